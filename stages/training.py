"""Training a run folder, and a sweep's trial to a rung.

A run folder (a folder of checkpoints) belongs to one process for the whole training: `train_run` holds its
lock (model.files.owned) from the first look at its checkpoints to the last one written, so a second writer
(`--resume` and `--overwrite` included) is refused in one line naming the owner, and a run killed any way at
all leaves nothing that blocks its resume.
"""

from __future__ import annotations

import hashlib
import json
import os
import socket
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
from pydantic import TypeAdapter

from model import checkpoint, net, train
from model.config import ModelConfig, TrainConfig
from model.files import owned, write_atomic
from model.net import Params
from model.runtime import blas_limit
from model.train import Progress
from model.vocab import Vocab
from stages.records import CurrentModel, Encoded, Rung, Trained, Trial


def run_name(fingerprint: str, model: ModelConfig, config: TrainConfig, parent: str | None) -> str:
    """A pipeline run folder's name: the same work gets the same name, so a re-run finds its checkpoints."""
    blob = json.dumps([model.model_dump(), config.model_dump(), parent], sort_keys=True).encode()
    return f"run-{fingerprint[:12]}-{hashlib.sha256(blob).hexdigest()[:8]}"


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
) -> Trained:
    """Train into the checkpoint folder `out`, owning it throughout. `resume` continues its newest checkpoint
    (bitwise as if never stopped); without it a folder that holds checkpoints is refused, unless `overwrite`
    (which deletes them first). A fresh run starts from `warm` (the promoted model, grown) when given.
    `on_start` hears the step training starts from (0 when fresh)."""
    out = Path(out)
    with owned(out, "training"):
        if overwrite:
            checkpoint.clear(out)
        start = newest_step(out) if resume else 0
        if on_start:
            on_start(start)
        t0 = time.perf_counter()
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
            on_progress=on_progress,
        )
    return Trained(
        checkpoint=final.path,
        step=final.meta.step,
        resumed_from=start,
        warm_start=final.meta.parent,
        seconds=time.perf_counter() - t0,
    )


def train_trial(data: Encoded, trial: Trial, rung: int, stop: int, worker: str = "local") -> Rung:
    """Train `trial` to step `stop` on one BLAS thread, resuming its newest checkpoint. A rung it finished
    before is read back, not trained again; a diverging trial is a failed Rung, not an error."""
    done = {r.rung: r for r in trial.rungs()}
    if rung in done:
        return done[rung]
    out = trial.dir / "checkpoints"
    with owned(out, f"training trial {trial.index}"):
        now = {"worker": worker, "pid": os.getpid(), "host": socket.gethostname(), "rung": rung}
        write_atomic(trial.dir / "worker.json", json.dumps(now).encode())
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
