"""The `char-rnn` command line's grammar: every subcommand, its flags, their types and defaults.

Model and training flags take their types, bounds and defaults from ModelConfig and TrainConfig
(model.config), the pipeline's and the sweep's from their flows' parameters, so `--help` shows the defaults
that apply."""

from __future__ import annotations

import argparse
import math
import typing
from importlib.metadata import PackageNotFoundError, version

from pydantic import BaseModel

from model.config import ModelConfig, TrainConfig
from stages.sweeping import DEFAULTS
from terminal import Parser

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
    "average": "decay of a moving average of the weights, which is validated and saved (0 = off)",
    "optimizer": "adam, adagrad or sgd",
    "checkpoint_every": "steps between checkpoints",
    "eval_every": "steps between validation passes",
}
PIPELINE_FLAGS = (
    "steps",
    "cell",
    "hidden",
    "layers",
    "dropout",
    "batch",
    "seq",
    "lr",
    "checkpoint_every",
    "seed",
)
SWEEP_FLAGS = {  # the flow's parameters besides data_dir and space; defaults: DEFAULTS or as said
    "trials": (int, "configurations drawn from the space"),
    "seed": (int, "draws the configurations; every trial's seed"),
    "steps": (int, "the budget per trial: the steps the winner trains (each earlier rung half the next)"),
    "minutes": (float, "wall minutes a trial may train in all (default: no limit)"),
    "checkpoint_every": (int, "steps between a trial's checkpoints"),
    "dask_address": (str, "a running Dask scheduler, e.g. tls://10.0.0.5:8786 (default: a local cluster)"),
    "local_workers": (int, "worker processes of the local cluster (default: one per core)"),
    "halving": (bool, "train every trial for --steps (a plain random or grid search)"),
    "promote": (bool, "leave the winner unpromoted"),
}
CONFIGS: dict[str, type[BaseModel]] = {k: ModelConfig for k in MODEL_FLAGS} | {
    k: TrainConfig for k in TRAIN_FLAGS
}


def number(kind: type, lo: float, hi: float) -> typing.Callable[[str], float]:
    """An argparse type: a finite `kind` in [lo, hi]."""

    def parse(text: str) -> float:
        try:
            v = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a {kind.__name__} number, got {text!r}") from None
        if not math.isfinite(v):
            raise argparse.ArgumentTypeError(f"must be a finite number, got {text!r}")
        if not lo <= v <= hi:
            raise argparse.ArgumentTypeError(f"must be in [{lo:g}, {hi:g}], got {text!r}")
        return v

    return parse


def config_flag(p: argparse.ArgumentParser, name: str, help_: str, shown: str | None = None) -> None:
    """A flag for the config field `name`: its type or choices (pydantic checks the bounds later), and its
    default in the help (`shown` when the default is said otherwise), while the parsed default stays None:
    unset flags leave the field to the config (or, on --resume, to the run being resumed)."""
    field = CONFIGS[name].model_fields[name]
    kind = field.annotation
    if typing.get_origin(kind) is typing.Literal:
        how: dict = {"choices": typing.get_args(kind)}
    else:
        how = {"type": kind if kind in (int, float) else str}
    default = shown or (field.description if field.default is None and field.description else field.default)
    p.add_argument(f"--{name.replace('_', '-')}", help=f"{help_} (default: {default})", **how)


def package_version() -> str:
    try:
        return version("char-rnn-pipeline")
    except PackageNotFoundError:
        return "unknown (not installed)"


def add_train(sub: argparse._SubParsersAction) -> None:
    t = sub.add_parser("train", help="train a model on a text file or a folder of .txt files")
    t.add_argument("--data", required=True, help="a .txt file or a folder of .txt files")
    t.add_argument("--out", required=True, help="folder for the checkpoints")
    t.add_argument("--resume", action="store_true", help="continue from the newest good checkpoint in --out")
    t.add_argument("--overwrite", action="store_true", help="replace the checkpoints already in --out")
    for name, help_ in (MODEL_FLAGS | TRAIN_FLAGS).items():
        config_flag(t, name, help_)


def add_sample(sub: argparse._SubParsersAction) -> None:
    s = sub.add_parser("sample", help="generate text from a checkpoint")
    s.add_argument("--checkpoint", required=True, help="a checkpoint directory, or a folder of them")
    s.add_argument("--prompt", default="\n", help="text that primes the model (may be empty; \\n = newline)")
    s.add_argument(
        "--length", type=number(int, 0, 10**7), default=300, help="characters to generate (%(default)s)"
    )
    s.add_argument("--temperature", type=number(float, 1e-3, 1e3), default=0.8, help="(default: %(default)s)")
    s.add_argument(
        "--top-k", type=number(int, 0, 10**7), default=0, help="sample among the k most likely (0: all)"
    )
    s.add_argument(
        "--top-p", type=number(float, 1e-9, 1), default=1.0, help="sample within this mass (1: all)"
    )
    s.add_argument("--seed", type=number(int, 0, 2**63 - 1), default=None, help="for reproducible output")
    s.add_argument("--unknown", choices=["error", "skip"], default="error", help="prompt chars not in vocab")
    e = sub.add_parser("evaluate", help="validation loss of a checkpoint on the last 10%% of each file")
    e.add_argument("--checkpoint", required=True, help="a checkpoint directory, or a folder of them")
    e.add_argument("--data", required=True, help="a .txt file or a folder of .txt files")
    e.add_argument("--unknown", choices=["error", "skip"], default="error", help="chars not in vocab")


DATA_HELP = "a corpus folder or file; this run may read it even outside the allowed roots (default: data)"


def add_flows(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("pipeline", help="run the Prefect pipeline once, in-process (no server needed)")
    p.add_argument("--data", default="data", help=DATA_HELP)
    for name in PIPELINE_FLAGS:
        config_flag(p, name, (MODEL_FLAGS | TRAIN_FLAGS)[name])
    p.add_argument(
        "--bento",
        action="store_true",
        help="if the model is promoted, build a Bento of it, versioned as the model (default: off)",
    )
    w = sub.add_parser("sweep", help="search settings on Dask (successive halving) and promote the best")
    w.add_argument("--data", default="data", help=DATA_HELP)
    w.add_argument(
        "--space", help='JSON: setting -> [values] or {"low", "high", "log"} (default: stages.sweeping\'s)'
    )
    for name, (kind, help_) in SWEEP_FLAGS.items():
        if kind is bool:
            w.add_argument(f"--no-{name}", dest=name, action="store_false", default=None, help=help_)
        else:
            shown = f" (default: {DEFAULTS[name]})" if name in DEFAULTS else ""
            w.add_argument(f"--{name.replace('_', '-')}", type=kind, help=help_ + shown)


def add_models(sub: argparse._SubParsersAction) -> None:
    m = sub.add_parser("models", help="the promoted models: list, show, roll back")
    msub = m.add_subparsers(dest="models_cmd", required=True, parser_class=Parser)
    ml = msub.add_parser("list", help="every promoted model, and which one serves")
    ml.add_argument("--json", action="store_true", help="one JSON document, for scripts")
    ms = msub.add_parser("show", help="one promoted model in full, with its history")
    ms.add_argument("tag", help="char-rnn:VERSION, or VERSION")
    ms.add_argument("--json", action="store_true", help="one JSON document, for scripts")
    mr = msub.add_parser("rollback", help="make an earlier promoted model current again")
    mr.add_argument("tag", nargs="?", help="the model to make current (default: the one promoted before it)")
    mr.add_argument("--reason", default="", help="recorded in the history (e.g. what was wrong)")


def parser() -> argparse.ArgumentParser:
    ap = Parser(
        prog="char-rnn", description="A character-level RNN in NumPy, trained by Prefect, served by BentoML."
    )
    ap.add_argument("--version", action="version", version=f"%(prog)s {package_version()}")
    sub = ap.add_subparsers(dest="cmd", required=True, parser_class=Parser)
    add_train(sub)
    add_sample(sub)
    add_flows(sub)
    sub.add_parser(
        "serve",
        help="serve the promoted model over HTTP (bentoml serve, this project's homes)",
        epilog="Other options (e.g. --port 3001) are passed to `bentoml serve`.",
    )
    add_models(sub)
    return ap
