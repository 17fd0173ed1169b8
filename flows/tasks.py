"""The pipeline's steps as small Prefect tasks. They pass paths, hashes and small models, never big arrays.

No task result is persisted (nothing is ever unpickled): work that is worth reusing leaves files whose names
are their cache keys (encoded data under its fingerprint, checkpoints in a run folder named by its config).
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import logging
import os
import socket
import time
from collections.abc import Collection
from pathlib import Path
from typing import Any

import numpy as np
from prefect import runtime, task
from prefect.artifacts import (
    create_link_artifact,
    create_markdown_artifact,
    create_progress_artifact,
    create_table_artifact,
    update_progress_artifact,
)
from prefect.exceptions import MissingContextError
from prefect.logging import get_logger, get_run_logger
from pydantic import BaseModel, TypeAdapter, ValidationError
from threadpoolctl import threadpool_limits

from flows import report
from flows.report import Comparison, Decision, Outcome, Rung, Score
from model import checkpoint, corpus, net, train
from model.checkpoint import CheckpointError
from model.files import locked, make_dirs, write_atomic
from model.net import ModelConfig
from model.sample import Settings, sample
from model.train import Progress, Streams, TrainConfig
from model.vocab import Vocab
from registry import Current, Registry, Verdict

PROMPTS = ("\n", "The ", "ROMEO:")  # fixed, so samples are comparable across runs; unknown chars skipped
SAMPLE_CHARS = 200
SAMPLING = [Settings(temperature=0.8, seed=i) for i in range(len(PROMPTS))]
PROGRESS = "char-rnn-training"  # the progress artifact's key


class CorpusInfo(BaseModel):
    """What ingest found: the fingerprint and the files used and skipped (not the text itself)."""

    fingerprint: str
    files: list[str]
    skipped: dict[str, str]
    chars: int


class CurrentModel(BaseModel):
    """The promoted model: its tag, its checkpoint directory in the store, and what it was trained on."""

    tag: str
    path: Path
    fingerprint: str | None
    vocab: list[str]
    config: ModelConfig
    rolled_back_from: dict[str, str] = {}  # fingerprint -> tag: models a rollback to this one replaced

    @classmethod
    def of(cls, cur: Current, registry: Registry | None = None) -> CurrentModel:
        """The model `cur`; with the `registry`, also what rollbacks to it replaced."""
        m, replaced = cur.checkpoint.meta, {}
        for tag in registry.rolled_back_from(cur.tag) if registry else ():
            with contextlib.suppress(CheckpointError):
                replaced[registry.get(tag).info.labels.get("fingerprint", "")] = tag
        return cls(
            tag=cur.tag,
            path=cur.checkpoint.path,
            fingerprint=m.fingerprint,
            vocab=m.vocab,
            config=m.model,
            rolled_back_from=replaced,
        )

    def knows(self, fingerprint: str) -> str | None:
        """Why retraining from this model on the corpus `fingerprint` would redo known work, if it would:
        this model was trained on it, or a model trained on it from this one was rolled back to this one."""
        seen = f"(fingerprint {fingerprint[:12]})"
        if fingerprint == self.fingerprint:
            return f"corpus unchanged since {self.tag} was trained on it {seen}"
        if tag := self.rolled_back_from.get(fingerprint):
            return f"corpus unchanged since {tag}, trained on it, was rolled back to {self.tag} {seen}"
        return None

    def shape_differs(self, model: ModelConfig) -> str | None:
        """Why a candidate of config `model` cannot warm-start from this one (None when it can)."""
        mine, theirs = (c.model_dump(exclude={"vocab_size", "dropout"}) for c in (self.config, model))
        if mine == theirs:
            return None
        diff = ", ".join(f"{k}={mine[k]}" for k in mine if mine[k] != theirs[k])
        return f"{self.tag} has {diff}, unlike this run"


class Encoded(BaseModel):
    """An encoded corpus on disk (this is its manifest.json): vocabulary, split sizes, file checksums."""

    dir: Path
    fingerprint: str
    vocab: list[str]
    new_chars: list[str]  # appended to the warm-start model's vocabulary
    train_chars: int
    val_chars: int
    sha256: dict[str, str]

    @property
    def manifest(self) -> Path:
        return self.dir / "manifest.json"

    def load(self, name: str) -> np.ndarray:
        """The `name` array ("train" or "val"), checked against the manifest's sha256."""
        f = self.dir / f"{name}.npy"
        data = f.read_bytes()
        if hashlib.sha256(data).hexdigest() != self.sha256[f.name]:
            raise ValueError(f"{f}: checksum mismatch; delete {self.dir} and run the pipeline again")
        return np.load(io.BytesIO(data), allow_pickle=False)


class Trained(BaseModel):
    """The candidate: its final checkpoint and how training went."""

    checkpoint: Path
    step: int
    resumed_from: int  # 0 when training started fresh
    warm_start: str | None  # the promoted tag it started from
    seconds: float


def log() -> logging.Logger | logging.LoggerAdapter:
    """The run logger inside a flow or task run; a plain Prefect logger when called through .fn()."""
    try:
        return get_run_logger()
    except MissingContextError:
        return get_logger("char-rnn")


@task(persist_result=False)
def ingest(data_dir: Path) -> CorpusInfo:
    """Read the corpus's .txt files as NFC UTF-8 (unusable ones skipped with a warning); fingerprint it."""
    c = corpus.read(data_dir)
    for name, why in c.skipped.items():
        log().warning("Skipped %s: %s", Path(data_dir) / name, why)
    log().info(
        "Corpus %s: %d file(s), %d chars, fingerprint %s", data_dir, len(c.files), len(c.text), c.fingerprint
    )
    return CorpusInfo(fingerprint=c.fingerprint, files=c.files, skipped=c.skipped, chars=len(c.text))


@task(persist_result=False)
def current_model(store: Path) -> CurrentModel | None:
    """The promoted model a candidate has to beat (the newest that passes its checks), or None."""
    registry = Registry(store)
    cur = registry.current()
    return None if cur is None else CurrentModel.of(cur, registry)


def reuse(out: Path) -> Encoded | None:
    """The encoded data already in `out`, if its manifest and arrays check out."""
    try:
        found = Encoded.model_validate_json((out / "manifest.json").read_bytes())
        for name in ("train", "val"):
            found.load(name)
    except (OSError, ValueError, ValidationError):
        return None
    return found if found.dir == out else None


@task(persist_result=False)
def encode(data_dir: Path, fingerprint: str, root: Path, base_vocab: list[str] | None = None) -> Encoded:
    """Build the vocabulary (grown from `base_vocab`), split every file 90/10 and write the arrays; reuse
    them when a run already encoded the same text with the same vocabulary."""
    c = corpus.read(data_dir)
    if c.fingerprint != fingerprint:
        raise RuntimeError(f"{data_dir} changed while the pipeline ran (fingerprint differs); run it again")
    base = Vocab(tuple(base_vocab or ()))
    vocab = base.grow(c.text)
    blob = json.dumps(vocab.chars).encode()
    out = Path(root) / f"data-{fingerprint[:12]}-{hashlib.sha256(blob).hexdigest()[:8]}"
    if found := reuse(out):
        log().info("Reusing the encoded corpus in %s", out)
        return found
    make_dirs(out)
    train_text, val_text = c.split()
    files = {"vocab.json": blob}
    for name, text in (("train", train_text), ("val", val_text)):
        buf = io.BytesIO()
        np.save(buf, vocab.encode(text), allow_pickle=False)
        files[f"{name}.npy"] = buf.getvalue()
    for name, data in files.items():
        write_atomic(out / name, data)
    encoded = Encoded(
        dir=out,
        fingerprint=fingerprint,
        vocab=list(vocab.chars),
        new_chars=list(vocab.chars[len(base) :]) if base_vocab else [],
        train_chars=len(train_text),
        val_chars=len(val_text),
        sha256={name: hashlib.sha256(data).hexdigest() for name, data in files.items()},
    )
    write_atomic(encoded.manifest, encoded.model_dump_json(indent=1).encode())  # last: marks it complete
    if encoded.new_chars:
        log().info(
            "Vocabulary grown by %d new character(s): %r", len(encoded.new_chars), "".join(encoded.new_chars)
        )
    return encoded


@task(persist_result=False)
def preflight(data: Encoded, configs: list[TrainConfig], current: CurrentModel | None) -> None:
    """Check everything training, evaluation and comparison need, before any training time is spent."""
    for config in {(c.batch, c.seq): c for c in configs}.values():
        Streams(np.zeros(data.train_chars, np.int32), config.batch, config.seq)  # raises when too short
    if data.val_chars < 2:
        raise ValueError(f"{data.dir}: the validation text has {data.val_chars} characters; add text")
    if current is not None:
        known = set(current.vocab)
        usable = sum(1 for i in data.load("val") if data.vocab[i] in known)
        if usable < 2:
            raise ValueError(
                f"the promoted model {current.tag} knows none of the validation text's characters, so the "
                "candidate cannot be compared with it; keep some of the text it was trained on in the corpus "
                "folder, or train this text under a new CHAR_RNN_HOME"
            )


class Reporter:
    """Training progress as a Prefect progress artifact (its description is `Progress.summary`, the line
    `python -m flows.follow` shows) and a log line, every `every` s and at evaluations."""

    def __init__(self, steps: int, every: float = 2.0):
        self.every, self.last, self.last_val = every, 0.0, None
        self.artifact = create_progress_artifact(0.0, key=PROGRESS, description=f"0/{steps} starting")

    def __call__(self, p: Progress) -> None:
        now = time.monotonic()
        self.last_val = self.last_val if p.val_loss is None else p.val_loss
        if p.val_loss is None and p.step < p.steps and now - self.last < self.every:
            return
        self.last = now
        update_progress_artifact(self.artifact, 100.0 * p.step / p.steps, p.summary(self.last_val))
        val = f", val {p.val_loss:.4f} ({train.bits(p.val_loss):.3f} bits)" if p.val_loss is not None else ""
        log().info(
            "step %d/%d: loss %.4f nats/char%s, lr %.2g, |g| %.2f, %.0f chars/s, eta %.0f s",
            p.step,
            p.steps,
            p.loss,
            val,
            p.lr,
            p.grad_norm,
            p.chars_per_s,
            p.eta_s,
        )


@task(persist_result=False)
def train_model(
    data: Encoded, run_dir: Path, model: ModelConfig, config: TrainConfig, warm: CurrentModel | None
) -> Trained:
    """Train with checkpoints, resuming this run's last one if any, else warm-starting from `warm`."""
    out = run_dir / "checkpoints"
    init = parent = None
    if warm is not None:
        ck = checkpoint.load_dir(warm.path, with_optim=False)
        init = net.grow(ck.params, ck.config, model.vocab_size, np.random.default_rng(config.seed))
        parent = warm.tag
    t0 = time.perf_counter()
    with locked(make_dirs(run_dir) / ".lock", f"another run is training into {run_dir}; waiting for it"):
        resumed_from = checkpoint.load(out, with_optim=False).meta.step if checkpoint.step_dirs(out) else 0
        if resumed_from:
            log().info("Resuming from the checkpoint at step %d in %s", resumed_from, out)
        else:
            log().info("Training %s into %s", f"from {parent}" if parent else "from scratch", out)
        final = train.train(
            data.load("train"),
            data.load("val"),
            Vocab(tuple(data.vocab)),
            model,
            config,
            out,
            resume=True,
            init_params=init,
            parent=parent,
            fingerprint=data.fingerprint,
            on_progress=Reporter(config.steps),
        )
    return Trained(
        checkpoint=final.path,
        step=final.meta.step,
        resumed_from=resumed_from,
        warm_start=final.meta.parent,
        seconds=time.perf_counter() - t0,
    )


class Trial(BaseModel):
    """One configuration of a sweep (trial.json) and its run directory: checkpoints/, rungs.json (what each
    finished rung recorded) and worker.json (the Dask worker that trains it now, or did last)."""

    index: int
    dir: Path
    drawn: dict[str, Any]  # the values drawn from the search space
    model: ModelConfig
    config: TrainConfig  # config.steps is the schedule's horizon: the most steps this trial may train

    @property
    def results(self) -> Path:
        return self.dir / "rungs.json"

    def rungs(self) -> list[Rung]:
        """What the trial's finished rungs recorded (none when the file is missing or unreadable)."""
        try:
            return TypeAdapter(list[Rung]).validate_json(self.results.read_bytes())
        except (OSError, ValidationError):
            return []


def worker_address() -> str:
    """The address of the Dask worker running this task ("local" outside Dask)."""
    from distributed import get_worker  # imported here: only sweep trials run on Dask

    try:
        return get_worker().address
    except ValueError:
        return "local"


@task(persist_result=False)
def train_trial(data: Encoded, trial: Trial, rung: int, stop: int) -> Rung:
    """Train `trial` to step `stop`, resuming its newest checkpoint, on one BLAS thread. A rung it finished
    before is read back, not trained again; a diverging trial is a failed Rung, not an error."""
    done = {r.rung: r for r in trial.rungs()}
    if rung in done:
        return done[rung]
    out, worker = trial.dir / "checkpoints", worker_address()
    with locked(make_dirs(trial.dir) / ".lock", f"another worker is training {trial.dir}; waiting for it"):
        now = {"worker": worker, "pid": os.getpid(), "host": socket.gethostname(), "rung": rung}
        write_atomic(trial.dir / "worker.json", json.dumps(now).encode())
        write_atomic(trial.dir / "trial.json", trial.model_dump_json(indent=1).encode())
        start = checkpoint.load(out, with_optim=False).meta.step if checkpoint.step_dirs(out) else 0
        if start:
            log().info("Trial %d: resuming from its checkpoint at step %d", trial.index, start)
        t0, val, failed, step = time.perf_counter(), None, None, start
        try:
            with threadpool_limits(1):
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
        speed = (step - start) * trial.config.batch * trial.config.seq / max(seconds, 1e-9)
        result = Rung(
            rung=rung,
            step=stop if failed is None else step,
            val=val,
            seconds=seconds,
            chars_per_s=speed,
            worker=worker,
            resumed_from=start,
            failed=failed,
        )
        recorded = [*done.values(), result]
        write_atomic(trial.results, TypeAdapter(list[Rung]).dump_json(recorded, indent=1))
    return result


def score(
    model_dir: Path, data: Encoded, name: str, known: Collection[str] | None = None, samples: bool = True
) -> Score:
    """`name`'s loss on the validation text, leaving out characters it (or `known`) lacks; and samples."""
    ck = checkpoint.load_dir(model_dir, with_optim=False)
    text = Vocab(tuple(data.vocab)).decode(data.load("val"))
    keep = set(ck.vocab.chars) & set(known if known is not None else ck.vocab.chars)
    kept = "".join(ch for ch in text if ch in keep)
    nats = train.evaluate(ck.params, ck.config, ck.vocab.encode(kept))
    shown = {}
    if samples:
        outs = sample(ck.params, ck.config, ck.vocab, PROMPTS, SAMPLE_CHARS, SAMPLING, unknown="skip")
        shown = dict(zip(PROMPTS, outs, strict=True))
    return Score(model=name, nats=nats, chars=len(kept), dropped=len(text) - len(kept), samples=shown)


@task(persist_result=False)
def evaluate(model_dir: Path, data: Encoded) -> Score:
    """The candidate's validation loss (nats, bits, perplexity) and its samples from the fixed prompts."""
    s = score(model_dir, data, "candidate")
    log().info("Candidate: %.4f nats/char, %.4f bits/char, perplexity %.2f", s.nats, s.bits, s.perplexity)
    return s


@task(persist_result=False)
def compare(candidate_dir: Path, current: CurrentModel, data: Encoded) -> Comparison:
    """Score the promoted model and the candidate on the same text (what the promoted model can read)."""
    now = score(current.path, data, current.tag)
    c = Comparison(
        current=now, candidate=score(candidate_dir, data, "candidate", current.vocab, samples=False)
    )
    log().info(
        "Current %s: %.4f nats/char, candidate %.4f on the same text (%s)",
        current.tag,
        c.current.nats,
        c.candidate.nats,
        c.note,
    )
    return c


@task(persist_result=False)
def promote(
    trained: Trained,
    candidate: Score,
    against: Comparison | None,
    data: Encoded,
    run_dir: Path,
    store: Path,
) -> Decision:
    """Register the candidate if it beats the model that is current when the registry's lock is held."""
    compared = [against]

    def judge(cur: Current) -> Verdict:
        if against is None or cur.tag != against.current.model:  # another run promoted meanwhile
            log().info("%s became current during this run; comparing the candidate with it", cur.tag)
            compared[0] = compare.fn(trained.checkpoint, CurrentModel.of(cur), data)
        return Verdict(compared[0].wins, compared[0].reason)

    labels = {
        "fingerprint": data.fingerprint,
        "val_loss": f"{candidate.nats:.6f}",
        "parent": trained.warm_start or "",
        "run_id": run_dir.name,
        "corpus_chars": str(data.train_chars + data.val_chars),
    }
    about = {
        "bits": candidate.bits,
        "perplexity": candidate.perplexity,
        "flow_run_id": str(runtime.flow_run.id),
    }
    p = Registry(store).promote(trained.checkpoint, labels, about, judge)
    log().info("%s %s: %s", "Promoted" if p.promoted else "Kept", p.tag, p.reason)
    return Decision(
        promoted=p.promoted,
        tag=p.tag,
        reason=p.reason,
        run_dir=run_dir,
        against=compared[0],
        lost_to=p.lost_to,
    )


@task(persist_result=False)
def publish(
    data_dir: Path, info: CorpusInfo, data: Encoded, trained: Trained, candidate: Score, decision: Decision
) -> Outcome:
    """Write metrics.json, loss.png and report.md beside the checkpoints; publish them as artifacts."""
    run_dir = decision.run_dir
    meta = checkpoint.read_meta(trained.checkpoint)
    o = Outcome(
        run_id=run_dir.name,
        flow_run_id=runtime.flow_run.id,
        data_dir=str(data_dir),
        fingerprint=info.fingerprint,
        files=info.files,
        skipped=info.skipped,
        vocab_size=len(data.vocab),
        new_chars=data.new_chars,
        model=meta.model.model_dump(),
        train=meta.train,
        warm_start=trained.warm_start,
        resumed_from=trained.resumed_from,
        step=trained.step,
        train_seconds=trained.seconds,
        candidate=candidate,
        decision=decision,
        history={k: meta.metrics.get(k, []) for k in ("train", "val")},
    )
    text = report.markdown(o)
    write_atomic(run_dir / "metrics.json", o.model_dump_json(indent=1).encode())
    write_atomic(run_dir / "loss.png", report.loss_curve_png(o.history))
    write_atomic(run_dir / "report.md", text.encode())
    create_table_artifact(
        report.table(o), key="char-rnn-metrics", description=f"Validation scores of {o.run_id}"
    )
    create_markdown_artifact(text, key="char-rnn-report", description=decision.reason)
    create_link_artifact(
        run_dir.as_uri(), link_text=f"{run_dir} (metrics.json, loss.png, report.md)", key="char-rnn-files"
    )
    return o
