"""Reading a corpus: a text file or a folder of .txt files, as NFC text, in chunks.

A file is read a chunk of bytes at a time and decoded, its line endings and Unicode normalised on the way, so
memory does not grow with the file: the chunks joined are exactly the whole text normalised at once. Two
things can change across a chunk's edge, and the reader waits for them: a "\\r" that a "\\n" may follow, and
NFC, which may compose a character with the ones after it. A chunk is therefore cut only before a character
that nothing before it can combine with (`safe`): a starter that is never the second part of a composition.

A file whose bytes are not UTF-8, that holds NUL bytes (binary) or nothing but white space is skipped, with
the reason. `scan` reads a file once for what the later stages need (its digest, length and alphabet);
`texts` gives its normalised chunks again when it is encoded.
"""

from __future__ import annotations

import codecs
import hashlib
import unicodedata
from collections.abc import Iterator
from dataclasses import dataclass, field
from functools import cache
from pathlib import Path
from typing import TypeVar

import numpy as np

S = TypeVar("S", np.ndarray, str)
CHUNK = 4 << 20  # bytes read at a time


class CorpusError(ValueError):
    """No usable text at the given path."""


class BadFile(ValueError):
    """A file that cannot be part of the corpus (the message says why)."""


def normalise(raw: str) -> str:
    """NFC, a leading byte-order mark dropped, and \\r\\n / \\r turned into \\n (a whole text at once)."""
    text = raw.removeprefix("\ufeff").replace("\r\n", "\n").replace("\r", "\n")
    return unicodedata.normalize("NFC", text)


@cache
def second_parts() -> frozenset[str]:
    """Starters (combining class 0) that NFC can compose with a character before them: the second part of a
    canonical composition (some Indic vowel signs, for instance), and Hangul's medial and final jamo."""
    found = set()
    for cp in range(0x300, 0x30000):
        d = unicodedata.decomposition(chr(cp))
        if d and not d.startswith("<") and len(parts := d.split()) == 2:
            found.add(chr(int(parts[1], 16)))
    found |= {chr(cp) for cp in (*range(0x1161, 0x1176), *range(0x11A8, 0x11C3))}
    return frozenset(c for c in found if unicodedata.combining(c) == 0)


def safe(ch: str) -> bool:
    """Whether a text may be cut before `ch` and each side normalised alone, with the same result."""
    if ch < "\u0300":  # Latin-1 and the rest below the first combining mark: starters that never compose back
        return True
    first = unicodedata.normalize("NFD", ch)[0]
    return unicodedata.combining(ch) == 0 and unicodedata.combining(first) == 0 and ch not in second_parts()


class Normaliser:
    """Normalises a text given in pieces: `feed` returns what is ready, `end` the rest."""

    def __init__(self) -> None:
        self.pending, self.started = "", False

    def feed(self, piece: str) -> str:
        if not self.started:
            piece, self.started = piece.removeprefix("\ufeff"), bool(piece)
        text = self.pending + piece
        held = "\r" if text.endswith("\r") else ""  # it may be the first half of a \r\n
        body = text[: len(text) - len(held)]
        if "\r" in body:
            body = body.replace("\r\n", "\n").replace("\r", "\n")
        cut = next((i for i in range(len(body) - 1, 0, -1) if safe(body[i])), 0)
        self.pending = body[cut:] + held
        return unicodedata.normalize("NFC", body[:cut])

    def end(self) -> str:
        rest, self.pending = self.pending.replace("\r", "\n"), ""
        return unicodedata.normalize("NFC", rest)


def texts(path: Path, chunk: int | None = None) -> Iterator[str]:
    """The normalised text of the file `path`, in pieces of about `chunk` bytes; BadFile when it is not
    UTF-8 (naming the byte)."""
    decoder, norm, offset, chunk = codecs.getincrementaldecoder("utf-8")(), Normaliser(), 0, chunk or CHUNK
    with open(path, "rb") as f:
        while True:
            block = f.read(chunk)
            held = len(decoder.getstate()[0])  # bytes of a character cut by the last block
            try:
                text = decoder.decode(block, final=not block)
            except UnicodeDecodeError as e:
                raise BadFile(f"not valid UTF-8 (byte {offset - held + e.start})") from None
            offset += len(block)
            if piece := norm.feed(text) + ("" if block else norm.end()):
                yield piece
            if not block:
                return


class Alphabet:
    """The distinct characters of a text given in pieces, found in C rather than one Python object per
    character: ASCII by deleting the bytes seen so far (what is left is new), the rest with NumPy."""

    def __init__(self) -> None:
        self.ascii, self.other = b"", set()

    def add(self, piece: str) -> None:
        if not piece.isascii():
            cps = np.frombuffer(piece.encode("utf-32-le"), np.uint32)
            self.other |= {chr(i) for i in np.unique(cps[cps >= 0x80])}
            piece = piece.encode("ascii", "ignore").decode()
        rest = piece.encode("ascii").translate(None, self.ascii)
        while rest:
            self.ascii += rest[:1]
            rest = rest.translate(None, rest[:1])

    def chars(self) -> str:
        return "".join(sorted({*self.ascii.decode(), *self.other}))


@dataclass
class Scan:
    """One file as a streaming pass found it: the digest of its normalised text, its length as the corpus
    uses it (a final newline added when it lacks one), its alphabet; or why it is skipped."""

    digest: str = ""
    chars: int = 0
    alphabet: str = ""
    skipped: str | None = None


def scan(path: Path, chunk: int | None = None) -> Scan:
    """Read the file `path` once (in chunks): its digest, length and alphabet, or why it cannot be used."""
    h, n, seen, last, content = hashlib.sha256(), 0, Alphabet(), "", False
    try:
        for piece in texts(path, chunk):
            if "\x00" in piece:
                return Scan(skipped="binary (contains NUL bytes)")
            h.update(piece.encode())
            seen.add(piece)
            n, last, content = n + len(piece), piece[-1], content or not piece.isspace()
    except BadFile as e:
        return Scan(skipped=str(e))
    except OSError as e:
        return Scan(skipped=f"unreadable ({e.strerror})")
    if not content:
        return Scan(skipped="empty")
    newline = last != "\n"
    if newline:
        seen.add("\n")
    return Scan(h.hexdigest(), n + newline, seen.chars())


def listing(path: str | Path) -> tuple[list[Path], dict[str, str]]:
    """The .txt files of a folder (sorted by name), or the one file `path`; and those left out, with why (a
    link that leads outside the folder)."""
    path = Path(path)
    if path.is_file():
        return [path], {}
    if not path.is_dir():
        raise CorpusError(f"{path}: no such file or folder")
    found = sorted(p for p in path.glob("*.txt") if p.is_file())
    if not found:
        raise CorpusError(f"{path}: no .txt files in this folder")
    inside = path.resolve()
    outside = {
        p.name: f"a link to {p.resolve()}, outside the folder"
        for p in found
        if not p.resolve().is_relative_to(inside)
    }
    return [p for p in found if p.name not in outside], outside


def fingerprint(digests: dict[str, str]) -> str:
    """The corpus's identity: the used files' names and the digests of their normalised texts, in order."""
    h = hashlib.sha256(b"char-rnn corpus 2\0")
    for name, digest in digests.items():
        h.update(f"{name}\0{digest}\0".encode())
    return h.hexdigest()


@dataclass
class Corpus:
    """A small corpus read whole into memory (tests, benchmarks, one-off evaluation); the pipeline streams."""

    parts: list[str]  # each used file's normalised text, ending in a newline
    fingerprint: str
    files: list[str]
    skipped: dict[str, str] = field(default_factory=dict)  # file -> reason

    @property
    def text(self) -> str:
        return "".join(self.parts)

    def split(self, val_frac: float = 0.1) -> tuple[str, str]:
        """Training and validation text: every file gives its last `val_frac` to validation."""
        pairs = [split(p, val_frac) for p in self.parts]
        return "".join(t for t, _ in pairs), "".join(v for _, v in pairs)


def read(path: str | Path) -> Corpus:
    """Read a .txt file or every .txt file in a folder whole, skipping unusable ones (as the pipeline
    does)."""
    found, skipped = listing(path)
    digests, parts = {}, []
    for f in found:
        s = scan(f)
        if s.skipped:
            skipped[f.name] = s.skipped
            continue
        text = "".join(texts(f))
        digests[f.name] = s.digest
        parts.append(text if text.endswith("\n") else text + "\n")
    if not parts:
        raise CorpusError(f"{path}: no usable text ({'; '.join(f'{k}: {v}' for k, v in skipped.items())})")
    return Corpus(parts, fingerprint(digests), list(digests), skipped)


def split(seq: S, val_frac: float = 0.1) -> tuple[S, S]:
    """The first (1 - val_frac) of `seq` (ids or text) for training, the rest for validation (as nanoGPT)."""
    n = train_part(len(seq), val_frac)
    return seq[:n], seq[n:]


def train_part(n: int, val_frac: float = 0.1) -> int:
    """How many of a file's `n` characters go to training; the rest validates."""
    return int(round(n * (1.0 - val_frac)))
