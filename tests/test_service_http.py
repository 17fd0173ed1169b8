"""Integration: a real `bentoml serve` subprocess on a free loopback port, with its own CHAR_RNN_HOME.

It starts with no model (503), picks up a promoted one, then switches to a second while clients keep sending
requests: no request fails, and every response is wholly the work of the model it names. Models are promoted
by a separate process, as the pipeline would."""

import contextlib
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import pytest
from test_service import EXTRA, expected, tiny_checkpoint

ROOT = Path(__file__).resolve().parent.parent
PROMOTE = "import sys; from flows import registry; print(registry.promote(sys.argv[1], {'source': 'tests'}))"


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
    env = os.environ | {
        "CHAR_RNN_HOME": str(home),
        "BENTOML_HOME": str(home / "bentoml"),
        "PREFECT_HOME": str(home / "prefect"),
        "CHAR_RNN_RELOAD_INTERVAL": "0.3",
        "OPENBLAS_NUM_THREADS": "1",
        "DO_NOT_TRACK": "1",
        "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
        "BENTOML_DO_NOT_TRACK": "True",
    }
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
        end = time.monotonic() + 40
        for i in range(1000):
            if stop.wait(0.02) or time.monotonic() > end:
                return
            req = {"prompt": "THE ", "max_new_chars": 30 + i % 7, "seed": 1000 * k + i, "temperature": 0.9}
            results[k].append((req, client.post("/generate", json=req)))

    threads = [threading.Thread(target=loop, args=(k,)) for k in range(4)]
    for t in threads:
        t.start()
    wait_for(lambda: sum(map(len, results)) >= 20, 30, "requests before the switch")
    ck = tiny_checkpoint(small_text.upper() + EXTRA, tmp_path / "b", seed=1)
    tag_b = promote(ck.path, env)
    cks[tag_b] = ck

    def after_switch() -> bool:
        return sum(r.json()["model"] == tag_b for rs in results for _, r in rs if r.status_code == 200) >= 20

    wait_for(after_switch, 30, f"responses from {tag_b}")
    stop.set()
    for t in threads:
        t.join()

    for rs in results:
        seen = []
        for req, r in rs:
            assert r.status_code == 200, r.text
            body = r.json()
            assert body["model"] in cks
            want = expected(cks[body["model"]], req["prompt"], req["max_new_chars"], 0.9, req["seed"])
            assert body["completions"] == want, "a response mixes models or is not its seed's"
            seen.append(body["model"])
        assert seen == sorted(seen, key=[tag_a, tag_b].index), "a client went back to the old model"

    req = {"prompt": "THE ", "max_new_chars": 50, "seed": 4}
    with client.stream("POST", "/generate_stream", json=req) as r:
        assert r.status_code == 200 and r.headers["x-model-tag"] == tag_b
        assert ["".join(r.iter_text())] == expected(cks[tag_b], "THE ", 50, 0.8, 4)


def test_bentoml_build_bundles_the_promoted_model(server):
    client, env = server
    tag = client.post("/model_info").json()["model"]
    cmd = [sys.executable, "-m", "bentoml", "build"]
    out = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=180)
    assert out.returncode == 0, out.stderr[-2000:]
    [bento] = (Path(env["BENTOML_HOME"]) / "bentos" / "char_rnn").glob("*/bento.yaml")
    assert f"tag: {tag}" in bento.read_text()
