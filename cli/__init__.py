"""The `char-rnn` command: train, sample and evaluate without servers; run the pipeline or a sweep once;
serve the promoted model; list, show and roll back promoted models. `char-rnn --help` lists them.

Every entry point configures the settings first (`settings.configure`, before Prefect or BentoML is
imported). A wrong value, an unreadable file, a bad checkpoint or a full disk is one line,
`char-rnn: error: ...`, and exit status 1; a malformed command line is one line and status 2.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from collections.abc import Callable

from pydantic import ValidationError

import settings
from cli import commands, flowruns, models
from cli.flowruns import Lines
from cli.parsing import parser
from model.checkpoint import CheckpointError
from model.corpus import CorpusError
from model.files import FolderBusy
from model.train import TrainingDiverged
from model.vocab import UnknownCharsError

__all__ = ["main", "parser"]

ERRORS = (CheckpointError, CorpusError, UnknownCharsError, TrainingDiverged, FolderBusy, ValueError, OSError)
COMMANDS: dict[tuple[str, str | None], Callable[[argparse.Namespace], None]] = {
    ("train", None): commands.cmd_train,
    ("sample", None): commands.cmd_sample,
    ("evaluate", None): commands.cmd_evaluate,
    ("serve", None): commands.cmd_serve,
    ("pipeline", None): flowruns.cmd_pipeline,
    ("sweep", None): flowruns.cmd_sweep,
    ("models", "list"): models.cmd_list,
    ("models", "show"): models.cmd_show,
    ("models", "rollback"): models.cmd_rollback,
}
WARNINGS = Lines(logging.WARNING)  # refused checkpoints, damaged registry files: said on stderr


def one_line(e: Exception) -> str:
    if isinstance(e, ValidationError):
        flag = lambda loc: "--" + ".".join(map(str, loc)).replace("_", "-")  # noqa: E731
        return "; ".join(f"{flag(x['loc'])}: {x['msg']}" for x in e.errors())
    return str(e)


def main(argv: list[str] | None = None) -> int:
    ap = parser()
    args, rest = ap.parse_known_args(argv)
    if rest and args.cmd != "serve":
        ap.error(f"unrecognized arguments: {' '.join(rest)}")
    args.bentoml_args = rest
    logging.getLogger("char_rnn").addHandler(WARNINGS)  # once: a logger holds a handler at most once
    try:
        os.environ.update(settings.configure())
        COMMANDS[args.cmd, getattr(args, "models_cmd", None)](args)
    except ERRORS as e:
        print(f"char-rnn: error: {one_line(e)}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("\nchar-rnn: interrupted; resume with --resume", file=sys.stderr)
        return 130
    return 0
