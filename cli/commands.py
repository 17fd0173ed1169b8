"""`char-rnn train | sample | evaluate | serve`: the commands that need no Prefect server.

`train` goes through the same stages as the pipeline (ingest, encode, preflight, train a run folder), so its
run folder follows the same rules: owned by one process for the whole training, resumed bitwise, never
overwritten unless asked.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import settings
from cli.parsing import MODEL_FLAGS, TRAIN_FLAGS
from model import checkpoint, sample, train
from model.config import ModelConfig, TrainConfig
from model.vocab import UnknownCharsError
from stages import data, scoring, training
from terminal import TrainingBar


def checkpoint_path(arg: str) -> Path:
    """A checkpoint directory or folder; a file inside one means its directory."""
    p = Path(arg)
    return p.parent if p.is_file() else p


def configs(a: argparse.Namespace, vocab_size: int) -> tuple[ModelConfig, TrainConfig]:
    """The run's configs: the flags given, and for the rest the run being resumed (--resume), else
    defaults."""
    model_kw: dict = {"vocab_size": vocab_size}
    train_kw: dict = {}
    if a.resume and checkpoint.step_dirs(a.out):
        meta = checkpoint.load(a.out, with_optim=False).meta
        model_kw = meta.model.model_dump() | model_kw
        train_kw = meta.train.model_dump()
    model_kw |= {k: getattr(a, k) for k in MODEL_FLAGS if getattr(a, k) is not None}
    train_kw |= {k: getattr(a, k) for k in TRAIN_FLAGS if getattr(a, k) is not None}
    return ModelConfig(**model_kw), TrainConfig(**train_kw)


def cmd_train(a: argparse.Namespace) -> None:
    info = data.ingest(a.data, settings.current().runs_dir / "ingest")
    for name, why in info.skipped.items():
        print(f"char-rnn: warning: skipped {name}: {why}", file=sys.stderr)
    encoded = data.encode(info, settings.current().runs_dir)
    model, config = configs(a, len(encoded.vocab))
    data.preflight(encoded, [config], None)

    def starting(step: int) -> None:  # called once the run owns --out
        print(
            f"training on {encoded.train_chars:,} chars ({len(encoded.vocab)} symbols), validating on "
            f"{encoded.val_chars:,}: {model.cell} H={model.hidden} L={model.layers} B={config.batch} "
            f"T={config.seq} steps={config.steps}" + (f", resuming at step {step}" if step else ""),
            file=sys.stderr,
        )

    with TrainingBar() as bar:
        run = training.train_run(
            encoded,
            Path(a.out),
            model,
            config,
            resume=a.resume,
            overwrite=a.overwrite,
            on_start=starting,
            on_progress=bar,
        )
    ck = checkpoint.load(run.checkpoint, with_optim=False)
    val = ck.meta.metrics.get("val_loss")
    print(f"step {run.step}: val {val:.4f} nats/char ({train.bits(val):.4f} bits/char) -> {run.checkpoint}")


def cmd_sample(a: argparse.Namespace) -> None:
    ck = checkpoint.load(checkpoint_path(a.checkpoint), with_optim=False)
    rows = sample.Settings(a.temperature, a.top_k, a.top_p, a.seed)
    prompt = a.prompt.replace("\\n", "\n")
    (text,) = sample.sample(ck.params, ck.config, ck.vocab, [prompt], a.length, rows, a.unknown)
    sys.stdout.write(text + "\n")


def cmd_evaluate(a: argparse.Namespace) -> None:
    """The checkpoint's loss on the validation part of --data (each file's last 10%), encoded as the pipeline
    encodes it and scored as the pipeline scores it (up to CHAR_RNN_EVAL_CHARS whole, above it a sample)."""
    ck = checkpoint.load(checkpoint_path(a.checkpoint), with_optim=False)
    s = settings.current()
    encoded = data.encode(data.ingest(a.data, s.runs_dir / "ingest"), s.runs_dir)
    if a.unknown == "error" and (unknown := sorted(set(encoded.vocab) - set(ck.vocab.chars))):
        raise UnknownCharsError(unknown)
    score = scoring.score(ck.path, encoded, str(ck.path), samples=False, limit=s.eval_chars)
    sampled = f" of {score.of:,}, evenly spread" if score.sampled else ""
    print(
        f"{ck.path}: validation ({score.chars:,} chars{sampled}) {score.nats:.4f} nats/char, "
        f"{score.bits:.4f} bits/char, perplexity {score.perplexity:.3f}"
    )


def cmd_serve(a: argparse.Namespace) -> None:
    """`bentoml serve` for service.py with this project's homes and settings (it replaces this process)."""
    cmd = [sys.executable, "-m", "bentoml", "serve", "service:CharRNN", "--working-dir", str(settings.ROOT)]
    os.execve(sys.executable, cmd + a.bentoml_args, os.environ.copy())
