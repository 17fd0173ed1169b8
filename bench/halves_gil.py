"""What Python's GIL costs the batch's two halves in a training step (`net.grads` at 2 threads, where
model.runtime.halves splits the batch and runs each half on a thread of its own, BLAS on one thread each).

Each half's loop makes a few small NumPy calls per time step, and every call releases and takes back the GIL:
with the other half's thread doing the same, a call often finds the GIL taken and waits for it. The bench
times the forward and backward of one half of a batch (B/2 rows) in three ways, alternated round by round:

  alone      one half, on this process's one thread
  threads    both halves side by side on two threads (`runtime.side_by_side`, `net.grads` without a twin)
  processes  both halves at once, each in a process of its own (no GIL shared); the median of the two

and reports, per cell and (B, T, H), the time over "alone" of each, and what a whole training step on threads
(the halves, their sum, clipping and the optimizer, `numpy` in train_speed.py) would take if the halves cost
what they cost in processes: the step's time less the difference. That is the share of the step the GIL
takes, and the most a training step could gain with the halves free of it. Beside it, what model.train's
step gains: the same step with the second half in a process of its own (model/twin.py), measured.

  uv run --no-sync python bench/halves_gil.py [--quick] [--cells rnn,gru,lstm] [--no-record]
Writes its section of docs/benchmarks.md (unless --no-record); the last line printed is one JSON object.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time

import common
import numpy as np
from train_speed import CONFIGS, numpy_step

from model import net, runtime
from model.config import ModelConfig
from model.train import Streams


def half(ids: np.ndarray, V: int, size: tuple, kind: str):
    """A function timing the forward and backward of the batch's rows `r` (a slice), and the two slices."""
    B, T, H = size
    cfg = ModelConfig(vocab_size=V, cell=kind, hidden=H, layers=1, dropout=0.0)
    p, s = net.init(cfg, np.random.default_rng(0)), net.zeros_state(cfg, B)
    x, y, _ = Streams(ids, B, T).get(0)

    def run(r: slice) -> None:
        _, cache, _ = net.forward(p, cfg, x[r], y[r], s[:, :, r])
        net.backward(p, cfg, cache)

    return run, [slice(0, B // 2), slice(B // 2, B)]


def timed(fn, seconds: float) -> float:
    """Median seconds of fn() over about `seconds` (after two calls to warm up)."""
    fn(), fn()
    ts, end = [], time.perf_counter() + seconds
    while time.perf_counter() < end or len(ts) < 5:
        t0 = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t0)
    return float(np.median(ts))


def in_processes(kind: str, size: tuple, seconds: float) -> float:
    """Both halves at once, one per process (this script with --child): the median of their medians."""
    cmd = [sys.executable, __file__, "--child", kind, ",".join(map(str, size)), str(seconds)]
    procs = [
        subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True) for _ in range(2)
    ]
    for p in procs:  # both loaded and warmed up, then both told to start, so that their timings overlap
        p.stdout.readline()
    outs = [float(p.communicate("go\n")[0].split()[-1]) for p in procs]
    if any(p.returncode for p in procs):
        raise SystemExit(f"a --child run failed: {cmd}")
    return float(np.median(outs))


def measure(ids: np.ndarray, V: int, size: tuple, kind: str, rounds: int, seconds: float) -> dict:
    """The three ways, alternated over `rounds`, and the whole step at 2 threads; medians in ms."""
    run, groups = half(ids, V, size, kind)
    got: dict[str, list[float]] = {"alone": [], "threads": [], "processes": []}
    for _ in range(rounds):
        with runtime.blas_limit(1):
            got["alone"].append(timed(lambda: run(groups[0]), seconds))
        with runtime.blas_limit(2):
            got["threads"].append(timed(lambda: runtime.side_by_side(run, groups), seconds))
        got["processes"].append(in_processes(kind, size, seconds))
    steps = {
        "threads": numpy_step(ids, V, *size, kind, processes=False),
        "twin": numpy_step(ids, V, *size, kind),
    }
    whole: dict[str, list[float]] = {"threads": [], "twin": []}
    with runtime.blas_limit(2):
        for _ in range(rounds):
            for way, step in steps.items():
                whole[way].append(timed(step, seconds))
    ms = {k: 1e3 * float(np.median(v)) for k, v in got.items()}
    step_ms = {k: 1e3 * float(np.median(v)) for k, v in whole.items()}
    gil = ms["threads"] - ms["processes"]
    return {
        "cell": kind,
        "size": size,
        "ms": ms,
        "step_ms": step_ms["threads"],
        "twin_ms": step_ms["twin"],
        "gil_ms": gil,
    }


def report(rows: list[dict]) -> str:
    head = [
        "B, T, H",
        "cell",
        "one half alone ms",
        "both on threads ms (over alone)",
        "both in processes ms (over alone)",
        "training step on threads ms",
        "the GIL's share of the step",
        "the step without it: speed-up",
        "the step with a twin ms: speed-up",
    ]
    table = []
    for r in rows:
        a, ms, step = r["ms"]["alone"], r["ms"], r["step_ms"]
        table.append(
            [
                ", ".join(map(str, r["size"])),
                r["cell"],
                f"{a:.2f}",
                f"{ms['threads']:.2f} ({ms['threads'] / a:.2f}x)",
                f"{ms['processes']:.2f} ({ms['processes'] / a:.2f}x)",
                f"{step:.2f}",
                f"{100 * r['gil_ms'] / step:.0f}%",
                f"**{step / (step - r['gil_ms']):.2f}x**",
                f"{r['twin_ms']:.2f}: **{step / r['twin_ms']:.2f}x**",
            ]
        )
    note = (
        "\n\nMedians over alternated rounds; BLAS on one thread per half. 'The step without it' is an "
        "estimate: the step's time over the same less the threads' excess over the processes (what halves "
        "free of the GIL would save), all other work unchanged. The last column is measured: model.train's "
        "step, the second half in a process of its own (model/twin.py), alternated round by round with the "
        "step on threads."
    )
    return common.markdown_table(head, table) + note


def main() -> None:
    if sys.argv[1:2] == ["--child"]:  # one half, alone in this process, while its twin runs in another
        kind, size, seconds = sys.argv[2], tuple(map(int, sys.argv[3].split(","))), float(sys.argv[4])
        ids, vocab = common.load_ids()
        run, groups = half(ids, len(vocab), size, kind)
        with runtime.blas_limit(1):
            run(groups[0])
            print("ready", flush=True)
            sys.stdin.readline()
            print(timed(lambda: run(groups[0]), seconds))
        return
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="3 rounds of 0.5 s instead of 5 of 1 s")
    ap.add_argument("--cells", default="rnn,gru,lstm")
    common.add_record_flag(ap)
    args = ap.parse_args()
    run = common.begin("halves_gil", "What the GIL costs the batch's halves (`bench/halves_gil.py`)", args)
    rounds, seconds = (3, 0.5) if args.quick else (5, 1.0)
    ids, vocab = common.load_ids()
    rows = []
    for size in CONFIGS:
        for kind in args.cells.split(","):
            rows.append(measure(ids, len(vocab), size, kind, rounds, seconds))
            print(json.dumps(rows[-1]), flush=True)
    body = report(rows)
    print(body)
    run.facts["setup"] = f"{rounds} alternated rounds of {seconds:g} s per way, medians"
    common.record(run, body)
    print(json.dumps({"rows": rows}))


if __name__ == "__main__":
    main()
