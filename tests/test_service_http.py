"""Integration: a real `bentoml serve` subprocess on a free loopback port, with its own CHAR_RNN_HOME.

It starts with no model (503), picks up a promoted one, then switches to a second while clients keep sending
requests: no request fails, and every response is wholly the work of the model it names. Models are promoted
by a separate process, as the pipeline would."""

import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import pytest
from test_service import EXTRA, events, expected, tiny_checkpoint

from settings import isolated_env

ROOT = Path(__file__).resolve().parent.parent
ASTRAL = "\U0001f600 \U0001d11e \U00010348\n"  # characters outside the Basic Multilingual Plane
PROMOTE = (
    "import os, sys; from pathlib import Path; from registry import Registry; "
    "print(Registry(Path(os.environ['BENTOML_HOME'])).promote(Path(sys.argv[1]), {'source': 'tests'}).tag)"
)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def process_tree(pid: int) -> list[int]:
    """`pid` and its descendants, from /proc (BentoML's workers run in sessions of their own)."""
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            ppid = int(stat.read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, IndexError, ValueError):
            continue
        children.setdefault(ppid, []).append(int(stat.parent.name))
    tree, todo = [], [pid]
    while todo:
        tree.append(todo.pop())
        todo += children.get(tree[-1], [])
    return tree


def wait_for(check, timeout: float, what: str) -> None:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if check():
            return
        time.sleep(0.1)
    pytest.fail(f"timed out waiting for {what}")


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    """(client, env of the server's home); the server and its workers are stopped by their PIDs."""
    home = tmp_path_factory.mktemp("serve-home")
    (home / "user-home").mkdir()  # HOME: must stay empty
    env = os.environ | isolated_env(home) | {"CHAR_RNN_RELOAD_INTERVAL": "0.3", "OPENBLAS_NUM_THREADS": "1"}
    env |= {"HOME": str(home / "user-home")}
    port = free_port()
    cmd = [sys.executable, "-m", "bentoml", "serve", "--host", "127.0.0.1", "--port", str(port)]
    with open(home / "server.log", "wb") as log:
        proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)
    client = httpx.Client(base_url=f"http://127.0.0.1:{port}", trust_env=False, timeout=30)
    try:

        def up() -> bool:
            assert proc.poll() is None, (home / "server.log").read_text()
            try:
                return client.get("/livez").status_code == 200
            except httpx.TransportError:
                return False

        wait_for(up, 90, "the server to start")
        yield client, env
    finally:
        client.close()
        pids = process_tree(proc.pid)
        proc.terminate()  # the arbiter stops its workers
        try:
            proc.wait(20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        for pid in pids[1:]:  # any worker left behind
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)


def promote(ck_dir: Path, env: dict) -> str:
    """Promote in another process into the server's home, as the pipeline does; the new tag."""
    cmd = [sys.executable, "-c", PROMOTE, str(ck_dir)]
    out = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    return out.stdout.split()[-1]


def serves(client: httpx.Client, tag: str) -> bool:
    r = client.post("/model_info")
    return r.status_code == 200 and r.json()["model"] == tag


def test_starts_without_a_model_then_hot_reloads_under_load(server, small_text, tmp_path):
    client, env = server
    assert client.get("/readyz").status_code == 503
    r = client.post("/generate", json={})
    assert r.status_code == 503 and "char-rnn pipeline" in r.json()["error"]

    cks = {}
    ck = tiny_checkpoint(small_text + EXTRA, tmp_path / "a", seed=0)
    tag_a = promote(ck.path, env)
    cks[tag_a] = ck
    wait_for(lambda: serves(client, tag_a), 20, f"the server to load {tag_a}")
    assert client.get("/readyz").status_code == 200

    results: list[list[tuple[dict, httpx.Response]]] = [[] for _ in range(4)]
    stop = threading.Event()

    def loop(k: int) -> None:  # bounded in count and time
        end = time.monotonic() + 90
        for i in range(3000):
            if stop.wait(0.02) or time.monotonic() > end:
                return
            req = {"prompt": "THE ", "max_new_chars": 30 + i % 7, "seed": 1000 * k + i, "temperature": 0.9}
            results[k].append((req, client.post("/generate", json=req)))

    threads = [threading.Thread(target=loop, args=(k,)) for k in range(4)]
    for t in threads:
        t.start()
    wait_for(lambda: sum(map(len, results)) >= 20, 30, "requests before the first switch")
    texts = {"b": small_text.upper() + EXTRA, "c": small_text + EXTRA + ASTRAL * 30}
    order = [tag_a]
    for seed, name in enumerate(texts, 1):  # two promotions while the clients keep asking
        ck = tiny_checkpoint(texts[name], tmp_path / name, seed=seed)
        tag = promote(ck.path, env)
        cks[tag] = ck
        order.append(tag)

        def switched(tag: str = tag) -> bool:
            answered = [r.json()["model"] for rs in results for _, r in rs if r.status_code == 200]
            return answered.count(tag) >= 20

        wait_for(switched, 30, f"responses from {tag}")
    stop.set()
    for t in threads:
        t.join()
    newest = order[-1]

    for rs in results:
        seen = []
        for req, r in rs:
            assert r.status_code == 200, r.text
            body = r.json()
            assert body["model"] in cks
            want = expected(cks[body["model"]], req["prompt"], req["max_new_chars"], 0.9, req["seed"])
            assert body["completions"] == want, "a response mixes models or is not its seed's"
            seen.append(body["model"])
        assert seen == sorted(seen, key=order.index), "a client went back to an older model"
    assert {m for rs in results for _, r in rs for m in [r.json()["model"]]} == set(order)

    r = client.post("/generate", json={"prompt": "\U0001f600 ", "max_new_chars": 20, "seed": 3})
    assert r.status_code == 200 and r.json()["model"] == newest, r.text
    assert r.json()["completions"] == expected(cks[newest], "\U0001f600 ", 20, 0.8, 3)

    req = {"prompt": "THE ", "max_new_chars": 50, "seed": 4}
    with client.stream("POST", "/generate_stream", json=req) as r:
        assert r.status_code == 200 and r.headers["x-model-tag"] == newest
        got = events(r.iter_text())
    assert ["".join(d["text"] for _, d in got[:-1])] == expected(cks[newest], "THE ", 50, 0.8, 4)


def test_a_rollback_switches_the_live_service_with_no_failed_request(server):
    """`char-rnn models rollback` (another process) while clients keep asking: the service answers with the
    rolled-back model within its reload interval, and no request fails on the way."""
    client, env = server
    before = client.post("/model_info").json()["model"]
    answers: list[list[tuple[float, httpx.Response]]] = [[] for _ in range(4)]  # (received at, response)
    stop = threading.Event()

    def loop(k: int) -> None:
        for i in range(3000):
            if stop.wait(0.01):
                return
            r = client.post("/generate", json={"prompt": "THE ", "max_new_chars": 20, "seed": 1000 * k + i})
            answers[k].append((time.monotonic(), r))

    def model(r: httpx.Response) -> str:
        return r.json()["model"] if r.status_code == 200 else f"{r.status_code}: {r.text}"

    threads = [threading.Thread(target=loop, args=(k,)) for k in range(4)]
    for t in threads:
        t.start()
    try:
        wait_for(lambda: sum(map(len, answers)) >= 20, 30, "requests before the rollback")
        cli = shutil.which("char-rnn")
        assert cli, "the char-rnn script is not on PATH; install the project (uv sync)"
        reason = "tests: rolled back under load"
        done = subprocess.run(
            [cli, "models", "rollback", "--reason", reason], env=env, capture_output=True, text=True
        )
        rolled = time.monotonic()
        assert done.returncode == 0, done.stderr
        target = done.stdout.split()[0]
        wait_for(
            lambda: sum(model(r) == target for rs in answers for _, r in rs) >= 20, 30, f"{target} answers"
        )
    finally:
        stop.set()
        for t in threads:
            t.join()

    assert target != before
    for rs in answers:
        models = [model(r) for _, r in rs]
        assert all(r.status_code == 200 for _, r in rs), [m for m in models if m not in (before, target)]
        assert models == sorted(models, key=[before, target].index), "a client went back to the old model"
    took = min(t for rs in answers for t, r in rs if model(r) == target) - rolled
    interval = float(env["CHAR_RNN_RELOAD_INTERVAL"])
    print(f"the service switched {took:.2f} s after `char-rnn models rollback` (reload every {interval} s)")
    assert took < interval + 2.0, "not within the reload interval (with 2 s for a busy machine)"
    last = json.loads((Path(env["BENTOML_HOME"]) / "char-rnn-promoted.json").read_text())["entries"][-1]
    assert (last["tag"], last["action"], last["reason"]) == (target, "rollback", reason)


def test_bentoml_build_bundles_the_promoted_model(server):
    client, env = server
    tag = client.post("/model_info").json()["model"]
    cmd = [sys.executable, "-m", "bentoml", "build"]
    out = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=180)
    assert out.returncode == 0, out.stderr[-2000:]
    [bento] = (Path(env["BENTOML_HOME"]) / "bentos" / "char_rnn").glob("*/bento.yaml")
    assert f"tag: {tag}" in bento.read_text()


def test_nothing_was_written_under_home(server):
    """`bentoml serve`, the promotions and `bentoml build` above kept their state out of ~."""
    _, env = server
    assert sorted(Path(env["HOME"]).rglob("*")) == []
