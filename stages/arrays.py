"""Id arrays on disk: written in order into a .npy file with its checksum computed on the way (read back
memory-mapped), and text mapped to ids without a Python object per character."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import numpy as np

from model.files import fsync_dir, named, temp_name
from model.vocab import Vocab


def id_dtype(vocab_size: int) -> np.dtype:
    """The narrowest unsigned integer type that holds every id."""
    return np.dtype(np.uint8 if vocab_size <= 1 << 8 else np.uint16 if vocab_size <= 1 << 16 else np.uint32)


class ArrayWriter:
    """A 1-D .npy array of `n` items written front to back, with plain file writes, under a temporary name;
    `close` checks it is full, makes it durable, renames it into place and returns its sha256 (computed while
    writing). Written pieces go to the page cache, not to this process's memory: RSS stays flat."""

    def __init__(self, path: Path, dtype: np.dtype, n: int):
        self.path, self.tmp, self.n, self.pos = Path(path), temp_name(Path(path)), n, 0
        self.dtype = np.dtype(dtype)
        header = {"descr": np.lib.format.dtype_to_descr(self.dtype), "fortran_order": False, "shape": (n,)}
        try:
            self.file = open(self.tmp, "xb")
            np.lib.format.write_array_header_1_0(self.file, header)
            self.file.flush()
            with open(self.tmp, "rb") as f:
                self.hash = hashlib.sha256(f.read())  # the header: what the file holds before the ids
        except OSError as e:
            self.tmp.unlink(missing_ok=True)
            raise named(e, self.path, "writing") from e

    def write(self, ids: np.ndarray) -> None:
        if len(ids) == 0:
            return
        if self.pos + len(ids) > self.n:
            raise RuntimeError(f"{self.path}: more than {self.n} ids; the corpus changed meanwhile")
        data = np.ascontiguousarray(ids, self.dtype).data
        try:
            self.file.write(data)
        except OSError as e:
            self.file.close()
            self.tmp.unlink(missing_ok=True)
            raise named(e, self.path, "writing") from e
        self.hash.update(data)
        self.pos += len(ids)

    def close(self) -> str:
        if self.pos != self.n:
            raise RuntimeError(f"{self.path}: wrote {self.pos} of {self.n} ids; the corpus changed meanwhile")
        try:
            with self.file:
                self.file.flush()
                os.fsync(self.file.fileno())
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
