"""The `char-rnn-pipeline` flow: ingest, encode, train, evaluate, promote, report."""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Annotated

from model import paths

paths.configure_env()

from prefect import flow, get_run_logger  # noqa: E402
from pydantic import AfterValidator, Field  # noqa: E402

from flows.report import Decision  # noqa: E402
from flows.tasks import compare, current_model, encode, evaluate, ingest, promote, publish, train_model  # noqa: E402
from model.rnn import ModelConfig  # noqa: E402
from model.train import TrainConfig  # noqa: E402

DEFAULT_DATA = Path(os.environ.get("CHAR_RNN_DATA") or Path(__file__).resolve().parents[1] / "data")


def existing(path: Path) -> Path:
    if not path.exists():
        raise ValueError(f"{path} does not exist; pass data_dir=<a folder of UTF-8 .txt files>")
    return path.absolute()


def run_name(fingerprint: str, model: ModelConfig, config: TrainConfig, parent: str | None) -> str:
    """The run directory's name: the same work gets the same name, so a re-run finds its checkpoints."""
    blob = json.dumps([model.model_dump(), config.model_dump(), parent], sort_keys=True).encode()
    return f"run-{fingerprint[:12]}-{hashlib.sha256(blob).hexdigest()[:8]}"


def train_config(
    steps: int, batch: int, seq: int, lr: float, checkpoint_every: int, seed: int
) -> TrainConfig:
    """The training settings for the flow's parameters: validation at every checkpoint, short warmup."""
    return TrainConfig(
        steps=steps,
        batch=batch,
        seq=seq,
        lr=lr,
        min_lr=lr / 10,
        warmup=min(100, steps // 10),
        checkpoint_every=checkpoint_every,
        eval_every=checkpoint_every,
        seed=seed,
    )


@flow(name="char-rnn-pipeline")
def pipeline(
    data_dir: Annotated[Path, AfterValidator(existing)] = DEFAULT_DATA,
    steps: Annotated[int, Field(ge=1, le=1_000_000)] = 2000,
    hidden: Annotated[int, Field(ge=8, le=2048)] = 128,
    layers: Annotated[int, Field(ge=1, le=4)] = 1,
    batch: Annotated[int, Field(ge=1, le=1024)] = 32,
    seq: Annotated[int, Field(ge=1, le=1024)] = 64,
    lr: Annotated[float, Field(gt=0, le=1)] = 3e-3,
    checkpoint_every: Annotated[int, Field(ge=1, le=1_000_000)] = 250,
    seed: Annotated[int, Field(ge=0)] = 0,
    artifacts_root: Path | None = None,
    only_if_changed: bool = False,
) -> Decision:
    """Train a character-level RNN on a folder of text and promote it if it beats the current model.

    Args:
        data_dir: the corpus: a folder of UTF-8 .txt files (or one file)
        steps: optimizer steps in total
        hidden: hidden units per layer
        layers: stacked RNN layers
        batch: parallel sequences per step
        seq: characters per sequence (truncated BPTT length)
        lr: peak learning rate (warmup, then cosine decay)
        checkpoint_every: steps between checkpoints and validation passes
        seed: random seed for initialisation and sampling
        artifacts_root: where run directories go (default $CHAR_RNN_RUNS or $CHAR_RNN_HOME/runs)
        only_if_changed: end at once if the promoted model was trained on this very corpus
    """
    logger = get_run_logger()
    root = (artifacts_root or paths.runs()).absolute()
    corpus = ingest(data_dir)
    current = current_model()
    if only_if_changed and current and current.fingerprint == corpus.fingerprint:
        reason = (
            f"corpus unchanged since {current.tag} was trained on it (fingerprint {corpus.fingerprint[:12]})"
        )
        logger.info("Nothing to retrain: %s", reason)
        return Decision(promoted=False, tag=current.tag, reason=reason)
    warm = current if current and current.can_warm_start(hidden, layers) else None
    if current and not warm:
        logger.info(
            "%s has another shape than hidden=%d, layers=%d: training from scratch",
            current.tag,
            hidden,
            layers,
        )
    base_vocab = warm.vocab if warm else None
    data = encode(data_dir, corpus.fingerprint, root, base_vocab)
    if not data.manifest.exists():  # a cached result whose files were deleted since
        data = encode.with_options(refresh_cache=True)(data_dir, corpus.fingerprint, root, base_vocab)
    model = ModelConfig(vocab_size=len(data.vocab), hidden=hidden, layers=layers)
    config = train_config(steps, batch, seq, lr, checkpoint_every, seed)
    run_dir = root / run_name(corpus.fingerprint, model, config, warm.tag if warm else None)
    trained = train_model(data, run_dir, model, config, warm)
    candidate = evaluate(trained.checkpoint, data)
    against = compare(trained.checkpoint, current, data) if current else None
    decision = promote(trained, candidate, against, data, run_dir)
    publish(data_dir, corpus, data, trained, candidate, decision)
    return decision
