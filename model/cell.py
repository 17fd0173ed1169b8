"""What every recurrent cell provides (`rnn.py`, `gru.py`, `lstm.py`), and the helpers they share.

A cell is one layer's recurrence over T steps, batched and time-major. The network (`net.py`) gives it the
input pre-activations a = x U + b of all T steps, computed in one product per layer and laid out gate-major,
(k, T, B, H) for k gate blocks of width H: each gate of each step is one contiguous (B, H) block, so the
pointwise maths of a step runs on whole blocks in place. The cell adds h_{t-1} W: one matmul call per step
with W (H, kH) seen as its k blocks (k, H, H). Its state is S arrays (B, H), h first (the LSTM adds its c).
Sigmoids are computed as σ(x) = (1 + tanh(x / 2)) / 2: one tanh call can then cover a slab of gates, and the
halving is done once for all steps, on the sigmoid blocks of a and of the copy of W a pass multiplies by
(`halved`): exact, 1/2 being a power of two, so every number is the one the plain formula gives.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any, ClassVar

import numpy as np

from model.runtime import Product, Recur, one_thread

Params = dict[str, np.ndarray]

EMBED_STD = 0.6  # std of the layer-0 input rows (every gate block)


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

    def step(self, a: np.ndarray, q: Params, s: np.ndarray, out: np.ndarray, mul: Product) -> None:
        """One step without the training caches (sampling): the next state into `out` (S, B, H), from the
        input pre-activations `a` (k, B, H; overwritten) and the state `s` (S, B, H; not `out`); `mul` is
        the product h W of this layer (its result is overwritten by the next call)."""
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
    k = len(dz)
    tmpk = np.empty((k, B, H), dh.dtype)
    tmp = np.empty((B, H), dh.dtype)
    with one_thread(T, B, H):
        recur = Recur(blocks(W, k).transpose(0, 2, 1), B)  # (k, H, H): W^T's blocks (Recur copies them)
        WT, out = recur.W, recur.cols(tmpk)
        xs, ds = list(recur.rows(dz).swapaxes(0, 1)), list(dh)  # the steps' views, made once
        for t in range(T - 1, -1, -1):
            if t < T - 1:
                np.matmul(xs[t + 1], WT, out)
                np.add.reduce(tmpk, 0, out=tmp)
                np.add(ds[t], tmp, ds[t])
            yield t, ds[t]


def recur_grad(h: np.ndarray, dz: np.ndarray) -> np.ndarray:
    """dW (H, kH) = sum over steps of h_{t-1}^T dz_t, from h (T+1, B, H) and dz (k, T, B, H)."""
    H, k = h.shape[-1], len(dz)
    dW = np.empty((H, k * H), dz.dtype)
    np.matmul(h[:-1].reshape(-1, H).T, dz.reshape(k, -1, H), out=blocks(dW, k))
    return dW


def halved(W: np.ndarray, k: int, j: int) -> np.ndarray:
    """W's k gate blocks (k, H, H), copied, the first j of them (the sigmoids') halved."""
    Wk = blocks(W, k).copy()
    Wk[:j] *= 0.5
    return Wk


def orthogonal(H: int, gain: float, rng: np.random.Generator) -> np.ndarray:
    q, r = np.linalg.qr(rng.standard_normal((H, H)))
    return gain * q * np.sign(np.diag(r))
