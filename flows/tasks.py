"""The stages as Prefect tasks: each wraps one function of `stages/` and adds what Prefect is for (retries
where a retry can help, the run's log and events, artifacts in the UI).

No task result is persisted (nothing is ever pickled): work worth reusing leaves files whose names are its
cache keys (encoded data under its fingerprint, checkpoints in a run folder named by its configuration).
"""

from __future__ import annotations

import logging
import time
from pathlib import Path

from prefect import get_run_logger, runtime, task
from prefect.artifacts import (
    create_link_artifact,
    create_markdown_artifact,
    create_progress_artifact,
    create_table_artifact,
    update_progress_artifact,
)
from prefect.exceptions import MissingContextError

import settings
from flows.events import PROGRESS, announce
from model.config import ModelConfig, TrainConfig
from model.train import Progress, bits
from stages import bento, data, promotion, publishing, report, scoring, training
from stages.records import Comparison, CorpusInfo, CurrentModel, Decision, Encoded, Outcome, Score, Trained
from stages.training import Budget, Learnt

# Nothing is pickled: results are not persisted, and what Prefect writes anyway (a failed run's exception,
# which it stores even then) is written as JSON, never with its default pickle serializer.
NO_PICKLE = {"persist_result": False, "result_serializer": "json"}
QUIET = NO_PICKLE | {"log_prints": False}
# Reading files and the model store can meet a transient fault (a shared filesystem's hiccup); training,
# scoring and promotion are not retried: a second attempt would meet the same fault or redo long work.
READ = QUIET | {"retries": 2, "retry_delay_seconds": 2}


def log() -> logging.Logger | logging.LoggerAdapter:
    """The run logger inside a flow or task run; a plain logger when called through `.fn()`."""
    try:
        return get_run_logger()
    except MissingContextError:
        return logging.getLogger("char_rnn")


def flow_run_id() -> str | None:
    return str(runtime.flow_run.id) if runtime.flow_run.id else None


@task(**READ)
def ingest(data_dir: Path) -> CorpusInfo:
    """Read the corpus's .txt files as NFC UTF-8 (unusable ones skipped, with the reason); fingerprint it."""
    c = data.ingest(data_dir, settings.current().runs_dir / "ingest")
    for name, why in c.skipped.items():
        announce("skipped", f"Skipped {Path(data_dir) / name}: {why}", level=logging.WARNING)
    line = f"Corpus {data_dir}: {len(c.files)} file(s), {c.chars:,} chars, fingerprint {c.fingerprint}"
    announce("ingested", line, c.model_copy(update={"sources": []}))  # the event without the per-file list
    return c


@task(**READ)
def current_model(store: Path) -> CurrentModel | None:
    """The promoted model a candidate has to beat (the newest that passes its checks), or None."""
    return promotion.current(store)


@task(**READ)
def learnt(current: CurrentModel | None, store: Path) -> Learnt:
    """What the promoted model has learnt: its steps in all, the corpus characters it was trained on."""
    return training.learnt(current, store)


@task(**QUIET)
def encode(info: CorpusInfo, root: Path, warm: CurrentModel | None) -> Encoded:
    """Vocabulary (grown from the warm-start model's) and id arrays on disk, reused when already there."""
    e = data.encode(info, root, warm.vocab if warm else None)
    grown = f"; vocabulary grown by {len(e.new_chars)}: {''.join(e.new_chars)!r}" if e.new_chars else ""
    announce("encoded", f"Encoded {e.train_chars} + {e.val_chars} chars, {len(e.vocab)} symbols{grown}", e)
    return e


@task(**QUIET)
def preflight(encoded: Encoded, configs: list[TrainConfig], current: CurrentModel | None) -> None:
    """Check everything training, evaluation and comparison need, before any training time is spent."""
    data.preflight(encoded, configs, current)


class Reporter:
    """Training progress as a Prefect progress artifact (its description is `Progress.summary`) and a log
    line, every `every` seconds and at evaluations."""

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
        val = f", val {p.val_loss:.4f} ({bits(p.val_loss):.3f} bits)" if p.val_loss is not None else ""
        log().info(
            "step %d/%d: loss %.4f nats/char%s, lr %.2g, |g| %.2f, %.0f chars/s, eta %.0f s",
            *(p.step, p.steps, p.loss, val, p.lr, p.grad_norm, p.chars_per_s, p.eta_s),
        )


@task(**QUIET)
def train(
    encoded: Encoded,
    run_dir: Path,
    model: ModelConfig,
    config: TrainConfig,
    warm: CurrentModel | None,
    why_not: str | None = None,
    budget: Budget | None = None,
) -> Trained:
    """Train into the run folder, resuming its last checkpoint if any, else warm-starting from `warm` (or from
    scratch, `why_not`), for `budget` steps (the why is said and kept in the run's progress.json)."""
    out = run_dir / "checkpoints"
    why = budget.why if budget else f"{config.steps} steps asked"

    def starting(step: int) -> None:
        how = f"from scratch ({why_not})" if why_not else "from scratch"
        how = f"warm-started from {warm.tag}" if warm else how
        how = f"from its checkpoint at step {step}" if step else how
        shape = f"{model.cell} {model.layers}x{model.hidden}"
        announce("training", f"Training {how}: {shape}, {config.steps} steps ({why}) into {out}")

    progress = training.ProgressFile(
        run_dir / training.PROGRESS_FILE, config.steps, warm.tag if warm else None, why
    )
    return training.train_run(
        encoded,
        out,
        model,
        config,
        warm=warm,
        on_start=starting,
        on_progress=Reporter(config.steps),
        progress=progress,
        waiting=lambda who: announce("training", who),  # the same work asked twice at once: take turns
    )


@task(**QUIET)
def evaluate(checkpoint: Path, encoded: Encoded) -> Score:
    """The candidate's validation loss (nats, bits, perplexity) and its samples from the fixed prompts."""
    s = scoring.evaluate(checkpoint, encoded, settings.current().eval_chars)
    announce(
        "evaluated",
        f"Candidate: {s.nats:.4f} nats/char, {s.bits:.4f} bits/char, perplexity {s.perplexity:.2f}",
        s,
    )
    return s


@task(**QUIET)
def compare(checkpoint: Path, current: CurrentModel, encoded: Encoded) -> Comparison:
    """Score the promoted model and the candidate on the same text (what the promoted model can read)."""
    c = scoring.compare(checkpoint, current, encoded, settings.current().eval_chars)
    line = (
        f"Current {current.tag}: {c.current.nats:.4f} nats/char, candidate {c.candidate.nats:.4f} ({c.note})"
    )
    announce("compared", line, c)
    return c


@task(**QUIET)
def promote(
    trained: Trained,
    candidate: Score,
    against: Comparison | None,
    encoded: Encoded,
    run_dir: Path,
    store: Path,
) -> Decision:
    """Register the candidate if it beats the model that is current when the registry's lock is held."""
    about = {"flow_run_id": flow_run_id()}
    limit = settings.current().eval_chars
    d = promotion.promote(trained, candidate, against, encoded, run_dir, store, about, limit)
    training.settle(run_dir, d)
    return d


@task(**QUIET)
def build_bento(tag: str) -> str:
    """Build a Bento of promoted model `tag` whose version is the model's; its tag."""
    built = bento.build(tag)
    log().info(
        "Built the Bento %s of %s: bentoml serve %s (or bentoml containerize %s)", built, tag, built, built
    )
    create_markdown_artifact(
        f"`bentoml serve {built}` serves {tag}; `bentoml containerize {built}` makes its image.",
        key="char-rnn-bento",
        description=f"the Bento of {tag}",
    )
    return built


def decided(d: Decision, trained: bool = True) -> Decision:
    """Announce the run's outcome (its last event) and return it; `trained`: whether the run trained at
    all."""
    if not trained:
        line = f"Reusing the promoted model: {d.reason}"
    else:
        line = f"{'Promoted' if d.promoted else 'Kept'} {d.tag or 'no model'}: {d.reason}"
    announce("decided", line, d)
    return d


@task(**QUIET)
def publish(
    info: CorpusInfo,
    encoded: Encoded,
    trained: Trained,
    candidate: Score,
    decision: Decision,
    why: str | None = None,
) -> Outcome:
    """Write metrics.json, loss.png and report.md beside the checkpoints; publish them as artifacts. `why`:
    why the run trained the steps it did, which the report states under its training line."""
    o = publishing.outcome(info, encoded, trained, candidate, decision, flow_run_id(), why)
    text = publishing.write_run(o)
    run_dir = decision.run_dir
    create_table_artifact(
        report.table(o), key="char-rnn-metrics", description=f"Validation scores of {o.run_id}"
    )
    create_markdown_artifact(text, key="char-rnn-report", description=decision.reason)
    create_link_artifact(
        run_dir.as_uri(), link_text=f"{run_dir} (metrics.json, loss.png, report.md)", key="char-rnn-files"
    )
    return o
