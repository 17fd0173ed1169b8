"""Validation loss reached in M minutes of wall time, everything included, by a cell and configuration.

Trains TrainConfig() + ModelConfig() defaults (or `--cell`, `--set` overrides) with model.train.train on tiny
shakespeare (last 10% held out, model.corpus.split). The budget is wall time from start to the last number:
a warm-up that times real training steps and a validation pass (on a throwaway model) sets the step count so
that the cosine schedule, the in-run validations, the checkpoints and the final full-validation passes fit;
should the machine slow down (other jobs take the cores), a deadline stops training early (reported, with
the steps done) rather than overrun. Prints validation loss against time; the last line is one JSON object
whose "best_val_nats" is the full validation set's loss of the better of the final and the best (by in-run
validation) checkpoints. Run it on an otherwise idle machine: the load average is printed before and after.

  uv run python bench/train_quality.py --cell lstm --minutes 5 [--set hidden=512 --set lr=2e-3 ...]
`--set` overrides a TrainConfig or ModelConfig field (for experiments; the default run uses none).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import tempfile
import time
from pathlib import Path

import common
import numpy as np
from threadpoolctl import threadpool_limits

from model import checkpoint, net, optim, train
from model.corpus import split
from model.net import ModelConfig
from model.train import Streams, TrainConfig

MARGIN = 0.02  # of the budget, kept free against estimation error


class OutOfTime(Exception):
    """The deadline for training passed."""


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


def timings(
    tr: np.ndarray, va: np.ndarray, mcfg: ModelConfig, tcfg: TrainConfig, seconds: float, tmp: Path
) -> tuple[float, float, float, int]:
    """Wall seconds per training step (the mean of the second half of the steps: a run pays for its slow steps
    too, but not for a fresh process's first ones), per in-run validation and per checkpoint, timed for about
    `seconds` on a throwaway model; the steps taken."""
    rng = np.random.default_rng(tcfg.seed + 1)
    p = net.init(mcfg, rng)
    opt = optim.make(tcfg.optimizer, p, tcfg.weight_decay)
    streams = Streams(tr, tcfg.batch, tcfg.seq)
    s, pos, times = net.zeros_state(mcfg, tcfg.batch), 0, []
    drop = rng if mcfg.dropout > 0 else None
    end = time.perf_counter() + seconds
    while len(times) < 10 or time.perf_counter() < end:
        t0 = time.perf_counter()
        x, y, pos = streams.get(pos)
        _, g, s = net.grads(p, mcfg, x, y, s, drop)
        optim.clip_(g, tcfg.clip)
        opt.step(p, g, tcfg.lr * 0.1)
        times.append(time.perf_counter() - t0)
    t1 = time.perf_counter()
    train.evaluate(p, mcfg, va[: tcfg.eval_chars] if tcfg.eval_chars else va)
    t2 = time.perf_counter()
    meta = checkpoint.Meta(format=checkpoint.FORMAT, vocab=[], model=mcfg)
    checkpoint.save(tmp / "warm-up", p, meta, opt.state_dict() | {"state": s})
    t3 = time.perf_counter()
    return float(np.mean(times[len(times) // 2 :])), t2 - t1, t3 - t2, len(times)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--minutes", type=float, default=5.0, help="wall-time budget, everything included")
    ap.add_argument("--cell", choices=sorted(net.CELLS), help="the cell (default: ModelConfig's)")
    ap.add_argument("--steps", type=int, default=0, help="fix the step count instead (no deadline)")
    ap.add_argument("--threads", type=int, default=0, help="BLAS threads; 0 = leave as is")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a field")
    args = ap.parse_args()
    start = time.perf_counter()
    cpu0, load_before = time.process_time(), os.getloadavg()
    budget = 60.0 * args.minutes
    if args.threads:
        threadpool_limits(args.threads, user_api="blas")

    ids, vocab = common.load_ids()
    tr, va = split(ids)
    mcfg, tcfg = configs(len(vocab), ([f"cell={args.cell}"] if args.cell else []) + args.set)
    tmp = Path(tempfile.mkdtemp(prefix="char-rnn-quality-"))
    warm = min(20.0, max(5.0, 0.02 * budget))  # ~80 steps of the default model: its mean is steady
    per_step, per_eval, per_save, n_warm = timings(tr, va, mcfg, tcfg, warm, tmp)
    # checkpoints take ~1% of the time, so that a deadline loses few steps (those since the last one)
    eval_every = tcfg.eval_every or tcfg.checkpoint_every
    every = min(eval_every, max(10, math.ceil(per_save / (0.01 * per_step))))
    eval_chars = tcfg.eval_chars or len(va)
    final_evals = 2 * per_eval * len(va) / min(eval_chars, len(va))  # the final and the best, on all of va
    deadline = start + budget * (1 - MARGIN) - final_evals
    left = deadline - time.perf_counter()
    # 5%: logging, progress, and a long run's steps being slower than its warm-up's (a GRU 2 x 256 warmed up
    # at 67.2 ms a step then ran at 72, and the deadline cut its annealing tail: worse than fewer steps)
    per_step_all = per_step * 1.05 + per_eval / eval_every + per_save / every
    steps = args.steps or max(1, int(left / per_step_all))
    tcfg = tcfg.model_copy(update={"steps": steps, "checkpoint_every": every, "eval_every": eval_every})
    print(f"tiny shakespeare: {len(tr):,} train / {len(va):,} validation chars")
    print(f"BLAS {common.blas_name()}, {common.blas_threads()} threads")
    print(f"load average before: {' '.join(f'{x:.2f}' for x in load_before)}")
    print(f"model {mcfg.model_dump()}")
    print(f"train {tcfg.model_dump()}")
    print(
        f"warm-up: {n_warm} steps, {per_step * 1e3:.1f} ms/step ({tcfg.batch * tcfg.seq / per_step:,.0f} "
        f"chars/s), {per_eval:.2f} s/validation, {per_save:.2f} s/checkpoint -> {steps} steps in the "
        f"{left:.0f} s left for training"
    )
    print(f"{'minutes':>8} {'step':>7} {'train':>7} {'val':>7}")
    curve: list[list[float]] = []

    def progress(p: train.Progress) -> None:
        if p.val_loss is not None:
            m = (time.perf_counter() - start) / 60
            curve.append([round(m, 3), p.step, round(p.val_loss, 4)])
            print(f"{m:>8.2f} {p.step:>7} {p.loss:>7.4f} {p.val_loss:>7.4f}", flush=True)
        if not args.steps and p.step < p.steps and time.perf_counter() > deadline:
            raise OutOfTime  # (past the last step, the final checkpoint is written: it is quick)

    out = tmp / "run"
    try:
        done = train.train(tr, va, vocab, mcfg, tcfg, out, on_progress=progress).meta.step
    except OutOfTime:
        done = None
        if not checkpoint.step_dirs(out):
            raise SystemExit(
                "the deadline came before the first checkpoint: give it more --minutes"
            ) from None
    final = checkpoint.load(out)  # the last one written (at a deadline: fewer than checkpoint_every back)
    best = checkpoint.load(out, pointer="best")
    full = {f"final (step {final.meta.step})": train.evaluate(final.params, mcfg, va)}
    if best.meta.step != final.meta.step:
        full[f"best (step {best.meta.step})"] = train.evaluate(best.params, mcfg, va)
    shutil.rmtree(tmp)
    minutes = (time.perf_counter() - start) / 60
    cpu_minutes = (time.process_time() - cpu0) / 60
    load_after = os.getloadavg()
    best_val = min(full.values())
    for k, v in full.items():
        print(f"full validation, {k}: {v:.4f} nats/char ({v / math.log(2):.4f} bits)")
    stopped = "" if done else f"; the deadline stopped training after step {final.meta.step} of {steps}"
    print(f"{minutes:.2f} min wall (budget {args.minutes:g}), {cpu_minutes:.2f} min CPU{stopped}")
    print(f"load average after: {' '.join(f'{x:.2f}' for x in load_after)}")
    result = {
        "best_val_nats": round(best_val, 4),
        "best_val_bits": round(best_val / math.log(2), 4),
        "minutes": round(minutes, 3),
        "budget_minutes": args.minutes,
        "cpu_minutes": round(cpu_minutes, 3),
        "steps_planned": steps,
        "steps_done": final.meta.step if done is None else done,
        "stopped_by_deadline": done is None,
        "ms_per_step": round(per_step * 1e3, 2),
        "blas_threads": common.blas_threads(),
        "load_avg_before": [round(x, 2) for x in load_before],
        "load_avg_after": [round(x, 2) for x in load_after],
        "model": mcfg.model_dump(),
        "train": tcfg.model_dump(),
        "overrides": args.set,
        "curve": curve,
    }
    print(json.dumps(result))


if __name__ == "__main__":
    main()
