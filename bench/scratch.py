"""A bench's own CHAR_RNN_HOME: a temporary folder, removed when the bench's process ends (a bench run
leaves nothing behind; its results go to docs/benchmarks.md). Imports nothing of the project, so that a
bench can set its environment before Prefect or BentoML read theirs."""

from __future__ import annotations

import atexit
import shutil
import tempfile
from pathlib import Path


def home(prefix: str) -> Path:
    path = Path(tempfile.mkdtemp(prefix=prefix))
    atexit.register(shutil.rmtree, path, ignore_errors=True)
    return path
