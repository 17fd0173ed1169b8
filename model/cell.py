"""What every recurrent cell provides (`rnn.py`, `gru.py`, `lstm.py`), and the helpers they share.

A cell is one layer's recurrence over T steps, batched and time-major. The network (`net.py`) gives it the
input pre-activations a = x U + b of all T steps, computed in one product per layer and laid out gate-major,
(k, T, B, H) for k gate blocks of width H: each gate of each step is one contiguous (B, H) block, so the
pointwise maths of a step runs on whole blocks in place. The cell adds h_{t-1} W: one matmul call per step
with W (H, kH) seen as its k blocks (k, H, H). Its state is S arrays (B, H), h first (the LSTM adds its c).
Sigmoids are computed as σ(x) = (1 + tanh(x / 2)) / 2: one tanh call can then cover a slab of gates.
"""

from __future__ import annotations

import ctypes
import os
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import AbstractContextManager, contextmanager, nullcontext
from functools import cache
from typing import Any, ClassVar

import numpy as np
from threadpoolctl import ThreadpoolController

Params = dict[str, np.ndarray]

EMBED_STD = 0.6  # std of the layer-0 input rows (every gate block)
SMALL_FLOPS = 1 << 24  # per-step (B, H) x (H, H) products below this run on one BLAS thread
# Up to this hidden size a batch's two halves side by side beat one pass on 2 BLAS threads (each thread
# streams all of W every step, which costs more as W grows). Training steps, halves / one pass: B 64, T 128,
# H 512: RNN 1.33x, GRU 1.34x and 1.19x, LSTM 1.17x and 0.95x (two runs); B 32, T 64, H 768: RNN 1.09x,
# LSTM 1.05x; H 1024: RNN (B 64) 1.02x, GRU (B 32, W 12 MB) 0.89x
HALVES_MAX_H = 768
# OpenBLAS multiplies a product of M·N·K <= 10^6 through a kernel that does not pack the matrices first, on
# the cores that have one (its SkylakeX kernels, which Cooperlake and SapphireRapids reuse; OpenBLAS PR 3335).
# This machine's (AVX-512: OpenBLAS picks SkylakeX), one thread: (16, 256) x (256, 256) as one call 29 us, as
# 2 calls of 8 rows 19-21 us; (32, 512) x (512, 512) 194 us, as 4 x 4 calls of (8, 512) x (512, 128) 152 us.
# Where it has none (Haswell's kernels, which Zen uses too: OPENBLAS_CORETYPE=Haswell here), small calls
# pack W every call: 2 calls of 8 rows 40 us. `Recur` splits only where the kernel is.
SMALL_MNK = 10**6
SMALL_KERNEL_CORES = {"skylakex", "cooperlake", "sapphirerapids"}


class Cell:
    """One layer's maths. Subclasses set the class attributes and implement forward and backward."""

    name: ClassVar[str]
    gates: ClassVar[int]  # k: blocks of width H in U, W and b
    states: ClassVar[int]  # S: arrays of (B, H) in the state, h first
    recur_gain: ClassVar[float]  # the singular values of every (H, H) block of W at init

    def shapes(self, H: int) -> dict[str, tuple[int, ...]]:
        """The layer's parameters besides U (in, kH), as name -> shape (the net appends the layer index)."""
        return {"W": (H, self.gates * H), "b": (self.gates * H,)}

    def init(self, fan_in: int, H: int, rng: np.random.Generator, embed: bool) -> Params:
        """Fresh float64 parameters of one layer: inputs N(0, 0.6^2) for embedding rows, N(0, 1/fan_in)
        above; every (H, H) block of W orthogonal with gain `recur_gain`; zero biases."""
        k = self.gates
        U = rng.standard_normal((fan_in, k * H)) * (EMBED_STD if embed else 1.0 / np.sqrt(fan_in))
        W = np.concatenate([orthogonal(H, self.recur_gain, rng) for _ in range(k)], axis=1)
        return {"U": U, "W": W} | {n: np.zeros(s) for n, s in self.shapes(H).items() if n != "W"}

    def forward(self, a: np.ndarray, q: Params, s0: np.ndarray) -> tuple[np.ndarray, Any, np.ndarray]:
        """The outputs h (T, B, H), a cache for `backward`, and the last state (S, B, H), from the input
        pre-activations `a` (k, T, B, H; overwritten), the layer's parameters `q` and the state `s0`."""
        raise NotImplementedError

    def step(self, a: np.ndarray, q: Params, s: np.ndarray, out: np.ndarray) -> None:
        """One step without the training caches (sampling): the next state into `out` (S, B, H), from the
        input pre-activations `a` (k, B, H; overwritten) and the state `s` (S, B, H; not `out`)."""
        raise NotImplementedError

    def backward(self, dh: np.ndarray, cache: Any, q: Params) -> tuple[np.ndarray, Params]:
        """From the loss gradient w.r.t. the outputs h (T, B, H; overwritten): the gradient w.r.t. the
        pre-activations a (k, T, B, H) and the gradients of `q` besides U and b (truncated at the chunk
        start; the net derives U's and b's from a's)."""
        raise NotImplementedError


def blocks(M: np.ndarray, k: int) -> np.ndarray:
    """The k gate blocks of M, (kH,) or (R, kH), as a view (k, H) or (k, R, H)."""
    if M.ndim == 1:
        return M.reshape(k, -1)
    return M.reshape(len(M), k, -1).swapaxes(0, 1)


def back_through_time(dh: np.ndarray, dz: np.ndarray, W: np.ndarray) -> Iterator[tuple[int, np.ndarray]]:
    """Walk t = T-1 .. 0 and yield (t, dh[t]) with the future's part added in place: dh[t] += dz[:, t+1] W^T,
    where dz (k, T, B, H) is the gradient w.r.t. the recurrent products h_t W, which the caller fills for step
    t (from dh[t]) before the walk goes on."""
    T, B, H = dh.shape
    # (k, H, H), copied: OpenBLAS multiplies a small batch by a transposed view at half the speed
    WT = np.ascontiguousarray(blocks(W, len(dz)).transpose(0, 2, 1))
    tmpk = np.empty((len(dz), B, H), dh.dtype)
    tmp = np.empty((B, H), dh.dtype)
    with one_thread(T, B, H):
        recur = Recur(WT, B)
        for t in range(T - 1, -1, -1):
            if t < T - 1:
                recur(dz[:, t + 1], tmpk)
                np.sum(tmpk, axis=0, out=tmp)
                dh[t] += tmp
            yield t, dh[t]


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
    (`split`), small enough for that kernel."""

    def __init__(self, W: np.ndarray, B: int):
        K, N = W.shape[-2:]
        m, n = split(B, K, N) if blas_threads() == 1 and small_kernel() else (B, N)
        self.plain, self.W = (m, n) == (B, N), W
        if not self.plain:  # (..., N/n, 1, K, n): the column blocks, each against every row block
            self.W = W.reshape(*W.shape[:-2], K, N // n, n).swapaxes(-3, -2)[..., None, :, :]
        self.xs, self.outs = (1, B // m, m, K), (B // m, m, N // n, n)

    def __call__(self, x: np.ndarray, out: np.ndarray) -> None:
        if self.plain:
            np.matmul(x, self.W, out=out)
            return
        xv = x.reshape(x.shape[:-2] + self.xs)  # (..., 1, B/m, m, K)
        ov = out.reshape(out.shape[:-2] + self.outs, copy=False)  # a view: the product must land in `out`
        np.matmul(xv, self.W, out=ov.swapaxes(-2, -3).swapaxes(-3, -4))  # (..., N/n, B/m, m, n)


def recur_grad(h: np.ndarray, dz: np.ndarray) -> np.ndarray:
    """dW (H, kH) = sum over steps of h_{t-1}^T dz_t, from h (T+1, B, H) and dz (k, T, B, H)."""
    H, k = h.shape[-1], len(dz)
    dW = np.empty((H, k * H), dz.dtype)
    np.matmul(h[:-1].reshape(-1, H).T, dz.reshape(k, -1, H), out=blocks(dW, k))
    return dW


def orthogonal(H: int, gain: float, rng: np.random.Generator) -> np.ndarray:
    q, r = np.linalg.qr(rng.standard_normal((H, H)))
    return gain * q * np.sign(np.diag(r))


@cache
def _blas() -> tuple:
    """NumPy's BLAS libraries, as threadpoolctl finds them (its `limit` and `select` cost milliseconds a
    call, its controllers' get/set calls microseconds)."""
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
    a training step allocates arrays of megabytes, and faulting their pages in anew each step made a GRU
    2 x 256 step (B 32, T 64) 15% slower. Once per process; nothing where malloc is not glibc's."""
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


def small(B: int, H: int) -> bool:
    """Whether the per-step (B, H) x (H, H) products are too small for BLAS to share between threads."""
    return 2 * B * H * H < SMALL_FLOPS


def halves(B: int, H: int) -> list[slice]:
    """The rows of a batch as the groups that run side by side, each on one thread: the two halves when the
    process allows 2 BLAS threads, B >= 16 and H <= HALVES_MAX_H (then the pointwise maths and the Python
    loop use the second core too, not only the products); else all rows at once."""
    if B < 16 or H > HALVES_MAX_H or blas_threads() < 2:
        return [slice(None)]
    return [slice(0, B // 2), slice(B // 2, B)]


def side_by_side(fn: Callable[[Any], Any], groups: list) -> list[Any]:
    """fn(group) for each group: on this thread for one, else on two threads with BLAS on one thread each (the
    process-wide limit is set here, once, not by the calls that run together)."""
    if len(groups) == 1:
        return [fn(groups[0])]
    with blas_limit(1):
        return list(_pool(os.getpid()).map(fn, groups))


def one_thread(T: int, B: int, H: int) -> AbstractContextManager:
    """BLAS on one thread for the T sequential (B, H) x (H, H) products (one per gate block) when they are
    small: a thread hand-off per small product costs more than it saves, and much more when other jobs share
    the cores. Not for a single step (sampling)."""
    if T == 1 or not small(B, H) or blas_threads() == 1:
        return nullcontext()
    return blas_limit(1)
