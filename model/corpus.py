"""Reading a corpus: a text file or a folder of .txt files, as NFC text with a fingerprint."""

from __future__ import annotations

import hashlib
import unicodedata
from dataclasses import dataclass, field
from pathlib import Path
from typing import TypeVar

import numpy as np

S = TypeVar("S", np.ndarray, str)
MAX_FILE_BYTES = 1 << 30


class CorpusError(ValueError):
    """No usable text at the given path."""


@dataclass
class Corpus:
    parts: list[str]  # each used file's normalised text, ending in a newline
    fingerprint: str  # sha256 over the used files' names and normalised contents
    files: list[str]
    skipped: dict[str, str] = field(default_factory=dict)  # file -> reason

    @property
    def text(self) -> str:
        return "".join(self.parts)

    def split(self, val_frac: float = 0.1) -> tuple[str, str]:
        """Training and validation text: every file gives its last `val_frac` to validation, so a new file
        cannot fill the validation text alone."""
        pairs = [split(p, val_frac) for p in self.parts]
        return "".join(t for t, _ in pairs), "".join(v for _, v in pairs)


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
    inside = path.resolve() if path.is_dir() else None
    for f in files:
        if inside is not None and not f.resolve().is_relative_to(inside):
            skipped[f.name] = f"a link to {f.resolve()}, outside the folder"
            continue
        try:
            if f.stat().st_size > MAX_FILE_BYTES:
                skipped[f.name] = f"larger than {MAX_FILE_BYTES >> 20} MiB"
                continue
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
    return Corpus(parts, h.hexdigest(), used, skipped)


def split(seq: S, val_frac: float = 0.1) -> tuple[S, S]:
    """The first (1 - val_frac) of `seq` (ids or text) for training, the rest for validation (as nanoGPT)."""
    n = int(round(len(seq) * (1.0 - val_frac)))
    return seq[:n], seq[n:]
