"""Integration: a real `bentoml serve` subprocess on a free loopback port, with its own CHAR_RNN_HOME.

It starts with no model (503), picks up a promoted one, then switches to a second while clients keep sending
requests: no request fails, and every response is wholly the work of the model it names. Models are promoted
by a separate process, as the pipeline would."""

import asyncio
import contextlib
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import bentoml
import httpx
import pytest
from conftest import free_port
from prometheus_client.parser import text_string_to_metric_families
from test_service import EXTRA, events, expected, tiny_checkpoint

from settings import isolated_env

ROOT = Path(__file__).resolve().parent.parent
ASTRAL = "\U0001f600 \U0001d11e \U00010348\n"  # characters outside the Basic Multilingual Plane
PROMOTE = (
    "import os, sys; from pathlib import Path; from registry import Registry; "
    "r = Registry(Path(os.environ['BENTOML_HOME'])); "
    "print(*(r.promote(Path(d), {'source': 'tests'}).tag for d in sys.argv[1:]))"
)


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


@dataclass
class Live:
    client: httpx.Client
    env: dict[str, str]  # the server's environment
    log: Path
    pid: int
    port: int


def server_env(home: Path, **extra: str) -> dict[str, str]:
    """The environment of a server whose state is all under `home` (its HOME too, which must stay empty)."""
    (home / "user-home").mkdir(exist_ok=True)
    env = os.environ | isolated_env(home) | {"CHAR_RNN_RELOAD_INTERVAL": "0.3", "OPENBLAS_NUM_THREADS": "1"}
    return env | {"HOME": str(home / "user-home")} | extra


@contextlib.contextmanager
def running(env: dict[str, str], log: Path, *bento: str) -> Iterator[Live]:
    """`char-rnn serve` (or `bentoml serve BENTO`, a built one) on a free loopback port, without --host: the
    service's own settings choose where it listens. The server and its workers are stopped by their PIDs."""
    port = free_port()
    cmd = [sys.executable, "-m", "bentoml", "serve", *bento] if bento else ["char-rnn", "serve"]
    with open(log, "wb") as out:
        proc = subprocess.Popen([*cmd, "--port", str(port)], cwd=ROOT, env=env, stdout=out, stderr=out)
    client = httpx.Client(base_url=f"http://127.0.0.1:{port}", trust_env=False, timeout=30)
    try:

        def up() -> bool:
            assert proc.poll() is None, log.read_text()
            try:
                return client.get("/livez").status_code == 200
            except httpx.TransportError:
                return False

        wait_for(up, 90, "the server to start")
        yield Live(client, env, log, proc.pid, port)
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


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    """(client, env of the server's home), starting without a model."""
    home = tmp_path_factory.mktemp("serve-home")
    with running(server_env(home), home / "server.log") as live:
        yield live.client, live.env


def promote(env: dict, *ck_dirs: Path) -> list[str]:
    """Promote in another process into the server's home, as the pipeline does, in order; the new tags."""
    cmd = [sys.executable, "-c", PROMOTE, *map(str, ck_dirs)]
    out = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    return out.stdout.split()[-len(ck_dirs) :]


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
    [tag_a] = promote(env, ck.path)
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
        [tag] = promote(env, ck.path)
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


def test_bentoml_clients_take_keyword_arguments_stream_events_and_raise_clean_errors(server):
    """bentoml.SyncHTTPClient / AsyncHTTPClient: `generate(prompt=..., ...)` as the API is documented, the
    stream's events as they arrive, and the service's own 400 bodies in the exceptions they raise."""
    client, _ = server
    url = str(client.base_url)
    req = {"prompt": "THE ", "max_new_chars": 40, "seed": 11, "temperature": 0.7}
    want = client.post("/generate", json=req).json()
    with bentoml.SyncHTTPClient(url) as c:
        assert c.generate(**req) | {"elapsed_ms": 0} == want | {"elapsed_ms": 0}
        chunks = list(c.generate_stream(**req))
        with pytest.raises(bentoml.exceptions.InvalidArgument) as bad:
            c.generate(prompt="THE ", temperature=0)
        with pytest.raises(bentoml.exceptions.InvalidArgument) as unknown:
            c.generate(prompt="THE \u2708")
        skipped = c.generate(prompt="THE \u2708", max_new_chars=5, unknown_chars="skip")
        with pytest.raises(TypeError, match="length"):  # the client checks names against the API's schema
            c.generate(prompt="THE ", length=5)
    assert isinstance(chunks[0], str) and chunks[0].startswith("data: ")  # events as they come, not one body
    got = events(chunks)
    assert ["".join(d["text"] for _, d in got[:-1])] == want["completions"]
    assert got[-1] == ("done", {"model": want["model"], "chars": 40})

    assert bad.value.error_code == 400
    [err] = json.loads(str(bad.value))["detail"]
    assert err["loc"] == ["temperature"] and err["type"] == "greater_than_equal"
    [err] = json.loads(str(unknown.value))["detail"]
    assert (
        err["type"] == "unknown_chars"
        and err["chars"] == ["\u2708"]
        and '"unknown_chars": "skip"' in err["msg"]
    )
    assert skipped["skipped_chars"] == ["\u2708"]
    for e in (bad.value, unknown.value):
        assert "IODescriptor" not in str(e) and "pydantic" not in str(e)

    async def use_async() -> tuple[dict, list[str]]:
        async with bentoml.AsyncHTTPClient(url) as c:
            answer = await c.generate(**req)
            chunks = [chunk async for chunk in c.generate_stream(**req)]
            with pytest.raises(bentoml.exceptions.InvalidArgument, match="max_new_chars"):
                await c.generate(max_new_chars=0)
        return answer, chunks

    answer, chunks = asyncio.run(use_async())
    got = events(chunks)
    assert answer["completions"] == want["completions"] == ["".join(d["text"] for _, d in got[:-1])]


def scrape(client: httpx.Client) -> dict[tuple[str, tuple], float]:
    """Every sample on /metrics: (name, sorted labels) -> value."""
    r = client.get("/metrics")
    assert r.status_code == 200
    families = text_string_to_metric_families(r.text)
    return {(s.name, tuple(sorted(s.labels.items()))): s.value for f in families for s in f.samples}


def rows_9_to_16(metrics: dict) -> float:
    """Generation steps of 9 to 16 rows so far."""
    bucket = "char_rnn_batch_rows_bucket"
    return metrics.get((bucket, (("le", "16.0"),)), 0) - metrics.get((bucket, (("le", "8.0"),)), 0)


def settled(client: httpx.Client) -> dict[tuple[str, tuple], float]:
    """The metrics once all that the service did before has reached them. The generation thread's reports
    reach the metrics in the order they were made, so it sends a marker: a request of 16 rows, the only one of
    these tests to step 9 to 16 rows alone, and waits until that step is counted."""
    before = scrape(client)
    assert client.post("/generate", json={"max_new_chars": 1, "num_samples": 16}).status_code == 200
    seen: dict = {}

    def counted() -> bool:
        seen.update(scrape(client))
        return rows_9_to_16(seen) > rows_9_to_16(before)

    wait_for(counted, 10, "the marker request to be counted")
    return seen


def test_metrics_count_what_the_service_did(server):
    client, _ = server
    tag = client.post("/model_info").json()["model"]
    before = settled(client)  # the earlier tests' reports included
    r = client.post("/generate", json={"prompt": "THE ", "max_new_chars": 25, "num_samples": 3})
    assert r.status_code == 200
    with client.stream("POST", "/generate_stream", json={"max_new_chars": 20}) as r:
        assert events(r.iter_text())[-1][0] == "done"
    assert client.post("/generate", json={"temperature": 0}).status_code == 400
    assert client.post("/generate", content=b"x", headers={"content-type": "text/plain"}).status_code == 415
    grew = {
        ("char_rnn_generated_chars_total", (("route", "/generate"),)): 75,
        ("char_rnn_generated_chars_total", (("route", "/generate_stream"),)): 20,
        ("char_rnn_requests_total", (("route", "/generate"), ("status", "200"))): 1,
        ("char_rnn_requests_total", (("route", "/generate"), ("status", "400"))): 1,
        ("char_rnn_requests_total", (("route", "/generate"), ("status", "415"))): 1,
        ("char_rnn_requests_total", (("route", "/generate_stream"), ("status", "200"))): 1,
        # steps: 28 of 3 rows (3 more reading "THE ", whose 4th step gives the first character), 20 of 1
        ("char_rnn_batch_rows_count", ()): 28 + 20,
        ("char_rnn_batch_rows_sum", ()): 84 + 20,
        ("char_rnn_batch_rows_bucket", (("le", "2.0"),)): 20,
        ("char_rnn_batch_rows_bucket", (("le", "4.0"),)): 48,
        ("char_rnn_time_to_first_char_seconds_count", ()): 2,
    }
    seen: dict = {}

    def counted() -> bool:  # the generation thread's reports are flushed every half second
        seen.update(scrape(client))
        return all(seen.get(k, 0) - before.get(k, 0) == n for k, n in grew.items())

    wait_for(counted, 10, "the metrics to count the requests")
    assert {k: seen[k] - before.get(k, 0) for k in grew} == grew
    assert seen[("char_rnn_queue_depth", ())] == 0
    assert 0 < seen[("char_rnn_time_to_first_char_seconds_sum", ())] < 30
    info = {dict(k[1])["tag"]: v for k, v in seen.items() if k[0] == "char_rnn_model_info"}
    assert info.pop(tag) == 1 and len(info) >= 2 and set(info.values()) == {0}  # the models it served before
    assert any(k[0].startswith("bentoml_service_request") for k in seen)  # beside BentoML's own


def in_progress(client: httpx.Client, route: str) -> float:
    """Requests to `route` in progress, by BentoML's own gauge (its outermost middleware counts a request from
    its start; this scrape is answered after the handlers that started before it have queued their jobs)."""
    got = scrape(client)
    name = "bentoml_service_request_in_progress"
    return sum(v for (n, labels), v in got.items() if n == name and ("endpoint", route) in labels)


def after_disconnect(seen: dict, before: dict) -> tuple[float, float]:
    """Requests counted by char_rnn_steps_after_disconnect since `before`: all, and those within 2 steps."""
    name, within = "char_rnn_steps_after_disconnect", (("le", "2.0"),)
    count, le2 = (name + "_count", ()), (name + "_bucket", within)
    return seen[count] - before.get(count, 0), seen[le2] - before.get(le2, 0)


FINISHED = len("THE ") - 1 + 2000  # the steps these requests (prompt "THE ", 2000 characters) take to the end


def test_a_disconnected_generate_clients_rows_leave_the_batch(server):
    """Clients that close their connection while their /generate runs (8 x 16 rows of 2000 characters) take
    their rows out of the batch: counted as cancelled for "disconnect", after far fewer than 2000 steps."""
    client, _ = server
    before = settled(client)
    body = json.dumps({"prompt": "THE ", "max_new_chars": 2000, "num_samples": 16}).encode()
    head = (
        f"POST /generate HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: {len(body)}"
    )
    socks = [socket.create_connection((client.base_url.host, client.base_url.port)) for _ in range(8)]
    for s in socks:
        s.sendall(head.encode() + b"\r\n\r\n" + body)
    wait_for(lambda: in_progress(client, "/generate") == 8, 10, "the requests to be in progress")
    for s in socks:
        s.close()
    key = ("char_rnn_rows_cancelled_total", (("reason", "disconnect"),))
    seen: dict = {}

    def counted() -> bool:
        seen.update(scrape(client))
        return seen.get(key, 0) - before.get(key, 0) == 8 * 16

    wait_for(counted, 20, "the disconnected clients' rows to be cancelled")
    steps = ("char_rnn_batch_rows_count", ())
    assert seen[steps] - before.get(steps, 0) < FINISHED  # cut short; how soon is the next line's measure
    assert after_disconnect(seen, before) == (8, 8)  # once per request, each within 2 steps of its cancel
    assert client.post("/generate", json={"max_new_chars": 5}).status_code == 200  # the service goes on


def test_a_stream_whose_client_leaves_takes_its_row_out_of_the_batch(server):
    """Clients that close their connection once their /generate_stream has sent its first event (8 streams of
    2000 characters) take their rows out of the batch: cancelled for "disconnect", far fewer steps run."""
    client, _ = server
    before = scrape(client)
    body = json.dumps({"prompt": "THE ", "max_new_chars": 2000}).encode()
    head = "POST /generate_stream HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
    head += f"Content-Length: {len(body)}\r\n\r\n"
    socks = [
        socket.create_connection((client.base_url.host, client.base_url.port), timeout=30) for _ in range(8)
    ]
    for s in socks:
        s.sendall(head.encode() + body)
    for s in socks:  # each is generating once its first event arrives
        got = b""
        while b"data: " not in got:
            chunk = s.recv(4096)
            assert chunk, got
            got += chunk
        assert got.startswith(b"HTTP/1.1 200"), got
        s.close()
    key = ("char_rnn_rows_cancelled_total", (("reason", "disconnect"),))
    seen: dict = {}

    def counted() -> bool:
        seen.update(scrape(client))
        return seen.get(key, 0) - before.get(key, 0) == 8

    wait_for(counted, 20, "the streams' rows to be cancelled")
    steps = ("char_rnn_batch_rows_count", ())
    assert seen[steps] - before.get(steps, 0) < FINISHED  # cut short; how soon is the next line's measure
    assert after_disconnect(seen, before) == (8, 8)
    assert client.post("/generate", json={"max_new_chars": 5}).status_code == 200  # the service goes on


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


def without_uv(env: dict[str, str]) -> dict[str, str]:
    """`env` with no `uv` on its PATH: BentoML must find the project's own (a dependency), as on a machine
    whose only uv is `make`'s private one."""
    path = os.pathsep.join(d for d in env["PATH"].split(os.pathsep) if not (Path(d) / "uv").exists())
    assert shutil.which("uv", path=path) is None
    return env | {"PATH": path}


def test_a_built_bento_serves_its_model_the_playground_and_metrics(server, small_text, tmp_path):
    """`stages.bento.build` bundles the promoted model and the page into a Bento of the model's version;
    `bentoml serve <bento>` serves that model, also once another one has been promoted."""
    client, env = server
    tag = client.post("/model_info").json()["model"]
    code = f"from stages.bento import build; print(build({tag!r}))"
    build = [sys.executable, "-c", code]
    out = subprocess.run(build, cwd=ROOT, env=without_uv(env), capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    version = tag.split(":")[1]
    assert out.stdout.split()[-1] == f"char_rnn:{version}"
    bento = Path(env["BENTOML_HOME"]) / "bentos" / "char_rnn" / version / "bento.yaml"
    assert f"tag: {tag}" in bento.read_text()
    assert (bento.parent / "src" / "serving" / "static" / "playground.js").is_file()
    [newer] = promote(env, tiny_checkpoint(small_text + EXTRA, tmp_path / "newer", seed=9).path)
    wait_for(lambda: serves(client, newer), 20, f"the service to load {newer}")

    with running(env, tmp_path / "bento.log", f"char_rnn:{version}") as live:
        built = live.client
        assert built.post("/model_info").json()["model"] == tag
        page = built.get("/")
        assert page.status_code == 200 and 'src="playground.js"' in page.text
        assert built.get("/playground.js").headers["content-type"].startswith("text/javascript")
        assert built.get("/playground.css").status_code == 200
        assert built.post("/generate", json={"max_new_chars": 5}).json()["model"] == tag
        view = built.post("/models").json()
        assert view["serving"] == tag and [r["tag"] for r in view["history"] if r["serving"]] == [tag]
        assert view["curve"]["val"]
        assert f'char_rnn_model_info{{tag="{tag}"}} 1.0' in built.get("/metrics").text


def test_plain_bentoml_serve_from_the_checkout_serves_the_projects_models(small_text, tmp_path):
    """`bentoml serve` from the repository root, BentoML's own first command, with neither BENTOML_HOME nor
    PREFECT_HOME exported: the service serves what the pipeline promoted under CHAR_RNN_HOME."""
    home = tmp_path / "home"
    home.mkdir()
    env = server_env(home)
    [tag] = promote(env, tiny_checkpoint(small_text + EXTRA, tmp_path / "ck", seed=5).path)
    plain = {k: v for k, v in env.items() if k not in ("BENTOML_HOME", "PREFECT_HOME")}
    with running(plain, tmp_path / "plain.log", ".") as live:
        wait_for(lambda: serves(live.client, tag), 30, f"the service to serve {tag}")
        assert live.client.post("/generate", json={"max_new_chars": 5}).json()["model"] == tag


def test_nothing_was_written_under_home(server):
    """`bentoml serve`, the promotions and `bentoml build` above kept their state out of ~."""
    _, env = server
    assert sorted(Path(env["HOME"]).rglob("*")) == []


def listening_addresses(port: int) -> set[str]:
    """Local addresses of the sockets listening on `port`, from /proc/net/tcp and tcp6 (hex, as the kernel
    writes them)."""
    found = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        for line in Path(table).read_text().splitlines()[1:]:
            local, state = line.split()[1], line.split()[3]
            addr, hex_port = local.split(":")
            if state == "0A" and int(hex_port, 16) == port:
                found.add(addr)
    return found


KEY = "s3cret-key-for-tests"
METRICS_KEY = "scraper-key-for-tests"


@pytest.fixture(scope="module")
def guarded(tmp_path_factory, small_text):
    """A server with an API key, 4 requests in progress at most, and 1.5 s to receive a body; a model is
    promoted before it starts, and then the registry's history file is truncated."""
    home = tmp_path_factory.mktemp("guarded-home")
    limits = {"CHAR_RNN_API_KEY": KEY, "CHAR_RNN_MAX_CONCURRENCY": "4", "CHAR_RNN_BODY_TIMEOUT": "1.5"}
    limits |= {"CHAR_RNN_METRICS_KEY": METRICS_KEY}
    env = server_env(home, **limits)
    ck = tiny_checkpoint(small_text + EXTRA, tmp_path_factory.mktemp("guarded-run") / "ck", seed=3)
    [tag] = promote(env, ck.path)
    history = home / "bentoml" / "char-rnn-promoted.json"
    history.write_bytes(history.read_bytes()[:40])
    with running(env, home / "server.log") as live:
        wait_for(lambda: live.client.get("/readyz").status_code == 200, 30, "the model to load")
        yield live, tag


AUTH = {"Authorization": f"Bearer {KEY}"}


def test_a_damaged_history_neither_stops_the_service_nor_fills_its_log(guarded):
    """Each damage is said once, as one WARNING line: the watcher notices a new one (the only reader of the
    file while nobody asks), and reading it again (the models view reads it at each request) says nothing."""
    live, tag = guarded

    def said() -> list[str]:
        return [
            line for line in live.log.read_text().splitlines() if "char-rnn-promoted.json is damaged" in line
        ]

    assert live.client.post("/model_info", headers=AUTH).json()["model"] == tag  # found in the store
    assert len(said()) == 1
    history = Path(live.env["BENTOML_HOME"]) / "char-rnn-promoted.json"
    history.write_bytes(b'{"entries": [}')  # damaged otherwise
    wait_for(lambda: len(said()) == 2, 30, "the watcher to notice the new damage")
    for _ in range(3):
        assert live.client.post("/models", headers=AUTH).json()["serving"] == tag
    assert live.client.post("/model_info", headers=AUTH).json()["model"] == tag
    assert len(said()) == 2 and all("[WARNING]" in line for line in said())
    assert "Traceback" not in live.log.read_text()


def test_listens_on_loopback_only_unless_asked(guarded):
    live, _ = guarded
    assert listening_addresses(live.port) == {"0100007F"}  # 127.0.0.1, not 0.0.0.0 (00000000)


def test_the_api_key_guards_generation_and_model_info_only(guarded):
    live, tag = guarded
    client = live.client
    for route, body in (("/generate", {"max_new_chars": 5}), ("/generate_stream", {}), ("/model_info", None)):
        for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": KEY}):
            r = client.post(route, json=body, headers=headers)
            assert r.status_code == 401 and "API key" in r.json()["error"], (route, headers)
            assert r.headers["www-authenticate"] == "Bearer"
    assert client.post("/generate", json={"max_new_chars": 5}, headers=AUTH).json()["model"] == tag
    assert client.post("/model_info", headers=AUTH).json()["model"] == tag
    for route in ("/livez", "/readyz", "/docs.json", "/", "/docs"):
        assert client.get(route).status_code == 200, route


def test_the_metrics_need_their_own_key_when_one_is_set(guarded):
    """/metrics tells the model's tag, the request counts and the queue: with CHAR_RNN_METRICS_KEY set, a
    scraper needs that key (and the API key is not it)."""
    client = guarded[0].client
    for headers in ({}, {"Authorization": "Bearer wrong"}, AUTH):
        r = client.get("/metrics", headers=headers)
        assert r.status_code == 401 and "CHAR_RNN_METRICS_KEY" in r.json()["error"], (headers, r.text)
        assert r.headers["www-authenticate"] == "Bearer" and "char_rnn_" not in r.text
    r = client.get("/metrics", headers={"Authorization": f"Bearer {METRICS_KEY}"})
    assert r.status_code == 200 and "char_rnn_model_info" in r.text
    assert client.post("/model_info", headers={"Authorization": f"Bearer {METRICS_KEY}"}).status_code == 401


def test_the_pages_load_nothing_from_other_hosts(guarded):
    client = guarded[0].client
    assert "swagger-ui" in client.get("/docs").text and "playground.js" in client.get("/").text
    for route in ("/", "/docs"):
        page = client.get(route)
        assert page.status_code == 200 and "googletagmanager" not in page.text, route
        sources = re.findall(r'(?:src|href)="([^"]*)"', page.text)
        assert sources and not any(re.match(r"[a-z]+://|//", src) for src in sources), (
            sources
        )  # data: is fine


def stalled(port: int) -> socket.socket:
    """A connection that sends a request's headers, promising a body that never comes."""
    s = socket.create_connection(("127.0.0.1", port), timeout=10)
    s.sendall(
        b"POST /generate HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
        + f"Authorization: Bearer {KEY}\r\nContent-Length: 1000\r\n\r\n".encode()
    )
    return s


def test_stalled_bodies_cannot_lock_out_other_clients(guarded):
    """Three times more stalled sockets than requests allowed at once; a normal client keeps getting 200s
    within a bounded time, and each stalled socket gets 408 once the body timeout passes."""
    client = guarded[0].client
    sockets = [stalled(guarded[0].port) for _ in range(12)]
    try:
        t0 = time.monotonic()
        for _ in range(10):
            t = time.monotonic()
            r = client.post("/generate", json={"max_new_chars": 20}, headers=AUTH, timeout=5)
            assert r.status_code == 200 and time.monotonic() - t < 1.0, r.text
        answers = [s.recv(200) for s in sockets]
        assert all(a.startswith(b"HTTP/1.1 408") for a in answers), answers[:2]
        assert time.monotonic() - t0 < 10
    finally:
        for s in sockets:
            s.close()


def test_client_errors_are_one_warning_line_each(guarded):
    client, log = guarded[0].client, guarded[0].log
    before = log.read_text()
    bad = [
        ({"temperature": 99}, 400),
        ({"prompt": "✈ " * 3, "max_new_chars": 5}, 400),
        ({"length": 5}, 400),
    ]
    for body, status in bad:
        assert client.post("/generate", json=body, headers=AUTH).status_code == status
    assert (
        client.post(
            "/generate", content=b"{", headers=AUTH | {"content-type": "application/json"}
        ).status_code
        == 400
    )
    assert client.post("/model_info").status_code == 401

    def warnings() -> list[str]:
        return [
            line
            for line in log.read_text()[len(before) :].splitlines()
            if "-> 400" in line or "-> 401" in line
        ]

    wait_for(lambda: len(warnings()) >= 5, 10, "the five warnings")
    new = log.read_text()[len(before) :]
    assert len(warnings()) == 5 and all("[WARNING]" in w for w in warnings()), new
    assert "POST /generate -> 400: temperature: Input should be less than or equal to 5" in new
    assert "Traceback" not in new and "[ERROR]" not in new


def test_a_worker_that_dies_is_restarted_and_logged(guarded):
    live, tag = guarded
    (worker,) = [
        p
        for p in process_tree(live.pid)
        if b"_bentoml_impl.worker" in Path(f"/proc/{p}/cmdline").read_bytes()
    ]
    os.kill(worker, signal.SIGKILL)
    wait_for(lambda: f"(pid {worker}) died" in live.log.read_text(), 60, "the restart to be logged")
    wait_for(lambda: live.client.get("/readyz").status_code == 200, 60, "the new worker")
    assert live.client.post("/generate", json={"max_new_chars": 5}, headers=AUTH).json()["model"] == tag


def test_nothing_was_written_under_home_by_the_guarded_server(guarded):
    assert sorted(Path(guarded[0].env["HOME"]).rglob("*")) == []


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def generate(sock: socket.socket, port: int) -> tuple[bytes, socket.socket]:
    """POST /generate over a kept-alive socket: the status line, and the socket for the next request (a new
    one when the server said `Connection: close`)."""
    body = b'{"max_new_chars": 300}'
    head = "POST /generate HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
    sock.sendall(f"{head}Content-Length: {len(body)}\r\n\r\n".encode() + body)
    data = b""
    while b"\r\n\r\n" not in data:
        data += sock.recv(65536)
    header, _, rest = data.partition(b"\r\n\r\n")
    fields = dict(line.lower().split(b": ", 1) for line in header.split(b"\r\n")[1:])
    while len(rest) < int(fields[b"content-length"]):
        rest += sock.recv(65536)
    if fields.get(b"connection") == b"close":
        sock.close()
        sock = socket.create_connection(("127.0.0.1", port))
    return header.split(b"\r\n")[0], sock


def test_two_workers_share_clients_that_connect_at_once(small_text, tmp_path):
    """Eight keep-alive clients connect at the same moment, all waiting in the listening socket's queue, which
    lets the first worker to wake accept them all; the crowded worker sends clients to reconnect until both
    workers generate (each gains CPU time), and no request fails."""
    home = tmp_path / "home"
    home.mkdir()
    env = server_env(home, CHAR_RNN_WORKERS="2")
    promote(env, tiny_checkpoint(small_text, tmp_path / "ck").path)
    with running(env, home / "server.log") as live:
        wait_for(lambda: live.client.get("/readyz").status_code == 200, 60, "the model to load")
        workers = [
            p
            for p in process_tree(live.pid)
            if b"_bentoml_impl.worker" in Path(f"/proc/{p}/cmdline").read_bytes()
        ]
        assert len(workers) == 2
        socks = [socket.create_connection(("127.0.0.1", live.port)) for _ in range(8)]
        stop, statuses = threading.Event(), set()

        def client(sock: socket.socket) -> None:
            while not stop.is_set():
                status, sock = generate(sock, live.port)
                statuses.add(status)
            sock.close()

        threads = [threading.Thread(target=client, args=(s,)) for s in socks]
        before = {w: cpu_seconds(w) for w in workers}
        for t in threads:
            t.start()
        try:
            wait_for(lambda: all(cpu_seconds(w) - before[w] > 1.0 for w in workers), 120, "both workers")
        finally:
            stop.set()
            for t in threads:
                t.join()
        assert statuses == {b"HTTP/1.1 200 OK"}
