"""Serving latency and throughput of the real `bentoml serve`, with and without batching across requests.

Trains and promotes a quick model (by default ModelConfig's cell, hidden 256, 1 layer) into a temporary
CHAR_RNN_HOME, starts the server on a free loopback port (batching on, off, and on with 2 worker processes)
and keeps `concurrency` clients busy with 200-character generations. Prints p50/p95/p99 latency and generated
characters/s per point as a table; the last line is JSON. With batching on and one worker it also measures:
a mixed workload (p50/p99 of 20-character requests while 32 clients ask for 2000 characters), abandoned
requests (the worker's CPU for N requests of 2000 characters whose client leaves after 10 ms, against N
completed, and the generation steps each ran), and in-process the cost per character of `sample.generate_ids`
against a minimal NumPy loop (`sample_cost.py`). Targets (hidden 256, 2 cores): p50 <= 10 ms at concurrency
1; throughput at 32 >= 5x that at 1, batching on; short requests' p99 <= 50 ms under the long ones; abandoned
< 10% of completed; generate_ids at batch 1 within 1.2x of the minimal loop. The cores are shared: levels
alternate over rounds, and the server's CPU time per request (robust to contention) and the load average are
recorded.

    uv run python bench/serve_latency.py [--seconds 6] [--rounds 3] [--cell lstm] [--hidden 256] [--layers 1]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import common
import httpx
import numpy as np
import sample_cost

from model import corpus
from model.net import ModelConfig
from model.train import TrainConfig, train
from model.vocab import Vocab
from serving.metrics import FLUSH
from settings import ROOT, isolated_env

# a home of its own, before BentoML is imported (by registry): it reads BENTOML_HOME then
os.environ.update(
    isolated_env(Path(tempfile.mkdtemp(prefix="char-rnn-bench-serve-"))) | {"OPENBLAS_NUM_THREADS": "1"}
)
HOME, ENV = Path(os.environ["CHAR_RNN_HOME"]), dict(os.environ)

CHARS = 200
LEVELS = (1, 8, 32)
LONG, LONG_CLIENTS, SHORT = 2000, 32, 20  # the mixed workload's and abandoned requests' lengths


def promote_quick_model(cell: str, hidden: int, layers: int) -> str:
    """Train a few steps on tiny shakespeare (speed does not depend on quality) and promote it."""
    from registry import Registry

    text = corpus.read(ROOT / "data" / "tinyshakespeare.txt").text[:200_000]
    vocab = Vocab.from_text(text)
    ids = vocab.encode(text)
    cfg = ModelConfig(vocab_size=len(vocab), cell=cell, hidden=hidden, layers=layers, dropout=0.0)
    tc = TrainConfig(
        steps=20, batch=16, seq=32, warmup=0, eval_every=20, checkpoint_every=20, eval_chars=5000
    )
    ck = train(ids[:180_000], ids[180_000:], vocab, cfg, tc, HOME / "run")
    return Registry(HOME / "bentoml").promote(ck.path, {"source": "bench"}).tag


class Server:
    """`bentoml serve` from the repository root; stopped by the ids of its process and its workers."""

    def __init__(self, max_batch: int, workers: int):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.url = f"http://127.0.0.1:{s.getsockname()[1]}"
        port = self.url.rsplit(":", 1)[1]
        cmd = [sys.executable, "-m", "bentoml", "serve", "--host", "127.0.0.1", "--port", port]
        env = ENV | {"CHAR_RNN_MAX_BATCH": str(max_batch), "CHAR_RNN_WORKERS": str(workers)}
        self.log = open(HOME / f"server-{max_batch}-{workers}.log", "wb")  # noqa: SIM115
        self.proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=self.log, stderr=subprocess.STDOUT)
        self.pids = [self.proc.pid]

    def __enter__(self) -> Server:
        end = time.monotonic() + 120
        with httpx.Client(trust_env=False) as c:
            while time.monotonic() < end and self.proc.poll() is None:
                try:
                    if c.get(f"{self.url}/readyz").status_code == 200:
                        self.pids = process_tree(self.proc.pid)
                        return self
                except httpx.TransportError:
                    pass
                time.sleep(0.2)
        self.__exit__()
        raise RuntimeError(f"the server did not become ready; see {self.log.name}")

    def __exit__(self, *_: object) -> None:
        pids = process_tree(self.proc.pid)
        self.proc.terminate()  # the arbiter stops its workers
        try:
            self.proc.wait(20)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        for pid in pids[1:]:  # any worker left behind
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        self.log.close()


class Connection:
    """A minimal HTTP/1.1 keep-alive client for POST /generate: the load generator shares the cores with the
    server, so it must cost little CPU per request (httpx costs about as much as the server's HTTP stack)."""

    def __init__(self, host: str, port: int):
        self.host, self.port = host, port
        self.reader: asyncio.StreamReader | None = None
        self.writer: asyncio.StreamWriter | None = None

    async def send(self, path: str, body: dict) -> None:
        if self.writer is None:
            self.reader, self.writer = await asyncio.open_connection(self.host, self.port)
        data = json.dumps(body).encode()
        head = f"POST {path} HTTP/1.1\r\nHost: {self.host}\r\nContent-Type: application/json\r\n"
        self.writer.write(f"{head}Content-Length: {len(data)}\r\n\r\n".encode() + data)
        await self.writer.drain()

    async def post(self, path: str, body: dict) -> dict:
        await self.send(path, body)
        status, *lines = (await self.reader.readuntil(b"\r\n\r\n")).decode("latin-1").split("\r\n")
        if status.split()[1] != "200":
            raise RuntimeError(f"{status}")
        size = next(int(v) for k, _, v in (h.partition(":") for h in lines) if k.lower() == "content-length")
        return json.loads(await self.reader.readexactly(size))

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()


@dataclass
class Tally:
    """Requests at one concurrency, summed over rounds."""

    latencies: list[float] = field(default_factory=list)
    chars: int = 0
    wall: float = 0.0
    cpu: float = 0.0

    def row(self) -> dict:
        ms = np.array(self.latencies) * 1000
        return {
            "requests": len(ms),
            "p50_ms": round(float(np.percentile(ms, 50)), 2),
            "p95_ms": round(float(np.percentile(ms, 95)), 2),
            "p99_ms": round(float(np.percentile(ms, 99)), 2),
            "chars_per_s": round(self.chars / self.wall),
            "cpu_ms_per_req": round(self.cpu / len(ms) * 1000, 2),
        }


def process_tree(pid: int) -> list[int]:
    """`pid` and its descendants, from /proc (the server's workers run in sessions of their own)."""
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            children.setdefault(int(stat.read_text().rsplit(")", 1)[1].split()[1]), []).append(
                int(stat.parent.name)
            )
        except (OSError, IndexError, ValueError):
            continue
    tree, todo = [], [pid]
    while todo:
        tree.append(todo.pop())
        todo += children.get(tree[-1], [])
    return tree


def cpu_seconds(pids: list[int]) -> float:
    """CPU time (user + system) used so far by the live processes `pids`."""
    total = 0.0
    for pid in pids:
        try:
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        total += (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    return total


async def load(url: str, concurrency: int, seconds: float, tally: Tally, pids: list[int]) -> None:
    """`concurrency` clients sending requests back to back for `seconds` (after a short warm-up)."""
    host, port = url.removeprefix("http://").split(":")
    conns = [Connection(host, int(port)) for _ in range(concurrency)]

    async def worker(k: int, until: float, record: bool) -> None:
        i = k
        while time.perf_counter() < until:
            t = time.perf_counter()
            body = await conns[k].post("/generate", {"prompt": "ROMEO:", "max_new_chars": CHARS, "seed": i})
            i += concurrency
            if record:
                tally.latencies.append(time.perf_counter() - t)
                tally.chars += sum(map(len, body["completions"]))

    warm = time.perf_counter() + 0.3
    await asyncio.gather(*(worker(k, warm, False) for k in range(concurrency)))
    t0, cpu0 = time.perf_counter(), cpu_seconds(pids)
    await asyncio.gather(*(worker(k, t0 + seconds, True) for k in range(concurrency)))
    tally.wall += time.perf_counter() - t0
    tally.cpu += cpu_seconds(pids) - cpu0
    for c in conns:
        c.close()


def percentiles(seconds: list[float]) -> dict:
    ms = np.array(seconds) * 1000
    return {
        "p50_ms": round(float(np.percentile(ms, 50)), 2),
        "p99_ms": round(float(np.percentile(ms, 99)), 2),
    }


async def mixed(url: str, seconds: float) -> dict:
    """One client's SHORT-character requests, back to back, while LONG_CLIENTS ask for LONG characters."""
    host, port = url.removeprefix("http://").split(":")
    conns = [Connection(host, int(port)) for _ in range(LONG_CLIENTS + 1)]
    stop, done = asyncio.Event(), [0]

    async def long_client(k: int) -> None:
        while not stop.is_set():
            await conns[k].post("/generate", {"prompt": "ROMEO:", "max_new_chars": LONG, "seed": k})
            done[0] += 1

    tasks = [asyncio.create_task(long_client(k)) for k in range(LONG_CLIENTS)]
    await asyncio.sleep(1.0)  # the long requests are running
    latencies, end = [], time.perf_counter() + seconds
    while time.perf_counter() < end:
        t = time.perf_counter()
        await conns[-1].post(
            "/generate", {"prompt": "ROMEO:", "max_new_chars": SHORT, "seed": len(latencies)}
        )
        latencies.append(time.perf_counter() - t)
    stop.set()
    await asyncio.gather(*tasks)
    for c in conns:
        c.close()
    return {"short_requests": len(latencies), "long_requests": done[0]} | percentiles(latencies)


async def quiet(pids: list[int]) -> None:
    """Until the server uses less than 4% of a core (its work done), checked every 0.25 s."""
    before = cpu_seconds(pids)
    while True:
        await asyncio.sleep(0.25)
        now = cpu_seconds(pids)
        if now - before < 0.01:
            return
        before = now


async def steps(url: str) -> float:
    """Generation steps the server has run (its char_rnn_batch_rows histogram's count), once its metrics
    flusher has reported them."""
    await asyncio.sleep(FLUSH + 0.2)
    text = httpx.get(f"{url}/metrics", trust_env=False).text
    counts = [line.split()[-1] for line in text.splitlines() if line.startswith("char_rnn_batch_rows_count")]
    return sum(map(float, counts))


async def abandoned(url: str, pids: list[int], n: int) -> dict:
    """The server's CPU seconds and generation steps for n requests of LONG characters, one at a time (the
    server idle before and after each): n completed, then n whose client closes the connection 10 ms after
    sending. The idle server's own CPU rate, measured first, is subtracted."""
    host, port = url.removeprefix("http://").split(":")
    body = {"prompt": "ROMEO:", "max_new_chars": LONG}
    await quiet(pids)
    cpu0, t0 = cpu_seconds(pids), time.perf_counter()
    await asyncio.sleep(2.0)
    idle = (cpu_seconds(pids) - cpu0) / (time.perf_counter() - t0)  # CPU seconds per second
    cpu, ran = {}, {}
    for kind in ("completed", "abandoned"):
        steps0, cpu0, t0 = await steps(url), cpu_seconds(pids), time.perf_counter()
        for _ in range(n):
            conn = Connection(host, int(port))
            if kind == "completed":
                await conn.post("/generate", body)
            else:
                await conn.send("/generate", body)
                await asyncio.sleep(0.01)
            conn.close()
            await quiet(pids)
        cpu[kind] = round(cpu_seconds(pids) - cpu0 - idle * (time.perf_counter() - t0), 3)
        ran[kind] = round((await steps(url) - steps0) / n, 1)
    ratio = round(cpu["abandoned"] / cpu["completed"], 3)
    return {"n": n, "cpu_s": cpu, "steps_per_request": ran, "idle_cpu_per_s": round(idle, 4), "ratio": ratio}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--seconds", type=float, default=6.0, help="measured time per point")
    ap.add_argument("--rounds", type=int, default=3, help="alternations of the levels, against drifting load")
    ap.add_argument(
        "--cell", choices=["rnn", "gru", "lstm"], default=ModelConfig.model_fields["cell"].default
    )
    ap.add_argument("--hidden", type=int, default=256)
    ap.add_argument("--layers", type=int, default=1)
    ap.add_argument("--abandoned", type=int, default=15, help="requests abandoned, and completed")
    a = ap.parse_args()
    load_before = [round(x, 2) for x in os.getloadavg()]
    tag = promote_quick_model(a.cell, a.hidden, a.layers)
    rows, extra = [], {}
    for batching, max_batch, workers in (("on", 64, 1), ("off", 1, 1), ("on", 64, 2)):
        with Server(max_batch, workers) as server:
            tallies = {c: Tally() for c in LEVELS}
            for r in range(a.rounds):
                for c in LEVELS if r % 2 == 0 else LEVELS[::-1]:
                    asyncio.run(load(server.url, c, a.seconds / a.rounds, tallies[c], server.pids))
            for c, tally in tallies.items():
                rows.append({"batching": batching, "workers": workers, "concurrency": c} | tally.row())
            if (batching, workers) == ("on", 1):
                extra["mixed"] = asyncio.run(mixed(server.url, a.seconds))
                extra["abandoned"] = asyncio.run(abandoned(server.url, server.pids, a.abandoned))
    extra["cost"] = sample_cost.cost(a.cell, a.hidden, a.layers)
    cols = ("batching", "workers", "concurrency", "requests", "p50_ms", "p95_ms", "p99_ms", "chars_per_s")
    cols += ("cpu_ms_per_req",)
    size = f"{a.cell}, hidden {a.hidden} x {a.layers} layer(s)"
    load_after = [round(x, 2) for x in os.getloadavg()]
    print(f"{tag}: {size}, {CHARS} chars/request, {os.cpu_count()} cores")
    print(f"BLAS {common.blas_name()}: 1 thread per server worker and in-process (cost per char)")
    print(f"load average (1, 5, 15 min): {load_before} before, {load_after} after")
    print(" ".join(f"{c:>14}" for c in cols))
    for r in rows:
        print(" ".join(f"{r[c]:>14}" for c in cols))
    rate = {(r["batching"], r["workers"], r["concurrency"]): r["chars_per_s"] for r in rows}
    scale = {f"{b}/{w}w": round(rate[(b, w, 32)] / rate[(b, w, 1)], 2) for b, w, _ in rate if _ == 1}
    p50_c1 = next(r["p50_ms"] for r in rows if r["batching"] == "on" and r["concurrency"] == 1)
    print("throughput at 32 / at 1: " + ", ".join(f"{k} {v}x" for k, v in scale.items()))
    m, ab, cost = extra["mixed"], extra["abandoned"], extra["cost"]
    print(
        f"mixed: {SHORT}-char requests while {LONG_CLIENTS} clients ask for {LONG}: p50 {m['p50_ms']} ms, "
        f"p99 {m['p99_ms']} ms ({m['short_requests']} short, {m['long_requests']} long completed)"
    )
    print(
        f"abandoned after 10 ms: {ab['n']} requests of {LONG} chars cost {ab['cpu_s']['abandoned']} s of "
        f"server CPU, {ab['n']} completed {ab['cpu_s']['completed']} s: ratio {ab['ratio']} (one at a time; "
        f"the idle server's {ab['idle_cpu_per_s']} CPU s/s subtracted); generation steps per request: "
        f"{ab['steps_per_request']['abandoned']} abandoned, {ab['steps_per_request']['completed']} completed"
    )
    for r in cost:
        print(
            f"generate_ids at batch {r['batch']}: {r['generate_ids_us']} us/char, minimal loop "
            f"{r['minimal_us']} us/char: ratio {r['ratio']}"
        )
    targets = {"p50_c1_le_10ms": p50_c1 <= 10, "c32_over_c1_ge_5x": scale["on/1w"] >= 5}
    targets |= {"short_p99_le_50ms": m["p99_ms"] <= 50, "abandoned_lt_10pct": ab["ratio"] < 0.1}
    targets["generate_ids_b1_le_1.2x"] = cost[0]["ratio"] <= 1.2
    summary = {"model": tag, "cell": a.cell, "hidden": a.hidden, "layers": a.layers, "chars": CHARS}
    summary |= {"load_avg_before": load_before, "load_avg_after": load_after, "results": rows} | extra
    print(json.dumps(summary | {"scale_32_over_1": scale, "targets_met": targets}))
    shutil.rmtree(HOME, ignore_errors=True)  # kept when a run fails, for the server logs


if __name__ == "__main__":
    main()
