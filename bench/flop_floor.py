"""What a time budget of training can hold on this machine: a training step's arithmetic against the best rate
at which this machine multiplies matrices.

A training step of a model (`ModelConfig` defaults, or `--set` overrides as bench/train_quality.py takes them)
does at least the matrix products of its maths: for each layer and time step, the recurrent product h W
(B, H) x (H, kH), its two backward products (dh Wᵀ and the dW sum), the same three for the input product x U
of every layer above the first (layer 0 looks its inputs up), and the output layer's three (B, H) x (H, V);
2 flops a multiply-add. Everything else a step does (the gates' pointwise maths, the softmax, the optimizer)
is left out, so the count is a lower bound on the work and what follows an upper bound on the steps.

The bench measures the machine's best rate: a large float32 matrix product (2048 x 2048, the kernel at its
most efficient) on 1 and 2 BLAS threads. It then times the model's own training step (`net.grads` with its
twin, clipping and Adam, as model.train runs it, dropout included) to say what share of that rate the step
reaches.

From a run that needed `--reached STEPS:LOSS` steps to reach a loss (a recorded bench/train_quality.py run),
it reports how long those steps would take if every product ran at the best rate: when that exceeds the
budget, no faster implementation of this model and recipe reaches that loss within it.

  uv run --no-sync python bench/flop_floor.py --set layers=3 --minutes 5 --reached 6850:1.4101
Writes its section of docs/benchmarks.md (unless --no-record); the last line printed is one JSON object.
"""

from __future__ import annotations

import argparse
import json
import math
import time
from contextlib import nullcontext

import common
import numpy as np
from train_quality import configs

from model import net, runtime, train, twin
from model.config import TrainConfig
from model.train import Streams

SIZE = 2048  # the large product that shows the machine's best rate


def step_flops(cfg: net.ModelConfig, B: int, T: int) -> int:
    """The flops of a training step's matrix products (see the docstring)."""
    kH, H, V = net.CELLS[cfg.cell].gates * cfg.hidden, cfg.hidden, cfg.vocab_size
    # three products of 2·B·H·kH flops for each layer's recurrence and each input product above layer 0,
    # three of 2·B·H·V for the output layer
    return T * (6 * B * H * kH * (2 * cfg.layers - 1) + 6 * B * H * V)


def best_rate(threads: int, rounds: int = 7) -> float:
    """flop/s of the fastest of `rounds` float32 SIZE x SIZE products on `threads` BLAS threads."""
    a, b = (np.random.default_rng(i).random((SIZE, SIZE), dtype=np.float32) for i in (0, 1))
    out = np.empty_like(a)
    with runtime.blas_limit(threads):
        np.matmul(a, b, out=out)
        times = []
        for _ in range(rounds):
            t0 = time.perf_counter()
            np.matmul(a, b, out=out)
            times.append(time.perf_counter() - t0)
    return 2 * SIZE**3 / min(times)


def step_time(cfg: net.ModelConfig, tcfg: TrainConfig, ids: np.ndarray, seconds: float) -> float:
    """Median seconds of model.train's own step (`train.step`: the twin where it applies, clipping, the
    optimizer, the schedule) on a fresh run, over ~`seconds`."""
    run, streams = train.start(cfg, tcfg, None, None), Streams(ids, tcfg.batch, tcfg.seq)
    with twin.start(cfg, tcfg.batch, tcfg.seq) or nullcontext() as tw:
        times: list[float] = []
        while sum(times) < seconds or len(times) < 5:
            t0 = time.perf_counter()
            train.step(run, streams, cfg, tcfg, math.inf, tw)
            times.append(time.perf_counter() - t0)
    return float(np.median(times[2:]))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="a config field")
    ap.add_argument("--minutes", type=float, default=5.0, help="the budget")
    ap.add_argument("--reached", required=True, metavar="STEPS:LOSS", help="a recorded run's steps to a loss")
    ap.add_argument("--seconds", type=float, default=10.0, help="timing the step")
    common.add_record_flag(ap)
    a = ap.parse_args()
    run = common.begin("flop_floor", "What a training budget can hold (`bench/flop_floor.py`)", a)
    ids, vocab = common.load_ids()
    cfg, tcfg = configs(len(vocab), a.set)
    steps, loss = a.reached.split(":")
    flops = step_flops(cfg, tcfg.batch, tcfg.seq)
    rates = {n: best_rate(n) for n in (1, 2)}
    peak = max(rates.values())
    step = step_time(cfg, tcfg, ids, a.seconds)
    budget = 60 * a.minutes
    at_peak = int(steps) * flops / peak
    out = {
        "model": f"{cfg.cell} {cfg.layers}x{cfg.hidden}, batch {tcfg.batch} x {tcfg.seq}",
        "step_gflop": round(flops / 1e9, 3),
        "best_gflops": {n: round(r / 1e9, 1) for n, r in rates.items()},
        "step_ms": round(1e3 * step, 2),
        "step_gflops": round(flops / step / 1e9, 1),
        "steps_in_budget_at_best": int(budget * peak / flops),
        "steps_in_budget_measured": int(budget / step),
        "reached": {"steps": int(steps), "loss": float(loss), "minutes_at_best": round(at_peak / 60, 2)},
    }
    head = ["model", "products a step GFLOP", "best product rate GFLOP/s (1, 2 threads)", "the step ms"]
    head += [
        "its rate GFLOP/s (share of best)",
        f"steps in {a.minutes:g} min at the best rate / at the step's",
    ]
    head += [f"{steps} steps (reached {loss}) at the best rate"]
    row = [out["model"], out["step_gflop"], "{}, {}".format(*out["best_gflops"].values()), out["step_ms"]]
    row += [f"{out['step_gflops']} ({flops / step / peak:.0%})"]
    row += [f"{out['steps_in_budget_at_best']} / {out['steps_in_budget_measured']}"]
    row += [f"**{out['reached']['minutes_at_best']} min** (budget {a.minutes:g})"]
    body = common.markdown_table(head, [row])
    body += (
        "\n\nThe products are the least work a step does (the pointwise maths, the softmax and the optimizer "
        "left out), and the best rate is a large product's: so the steps at the best rate are more than any "
        "implementation of this model and recipe runs in the budget."
    )
    print(body)
    run.facts["setup"] = (
        f"--set {' '.join(a.set) or '(defaults)'}; the step timed over {a.seconds:g} s, median"
    )
    common.record(run, body)
    print(json.dumps(out))


if __name__ == "__main__":
    main()
