"""Serving latency and throughput of the real `bentoml serve`, with and without batching across requests, and
what serving adds to a request's own computation.

Trains and promotes a quick model (by default ModelConfig's cell, hidden 256, 1 layer) into a temporary
CHAR_RNN_HOME, starts the server on a free loopback port (batching on, off, and on with 2 worker processes)
and keeps `concurrency` clients busy with 200-character generations: p50/p95/p99 latency, generated
characters/s, the server's CPU time per request (robust to other jobs on the cores), the event loops' part of
it (the workers' main threads), the busiest server process's share of it (with 2 workers: how evenly the
kernel spread the clients' connections) and the rows a generation step computed (the server's
char_rnn_batch_rows histogram) per point. With
batching on and one worker it also measures:
  - a mixed workload: p50/p99 of 20-character requests while 32 clients ask for 2000 characters;
  - abandoned requests, one at a time on an idle server: N of 2000 characters whose client leaves 10 ms after
    sending (/generate), and N whose client leaves once the first characters arrive (/generate_stream). Per
    request: the generation steps it ran (the server's char_rnn_batch_rows count); the steps the service
    counted after it saw its client leave (its char_rnn_steps_after_disconnect histogram, when it has one);
    and for the stream, from outside, at most how many ran after the client left: the steps beyond those
    that gave the characters it had received (a row's prompt takes len(prompt) - 1 steps, then one step
    gives one character). That bound holds the client's own reaction time too: the service generates on
    while the client reads its first characters and closes, and a client held off the cores for as long as
    the whole generation takes sees all of it run "after".
  - the concurrency-1 request over HTTP and in-process (on one BLAS thread, its row in a `sample.Rows` set
    up once, as a worker's batch is: model, prompt, length and settings the same), in turn, so that both see
    the same load: the HTTP median over the in-process CPU time is what serving adds (the in-process wall
    clock and the server's CPU time per request are shown beside it).
Then the cost per character of `generate_ids` against a minimal NumPy loop (sample_cost.py).

Targets (hidden 256): p50 at concurrency 1 <= in-process + 2 ms; throughput at concurrency 32 over 1 on two
workers >= 5x; short requests' p99 <= 50 ms beside the long ones; steps after the client left <= 2 (median);
generate_ids at batch 1 within 1.2x of the minimal loop. The concurrency levels alternate over rounds against
drifting load, and the load average is recorded.

    uv run python bench/serve_latency.py [--quick] [--seconds 6] [--rounds 3] [--cell lstm] [--hidden 256]
        [--layers 1] [--abandoned 15] [--no-record]
The run writes its section of docs/benchmarks.md (unless --no-record); the last line printed is JSON.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import common
import numpy as np
import sample_cost
import scratch
from serve_tools import Connection, Server, cpu_seconds, metrics, quiet

from model import corpus, runtime, sample
from model.config import ModelConfig, TrainConfig
from model.train import train
from model.vocab import Vocab
from serving.metrics import FLUSH
from settings import ROOT, isolated_env

# a home of its own, before BentoML is imported (by registry): it reads BENTOML_HOME then
os.environ.update(isolated_env(scratch.home("char-rnn-bench-serve-")) | {"OPENBLAS_NUM_THREADS": "1"})
HOME, ENV = Path(os.environ["CHAR_RNN_HOME"]), dict(os.environ)

CHARS, PROMPT, TEMPERATURE = 200, "ROMEO:", 0.8  # the service's default temperature
LEVELS = (1, 8, 32)
LONG, LONG_CLIENTS, SHORT = 2000, 32, 20  # the mixed workload's and abandoned requests' lengths
SERVERS = (("on", 64, 1), ("off", 1, 1), ("on", 64, 2))  # batching, CHAR_RNN_MAX_BATCH, workers
AFTER = "char_rnn_steps_after_disconnect"  # the service's count of steps run after a client left


@dataclass
class Model:
    tag: str
    params: dict
    config: ModelConfig
    prompt: np.ndarray  # PROMPT's ids


def promote_quick_model(cell: str, hidden: int, layers: int) -> Model:
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
    tag = Registry(HOME / "bentoml").promote(ck.path, {"source": "bench"}).tag
    return Model(tag, ck.params, ck.config, vocab.encode(PROMPT))


@dataclass
class Tally:
    """Requests at one concurrency, summed over rounds."""

    latencies: list[float] = field(default_factory=list)
    chars: int = 0
    wall: float = 0.0
    per_process: Counter = field(default_factory=Counter)  # pid -> CPU seconds
    client: float = 0.0  # the load generator's own CPU seconds
    reconnects: int = 0  # requests after which the server closed the connection
    loops: float = 0.0  # the workers' main threads' CPU seconds: their event loops
    rows: float = 0.0  # rows the generation steps computed (warm-ups included)
    steps: float = 0.0  # generation steps (warm-ups included)

    def row(self) -> dict:
        cpu = sum(self.per_process.values())
        return percentiles(self.latencies, (50, 95, 99)) | {
            "requests": len(self.latencies),
            "chars_per_s": round(self.chars / self.wall),
            "cpu_ms_per_req": round(cpu / len(self.latencies) * 1000, 2),
            "client_cpu_ms_per_req": round(self.client / len(self.latencies) * 1000, 2),
            "reconnects_per_req": round(self.reconnects / len(self.latencies), 3),
            "loop_cpu_ms_per_req": round(self.loops / len(self.latencies) * 1000, 2),
            "rows_per_step": round(self.rows / self.steps, 1) if self.steps else None,
            # Workers share one listening socket, and the kernel may give one of them most connections.
            "busiest_process_cpu_share": round(max(self.per_process.values()) / cpu, 2) if cpu else None,
        }


def percentiles(seconds: list[float], ps: tuple[int, ...] = (50, 99)) -> dict:
    ms = np.array(seconds) * 1000
    return {f"p{p}_ms": round(float(np.percentile(ms, p)), 2) for p in ps}


async def load(url: str, concurrency: int, seconds: float, tally: Tally, pids: list[int]) -> None:
    """`concurrency` clients sending requests back to back for `seconds` (after a short warm-up)."""
    conns = [Connection(url) for _ in range(concurrency)]

    async def worker(k: int, until: float, record: bool) -> None:
        i = k
        while time.perf_counter() < until:
            t = time.perf_counter()
            body = await conns[k].post("/generate", {"prompt": PROMPT, "max_new_chars": CHARS, "seed": i})
            i += concurrency
            if record:
                tally.latencies.append(time.perf_counter() - t)
                tally.chars += sum(map(len, body["completions"]))

    before = await metrics(url, FLUSH)  # the steps of the point before reported
    warm = time.perf_counter() + 0.3
    await asyncio.gather(*(worker(k, warm, False) for k in range(concurrency)))
    t0, cpu0 = time.perf_counter(), {pid: cpu_seconds([pid]) for pid in pids}
    loops = cpu_seconds(pids, main_thread=True)
    client, closed = time.process_time(), sum(c.closed_by_server for c in conns)
    await asyncio.gather(*(worker(k, t0 + seconds, True) for k in range(concurrency)))
    tally.reconnects += sum(c.closed_by_server for c in conns) - closed
    tally.wall += time.perf_counter() - t0
    tally.client += time.process_time() - client
    tally.loops += cpu_seconds(pids, main_thread=True) - loops
    for pid, cpu in cpu0.items():
        tally.per_process[pid] += cpu_seconds([pid]) - cpu
    for c in conns:
        c.close()
    after = await metrics(url, FLUSH)
    tally.rows += after.get("char_rnn_batch_rows_sum", 0) - before.get("char_rnn_batch_rows_sum", 0)
    tally.steps += after.get("char_rnn_batch_rows_count", 0) - before.get("char_rnn_batch_rows_count", 0)


async def mixed(url: str, seconds: float) -> dict:
    """One client's SHORT-character requests, back to back, while LONG_CLIENTS ask for LONG characters."""
    conns = [Connection(url) for _ in range(LONG_CLIENTS + 1)]
    stop, done = asyncio.Event(), [0]

    async def long_client(k: int) -> None:
        while not stop.is_set():
            await conns[k].post("/generate", {"prompt": PROMPT, "max_new_chars": LONG, "seed": k})
            done[0] += 1

    tasks = [asyncio.create_task(long_client(k)) for k in range(LONG_CLIENTS)]
    await asyncio.sleep(1.0)  # the long requests are running
    latencies, end = [], time.perf_counter() + seconds
    while time.perf_counter() < end:
        t = time.perf_counter()
        await conns[-1].post("/generate", {"prompt": PROMPT, "max_new_chars": SHORT, "seed": len(latencies)})
        latencies.append(time.perf_counter() - t)
    stop.set()
    await asyncio.gather(*tasks)
    for c in conns:
        c.close()
    return {"short_requests": len(latencies), "long_requests": done[0]} | percentiles(latencies)


async def leave(url: str, route: str) -> int | None:
    """One request of LONG characters whose client leaves: 10 ms after sending (/generate), or once the
    first characters arrived (/generate_stream: how many)."""
    conn, body = Connection(url), {"prompt": PROMPT, "max_new_chars": LONG}
    try:
        if route == "/generate_stream":
            return len(await conn.first_text(route, body))
        await conn.send(route, body)
        await asyncio.sleep(0.01)
        return None
    finally:
        conn.close()


async def abandoned(url: str, pids: list[int], n: int) -> dict:
    """Per route, n abandoned requests one at a time, the server idle before and after each: the steps each
    ran, the steps the service counted after its client left, and (stream) at most how many ran after."""
    await quiet(pids)
    last, out = await metrics(url, FLUSH), {}
    for route in ("/generate", "/generate_stream"):
        per: dict[str, list[float]] = {"ran": [], "counted_after": [], "at_most_after": []}
        for _ in range(n):
            got = await leave(url, route)
            await quiet(pids)
            now = await metrics(url, FLUSH)
            ran = now.get("char_rnn_batch_rows_count", 0) - last.get("char_rnn_batch_rows_count", 0)
            per["ran"].append(ran)
            if f"{AFTER}_sum" in now:
                per["counted_after"].append(now[f"{AFTER}_sum"] - last.get(f"{AFTER}_sum", 0))
            if got is not None:
                per["at_most_after"].append(ran - (len(PROMPT) - 1 + got))
            last = now
        out[route] = {k: summary(v) for k, v in per.items() if v}
    return out


def in_process(rows: sample.Rows, m: Model, seed: int) -> tuple[float, float]:
    """Seconds of the concurrency-1 request (same model, prompt, length, settings) computed in this process
    as a worker computes it: its row added to `rows`, which are kept from one request to the next as a
    worker keeps its batch (the model's one-time setup is not the request's), CHARS steps, the row removed
    (`sample.generate_ids` without its setup; the caller limits BLAS to one thread). Wall clock and this
    process's CPU time."""
    t, cpu = time.perf_counter(), time.process_time()
    rows.add(seed, [m.prompt], [sample.Settings(TEMPERATURE, 0, 1.0, seed)])
    for _ in range(CHARS):
        rows.step()
    rows.remove({seed})
    return time.perf_counter() - t, time.process_time() - cpu


async def paired(url: str, pids: list[int], m: Model, n: int) -> dict:
    """The concurrency-1 request over HTTP and in-process in turn, `n` times each (after one of each to warm
    up), so that both see the same load. Milliseconds: the HTTP median; the in-process median, wall clock and
    CPU time (a process held off the cores by others takes longer on the wall clock, not in CPU time); the
    server's CPU time per HTTP request; what serving adds: the HTTP median over the in-process CPU time."""
    conn, times = Connection(url), {"http": [], "in_process_wall": [], "in_process_cpu": []}
    with runtime.blas_limit(1):
        rows = sample.Rows(m.params, m.config)
        for i in range(n + 1):
            if i == 1:
                cpu = cpu_seconds(pids)
            t = time.perf_counter()
            await conn.post("/generate", {"prompt": PROMPT, "max_new_chars": CHARS, "seed": i})
            http, (wall, alone) = time.perf_counter() - t, in_process(rows, m, i)
            if i:
                for k, v in zip(times, (http, wall, alone), strict=True):
                    times[k].append(v)
    server = (cpu_seconds(pids) - cpu) / n
    conn.close()
    ms = {k: round(1000 * float(np.median(v)), 2) for k, v in times.items()}
    ms["server_cpu"] = round(1000 * server, 2)
    return ms | {"overhead": round(ms["http"] - ms["in_process_cpu"], 2), "pairs": n}


async def floor(url: str, pids: list[int], n: int) -> dict:
    """The floor service (floor_service.py) at concurrency 1, `n` requests after one to warm up: its p50 and
    the server's CPU per request (ms): what BentoML's HTTP path costs a request with no work behind it."""
    conn, times = Connection(url), []
    body = {"prompt": PROMPT, "max_new_chars": CHARS, "seed": 0}
    await conn.post("/generate", body)
    cpu = cpu_seconds(pids)
    for _ in range(n):
        t = time.perf_counter()
        await conn.post("/generate", body)
        times.append(time.perf_counter() - t)
    server = (cpu_seconds(pids) - cpu) / n
    conn.close()
    return percentiles(times) | {"server_cpu_ms": round(1000 * server, 2), "requests": n}


def serve_all(a: argparse.Namespace, m: Model) -> tuple[list[dict], dict]:
    """Every server configuration: its load levels, alternated over rounds; on the batching server with one
    worker, the extra workloads: HTTP against in-process, the mixed one, abandoned requests."""
    rows, extra = [], {}
    for batching, max_batch, workers in SERVERS:
        env = ENV | {"CHAR_RNN_MAX_BATCH": str(max_batch), "CHAR_RNN_WORKERS": str(workers)}
        first = (batching, workers) == ("on", 1)
        with Server(env, HOME / f"server-{max_batch}-{workers}.log") as server:
            tallies = {c: Tally() for c in LEVELS}
            for r in range(a.rounds):
                for c in LEVELS if r % 2 == 0 else LEVELS[::-1]:
                    asyncio.run(load(server.url, c, a.seconds / a.rounds, tallies[c], server.pids))
            for c, tally in tallies.items():
                rows.append({"batching": batching, "workers": workers, "concurrency": c} | tally.row())
            if first:
                extra["paired"] = asyncio.run(paired(server.url, server.pids, m, 20 if a.quick else 60))
                extra["mixed"] = asyncio.run(mixed(server.url, a.seconds))
                extra["abandoned"] = asyncio.run(abandoned(server.url, server.pids, a.abandoned))
    service = ("--working-dir", str(ROOT / "bench"), "floor_service:Floor")
    with Server(ENV, HOME / "server-floor.log", service) as server:
        extra["floor"] = asyncio.run(floor(server.url, server.pids, 100 if a.quick else 300))
    return rows, extra


def targets(rows: list[dict], extra: dict) -> dict:
    """The measures the targets are about, and whether each is met (None: not measured)."""
    rate = {(r["batching"], r["workers"], r["concurrency"]): r["chars_per_s"] for r in rows}
    scale = {f"{b}/{w}w": round(rate[(b, w, 32)] / rate[(b, w, 1)], 2) for b, _, w in SERVERS}
    p50 = next(r["p50_ms"] for r in rows if (r["batching"], r["workers"], r["concurrency"]) == ("on", 1, 1))
    busy = next(r for r in rows if (r["batching"], r["workers"], r["concurrency"]) == ("on", 2, 32))
    # The most two workers could give at 32 with every core busy: a request's CPU is at least the model's
    # steps at a worker's batch (its half of the 32 clients), the framework's floor and the client's own
    # share (all measured in this run).
    share = next(r for r in extra["cost"] if r["batch"] == 32 // 2)
    least = CHARS * share["generate_ids_us"] / 1000 + extra["floor"]["server_cpu_ms"]
    least += busy["client_cpu_ms_per_req"]
    ceiling = len(os.sched_getaffinity(0)) * CHARS / (least / 1000) / rate[("on", 2, 1)]
    ab = extra["abandoned"]
    counted = [x for route in ab.values() for x in route.get("counted_after", {}).get("all", [])]
    after = summary(counted) if counted else ab["/generate_stream"].get("at_most_after")
    source = "the service's count, both routes" if counted else "the stream's bound"
    return {
        "steps_after_leaving_from": source,
        "scale_32_over_1": scale,
        "p50_c1_ms": p50,
        "busiest_2w_32": next(
            r["busiest_process_cpu_share"] for r in rows if (r["workers"], r["concurrency"]) == (2, 32)
        ),
        "overhead_ms": extra["paired"]["overhead"],
        "overhead_above_floor_ms": round(extra["paired"]["overhead"] - extra["floor"]["p50_ms"], 2),
        "ceiling_32_over_1_2_workers": round(ceiling, 2),
        "rows_per_step_2w_32": busy["rows_per_step"],
        "loop_share_2w_32": round(busy["loop_cpu_ms_per_req"] / busy["cpu_ms_per_req"], 2),
        "least_cpu_ms_per_req_2w_32": round(least, 2),
        "met": {
            "p50_c1_le_in_process_plus_2ms": extra["paired"]["overhead"] <= 2,
            "c32_over_c1_2_workers_ge_5x": scale["on/2w"] >= 5,
            "short_p99_le_50ms": extra["mixed"]["p99_ms"] <= 50,
            "steps_after_leaving_median_le_2": None if after is None else after["median"] <= 2,
            "generate_ids_b1_le_1.2x": extra["cost"][0]["ratio"] <= 1.2,
        },
    }


def summary(values: list[float]) -> dict:
    return {"median": float(np.median(values)), "max": max(values), "all": values}


def steps_cell(s: dict | None) -> str:
    return "not measured" if s is None else f"{s['median']:g} / {s['max']:g}"


VERDICT = {True: "met", False: "not met", None: "not measured (the service has no such count)"}


def measures(extra: dict, t: dict) -> list[list[str]]:
    """Each measure of the run beside its target: what, this run's figure, the target, the verdict."""
    m, cost, met, pair, fl = extra["mixed"], extra["cost"], t["met"], extra["paired"], extra["floor"]
    gen, stream = extra["abandoned"]["/generate"], extra["abandoned"]["/generate_stream"]
    counted = gen.get("counted_after")
    return [
        [
            "`/generate` p50 at concurrency 1, against the same request's steps in-process (`sample.Rows` "
            f"set up once), in turn ({pair['pairs']} of each): its CPU time (wall clock); the server's CPU "
            "per request",
            f"{pair['http']} against {pair['in_process_cpu']} ({pair['in_process_wall']}) ms: "
            f"**{pair['overhead']:+} ms**; {pair['server_cpu']} ms",
            "≤ in-process + 2 ms",
            VERDICT[met["p50_c1_le_in_process_plus_2ms"]],
        ],
        [
            "the floor: a BentoML service with the same route and request fields that generates nothing "
            "(`bench/floor_service.py`), concurrency 1: p50; the server's CPU per request; the real "
            "service's overhead above it",
            f"{fl['p50_ms']} ms; {fl['server_cpu_ms']} ms; **{t['overhead_above_floor_ms']:+} ms**",
            "",
            "the +2 ms target is below the floor" if fl["p50_ms"] > 2 else "",
        ],
        [
            "throughput at concurrency 32 over 1: batching on / off / on with 2 workers (at 32 on 2 workers, "
            "the busiest process's share of the server CPU)",
            " / ".join(f"{v}x" for v in t["scale_32_over_1"].values()) + f" ({t['busiest_2w_32']})",
            "≥ 5x on 2 workers",
            VERDICT[met["c32_over_c1_2_workers_ge_5x"]],
        ],
        [
            "the ceiling at 32 on 2 workers with every core busy, over the measured rate at 1: the cores "
            "over a request's least CPU (the model's steps at batch 16, a worker's half of the clients; "
            "the floor's server CPU; the client's)",
            f"{t['ceiling_32_over_1_2_workers']}x ({t['least_cpu_ms_per_req_2w_32']} ms a request)",
            "",
            "the 5x target is above the ceiling" if t["ceiling_32_over_1_2_workers"] < 5 else "",
        ],
        [
            "at 32 on 2 workers, each worker a core at most (its threads share one GIL): rows a generation "
            "step against a worker's half of the clients; the event loops' share of the server CPU (a "
            "request whose HTTP work is running has no row in the batch)",
            f"{t['rows_per_step_2w_32']} of 16; {t['loop_share_2w_32']}",
            "",
            "",
        ],
        [
            f"{SHORT}-char requests while {LONG_CLIENTS} clients ask for {LONG}: p50 / p99",
            f"{m['p50_ms']} / {m['p99_ms']} ms ({m['short_requests']} short, {m['long_requests']} long)",
            "p99 ≤ 50 ms",
            VERDICT[met["short_p99_le_50ms"]],
        ],
        [
            "steps after the client left, `/generate` left after 10 ms, as the service counts: median / max",
            steps_cell(counted),
            "≤ 2 (median)",
            VERDICT[None if counted is None else counted["median"] <= 2],
        ],
        [
            "steps after the client left, `/generate_stream` left at its first text, as the service counts: "
            "median / max",
            steps_cell(stream.get("counted_after")),
            "≤ 2 (median)",
            VERDICT[None if "counted_after" not in stream else stream["counted_after"]["median"] <= 2],
        ],
        [
            "the same streams from outside: steps beyond the characters the client had read, at most "
            "(its own reaction time included): median / max",
            steps_cell(stream["at_most_after"]),
            "",
            "",
        ],
        [
            f"steps an abandoned `/generate` ran: median / max (completed: {len(PROMPT) - 1 + LONG})",
            steps_cell(gen["ran"]),
            "",
            "",
        ],
        [
            "`generate_ids` / minimal loop per character, batch " + ", ".join(str(r["batch"]) for r in cost),
            ", ".join(f"{r['ratio']}x ({r['generate_ids_us']} / {r['minimal_us']} µs)" for r in cost),
            "≤ 1.2x at batch 1",
            VERDICT[met["generate_ids_b1_le_1.2x"]],
        ],
    ]


def report(rows: list[dict], extra: dict, t: dict) -> str:
    """The run as markdown: every load point, then each measure beside its target."""
    cols = ["batching", "workers", "concurrency", "requests", "p50_ms", "p95_ms", "p99_ms", "chars_per_s"]
    extra_cols = ("cpu_ms_per_req", "loop_cpu_ms_per_req", "busiest_process_cpu_share", "reconnects_per_req")
    extra_cols += ("rows_per_step",)
    points = [[r[c] for c in cols] + [r[c] for c in extra_cols] for r in rows]
    names = [c.replace("_ms", " ms").replace("_per_s", "/s") for c in cols]
    shares = ["server CPU ms/request", "of it, event loops'", "busiest process's CPU share"]
    shares += ["reconnects a request", "rows a step"]
    head = common.markdown_table([*names, *shares], points)
    table = common.markdown_table(["measure", "this run", "target", "verdict"], measures(extra, t))
    return f"{head}\n\n{table}\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="2 s per point in 2 rounds, 5 abandoned requests")
    ap.add_argument("--seconds", type=float, default=6.0, help="measured time per point")
    ap.add_argument("--rounds", type=int, default=3, help="alternations of the levels, against drifting load")
    ap.add_argument(
        "--cell", choices=["rnn", "gru", "lstm"], default=ModelConfig.model_fields["cell"].default
    )
    ap.add_argument("--hidden", type=int, default=256)
    ap.add_argument("--layers", type=int, default=1)
    ap.add_argument("--abandoned", type=int, default=15, help="abandoned requests per route")
    common.add_record_flag(ap)
    a = ap.parse_args()
    if a.quick:
        a.seconds, a.rounds, a.abandoned = 2.0, 2, 5
    run = common.begin("serve_latency", "Serving latency and throughput (`bench/serve_latency.py`)", a)
    m = promote_quick_model(a.cell, a.hidden, a.layers)
    rows, extra = serve_all(a, m)
    extra["cost"] = sample_cost.cost(a.cell, a.hidden, a.layers, *((3, 0.3) if a.quick else (5, 0.6)))
    load_after = os.getloadavg()
    t = targets(rows, extra)
    size = f"{a.cell}, hidden {a.hidden} x {a.layers} layer(s)"
    run.facts["model"] = f"{m.tag}: {size}; {CHARS} chars a request unless said, prompt {PROMPT!r}"
    run.facts["setup"] = (
        f"1 BLAS thread per worker and in-process; {a.seconds:g} s a point over {a.rounds} rounds"
    )
    body = report(rows, extra, t)
    print(body)
    common.record(run, body, load_after)
    loads = [[round(x, 2) for x in xs] for xs in (run.load_before, load_after)]
    print(f"load average (1, 5, 15 min): {loads[0]} before, {loads[1]} after")
    summary = {"model": m.tag, "cell": a.cell, "hidden": a.hidden, "layers": a.layers, "chars": CHARS}
    summary |= {"load_avg_before": loads[0], "load_avg_after": loads[1], "results": rows} | extra | t
    print(json.dumps(summary))
    shutil.rmtree(HOME, ignore_errors=True)  # kept when a run fails, for the server logs


if __name__ == "__main__":
    main()
