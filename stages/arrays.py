"""Id arrays on disk: written in order into a memory-mapped .npy file with its checksum computed on the way,
and text mapped to ids without a Python object per character."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import numpy as np
from numpy.lib.format import open_memmap

from model.files import fsync_dir, named, temp_name
from model.vocab import Vocab


def id_dtype(vocab_size: int) -> np.dtype:
    """The narrowest unsigned integer type that holds every id."""
    return np.dtype(np.uint8 if vocab_size <= 1 << 8 else np.uint16 if vocab_size <= 1 << 16 else np.uint32)


class ArrayWriter:
    """A 1-D .npy array of `n` items written front to back under a temporary name; `close` checks it is
    full, makes it durable, renames it into place and returns its sha256 (computed while writing)."""

    def __init__(self, path: Path, dtype: np.dtype, n: int):
        self.path, self.tmp, self.n, self.pos = Path(path), temp_name(Path(path)), n, 0
        try:
            if n == 0:  # an empty file cannot be mapped: write the header alone
                np.save(self.tmp, np.empty(0, dtype), allow_pickle=False)
                self.array = None
            else:
                self.array = open_memmap(self.tmp, mode="w+", dtype=dtype, shape=(n,))
            with open(self.tmp, "rb") as f:  # the header: what the file holds before the ids
                self.hash = hashlib.sha256(f.read(self.array.offset if self.array is not None else None))
        except OSError as e:
            self.tmp.unlink(missing_ok=True)
            raise named(e, self.path, "writing") from e

    def write(self, ids: np.ndarray) -> None:
        if len(ids) == 0:
            return
        self.array[self.pos : self.pos + len(ids)] = ids
        self.hash.update(np.ascontiguousarray(ids, self.array.dtype).data)
        self.pos += len(ids)

    def close(self) -> str:
        if self.pos != self.n:
            raise RuntimeError(f"{self.path}: wrote {self.pos} of {self.n} ids; the corpus changed meanwhile")
        try:
            if self.array is not None:
                self.array.flush()
                del self.array
            fd = os.open(self.tmp, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
            os.replace(self.tmp, self.path)
            fsync_dir(self.path.parent)
        except OSError as e:
            self.tmp.unlink(missing_ok=True)
            raise named(e, self.path, "writing") from e
        return self.hash.hexdigest()


class Mapper:
    """Text to ids of `vocab` as `dtype`: ASCII through a byte translation table (one C call) when the ids
    fit in a byte, anything else through a sorted table of code points. None when a character is not in the
    vocabulary."""

    def __init__(self, vocab: Vocab, dtype: np.dtype):
        self.dtype = np.dtype(dtype)
        cps = np.array([ord(c) for c in vocab.chars], np.uint32)
        self.order = np.argsort(cps)
        self.keys = cps[self.order]
        table = bytearray(256)
        self.ascii_ok = bytearray(256)
        for i, c in enumerate(vocab.chars):
            if ord(c) < 128:
                table[ord(c)], self.ascii_ok[ord(c)] = i % 256, 1
        self.table, self.missing = bytes(table), bytes(c for c in range(128) if not self.ascii_ok[c])

    def __call__(self, text: str) -> np.ndarray | None:
        if text.isascii() and self.dtype == np.uint8:
            raw = text.encode("ascii")
            if raw.translate(None, self.missing) != raw:  # a byte the vocabulary lacks
                return None
            return np.frombuffer(raw.translate(self.table), np.uint8)
        cps = np.frombuffer(text.encode("utf-32-le"), np.uint32)
        at = np.minimum(np.searchsorted(self.keys, cps), len(self.keys) - 1)
        if not np.array_equal(self.keys[at], cps):
            return None
        return self.order[at].astype(self.dtype)
