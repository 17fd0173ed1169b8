"""Shared fixtures. Every test session writes under its own temporary CHAR_RNN_HOME, never under ~ or ./."""

import os
import tempfile
from pathlib import Path

import pytest

from settings import isolated_env

os.environ.update(isolated_env(Path(tempfile.mkdtemp(prefix="char-rnn-tests-"))))
os.environ.pop("CHAR_RNN_RUNS", None)

ROOT = Path(__file__).resolve().parent.parent
SHAKESPEARE = ROOT / "data" / "tinyshakespeare.txt"


@pytest.fixture(scope="session")
def small_text() -> str:
    """The first 20k characters of tiny shakespeare: enough to learn something in a few seconds."""
    return SHAKESPEARE.read_text(encoding="utf-8")[:20_000]


@pytest.fixture
def small_corpus(tmp_path, small_text) -> Path:
    path = tmp_path / "corpus.txt"
    path.write_text(small_text, encoding="utf-8")
    return path


def damage(f: Path, how: str) -> None:
    """Truncate `f` to a third, or flip bits in its middle byte."""
    raw = bytearray(f.read_bytes())
    if how == "truncate":
        raw = raw[: len(raw) // 3]
    else:
        raw[len(raw) // 2] ^= 0x5A
    f.write_bytes(bytes(raw))
