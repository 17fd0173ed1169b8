"""The playground page in a real browser: Debian's headless Chromium (/usr/bin/chromium, which `make test`
installs when missing) driven by Playwright, against a real `bentoml serve` that wants an API key. Screenshots
of each state are saved under the test's tmp folder (`screenshots/`)."""

import os
import re
import time
from pathlib import Path

import pytest
from playwright.sync_api import Page, expect, sync_playwright
from test_service import EXTRA, tiny_checkpoint
from test_service_http import promote, running, server_env

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
    end = time.monotonic() + 60
    while time.monotonic() < end and "characters in" not in (page.locator("#status").text_content() or ""):
        if len(page.locator(".generated").text_content() or "") and not (shots / "03-streaming.png").exists():
            page.screenshot(path=shots / "03-streaming.png")
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
