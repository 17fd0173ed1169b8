"""Validation loss reached in M minutes of wall time, everything included, by a cell and configuration.

Trains TrainConfig() + ModelConfig() defaults (or `--cell`, `--set` overrides) with model.train.train on tiny
shakespeare (last 10% held out, model.corpus.split). The budget is wall time from start to the last number:
a warm-up that times real training steps and a validation pass (on a throwaway model) sets the step count so
that the cosine schedule, the in-run validations, the checkpoints and the final full-validation passes fit;
should the machine slow down (other jobs take the cores), a deadline stops training early (reported, with
the steps done) rather than overrun. Prints validation loss against time; the last line is one JSON object
whose "best_val_nats" is the full validation set's loss of the better of the final and the best (by in-run
validation) checkpoints. Run it on an otherwise idle machine: the load average is recorded before and after.
The run writes its section of docs/benchmarks.md (unless --no-record): one section per cell, `--set`
overrides and budget, so the cells' last runs stand side by side, each with its own date, load and commit.

  uv run python bench/train_quality.py --cell lstm --minutes 5 [--set hidden=512 --set lr=2e-3 ...] [--quick]
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
from dataclasses import dataclass
from pathlib import Path

import common
import numpy as np
from threadpoolctl import threadpool_limits

from model import checkpoint, net, optim, train
from model.config import ModelConfig, TrainConfig
from model.corpus import split
from model.train import Streams

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
    meta = checkpoint.Meta(format=checkpoint.FORMAT, vocab=[], model=mcfg, train=tcfg)
    checkpoint.save(tmp / "warm-up", p, meta, opt.state_dict() | {"state": s})
    t3 = time.perf_counter()
    return float(np.mean(times[len(times) // 2 :])), t2 - t1, t3 - t2, len(times)


@dataclass
class Plan:
    """How the budget is spent: the warm-up's timings, and the steps, checkpoints and deadline they give."""

    per_step: float
    per_eval: float
    per_save: float
    warm_steps: int
    deadline: float  # perf_counter time by which training must stop, the final evaluations left to do
    left: float  # seconds for training when planned


def plan(tr: np.ndarray, va: np.ndarray, mcfg: ModelConfig, tcfg: TrainConfig, args, start: float, tmp: Path):
    """The warm-up, then the run's TrainConfig (steps, checkpoint and validation intervals) and its Plan."""
    budget = 60.0 * args.minutes
    warm = min(20.0, max(5.0, 0.02 * budget))  # long enough for the step time's mean to settle
    per_step, per_eval, per_save, n_warm = timings(tr, va, mcfg, tcfg, warm, tmp)
    # checkpoints take ~1% of the time, so that a deadline loses few steps (those since the last one)
    eval_every = tcfg.eval_every or tcfg.checkpoint_every
    every = min(eval_every, max(10, math.ceil(per_save / (0.01 * per_step))))
    eval_chars = tcfg.eval_chars or len(va)
    final_evals = 2 * per_eval * len(va) / min(eval_chars, len(va))  # the final and the best, on all of va
    deadline = start + budget * (1 - MARGIN) - final_evals
    left = deadline - time.perf_counter()
    # 5% slack: logging, progress, and a long run's steps running slower than its warm-up's; a deadline that
    # cuts the annealing tail costs more loss than planning a few steps fewer
    per_step_all = per_step * 1.05 + per_eval / eval_every + per_save / every
    steps = args.steps or max(1, int(left / per_step_all))
    tcfg = tcfg.model_copy(update={"steps": steps, "checkpoint_every": every, "eval_every": eval_every})
    return tcfg, Plan(per_step, per_eval, per_save, n_warm, deadline, left)


def run_training(tr, va, vocab, mcfg, tcfg, out: Path, pl: Plan, fixed: bool, start: float):
    """Train into `out`, stopped by the deadline unless the step count is fixed; the step it finished at
    (None when the deadline stopped it) and the validation curve [minutes, step, loss]."""
    curve: list[list[float]] = []

    def progress(p: train.Progress) -> None:
        if p.val_loss is not None:
            m = (time.perf_counter() - start) / 60
            curve.append([round(m, 3), p.step, round(p.val_loss, 4)])
            print(f"{m:>8.2f} {p.step:>7} {p.loss:>7.4f} {p.val_loss:>7.4f}", flush=True)
        if not fixed and p.step < p.steps and time.perf_counter() > pl.deadline:
            raise OutOfTime  # (past the last step, the final checkpoint is written: it is quick)

    print(f"{'minutes':>8} {'step':>7} {'train':>7} {'val':>7}")
    try:
        return train.train(tr, va, vocab, mcfg, tcfg, out, on_progress=progress).meta.step, curve
    except OutOfTime:
        if not checkpoint.step_dirs(out):
            raise SystemExit(
                "the deadline came before the first checkpoint: give it more --minutes"
            ) from None
        return None, curve


def full_validation(out: Path, mcfg: ModelConfig, va: np.ndarray) -> tuple[dict[str, float], int]:
    """The full validation loss of the final checkpoint and of the best one (when another); the final step."""
    final = checkpoint.load(out)  # the last one written (at a deadline: fewer than checkpoint_every back)
    best = checkpoint.load(out, pointer="best")
    full = {f"final (step {final.meta.step})": train.evaluate(final.params, mcfg, va)}
    if best.meta.step != final.meta.step:
        full[f"best (step {best.meta.step})"] = train.evaluate(best.params, mcfg, va)
    return full, final.meta.step


def describe(n_train: int, n_val: int, mcfg: ModelConfig, tcfg: TrainConfig, pl: Plan) -> None:
    print(f"tiny shakespeare: {n_train:,} train / {n_val:,} validation chars")
    print(f"BLAS {common.blas_name()}, {common.blas_threads()} threads")
    print(f"model {mcfg.model_dump()}\ntrain {tcfg.model_dump()}")
    rate = tcfg.batch * tcfg.seq / pl.per_step
    print(
        f"warm-up: {pl.warm_steps} steps, {pl.per_step * 1e3:.1f} ms/step ({rate:,.0f} chars/s), "
        f"{pl.per_eval:.2f} s/validation, {pl.per_save:.2f} s/checkpoint -> {tcfg.steps} steps in the "
        f"{pl.left:.0f} s left for training"
    )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--minutes", type=float, default=5.0, help="wall-time budget, everything included")
    ap.add_argument("--quick", action="store_true", help="a 1-minute budget (a smoke run, not a result)")
    ap.add_argument("--cell", choices=sorted(net.CELLS), help="the cell (default: ModelConfig's)")
    ap.add_argument("--steps", type=int, default=0, help="fix the step count instead (no deadline)")
    ap.add_argument("--threads", type=int, default=0, help="BLAS threads; 0 = leave as is")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a field")
    common.add_record_flag(ap)
    args = ap.parse_args()
    if args.quick:
        args.minutes = 1.0
    start, cpu0 = time.perf_counter(), time.process_time()
    if args.threads:
        threadpool_limits(args.threads, user_api="blas")
    ids, vocab = common.load_ids()
    tr, va = split(ids)
    mcfg, tcfg = configs(len(vocab), ([f"cell={args.cell}"] if args.cell else []) + args.set)
    key = " ".join([f"{mcfg.cell} {mcfg.layers}x{mcfg.hidden}", *args.set, f"in {args.minutes:g} min"])
    run = common.begin(
        f"train_quality {key}", f"Validation loss reached: {key} (`bench/train_quality.py`)", args
    )
    tmp = Path(tempfile.mkdtemp(prefix="char-rnn-quality-"))
    tcfg, pl = plan(tr, va, mcfg, tcfg, args, start, tmp)
    describe(len(tr), len(va), mcfg, tcfg, pl)
    done, curve = run_training(tr, va, vocab, mcfg, tcfg, tmp / "run", pl, bool(args.steps), start)
    full, final_step = full_validation(tmp / "run", mcfg, va)
    shutil.rmtree(tmp)
    minutes, cpu_minutes = (time.perf_counter() - start) / 60, (time.process_time() - cpu0) / 60
    load_after, best_val = os.getloadavg(), min(full.values())
    for k, v in full.items():
        print(f"full validation, {k}: {v:.4f} nats/char ({v / math.log(2):.4f} bits)")
    stopped = "" if done else f"; the deadline stopped training after step {final_step} of {tcfg.steps}"
    print(f"{minutes:.2f} min wall (budget {args.minutes:g}), {cpu_minutes:.2f} min CPU{stopped}")
    result = {
        "best_val_nats": round(best_val, 4),
        "best_val_bits": round(best_val / math.log(2), 4),
        "minutes": round(minutes, 3),
        "budget_minutes": args.minutes,
        "cpu_minutes": round(cpu_minutes, 3),
        "steps_planned": tcfg.steps,
        "steps_done": final_step if done is None else done,
        "stopped_by_deadline": done is None,
        "ms_per_step": round(pl.per_step * 1e3, 2),
        "blas_threads": common.blas_threads(),
        "load_avg_before": [round(x, 2) for x in run.load_before],
        "load_avg_after": [round(x, 2) for x in load_after],
        "model": mcfg.model_dump(),
        "train": tcfg.model_dump(),
        "overrides": args.set,
        "curve": curve,
    }
    common.record(run, report(result, full), load_after)
    print(json.dumps(result))


def report(r: dict, full: dict[str, float]) -> str:
    """The run as markdown: the result, then the validation curve."""
    head = [
        "best nats/char (bits)",
        "steps done / planned",
        "ms/step (warm-up)",
        "wall minutes",
        "CPU minutes",
    ]
    cut = " (deadline)" if r["stopped_by_deadline"] else ""
    row = [
        f"**{r['best_val_nats']}** ({r['best_val_bits']})",
        f"{r['steps_done']} / {r['steps_planned']}{cut}",
    ]
    row += [r["ms_per_step"], r["minutes"], r["cpu_minutes"]]
    checkpoints = "; ".join(f"{k}: {v:.4f}" for k, v in full.items())
    curve = common.markdown_table(["minutes", "step", "validation nats/char"], r["curve"])
    settings = f"Model `{r['model']}`; training `{r['train']}`; {r['blas_threads']} BLAS thread(s)."
    return f"{common.markdown_table(head, [row])}\n\nFull validation: {checkpoints}. {settings}\n\n{curve}\n"


if __name__ == "__main__":
    main()
