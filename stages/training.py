"""Training a run folder, and a sweep's trial to a rung.

A run folder (a folder of checkpoints) belongs to one process for the whole training: `train_run` holds its
lock (model.files.owned) from the first look at its checkpoints to the last one written, so a second writer
(`--resume` and `--overwrite` included) is refused in one line naming the owner, and a run killed any way at
all leaves nothing that blocks its resume.

How long a pipeline run trains is its `Budget`: a fresh model the steps asked; a warm start (which continues
the promoted model) as many steps as the share of the text that is new calls for, within a floor and a cap,
and never fewer than the promoted model still lacks of the steps asked. While it trains, a pipeline run
keeps `progress.json` in its run folder (`ProgressFile`): what the service's playground shows live.
"""

from __future__ import annotations

import hashlib
import json
import os
import socket
import time
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
from pydantic import BaseModel, TypeAdapter

from model import checkpoint, net, train
from model.checkpoint import CheckpointError
from model.config import ModelConfig, TrainConfig
from model.files import owned, write_atomic
from model.net import Params
from model.runtime import blas_limit
from model.train import Progress
from model.vocab import Vocab
from stages.records import CurrentModel, Decision, Encoded, Rung, Trained, Trial

PROGRESS_FILE = "progress.json"  # in a pipeline run's folder, while and after it trains


def run_name(fingerprint: str, model: ModelConfig, config: TrainConfig, parent: str | None) -> str:
    """A pipeline run folder's name: the same work gets the same name, so a re-run finds its checkpoints."""
    blob = json.dumps([model.model_dump(), config.model_dump(), parent], sort_keys=True).encode()
    return f"run-{fingerprint[:12]}-{hashlib.sha256(blob).hexdigest()[:8]}"


class Learnt(BaseModel):
    """What the promoted model has learnt: its steps in all (its own and its warm-start ancestors', as far
    as the model store still holds them), and the characters of the corpus it was trained on."""

    steps: int = 0
    chars: int = 0


class Budget(BaseModel):
    """How many steps a run trains, at which peak learning rate, and why."""

    steps: int
    lr: float
    why: str


def learnt(current: CurrentModel | None, store: Path) -> Learnt:
    """What promoted model `current` has learnt, from the model store under `store`."""
    from registry import Registry  # imports BentoML, which the entry point configures first

    if current is None:
        return Learnt()
    registry, tag, seen, steps, chars = Registry(store, report=False), current.tag, set(), 0, None
    while tag and tag not in seen:
        seen.add(tag)
        try:
            m = registry.get(tag)
            meta = checkpoint.read_meta(Path(m.path))
        except CheckpointError:  # an ancestor gone from the store: count what is known
            break
        steps += meta.step
        chars = int(m.info.labels.get("corpus_chars") or 0) if chars is None else chars
        tag = meta.parent
    return Learnt(steps=steps, chars=chars or 0)


def short_of(current: CurrentModel | None, fingerprint: str, known: Learnt, steps: int) -> bool:
    """Whether a run must train although the promoted model knows this corpus: it was trained on it (not
    chosen over one trained on it by a rollback) for fewer than `steps` steps in all."""
    return current is not None and current.fingerprint == fingerprint and known.steps < steps


WARM_LR = 0.2  # a warm start peaks at this share of the learning rate a fresh model takes


def budget(
    asked: TrainConfig, warm: CurrentModel | None, chars: int, known: Learnt, low: int, high: int
) -> Budget:
    """How a run asked for `asked` trains on `chars` characters, warm-starting from `warm` (which has
    learnt `known`). A fresh model trains `asked.steps`. A warm start refines a trained model: `asked.steps`
    times the share of the text that is new, within [low, high] and never more than `asked.steps`, but at
    least what `warm` lacks of them; and at WARM_LR of the peak learning rate, so that its first steps (with
    fresh optimizer moments) do not undo what the model knows."""
    steps = asked.steps
    if warm is None:
        return Budget(steps=steps, lr=asked.lr, why=f"a fresh model trains the {steps} steps asked")
    new = max(chars - known.chars, 0)
    share = new / max(chars, 1)
    raw = round(steps * share)
    n = min(max(raw, low), high, steps)
    why = [f"{share:.1%} of the text is new ({new:,} of {chars:,} characters), {steps} x {share:.1%} = {raw}"]
    if n != raw:
        why[0] += f", held within [{min(low, steps)}, {min(high, steps)}]"
    if (short := steps - known.steps) > 0:
        why.insert(0, f"it learnt {known.steps} steps in all, {short} short of the {steps} asked")
        n = max(n, short)
    lr = asked.lr * WARM_LR
    return Budget(
        steps=n, lr=lr, why=f"warm start from {warm.tag}: {'; '.join(why)}: {n} steps, at lr {lr:.2g}"
    )


def now() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds")


class ProgressFile:
    """A pipeline run's training as `progress.json` in its run folder, rewritten atomically at most every
    `every` seconds, at each validation and at the end: the run, its state (training, trained, then promoted
    or kept; failed), step, losses, speed, time left, the loss curves so far, the process that trains it, and
    why it trains that many steps. The service reads it to show the run live; nothing else depends on it."""

    def __init__(self, path: Path, steps: int, warm: str | None, why: str, every: float = 1.0):
        self.path, self.every, self.last = Path(path), every, 0.0
        self.doc = {
            "run": self.path.parent.name,
            "state": "training",
            "pid": os.getpid(),
            "host": socket.gethostname(),
            "started_at": now(),
            "warm_start": warm,
            "why": why,
            "step": 0,
            "steps": steps,
            "train": [],
            "val": [],
        }

    def write(self, **changes: object) -> None:
        self.doc |= changes | {"updated_at": now()}
        write_atomic(self.path, json.dumps(self.doc).encode())
        self.last = time.monotonic()

    def start(self, step: int) -> None:
        self.write(step=step, resumed_from=step)

    def __call__(self, p: Progress) -> None:
        self.doc["train"].append([p.step, round(p.loss, 4)])
        if p.val_loss is not None:
            self.doc["val"].append([p.step, round(p.val_loss, 4)])
        if p.val_loss is None and p.step < p.steps and time.monotonic() - self.last < self.every:
            return
        seen = {"loss": p.loss, "val_loss": self.doc["val"][-1][1] if self.doc["val"] else None}
        self.write(step=p.step, chars_per_s=p.chars_per_s, eta_s=p.eta_s, **seen)


def settle(run_dir: Path, decision: Decision) -> None:
    """Record in the progress.json of the run in `run_dir` how it ended (left alone when it has none)."""
    path = Path(run_dir) / PROGRESS_FILE
    try:
        doc = json.loads(path.read_bytes())
    except (OSError, ValueError):
        return
    doc |= {"state": "promoted" if decision.promoted else "kept", "updated_at": now()}
    doc |= {"tag": decision.tag, "reason": decision.reason}
    write_atomic(path, json.dumps(doc).encode())


def newest_step(out: Path) -> int:
    """The step of the newest good checkpoint in `out` (0 when there is none)."""
    return checkpoint.load(out, with_optim=False).meta.step if checkpoint.step_dirs(out) else 0


def warm_params(warm: CurrentModel | None, model: ModelConfig, seed: int) -> Params | None:
    """The promoted model's parameters grown to the candidate's vocabulary (old ids keep their rows)."""
    if warm is None:
        return None
    ck = checkpoint.load_dir(warm.path, with_optim=False)
    return net.grow(ck.params, ck.config, model.vocab_size, np.random.default_rng(seed))


def train_run(
    data: Encoded,
    out: Path,
    model: ModelConfig,
    config: TrainConfig,
    *,
    warm: CurrentModel | None = None,
    resume: bool = True,
    overwrite: bool = False,
    on_start: Callable[[int], None] | None = None,
    on_progress: Callable[[Progress], None] | None = None,
    progress: ProgressFile | None = None,
    waiting: Callable[[str], None] | None = None,
) -> Trained:
    """Train into the checkpoint folder `out`, owning it throughout (a live owner is refused, or waited for
    when `waiting` is given: it hears who). `resume` continues its newest checkpoint
    (bitwise as if never stopped); without it a folder that holds checkpoints is refused, unless `overwrite`
    (which deletes them first). A fresh run starts from `warm` (the promoted model, grown) when given.
    `on_start` hears the step training starts from (0 when fresh); `progress` records the training."""
    out = Path(out)
    with owned(out, "training", waiting):
        if overwrite:
            checkpoint.clear(out)
        start = newest_step(out) if resume else 0
        for hear in filter(None, (on_start, progress and progress.start)):
            hear(start)
        heard = [f for f in (on_progress, progress) if f]

        def tell(p: Progress) -> None:
            for f in heard:
                f(p)

        t0 = time.perf_counter()
        try:
            final = train.train(
                data.load("train"),
                data.load("val"),
                Vocab(tuple(data.vocab)),
                model,
                config,
                out,
                resume=resume,
                init_params=None if start else warm_params(warm, model, config.seed),
                parent=warm.tag if warm else None,
                fingerprint=data.fingerprint,
                on_progress=tell if heard else None,
            )
        except Exception as e:
            if progress:
                progress.write(state="failed", error=str(e))
            raise
        if progress:
            progress.write(state="trained", step=final.meta.step, eta_s=0.0)
    return Trained(
        checkpoint=final.path,
        step=final.meta.step,
        resumed_from=start,
        warm_start=final.meta.parent,
        seconds=time.perf_counter() - t0,
    )


def train_trial(
    data: Encoded,
    trial: Trial,
    rung: int,
    stop: int,
    worker: str = "local",
    waiting: Callable[[str], None] | None = None,
) -> Rung:
    """Train `trial` to step `stop` on one BLAS thread, resuming its newest checkpoint. A rung it finished
    before (in this sweep or the same sweep run meanwhile, which it waits for when told `waiting`) is read
    back, not trained again; a diverging trial is a failed Rung, not an error."""
    out = trial.dir / "checkpoints"
    with owned(out, f"training trial {trial.index}", waiting):
        done = {r.rung: r for r in trial.rungs()}
        if rung in done:
            return done[rung]
        where = {"worker": worker, "pid": os.getpid(), "host": socket.gethostname(), "rung": rung}
        write_atomic(trial.dir / "worker.json", json.dumps(where).encode())
        write_atomic(trial.dir / "trial.json", trial.model_dump_json(indent=1).encode())
        start = newest_step(out)
        t0, val, failed, step = time.perf_counter(), None, None, start
        try:
            with blas_limit(1):
                ck = train.train(
                    data.load("train"),
                    data.load("val"),
                    Vocab(tuple(data.vocab)),
                    trial.model,
                    trial.config,
                    out,
                    resume=True,
                    fingerprint=data.fingerprint,
                    stop=stop,
                )
            step, val = ck.meta.step, dict(map(tuple, ck.meta.metrics["val"]))[stop]
        except train.TrainingDiverged as e:
            failed = str(e)
        seconds = time.perf_counter() - t0
        result = Rung(
            rung=rung,
            step=stop if failed is None else step,
            val=val,
            seconds=seconds,
            chars_per_s=(step - start) * trial.config.batch * trial.config.seq / max(seconds, 1e-9),
            worker=worker,
            resumed_from=start,
            failed=failed,
        )
        write_atomic(trial.results, TypeAdapter(list[Rung]).dump_json([*done.values(), result], indent=1))
    return result
