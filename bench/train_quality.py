"""Validation loss reached in M minutes of wall time by the documented default configuration.

Trains TrainConfig() + ModelConfig() defaults with model.train.train on tiny shakespeare (last 10% held
out, model.corpus.split). The step count is derived from a short warm-up that times real training steps
and validation passes, so that the cosine schedule ends about M minutes after the start (warm-up
included) on an otherwise idle machine: the warm-up takes a low quantile of min(wall, CPU) step times,
so load from other jobs on a shared box stretches the wall time (reported, with CPU time) instead of
cutting steps. Prints validation loss against time; the last line is one JSON object whose "best_val_nats"
is the full validation set's loss of the better of the final and the best (by in-run evaluation)
checkpoints.

  uv run python bench/train_quality.py --minutes 5 [--set hidden=512 --set lr=2e-3 ...]
`--set` overrides a TrainConfig or ModelConfig field (for experiments; the default run uses none).
"""

from __future__ import annotations

import argparse
import json
import math
import tempfile
import time
from pathlib import Path

import common
import numpy as np

from model import checkpoint, net, optim, train
from model.corpus import split
from model.net import ModelConfig
from model.train import Streams, TrainConfig


def configs(vocab_size: int, overrides: list[str]) -> tuple[ModelConfig, TrainConfig]:
    """The default configs, with `key=value` overrides applied to whichever config has the field."""
    mkw: dict = {"vocab_size": vocab_size}
    tkw: dict = {}
    for item in overrides:
        key, _, value = item.partition("=")
        if key in ModelConfig.model_fields:
            mkw[key] = value
        elif key in TrainConfig.model_fields:
            tkw[key] = value
        else:
            raise SystemExit(f"--set {item}: no such ModelConfig or TrainConfig field")
    return ModelConfig(**mkw), TrainConfig(**tkw)


def seconds_per_step(
    tr: np.ndarray, va: np.ndarray, mcfg: ModelConfig, tcfg: TrainConfig, seconds: float
) -> tuple[float, float, int]:
    """Time real training steps (a throwaway model) for about `seconds`: s/step and s/evaluation as the
    machine gives them when it is ours, and the steps taken. A step counts min(wall, CPU) time: on an
    idle box wall <= CPU, and CPU time barely grows when other jobs take the cores."""
    rng = np.random.default_rng(tcfg.seed + 1)
    p = net.init(mcfg, rng)
    opt = optim.make(tcfg.optimizer, p, tcfg.weight_decay)
    streams = Streams(tr, tcfg.batch, tcfg.seq)
    h, pos, times = net.zeros_state(mcfg, tcfg.batch), 0, []
    drop = rng if mcfg.dropout > 0 else None
    end = time.perf_counter() + seconds
    while len(times) < 5 or time.perf_counter() < end:
        t0, c0 = time.perf_counter(), time.process_time()
        x, y, pos = streams.get(pos)
        _, cache, h = net.forward(p, mcfg, x, y, h, drop)
        g = net.backward(p, mcfg, cache)
        optim.clip_(g, tcfg.clip)
        opt.step(p, g, tcfg.lr * 0.1)
        times.append(min(time.perf_counter() - t0, time.process_time() - c0))
    evals = []
    for _ in range(2):
        t1, c1 = time.perf_counter(), time.process_time()
        train.evaluate(p, mcfg, va[: tcfg.eval_chars] if tcfg.eval_chars else va)
        evals.append(min(time.perf_counter() - t1, time.process_time() - c1))
    return float(np.quantile(times[2:], 0.1)), min(evals), len(times)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--minutes", type=float, default=5.0, help="wall-time budget, warm-up included")
    ap.add_argument("--steps", type=int, default=0, help="fix the step count instead (experiments)")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a field")
    args = ap.parse_args()
    start, cpu0 = time.perf_counter(), time.process_time()
    budget = 60.0 * args.minutes

    ids, vocab = common.load_ids()
    tr, va = split(ids)
    mcfg, tcfg = configs(len(vocab), args.set)
    warm = min(20.0, max(5.0, 0.05 * budget))
    per_step, per_eval, n_warm = seconds_per_step(tr, va, mcfg, tcfg, warm)
    left = budget - (time.perf_counter() - start)
    per_step_all = per_step * 1.01 + per_eval / tcfg.eval_every  # + checkpoints, logging
    steps = args.steps or max(1, int(left / per_step_all))
    tcfg = tcfg.model_copy(update={"steps": steps})
    threads = common.blas_threads()
    print(f"tiny shakespeare: {len(tr):,} train / {len(va):,} validation chars; BLAS {threads} threads")
    print(f"model {mcfg.model_dump()}")
    print(f"train {tcfg.model_dump()}")
    print(
        f"warm-up: {n_warm} steps, {per_step * 1e3:.1f} ms/step ({tcfg.batch * tcfg.seq / per_step:,.0f} "
        f"chars/s), {per_eval:.2f} s/eval -> {steps} steps in the {left:.0f} s left"
    )
    print(f"{'minutes':>8} {'step':>7} {'train':>7} {'val':>7}")
    curve: list[list[float]] = []

    def progress(p: train.Progress) -> None:
        if p.val_loss is not None:
            m = (time.perf_counter() - start) / 60
            curve.append([round(m, 3), p.step, round(p.val_loss, 4)])
            print(f"{m:>8.2f} {p.step:>7} {p.loss:>7.4f} {p.val_loss:>7.4f}", flush=True)

    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "run"
        final = train.train(tr, va, vocab, mcfg, tcfg, out, on_progress=progress)
        minutes = (time.perf_counter() - start) / 60
        cpu_minutes = (time.process_time() - cpu0) / 60
        best = checkpoint.load(out, pointer="best")
        full = {"final": train.evaluate(final.params, mcfg, va)}
        if best.meta.step != final.meta.step:
            full[f"best (step {best.meta.step})"] = train.evaluate(best.params, mcfg, va)
    best_val = min(full.values())
    for k, v in full.items():
        print(f"full validation, {k}: {v:.4f} nats/char ({v / math.log(2):.4f} bits)")
    print(f"{steps} steps: {minutes:.2f} min wall, {cpu_minutes:.2f} min CPU; budget {args.minutes:g}")
    result = {
        "best_val_nats": round(best_val, 4),
        "best_val_bits": round(best_val / math.log(2), 4),
        "minutes": round(minutes, 3),
        "budget_minutes": args.minutes,
        "cpu_minutes": round(cpu_minutes, 3),
        "steps": steps,
        "ms_per_step": round(per_step * 1e3, 2),
        "blas_threads": threads,
        "model": mcfg.model_dump(),
        "train": tcfg.model_dump(),
        "overrides": args.set,
        "curve": curve,
    }
    print(json.dumps(result))


if __name__ == "__main__":
    main()
