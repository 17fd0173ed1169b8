"""Validation loss reached in M minutes of wall time, everything included, by a cell and configuration.

Trains TrainConfig() + ModelConfig() defaults (or `--cell`, `--set` overrides) with model.train.train on tiny
shakespeare (last 10% held out, model.corpus.split). The budget is wall time from start to the last number:
the run's own first steps (its learning-rate warm-up) time a step, a validation pass and a checkpoint, which
sets the step count so that the cosine schedule, the in-run validations, the checkpoints and the final
full-validation passes fit; halfway and again near the end, the step count is planned again from the pace
measured since the last plan. Should the machine slow down (other jobs take the cores), a deadline stops
training early (reported, with the steps done) rather than overrun. Prints validation loss against time; the
last line is one JSON object whose "best_val_nats" is the full validation set's loss of the better of the
final and the best (by in-run validation) checkpoints. Run it on an otherwise idle machine: the load average
is recorded before and after. The run writes its section of docs/benchmarks.md (unless --no-record): one
section per cell, `--set` overrides and budget, so the cells' last runs stand side by side, each with its own
date, load and commit.

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
from dataclasses import dataclass, field
from pathlib import Path

import common
import numpy as np
from threadpoolctl import threadpool_limits

from model import checkpoint, net, train
from model.config import ModelConfig, TrainConfig
from model.corpus import split

MARGIN = 0.02  # of the budget, kept free against estimation error
# the shares of the planned steps after which the step count is planned again: the last one near the end, so
# that a slower second half is met while the learning rate still has its cosine's end to reach
REPLAN = (0.5, 0.9)
CHECKPOINT_EVERY = 50  # steps: what a deadline can lose; fixed, as a resumed run must keep it


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


@dataclass
class Budget:
    """The wall-time budget and the run's own timings: step, validation and checkpoint costs, measured on
    its first steps, and the deadline by which training must stop (the final evaluations left to do)."""

    start: float
    seconds: float  # the budget
    deadline: float = 0.0
    per_step: float = 0.0
    per_eval: float = 0.0
    per_save: float = 0.0
    plans: list[int] = field(default_factory=list)  # the step counts planned, in turn


@dataclass
class Segment:
    """What one train.train call saw: (time, step) at each report without a validation, the time of each
    report with one, its start and end."""

    marks: list[tuple[float, int]] = field(default_factory=list)
    val_marks: list[tuple[float, int]] = field(default_factory=list)
    t0: float = 0.0
    t1: float = 0.0


def segment(tr, va, vocab, mcfg, tcfg, out: Path, budget: Budget, curve: list, stop: int | None) -> Segment:
    """Train into `out` (resuming what is there) up to `stop` (or the end) while the schedule spans
    `tcfg.steps`; OutOfTime when the deadline passes first (budget.deadline 0: no deadline yet)."""
    seg = Segment(t0=time.perf_counter())

    def progress(p: train.Progress) -> None:
        now = time.perf_counter()
        if p.val_loss is None:
            seg.marks.append((now, p.step))
        else:
            seg.val_marks.append((now, p.step))
            curve.append([round((now - budget.start) / 60, 3), p.step, round(p.val_loss, 4)])
            print(f"{curve[-1][0]:>8.2f} {p.step:>7} {p.loss:>7.4f} {p.val_loss:>7.4f}", flush=True)
        if budget.deadline and p.step < p.steps and now > budget.deadline:
            raise OutOfTime  # (past the last step, the final checkpoint is written: it is quick)

    resume = bool(checkpoint.step_dirs(out))
    train.train(tr, va, vocab, mcfg, tcfg, out, resume=resume, stop=stop, on_progress=progress)
    seg.t1 = time.perf_counter()
    return seg


def measure(seg: Segment, budget: Budget) -> None:
    """Step, validation and checkpoint costs from the first segment: the steps' mean over its second half (a
    run pays for its slow steps too, but not for a fresh process's first ones); the validation, the time of
    the last report's steps over theirs; the checkpoint (with its read-back), what followed the report."""
    (ta, sa), (tb, sb) = seg.marks[len(seg.marks) // 2], seg.marks[-1]
    budget.per_step = (tb - ta) / (sb - sa)
    t_val, s_val = seg.val_marks[-1]
    budget.per_eval = max(0.0, t_val - tb - (s_val - sb) * budget.per_step)
    budget.per_save = seg.t1 - t_val


def plan(tcfg: TrainConfig, budget: Budget, done: int, per_step_all: float) -> TrainConfig:
    """The step count that ends training at the deadline, at `per_step_all` seconds a step from `done`."""
    steps = max(done + 1, done + int((budget.deadline - time.perf_counter()) / per_step_all))
    budget.plans.append(steps)
    return tcfg.model_copy(update={"steps": steps})


def run_training(tr, va, vocab, mcfg, tcfg: TrainConfig, out: Path, budget: Budget, n_val: int, fixed: bool):
    """The run in calls of train.train: its first steps (the learning-rate warm-up, whose schedule does not
    depend on the step count) time a step, a validation and a checkpoint; the step count is then planned so
    that training ends at the deadline, and planned again at each REPLAN share from the pace measured since
    the last plan (the cosine then stretches or shrinks a little from there). Returns the step it finished at
    (None when the deadline stopped it) and the validation curve [minutes, step, loss]."""
    curve: list[list[float]] = []
    print(f"{'minutes':>8} {'step':>7} {'train':>7} {'val':>7}")
    if fixed:
        segment(tr, va, vocab, mcfg, tcfg, out, budget, curve, None)
        return tcfg.steps, curve
    first = max(tcfg.warmup, 10 * tcfg.log_every)
    probe = tcfg.model_copy(update={"steps": max(10 * first, 10**6)})  # a cosine too long to move yet
    measure(segment(tr, va, vocab, mcfg, probe, out, budget, curve, first), budget)
    eval_chars = min(tcfg.eval_chars or n_val, n_val)
    # the final checkpoint on all of va (the best is another only when the last in-run validation was not
    # the lowest, rare at the cosine's end: MARGIN covers its pass then)
    final_evals = budget.per_eval * n_val / eval_chars
    budget.deadline = budget.start + budget.seconds * (1 - MARGIN) - final_evals
    every = tcfg.eval_every or tcfg.checkpoint_every
    per_step_all = budget.per_step + budget.per_eval / every + budget.per_save / tcfg.checkpoint_every
    tcfg = plan(tcfg, budget, first, per_step_all)
    told(budget, tcfg, first, per_step_all)
    try:
        done = first
        for share in REPLAN:
            at = first + int(share * (tcfg.steps - first))
            if at <= done:
                continue
            seg = segment(tr, va, vocab, mcfg, tcfg, out, budget, curve, at)
            pace = (seg.t1 - seg.t0) / (at - done)
            tcfg = plan(tcfg, budget, at, pace)
            told(budget, tcfg, at, pace)
            done = at
        segment(tr, va, vocab, mcfg, tcfg, out, budget, curve, None)
        return tcfg.steps, curve
    except OutOfTime:
        return None, curve


def full_validation(out: Path, mcfg: ModelConfig, va: np.ndarray) -> tuple[dict[str, float], int]:
    """The full validation loss of the final checkpoint and of the best one (when another); the final step."""
    final = checkpoint.load(out)  # the last one written (at a deadline: fewer than checkpoint_every back)
    best = checkpoint.load(out, pointer="best")
    full = {f"final (step {final.meta.step})": train.evaluate(final.params, mcfg, va)}
    if best.meta.step != final.meta.step:
        full[f"best (step {best.meta.step})"] = train.evaluate(best.params, mcfg, va)
    return full, final.meta.step


def describe(n_train: int, n_val: int, mcfg: ModelConfig, tcfg: TrainConfig) -> None:
    print(f"tiny shakespeare: {n_train:,} train / {n_val:,} validation chars")
    print(f"BLAS {common.blas_name()}, {common.blas_threads()} threads")
    print(f"model {mcfg.model_dump()}\ntrain {tcfg.model_dump(exclude={'steps'})}")


def told(budget: Budget, tcfg: TrainConfig, done: int, pace: float) -> None:
    """The plan just made, as a line."""
    if len(budget.plans) == 1:
        rate = tcfg.batch * tcfg.seq / budget.per_step
        print(
            f"first {done} steps: {budget.per_step * 1e3:.1f} ms/step ({rate:,.0f} chars/s), "
            f"{budget.per_eval:.2f} s/validation, {budget.per_save:.2f} s/checkpoint"
        )
    left = budget.deadline - time.perf_counter()
    print(f"  at step {done}: {pace * 1e3:.1f} ms a step all in, {left:.0f} s left -> {tcfg.steps} steps")


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
    every = tcfg.eval_every or tcfg.checkpoint_every
    tcfg = tcfg.model_copy(update={"eval_every": every, "checkpoint_every": CHECKPOINT_EVERY})
    if args.steps:
        tcfg = tcfg.model_copy(update={"steps": args.steps})
    describe(len(tr), len(va), mcfg, tcfg)
    budget = Budget(start, 60.0 * args.minutes)
    done, curve = run_training(tr, va, vocab, mcfg, tcfg, tmp / "run", budget, len(va), bool(args.steps))
    planned = budget.plans[-1] if budget.plans else tcfg.steps
    full, final_step = full_validation(tmp / "run", mcfg, va)
    shutil.rmtree(tmp)
    minutes, cpu_minutes = (time.perf_counter() - start) / 60, (time.process_time() - cpu0) / 60
    load_after, best_val = os.getloadavg(), min(full.values())
    for k, v in full.items():
        print(f"full validation, {k}: {v:.4f} nats/char ({v / math.log(2):.4f} bits)")
    stopped = "" if done else f"; the deadline stopped training after step {final_step} of {planned}"
    print(f"{minutes:.2f} min wall (budget {args.minutes:g}), {cpu_minutes:.2f} min CPU{stopped}")
    result = {
        "best_val_nats": round(best_val, 4),
        "best_val_bits": round(best_val / math.log(2), 4),
        "minutes": round(minutes, 3),
        "budget_minutes": args.minutes,
        "cpu_minutes": round(cpu_minutes, 3),
        "steps_planned": planned,
        "plans": budget.plans,
        "steps_done": final_step if done is None else done,
        "stopped_by_deadline": done is None,
        "ms_per_step": round(budget.per_step * 1e3, 2),
        "blas_threads": common.blas_threads(),
        "load_avg_before": [round(x, 2) for x in run.load_before],
        "load_avg_after": [round(x, 2) for x in load_after],
        "model": mcfg.model_dump(),
        "train": tcfg.model_dump() | {"steps": planned},
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
        "ms/step (first steps)",
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
