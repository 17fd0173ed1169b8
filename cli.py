"""The `char-rnn` command line: argument parsing only, over model/ (and flows/ for `pipeline`)."""

from __future__ import annotations

import argparse
import logging
import math
import os
import sys
import time
import warnings
from pathlib import Path

from pydantic import ValidationError

from model import checkpoint, corpus, net, sample, train
from model.checkpoint import CheckpointError
from model.corpus import CorpusError
from model.vocab import UnknownCharsError, Vocab

ERRORS = (CheckpointError, CorpusError, UnknownCharsError, train.TrainingDiverged, ValueError, OSError)

MODEL_FLAGS = {
    "cell": "recurrent cell: rnn, gru or lstm",
    "hidden": "hidden size",
    "layers": "stacked layers",
    "dropout": "dropout between layers",
}
TRAIN_FLAGS = {
    "steps": "total optimizer steps (a resumed run continues up to this total)",
    "seed": "random seed",
    "batch": "parallel sequences per step (B)",
    "seq": "truncated BPTT length (T)",
    "lr": "peak learning rate",
    "clip": "global gradient-norm clip (0 = off)",
    "optimizer": "adam, adagrad or sgd",
    "checkpoint_every": "steps between checkpoints",
    "eval_every": "steps between validation passes",
}


class Bar:
    """A one-line terminal progress bar on stderr (silent when stderr is not a terminal)."""

    def __init__(self, enabled: bool):
        self.enabled = enabled
        self.last_val: float | None = None

    def __call__(self, p: train.Progress) -> None:
        if p.val_loss is not None:
            self.last_val = p.val_loss
        if not self.enabled:
            return
        width = 30
        done = int(width * p.step / p.steps)
        val = f" val {self.last_val:.3f}" if self.last_val is not None else ""
        eta = time.strftime("%M:%S", time.gmtime(p.eta_s)) if p.eta_s < 3600 else f"{p.eta_s / 3600:.1f}h"
        line = (
            f"\r[{'#' * done}{'.' * (width - done)}] {p.step}/{p.steps} loss {p.loss:.3f}{val}"
            f" | {p.chars_per_s / 1000:.0f}k char/s | eta {eta}"
        )
        sys.stderr.write(line)
        if p.step == p.steps:
            sys.stderr.write("\n")
        sys.stderr.flush()


def checkpoint_path(arg: str) -> Path:
    """A checkpoint directory or folder; a file inside one means its directory."""
    p = Path(arg)
    return p.parent if p.is_file() else p


def cmd_train(a: argparse.Namespace) -> None:
    c = corpus.read(a.data)
    for name, why in c.skipped.items():
        print(f"char-rnn: warning: skipped {name}: {why}", file=sys.stderr)
    vocab = Vocab.from_text(c.text)
    ids = vocab.encode(c.text)
    tr, va = corpus.split(ids)
    if len(va) < 2:
        raise ValueError(f"{a.data}: too little text for a validation split ({len(ids)} characters)")
    model_kw: dict = {"vocab_size": len(vocab)}
    train_kw: dict = {}
    if a.resume and checkpoint.step_dirs(a.out):  # unspecified settings come from the run being resumed
        meta = checkpoint.load(a.out, with_optim=False).meta
        model_kw = meta.model.model_dump() | model_kw
        train_kw = dict(meta.train)
    model_kw |= {k: getattr(a, k) for k in MODEL_FLAGS if getattr(a, k) is not None}
    train_kw |= {k: getattr(a, k) for k in TRAIN_FLAGS if getattr(a, k) is not None}
    mcfg, tcfg = net.ModelConfig(**model_kw), train.TrainConfig(**train_kw)
    print(
        f"training on {len(tr):,} chars ({len(vocab)} symbols), validating on {len(va):,}: "
        f"H={mcfg.hidden} L={mcfg.layers} B={tcfg.batch} T={tcfg.seq} steps={tcfg.steps}",
        file=sys.stderr,
    )
    bar = Bar(sys.stderr.isatty())
    ck = train.train(
        tr, va, vocab, mcfg, tcfg, Path(a.out), resume=a.resume, fingerprint=c.fingerprint, on_progress=bar
    )
    val = ck.meta.metrics.get("val_loss")
    print(f"step {ck.meta.step}: val {val:.4f} nats/char ({train.bits(val):.4f} bits/char) -> {ck.path}")


def cmd_sample(a: argparse.Namespace) -> None:
    ck = checkpoint.load(checkpoint_path(a.checkpoint), with_optim=False)
    settings = sample.Settings(a.temperature, a.top_k or 0, a.top_p, a.seed)
    prompt = a.prompt.replace("\\n", "\n")
    (text,) = sample.sample(ck.params, ck.config, ck.vocab, [prompt], a.length, settings, a.unknown)
    sys.stdout.write(text + "\n")


def cmd_evaluate(a: argparse.Namespace) -> None:
    ck = checkpoint.load(checkpoint_path(a.checkpoint), with_optim=False)
    c = corpus.read(a.data)
    _, va = corpus.split(ck.vocab.encode(c.text, a.unknown))
    nats = train.evaluate(ck.params, ck.config, va)
    print(
        f"{ck.path}: validation ({len(va):,} chars) {nats:.4f} nats/char, {train.bits(nats):.4f} bits/char, "
        f"perplexity {math.exp(nats):.3f}"
    )


def cmd_pipeline(a: argparse.Namespace) -> None:
    os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "120")  # a busy box is slow
    from prefect.exceptions import ParameterTypeError  # Prefect is imported only for this command

    from flows.pipeline import pipeline

    names = ("steps", "hidden", "layers", "batch", "seq", "lr")
    params = {"data_dir": a.data} | {k: getattr(a, k) for k in names if getattr(a, k) is not None}
    flows_log = logging.getLogger("prefect.flows")
    flows_log.setLevel(logging.CRITICAL)  # it would log the errors at length; we say them in one line
    try:  # before Prefect's temporary server starts
        params = pipeline.validate_parameters(params)
    except ParameterTypeError as e:  # "...parameters:\n - name: msg\n - name: msg"
        raise ValueError("; ".join(x.removeprefix(" - ") for x in str(e).splitlines()[1:])) from e
    finally:
        flows_log.setLevel(logging.NOTSET)
    d = pipeline(**params)
    print(
        f"{'promoted' if d.promoted else 'kept'} {d.tag}: {d.reason}"
        + (f"\nrun: {d.run_dir}" if d.run_dir else "")
    )


def parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="char-rnn", description="A character-level RNN in NumPy.")
    sub = ap.add_subparsers(dest="cmd", required=True)

    t = sub.add_parser("train", help="train a model on a text file or a folder of .txt files")
    t.add_argument("--data", required=True, help="a .txt file or a folder of .txt files")
    t.add_argument("--out", required=True, help="folder for the checkpoints")
    t.add_argument("--resume", action="store_true", help="continue from the newest good checkpoint in --out")
    types = train.TrainConfig.model_fields | net.ModelConfig.model_fields
    for name, help_ in (MODEL_FLAGS | TRAIN_FLAGS).items():
        kind = types[name].annotation
        kind = kind if kind in (int, float) else str
        t.add_argument(f"--{name.replace('_', '-')}", type=kind, help=help_)
    t.set_defaults(fn=cmd_train)

    s = sub.add_parser("sample", help="generate text from a checkpoint")
    s.add_argument("--checkpoint", required=True, help="a checkpoint directory, or a folder of them")
    s.add_argument("--prompt", default="\n", help="text that primes the model (may be empty; \\n = newline)")
    s.add_argument("--length", type=int, default=300, help="characters to generate")
    s.add_argument("--temperature", type=float, default=0.8)
    s.add_argument("--top-k", type=int, default=None, help="sample among the k most likely")
    s.add_argument("--top-p", type=float, default=1.0, help="sample within this probability mass")
    s.add_argument("--seed", type=int, default=None, help="for reproducible output")
    s.add_argument("--unknown", choices=["error", "skip"], default="error", help="prompt chars not in vocab")
    s.set_defaults(fn=cmd_sample)

    e = sub.add_parser("evaluate", help="validation loss of a checkpoint on the last 10%% of a corpus")
    e.add_argument("--checkpoint", required=True)
    e.add_argument("--data", required=True)
    e.add_argument("--unknown", choices=["error", "skip"], default="error", help="chars not in vocab")
    e.set_defaults(fn=cmd_evaluate)

    p = sub.add_parser("pipeline", help="run the Prefect pipeline once, in-process (no server needed)")
    p.add_argument("--data", default="data", help="corpus folder")
    p.add_argument("--steps", type=int, default=None, help="(default: the flow's)")
    for flag, kind in (("hidden", int), ("layers", int), ("batch", int), ("seq", int), ("lr", float)):
        p.add_argument(f"--{flag}", type=kind, default=None, help="(default: the flow's)")
    p.set_defaults(fn=cmd_pipeline)
    return ap


def one_line(e: Exception) -> str:
    if isinstance(e, ValidationError):
        flag = lambda loc: "--" + ".".join(map(str, loc)).replace("_", "-")  # noqa: E731
        return "; ".join(f"{flag(x['loc'])}: {x['msg']}" for x in e.errors())
    return str(e)


def main(argv: list[str] | None = None) -> int:
    ap = parser()
    args = ap.parse_args(argv)
    if getattr(args, "length", 1) < 0:
        ap.error("--length must be >= 0")
    warnings.showwarning = lambda msg, *_a, **_k: print(f"char-rnn: warning: {msg}", file=sys.stderr)
    try:
        args.fn(args)
    except ERRORS as e:
        print(f"char-rnn: error: {one_line(e)}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("\nchar-rnn: interrupted; resume with --resume", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
