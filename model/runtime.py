"""How the maths runs on this process's cores: BLAS threads, the batch's halves side by side, the per-step
products in blocks OpenBLAS multiplies fastest, and malloc's reuse of freed memory.

Nothing here changes a number a model computes beyond rounding (a row's products may round differently in a
half, in a block or alone); it only decides where and in which pieces the products run. The cells (`rnn.py`,
`gru.py`, `lstm.py`) keep only the maths and call `Recur` and `one_thread` in training, `Product` in sampling;
`net.grads` calls `halves` and `side_by_side`, the optimizers `shares`.
"""

from __future__ import annotations

import ctypes
import math
import os
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor, wait
from contextlib import AbstractContextManager, contextmanager, nullcontext
from functools import cache
from typing import Any

import numpy as np
from threadpoolctl import ThreadpoolController

# A thread hand-off per step costs more than it saves on products smaller than this (flops of one per-step
# (B, H) x (H, H) product): they run on one BLAS thread.
SMALL_FLOPS = 1 << 24
# Up to this hidden size the batch's two halves side by side, one BLAS thread each, beat one pass on two
# threads: each thread streams all of W every step, which costs more than it saves as W grows
# (bench/train_speed.py measures both ways).
HALVES_MAX_H = 768
# OpenBLAS multiplies a product of M·N·K <= 10^6 through a kernel that does not pack the matrices first, on
# the cores that have one (its SkylakeX kernels, which Cooperlake and SapphireRapids reuse; OpenBLAS PR 3335):
# there several such small calls beat one large call that packs W every step. Where the kernel is missing
# (Haswell's kernels, which AVX2 machines such as Zen get) small calls pack W each time and lose, so `Recur`
# splits only where the kernel is.
SMALL_MNK = 10**6
SMALL_KERNEL_CORES = {"skylakex", "cooperlake", "sapphirerapids"}
# The small-matrix kernel and the matrix-vector product read W where it lies, with 64-byte (AVX-512) loads: a
# W that does not start on a cache line makes every load straddle two lines, and the product slower by a
# quarter. NumPy aligns its arrays to 16 bytes only (where malloc put them), so the copies that products read
# in place are made with `aligned` (Recur's, Product's, the sampling Stepper's).
LINE = 64
# Elementwise work on fewer elements than this (an optimizer step over all the parameters, say) is not worth
# handing to the second thread.
SHARE_MIN = 1 << 17


@cache
def _blas() -> tuple:
    """NumPy's BLAS libraries, as threadpoolctl finds them (its `limit` and `select` are slow per call, its
    controllers' get/set calls cheap: the per-step code uses only the latter)."""
    return tuple(ThreadpoolController().select(user_api="blas").lib_controllers)


@cache
def small_kernel() -> bool:
    """Whether NumPy's BLAS is an OpenBLAS whose core has the small-matrix kernel (SMALL_KERNEL_CORES)."""
    return any(
        c.internal_api == "openblas" and str(getattr(c, "architecture", "")).lower() in SMALL_KERNEL_CORES
        for c in _blas()
    )


def blas_threads() -> int:
    """The BLAS threads this process allows now."""
    return min((c.get_num_threads() for c in _blas()), default=1)


@contextmanager
def blas_limit(n: int) -> Iterator[None]:
    """At most `n` BLAS threads (process-wide) inside the block."""
    old = [c.get_num_threads() for c in _blas()]
    for c, o in zip(_blas(), old, strict=True):
        c.set_num_threads(min(n, o))
    try:
        yield
    finally:
        for c, o in zip(_blas(), old, strict=True):
            c.set_num_threads(o)


@cache
def keep_freed_memory() -> None:
    """Have glibc's malloc reuse freed memory for arrays up to 256 MB instead of mapping fresh pages for each:
    a training step allocates arrays of megabytes, and faulting their pages in anew every step slows it down.
    Once per process; nothing where malloc is not glibc's."""
    try:
        libc = ctypes.CDLL("libc.so.6")
        libc.mallopt(-3, 1 << 28)  # M_MMAP_THRESHOLD
        libc.mallopt(-1, 1 << 29)  # M_TRIM_THRESHOLD: freed memory kept for reuse, up to this much
    except (OSError, AttributeError):
        pass


@cache
def _pool(pid: int) -> ThreadPoolExecutor:
    """The two threads for `side_by_side`, of this process (`pid`: a forked child makes its own)."""
    return ThreadPoolExecutor(2, thread_name_prefix="rows")


def pool() -> ThreadPoolExecutor:
    """This process's two threads for the batch's halves."""
    return _pool(os.getpid())


def small(B: int, H: int) -> bool:
    """Whether the per-step (B, H) x (H, H) products are too small for BLAS to share between threads."""
    return 2 * B * H * H < SMALL_FLOPS


def halves(B: int, H: int) -> list[slice]:
    """The rows of a batch as the groups that run side by side, each on one thread: the two halves when the
    process allows 2 BLAS threads, B >= 16 and H <= HALVES_MAX_H (then the pointwise maths and the Python loop
    use the second core too, not only the products); else all rows at once."""
    if B < 16 or H > HALVES_MAX_H or blas_threads() < 2:
        return [slice(None)]
    return [slice(0, B // 2), slice(B // 2, B)]


def side_by_side(
    fn: Callable[[Any], Any], groups: list, meanwhile: Callable[[], Any] | None = None
) -> list[Any]:
    """fn(group) for each group: on this thread for one, else on two threads with BLAS on one thread each (the
    process-wide limit is set here, once, not by the calls that run together). `meanwhile()` runs on this
    thread, while the two run (before the one): work they wait for, which would otherwise run before them."""
    if len(groups) == 1:
        if meanwhile:
            meanwhile()
        return [fn(groups[0])]
    with blas_limit(1):
        futures = [pool().submit(fn, g) for g in groups]
        try:
            if meanwhile:
                meanwhile()
        except BaseException:
            wait(futures)  # never leave while they run; its error is the one to tell
            raise
        return [f.result() for f in futures]


def shares(arrays: dict[str, np.ndarray]) -> list[list[str]]:
    """The names of `arrays` in groups for `side_by_side` to update in place: two of about equal size when the
    process allows 2 threads and the arrays are large enough to pay for the hand-off (SHARE_MIN elements),
    else one."""
    names = sorted(arrays, key=lambda k: -arrays[k].size)
    if blas_threads() < 2 or sum(a.size for a in arrays.values()) < SHARE_MIN:
        return [names]
    groups: list[list[str]] = [[], []]
    sizes = [0, 0]
    for k in names:  # largest first, each to the lighter group
        i = sizes.index(min(sizes))
        groups[i].append(k)
        sizes[i] += arrays[k].size
    return groups


def one_thread(T: int, B: int, H: int) -> AbstractContextManager:
    """BLAS on one thread for the T sequential (B, H) x (H, H) products (one per gate block) when they are
    small: a thread hand-off per small product costs more than it saves, and much more when other jobs share
    the cores. Not for a single step (sampling)."""
    if T == 1 or not small(B, H) or blas_threads() == 1:
        return nullcontext()
    return blas_limit(1)


def aligned(a: np.ndarray) -> np.ndarray:
    """A C-contiguous copy of `a` that starts on a LINE-byte boundary."""
    raw = np.empty(a.nbytes + LINE, np.uint8)
    start = -raw.ctypes.data % LINE
    out = raw[start : start + a.nbytes].view(a.dtype).reshape(a.shape)
    out[...] = a
    return out


def split(B: int, K: int, N: int) -> tuple[int, int]:
    """Rows and columns per BLAS call for the per-step (B, K) x (K, N) products on one thread: calls small
    enough for OpenBLAS's small-matrix kernel (m·n·K <= SMALL_MNK), of m rows (the largest divisor of B from 4
    to 8) and n columns (the largest divisor of N that fits, at least 32); (B, N), one call, when the whole
    product fits or no such split exists."""
    m = next((m for m in range(8, 3, -1) if B % m == 0), B)
    n = next((n for n in range(min(N, SMALL_MNK // (m * K)), 31, -1) if N % n == 0), N)
    if B * N * K <= SMALL_MNK or m == B or m * n * K > SMALL_MNK:
        return B, N
    return m, n


class Recur:
    """The per-step recurrent products out = x W of one pass over the steps: W (..., K, N) fixed over the
    pass, x (..., B, K), out (..., B, N), broadcast over the leading axes; one matmul call per step. When BLAS
    runs on one thread and has the small-matrix kernel, that call multiplies blocks of m rows by n columns
    (`split`), small enough for that kernel.

    A cell's loop calls `np.matmul(xs[t], recur.W, out=outs[t])` on views made once per pass by `rows` and
    `cols` (they keep any leading axes, a step axis included), so that a step costs one call and no reshapes;
    `recur(x, out)` does the same for one step. The blocks fit any row count that m divides (`Product` uses
    one Recur for batches of changing size)."""

    def __init__(self, W: np.ndarray, B: int):
        K, N = W.shape[-2:]
        self.m, self.n = split(B, K, N) if blas_threads() == 1 and small_kernel() else (B, N)
        self.plain = (self.m, self.n) == (B, N)
        if not self.plain:  # (..., N/n, 1, K, n): the column blocks, each against every row block
            W = W.reshape(*W.shape[:-2], K, N // self.n, self.n).swapaxes(-3, -2)[..., None, :, :]
        # copied, each block contiguous: read in place, a block's rows lie a row of W apart (a multiple of
        # 4 KB for a gated cell), land on the same few cache sets and evict each other; and aligned (LINE)
        self.W = aligned(W)

    def rows(self, x: np.ndarray) -> np.ndarray:
        """x (..., B, K) as the product takes it: (..., 1, B/m, m, K), a view."""
        if self.plain:
            return x
        *lead, B, K = x.shape
        return x.reshape(*lead, 1, B // self.m, self.m, K)

    def cols(self, out: np.ndarray) -> np.ndarray:
        """out (..., B, N) as the product fills it: (..., N/n, B/m, m, n), a view (the product must land in
        `out`)."""
        if self.plain:
            return out
        *lead, B, N = out.shape
        blocks = out.reshape(*lead, B // self.m, self.m, N // self.n, self.n, copy=False)
        return blocks.swapaxes(-2, -3).swapaxes(-3, -4)

    def __call__(self, x: np.ndarray, out: np.ndarray) -> None:
        np.matmul(self.rows(x), self.W, out=self.cols(out))


class Product:
    """x W for one step of sampling, x (B, K) with B changing as rows join and leave. One plain call when the
    whole product fits OpenBLAS's small-matrix kernel (B·K·N <= SMALL_MNK), for one row (a matrix-vector
    product), or when the Recur is plain (BLAS on more threads, no such kernel). Otherwise the rows in whole
    blocks of 8 through a `Recur` made for blocks of 8 rows, and the rows past the last whole block: from
    PAD_FROM of them, copied into a block of their own whose other rows idle; fewer, against the same column
    blocks of W as they are. Never W itself beside its column blocks: two copies of W in one step do not fit
    a core's L2 together and each call would read its copy from further out. Returns a buffer of its own
    (B, N), overwritten by the next call."""

    ROWS = 8
    # 6 or 7 rows cost about what a block of 8 costs, in a plain call or against the column blocks (a plain
    # call for them cost more than the block at hidden 256: bench/sample_cost.py's batch 14): they go as a
    # whole block. A row of the product reads only its own row of x, so the idle rows (zeros, or rows of an
    # earlier call) change no other row's number.
    PAD_FROM = 6

    def __init__(self, W: np.ndarray):
        K, N = W.shape
        self.buf, self.size = np.empty((self.ROWS, N), W.dtype), K * N
        self.pad = np.zeros((self.ROWS, K), W.dtype)  # (8, K): the last rows and the idle ones
        self.recur = Recur(W, 2 * self.ROWS)  # its blocks: 8 rows (split's choice for 16)
        self.W = self.recur.W if self.recur.plain else aligned(W)  # (LINE); a plain Recur's W is one already
        blocked = not self.recur.plain and self.recur.m == self.ROWS
        # W's column blocks (N/n, K, n), the Recur's own, for rows as they are; None: plain calls only
        self.cols = self.recur.W.reshape(-1, K, self.recur.n) if blocked else None
        self.least = max(2, SMALL_MNK // self.size + 1) if blocked else math.inf  # fewer: one call

    def __call__(self, x: np.ndarray) -> np.ndarray:
        B = len(x)
        q = B // self.ROWS * self.ROWS  # rows in whole blocks
        r = B - q  # rows past them
        padded = r >= self.PAD_FROM and B >= self.least
        rows = q + self.ROWS if padded else B  # rows the products fill
        if len(self.buf) < rows:
            self.buf = np.empty((max(rows, 2 * len(self.buf)), self.W.shape[1]), self.W.dtype)
        out = self.buf[:rows]
        if B < self.least:
            np.matmul(x, self.W, out)  # outputs positional: a keyword costs more
            return out
        if q:
            self.recur(x[:q], out[:q])
        if padded:
            self.pad[:r] = x[q:]
            self.recur(self.pad, out[q:])
        elif r:  # (1, r, K) against (N/n, K, n) into out's rows seen as (N/n, r, n)
            np.matmul(x[None, q:], self.cols, out[q:].reshape(r, -1, self.recur.n).swapaxes(0, 1))
        return out[:B]
