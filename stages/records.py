"""What passes between the stages: paths, hashes and small models, never big arrays.

Every record is a pydantic model, so it is checked when made, written to JSON as it is (metrics.json,
manifest.json, trials.json) and carried through Prefect without pickling.
"""

from __future__ import annotations

import contextlib
import math
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from pydantic import BaseModel, TypeAdapter, ValidationError, computed_field

from model.checkpoint import CheckpointError
from model.config import ModelConfig, TrainConfig
from model.files import sha256

if TYPE_CHECKING:  # the registry imports BentoML, which an entry point configures first
    from registry import Current, Registry


class Source(BaseModel):
    """One file of a corpus as ingest last read it. Its identity on disk (size, times, inode) tells whether it
    must be read again: a file whose identity is unchanged keeps its digest, length and alphabet."""

    name: str
    size: int
    mtime_ns: int
    ctime_ns: int
    inode: int
    digest: str = ""  # sha256 of its normalised text
    chars: int = 0  # as the corpus uses it: a final newline added when it lacks one
    alphabet: str = ""  # its distinct characters, sorted
    skipped: str | None = None  # why it is not used

    @classmethod
    def stat(cls, path: Path) -> Source:
        st = path.stat()
        return cls(
            name=path.name, size=st.st_size, mtime_ns=st.st_mtime_ns, ctime_ns=st.st_ctime_ns, inode=st.st_ino
        )

    def same_file(self, other: Source) -> bool:
        return (self.name, self.size, self.mtime_ns, self.ctime_ns, self.inode) == (
            other.name,
            other.size,
            other.mtime_ns,
            other.ctime_ns,
            other.inode,
        )


class CorpusInfo(BaseModel):
    """What ingest found: the fingerprint, the files used (with what encoding needs) and skipped, the
    alphabet; never the text itself."""

    dir: Path
    fingerprint: str
    files: list[str]
    skipped: dict[str, str]
    chars: int
    alphabet: str = ""
    sources: list[Source] = []

    def path(self, name: str) -> Path:
        return self.dir / name if self.dir.is_dir() else self.dir


VERIFIED: set[tuple] = set()  # encoded arrays whose checksum this process has checked


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

    def verify(self, name: str) -> Path:
        """The `name` array's file ("train" or "val"), its sha256 checked against the manifest's, by streaming
        (once per process while the file's identity stays the same)."""
        f = self.dir / f"{name}.npy"
        st = f.stat()
        key = (str(f), st.st_size, st.st_mtime_ns, st.st_ino, self.sha256[f.name])
        if key not in VERIFIED:
            if sha256(f) != self.sha256[f.name]:
                raise ValueError(f"{f}: checksum mismatch; delete {self.dir} and run the pipeline again")
            VERIFIED.add(key)
        return f

    def load(self, name: str) -> np.ndarray:
        """The `name` array, checked, memory-mapped read-only: it is never read into memory whole. (A plain
        ndarray view of the mapping: numpy's memmap subclass costs time on every batch it is indexed for.)"""
        return np.asarray(np.load(self.verify(name), mmap_mode="r", allow_pickle=False))


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


class Trained(BaseModel):
    """A trained run folder: its final checkpoint and how training went."""

    checkpoint: Path
    step: int
    resumed_from: int  # 0 when training started fresh
    warm_start: str | None  # the promoted tag it started from
    seconds: float


class Score(BaseModel):
    """One model's loss on the validation text, or on the part of it the model has ids for."""

    model: str  # "candidate" or a registry tag
    nats: float  # mean cross-entropy, nats per character
    chars: int  # validation characters scored
    dropped: int = 0  # validation characters left out because the model's vocabulary lacks them
    samples: dict[str, str] = {}  # prompt -> continuation
    sampled: bool = False  # scored on evenly spread windows of the validation text, not all of it
    of: int = 0  # validation characters in all

    @computed_field
    @property
    def bits(self) -> float:
        return self.nats / math.log(2)

    @computed_field
    @property
    def perplexity(self) -> float:
        return math.exp(self.nats)


class Comparison(BaseModel):
    """The promoted model and the candidate, scored on the same text."""

    current: Score
    candidate: Score

    @property
    def wins(self) -> bool:
        """Whether the candidate beats the promoted model."""
        return self.candidate.nats < self.current.nats

    @property
    def reason(self) -> str:
        verb = "beats" if self.wins else "does not beat"
        return (
            f"the candidate ({self.candidate.nats:.4f} nats/char) {verb} {self.current.model} "
            f"({self.current.nats:.4f}) on the same validation text"
        )

    @property
    def note(self) -> str:
        text = "the whole validation text"
        if self.current.sampled:
            scored = self.current.chars + self.current.dropped
            text = (
                f"a sample of {scored:,} of the {self.current.of:,} validation characters (the same windows)"
            )
        if not self.current.dropped:
            return f"both models scored on {text}"
        return (
            f"{self.current.dropped} of {self.current.chars + self.current.dropped} characters of {text} "
            f"are new to {self.current.model}; both models were scored without them"
        )


class Decision(BaseModel):
    """What a run did with its candidate, and why."""

    promoted: bool
    tag: str | None  # the promoted model after this run
    reason: str
    run_dir: Path | None = None
    against: Comparison | None = None  # the comparison the decision rests on
    lost_to: str | None = None  # the model that stayed current when the candidate lost


class Outcome(BaseModel):
    """Everything metrics.json records about one run."""

    run_id: str
    flow_run_id: str | None
    data_dir: str
    fingerprint: str
    files: list[str]
    skipped: dict[str, str]
    vocab_size: int
    new_chars: list[str]
    model: ModelConfig
    train: TrainConfig
    warm_start: str | None
    resumed_from: int
    step: int
    train_seconds: float
    steps_why: str | None = None  # why the run trained the steps it did (a warm start's budget)
    candidate: Score
    decision: Decision
    history: dict[str, list[list[float]]]  # "train" / "val": [step, loss] pairs


class Rung(BaseModel):
    """A sweep trial trained to a rung's step: its validation loss there, or why it failed."""

    rung: int
    step: int
    val: float | None  # nats/char on the validation sample at `step`
    seconds: float  # wall seconds this rung trained (from resumed_from)
    chars_per_s: float
    worker: str  # the Dask worker's address
    resumed_from: int  # the step this rung started at (a checkpoint, after a killed worker)
    failed: str | None = None


class Trial(BaseModel):
    """One configuration of a sweep (trial.json) and its run directory: checkpoints/, rungs.json (what each
    finished rung recorded) and worker.json (the process that trains it now, or did last)."""

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


class TrialOutcome(BaseModel):
    """One trial of a sweep: what it drew, what each rung it reached recorded, and how it ended."""

    index: int
    name: str  # its run directory's name
    drawn: dict[str, Any]
    rungs: list[Rung]
    status: str  # "winner", "stopped after rung 1", "failed in rung 0: ...", "out of time after rung 2"
    history: list[list[float]]  # validation [step, nats/char] pairs

    @property
    def last(self) -> Rung:
        return self.rungs[-1]


class SweepOutcome(BaseModel):
    """Everything trials.json records about one sweep."""

    sweep_id: str
    dir: Path
    flow_run_id: str | None
    data_dir: str
    fingerprint: str
    plan: list[int]  # the step each rung trains to
    trials: list[TrialOutcome]
    winner: int | None  # index of the winning trial
    candidate: Score | None  # the winner on the whole validation text
    decision: Decision
    seconds: float  # wall seconds from the first trial to the last
