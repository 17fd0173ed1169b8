"""Reading a corpus: a text file or a folder of .txt files, as NFC text with a fingerprint."""

from __future__ import annotations

import hashlib
import unicodedata
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np


class CorpusError(ValueError):
    """No usable text at the given path."""


@dataclass
class Corpus:
    text: str
    fingerprint: str  # sha256 over the used files' names and normalised contents
    files: list[str]
    skipped: dict[str, str] = field(default_factory=dict)  # file -> reason


def normalise(raw: str) -> str:
    """NFC, a leading byte-order mark dropped, and \\r\\n / \\r turned into \\n."""
    text = raw.removeprefix("\ufeff").replace("\r\n", "\n").replace("\r", "\n")
    return unicodedata.normalize("NFC", text)


def read(path: str | Path) -> Corpus:
    """Read a .txt file or every .txt file in a folder (sorted by name), skipping unusable ones."""
    path = Path(path)
    if path.is_dir():
        files = sorted(p for p in path.glob("*.txt") if p.is_file())
        if not files:
            raise CorpusError(f"{path}: no .txt files in this folder")
    elif path.is_file():
        files = [path]
    else:
        raise CorpusError(f"{path}: no such file or folder")
    parts, used, skipped = [], [], {}
    h = hashlib.sha256()
    for f in files:
        try:
            text = normalise(f.read_bytes().decode("utf-8"))
        except UnicodeDecodeError as e:
            skipped[f.name] = f"not valid UTF-8 (byte {e.start})"
            continue
        except OSError as e:
            skipped[f.name] = f"unreadable ({e.strerror})"
            continue
        if not text.strip():
            skipped[f.name] = "empty"
            continue
        if "\x00" in text:
            skipped[f.name] = "binary (contains NUL bytes)"
            continue
        for chunk in (f.name.encode(), b"\0", text.encode(), b"\0"):
            h.update(chunk)
        parts.append(text if text.endswith("\n") else text + "\n")
        used.append(f.name)
    if not parts:
        why = "; ".join(f"{k}: {v}" for k, v in skipped.items())
        raise CorpusError(f"{path}: no usable text ({why})")
    return Corpus("".join(parts), h.hexdigest(), used, skipped)


def split(ids: np.ndarray, val_frac: float = 0.1) -> tuple[np.ndarray, np.ndarray]:
    """The first (1 - val_frac) of `ids` for training, the rest for validation (as nanoGPT does)."""
    n = int(round(len(ids) * (1.0 - val_frac)))
    return ids[:n], ids[n:]
