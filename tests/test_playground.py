"""The playground page in a real browser: Debian's headless Chromium (/usr/bin/chromium, which `make test`
installs when missing) driven by Playwright, against a real `bentoml serve` (one that wants an API key; one
that starts with no model while a real pipeline run trains its first). Screenshots of each state are saved
under the test's tmp folder (`screenshots/`)."""

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from playwright.sync_api import Page, expect, sync_playwright
from test_service import EXTRA, tiny_checkpoint
from test_service_http import promote, running, server_env

ROOT = Path(__file__).resolve().parent.parent
CHAR_RNN = str(Path(sys.executable).parent / "char-rnn")  # the venv's, on PATH or not
CHROMIUM = Path("/usr/bin/chromium")  # Playwright's own browser download cannot be reached from here
FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
KEY = "playground-test-key"
# Records the generated text's length at every change of the page, into window.seenLengths.
WATCH_GROWTH = """() => {
    window.seenLengths = [];
    new MutationObserver(() => {
        const shown = document.querySelector(".generated");
        if (shown) window.seenLengths.push(shown.textContent.length);
    }).observe(document.body, {childList: true, subtree: true, characterData: true});
}"""
expect.set_options(timeout=20_000)  # a shared 2-core machine


@pytest.fixture(scope="module")
def served(tmp_path_factory, small_text):
    """(an httpx client that sends the key, the promoted tags oldest first) of a server that wants a key."""
    home = tmp_path_factory.mktemp("playground-home")
    env = server_env(home, CHAR_RNN_API_KEY=KEY)
    texts = [small_text + EXTRA, small_text.upper() + EXTRA]
    tags = promote(env, *(tiny_checkpoint(t, home / f"run-{i}", seed=i).path for i, t in enumerate(texts)))
    with running(env, home / "server.log") as live:
        client = live.client
        assert client.post("/model_info").status_code == 401  # the page must ask for the key
        assert client.get("/").status_code == 200  # while the page itself is public
        client.headers["Authorization"] = f"Bearer {KEY}"
        yield client, tags


@pytest.fixture
def browser_page(tmp_path):
    """A page in headless Chromium with a profile and HOME of its own under tmp_path."""
    assert CHROMIUM.exists(), "the browser test needs Debian's chromium: apt-get install -y chromium"
    (tmp_path / "home").mkdir()
    env = os.environ | {"HOME": str(tmp_path / "home"), "XDG_CONFIG_HOME": str(tmp_path / "home" / ".config")}
    with sync_playwright() as p:
        context = p.chromium.launch_persistent_context(
            str(tmp_path / "profile"),
            executable_path=str(CHROMIUM),
            headless=True,
            args=FLAGS,
            env=env,
            viewport={"width": 1280, "height": 900},
        )
        try:
            yield context.pages[0] if context.pages else context.new_page()
        finally:
            context.close()


def test_playground_in_a_real_browser(served, browser_page: Page, tmp_path):
    client, (older, newest) = served
    page, shots = browser_page, tmp_path / "screenshots"
    base = str(client.base_url).rstrip("/")
    requests, complaints = [], []
    page.on("request", lambda r: requests.append(r.url))
    page.on("console", lambda m: complaints.append(m.text) if "Security Policy" in m.text else None)
    page.on("pageerror", lambda e: complaints.append(str(e)))

    # The service wants a key: the page asks for it, says when it is wrong, then shows the served model.
    page.goto(base + "/")
    expect(page.locator("#key-form")).to_be_visible()
    page.screenshot(path=shots / "01-asks-for-the-key.png")
    page.fill("#key", "wrong")
    page.press("#key", "Enter")
    expect(page.locator("#key-error")).to_contain_text("refused")
    page.fill("#key", KEY)
    page.press("#key", "Enter")
    info = client.post("/model_info").json()
    expect(page.locator("#model-tag")).to_have_text(newest)
    expect(page.locator("#model-loss")).to_have_text(f"{info['val_loss']:.4f} nats/char")
    expect(page.locator("#model-date")).to_contain_text(info["trained_at"][:10])
    expect(page.locator("#model-vocab")).to_have_text(f"{len(info['vocab'])} characters")
    expect(page.locator("#key-form")).to_be_hidden()
    page.screenshot(path=shots / "02-loaded.png")

    # One sample streams in: the text grows while it is generated, and is what the API gives for that seed.
    page.fill("#prompt", "ROMEO:")
    page.fill("#max_new_chars", "2000")
    page.fill("#seed", "7")
    page.evaluate(WATCH_GROWTH)  # in the page: a stream may end before a poll from here sees it grow
    page.click("#generate")
    # The shot as soon as the page shows some text (a poll from here can miss a short stream's middle; the
    # page's own record of it, above, does not), then the end of the stream.
    page.wait_for_function("() => window.seenLengths.some((n) => n > 0)", timeout=60_000)
    page.screenshot(path=shots / "03-streaming.png")
    expect(page.locator("#status")).to_contain_text("characters in", timeout=60_000)
    lengths = page.evaluate("window.seenLengths")
    text = page.locator(".generated").text_content()
    partial = sorted(set(lengths) - {0, len(text)})
    status = page.locator("#status").text_content()
    assert len(partial) >= 2, f"the text did not grow while streaming: {lengths} ({status})"
    assert lengths == sorted(lengths)
    want = client.post("/generate", json={"prompt": "ROMEO:", "max_new_chars": 2000, "seed": 7}).json()
    assert [text] == want["completions"]
    expect(page.locator("#status")).to_contain_text("2000 characters in")
    page.screenshot(path=shots / "04-streamed.png")

    # Unknown characters: marked in the prompt, refused by the service, then skipped with one click.
    page.fill("#prompt", "ROMEO \u2708:")
    expect(page.locator("#prompt-marks mark")).to_have_text("\u2708")
    page.click("#generate")
    expect(page.locator("#error")).to_contain_text("not in the model's vocabulary")
    expect(page.locator("#skip")).to_be_visible()
    page.screenshot(path=shots / "05-unknown-characters.png")
    page.click("#skip")
    expect(page.locator("#unknown_chars")).to_have_value("skip")
    expect(page.locator("#status")).to_contain_text("2000 characters in")
    expect(page.locator("#error")).to_be_hidden()
    page.screenshot(path=shots / "06-skipped.png")

    # A field out of bounds is marked where it is; several samples come side by side.
    page.fill("#temperature", "9")
    page.click("#generate")
    expect(page.locator("#temperature")).to_have_class(re.compile("invalid"))
    expect(page.locator(".field-error")).to_contain_text("less than or equal to 5")
    page.screenshot(path=shots / "07-invalid-field.png")
    page.fill("#temperature", "0.8")
    page.fill("#prompt", "ROMEO:")
    page.fill("#max_new_chars", "60")
    page.fill("#num_samples", "3")
    page.click("#generate")
    expect(page.locator(".sample")).to_have_count(3)
    want = {"prompt": "ROMEO:", "max_new_chars": 60, "seed": 7, "num_samples": 3}
    assert (
        page.locator(".generated").all_text_contents()
        == client.post("/generate", json=want).json()["completions"]
    )
    page.screenshot(path=shots / "08-samples.png")

    # The models view: the history newest first, the serving one marked, the served model's loss curve.
    page.click("#tab-models")
    rows = page.locator("#history tbody tr")
    expect(rows).to_have_count(2)
    assert page.locator("#history td.tag").all_text_contents() == [newest, older]
    expect(rows.first).to_have_class("serving")
    expect(rows.first.locator("td.serving")).to_have_text("● serving")
    expect(page.locator("#curve polyline.val")).to_have_count(1)
    expect(page.locator("#curve circle.val")).not_to_have_count(0)
    page.screenshot(path=shots / "09-models.png", full_page=True)

    assert [u for u in requests if not u.startswith(base + "/")] == []  # nothing from any other host
    assert complaints == []
    assert len(list(shots.glob("*.png"))) == 9


def progress_of(runs: Path) -> dict:
    """The newest run's progress.json under `runs` (empty while there is none, or while it is replaced)."""
    found = sorted(runs.glob("run-*/progress.json"))
    try:
        return json.loads(found[-1].read_text()) if found else {}
    except (OSError, ValueError):
        return {}


def test_the_first_runs_progress_shows_live_and_the_page_switches_to_its_model(
    tmp_path, small_text, browser_page: Page
):
    """No model yet: the page shows the pipeline run's training as it goes (from the run folder's
    progress.json, through POST /training), then uses the model the moment it is promoted, with no reload."""
    home, corpus, shots = tmp_path / "char-rnn-home", tmp_path / "corpus", tmp_path / "screenshots"
    home.mkdir()
    corpus.mkdir()
    (corpus / "a.txt").write_text(small_text * 3, encoding="utf-8")
    env = server_env(home)
    page = browser_page
    loads = []
    page.on("load", lambda _: loads.append(1))
    with running(env, home / "server.log") as live:
        page.goto(str(live.client.base_url).rstrip("/") + "/")
        expect(page.locator("#no-model")).to_contain_text("no model has been promoted yet")
        expect(page.locator("#training")).to_be_hidden()
        page.screenshot(path=shots / "10-no-model.png")
        small = [
            "--hidden",
            "32",
            "--layers",
            "1",
            "--batch",
            "8",
            "--seq",
            "32",
            "--checkpoint-every",
            "100",
        ]
        cmd = [CHAR_RNN, "pipeline", "--data", str(corpus), "--steps", "3000", *small]
        with open(tmp_path / "pipeline.log", "wb") as out:
            run = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=out, stderr=out, start_new_session=True)
        try:
            # Hold the training still once its progress has a curve and a validation point, then look.
            end = time.monotonic() + 300
            while len((p := progress_of(home / "runs")).get("train", [])) < 3 or not p.get("val"):
                assert run.poll() is None, (tmp_path / "pipeline.log").read_text()[-3000:]
                assert time.monotonic() < end, "the run wrote no progress"
                time.sleep(0.05)
            os.killpg(run.pid, signal.SIGSTOP)
            step = progress_of(home / "runs")["step"]
            assert 0 < step < 3000
            expect(page.locator("#training")).to_have_attribute("data-state", "training")
            expect(page.locator("#train-step")).to_have_text(f"{step} / 3000")
            expect(page.locator("#train-eta")).to_have_text(re.compile(r"^\d+ (s|min \d\d s)$"))
            expect(page.locator("#train-val")).to_have_text(re.compile(r"^\d+\.\d{3} nats/char$"))
            expect(page.locator("#train-curve polyline.train")).to_have_count(1)
            expect(page.locator("#train-curve circle.val")).not_to_have_count(0)
            expect(page.locator("#no-model")).to_contain_text("The first model is training")
            page.screenshot(path=shots / "11-training.png", full_page=True)
            os.killpg(run.pid, signal.SIGCONT)
            assert run.wait(600) == 0, (tmp_path / "pipeline.log").read_text()[-3000:]
        finally:
            if run.poll() is None:
                os.killpg(run.pid, signal.SIGKILL)
                run.wait()
        tag = live.client.post("/model_info").json()["model"]
        expect(page.locator("#model-tag")).to_have_text(tag)  # switched, with no reload
        expect(page.locator("#no-model")).to_be_hidden()
        expect(page.locator("#training")).to_have_attribute("data-state", "promoted")
        expect(page.locator("#train-state")).to_contain_text(f"promoted as {tag}")
        expect(page.locator("#train-step")).to_have_text("3000 / 3000")
        page.screenshot(path=shots / "12-switched.png", full_page=True)
        assert loads == [1], "the page was reloaded"
        page.fill("#max_new_chars", "40")
        page.click("#generate")
        expect(page.locator("#status")).to_contain_text("40 characters in")
        expect(page.locator("#status")).to_contain_text(tag)
