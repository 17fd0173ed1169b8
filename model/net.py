"""The network around the cell: a stack of recurrent layers over characters, batched and time-major.

    layer 0:  a_t = U_0[id_t] + b_0     an embedding: a row of U_0 per character
    layer l:  a_t = x_t U_l + b_l       x = the layer below's output after dropout; all T steps in one product
              h_t, state_t = cell(a_t, state_{t-1})    one (B, H) x (H, kH) product per step
    output:   y_t = h_t V + c,  p_t = softmax(y_t),  loss = mean cross-entropy in nats per character

The cell (`rnn`, `gru` or `lstm`: `rnn.py`, `gru.py`, `lstm.py`) has k gate blocks of width H, so U_l is
(in, kH) and b_l (kH,); a is laid out gate-major, (k, T, B, H) (see `cell.py`). Dropout (inverted) applies to
each layer's output, never to the recurrence. The state of the network is one array (L, S, B, H): S = 1 (h)
for rnn and gru, 2 (h, c) for lstm.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np

from model.cell import Cell, Params, blocks
from model.config import ModelConfig
from model.gru import GRU
from model.lstm import LSTM
from model.rnn import RNN
from model.runtime import Product, aligned, halves, keep_freed_memory, shares, side_by_side

CELLS: dict[str, Cell] = {c.name: c for c in (RNN(), GRU(), LSTM())}


def shapes(cfg: ModelConfig) -> dict[str, tuple[int, ...]]:
    """Every parameter's name and shape."""
    cell, H, V = CELLS[cfg.cell], cfg.hidden, cfg.vocab_size
    out: dict[str, tuple[int, ...]] = {}
    for l in range(cfg.layers):
        out[f"U{l}"] = (V if l == 0 else H, cell.gates * H)
        out |= {f"{k}{l}": s for k, s in cell.shapes(H).items()}
    return out | {"V": (H, V), "c": (V,)}


def init(cfg: ModelConfig, rng: np.random.Generator) -> Params:
    """Fresh parameters: each layer's as its cell starts it, outputs N(0, 1/H), zero output biases."""
    cell, H, V = CELLS[cfg.cell], cfg.hidden, cfg.vocab_size
    p: Params = {}
    for l in range(cfg.layers):
        q = cell.init(V if l == 0 else H, H, rng, embed=l == 0)
        p |= {f"{k}{l}": v for k, v in q.items()}
    p["V"] = rng.standard_normal((H, V)) / np.sqrt(H)
    p["c"] = np.zeros(V)
    return {k: v.astype(cfg.dtype) for k, v in p.items()}


def grow(p: Params, cfg: ModelConfig, vocab_size: int, rng: np.random.Generator) -> Params:
    """Parameters for a larger vocabulary: old rows/columns kept, new ones fresh."""
    if vocab_size < cfg.vocab_size:
        raise ValueError(f"cannot shrink the vocabulary from {cfg.vocab_size} to {vocab_size}")
    fresh = init(cfg.model_copy(update={"vocab_size": vocab_size}), rng)
    out = {k: v.copy() for k, v in p.items()}
    n = cfg.vocab_size
    out["U0"] = np.concatenate([p["U0"], fresh["U0"][n:]], axis=0)
    out["V"] = np.concatenate([p["V"], fresh["V"][:, n:]], axis=1)
    out["c"] = np.concatenate([p["c"], fresh["c"][n:]])
    return out


def zeros_state(cfg: ModelConfig, batch: int) -> np.ndarray:
    return np.zeros((cfg.layers, CELLS[cfg.cell].states, batch, cfg.hidden), cfg.dtype)  # (L, S, B, H)


def layer(p: Params, cfg: ModelConfig, l: int) -> Params:
    """Layer l's parameters besides U, under their names in its cell (W, b, ...)."""
    return {k: p[f"{k}{l}"] for k in CELLS[cfg.cell].shapes(cfg.hidden)}


def inputs(p: Params, l: int, k: int, x: np.ndarray) -> np.ndarray:
    """Layer l's input pre-activations a = x U_l + b_l, gate-major (k, ..., H): layer 0 looks up the ids `x`
    (...) as rows of U_0, the others take x (N, H) through one matmul call."""
    U, b = blocks(p[f"U{l}"], k), blocks(p[f"b{l}"], k)  # (k, in, H), (k, H)
    if l > 0:
        a = np.matmul(x, U)  # (k, N, H)
    elif x.size >= U.shape[1]:  # more ids than rows: fold the bias into the rows first
        return np.take(np.ascontiguousarray(U + b[:, None]), x, axis=1)  # (k, *x.shape, H)
    else:
        a = np.take(U, x, axis=1)
    a += b.reshape(k, *(1,) * (a.ndim - 2), -1)
    return a


@dataclass
class Cache:
    ids: np.ndarray  # (T, B) inputs, time-major
    tgt: np.ndarray  # (T*B,) targets
    outs: list[np.ndarray]  # per layer (T, B, H), the layer output after dropout
    masks: Sequence[np.ndarray | None]  # per layer (T, B, H) dropout masks (scaled)
    cells: list[Any]  # per layer, the cell's cache
    dz: np.ndarray  # (T*B, V) softmax / (T*B); backward turns it into the logits' gradient in place


def forward(
    p: Params,
    cfg: ModelConfig,
    ids: np.ndarray,
    targets: np.ndarray,
    s0: np.ndarray,
    rng: np.random.Generator | None = None,
    masks: Sequence[np.ndarray] | None = None,
) -> tuple[float, Cache, np.ndarray]:
    """Mean loss (nats/char) of `targets` given `ids` (both (B, T)) from the state `s0` (L, S, B, H): the
    loss, the cache for backward, the last state. Dropout is applied only in training: with the `masks`
    given, or else drawn from `rng` when it is given."""
    B, T = ids.shape
    cell, H, N = CELLS[cfg.cell], cfg.hidden, T * B
    k = cell.gates
    if masks is None and rng is not None:
        masks = dropout_masks(cfg, T, B, rng)
    ids_t = np.ascontiguousarray(ids.T)  # (T, B)
    tgt = np.ascontiguousarray(targets.T).reshape(-1)  # (N,)
    outs, caches = [], []
    sT = np.empty_like(s0)
    x = ids_t
    for l in range(cfg.layers):
        a = inputs(p, l, k, x if l == 0 else x.reshape(N, H)).reshape(k, T, B, H)
        h, c, sT[l] = cell.forward(a, layer(p, cfg, l), s0[l])  # (T, B, H)
        x = h * masks[l] if masks else h
        outs.append(x)
        caches.append(c)
    z = x.reshape(N, H) @ p["V"]  # (N, V) logits
    z += p["c"]
    z -= z.max(axis=1, keepdims=True)
    zt = z[np.arange(N), tgt]  # (N,) target logits, shifted
    np.exp(z, out=z)
    s = z.sum(axis=1, keepdims=True)  # (N, 1)
    loss = float((np.log(s[:, 0]) - zt).astype(np.float64).mean())
    z *= 1.0 / (s * N)
    return loss, Cache(ids_t, tgt, outs, masks or [None] * cfg.layers, caches, z), sT


def dropout_masks(cfg: ModelConfig, T: int, B: int, rng: np.random.Generator) -> list[np.ndarray] | None:
    """Each layer's inverted-dropout mask (T, B, H): kept units 1 / keep, dropped 0; None without dropout."""
    if cfg.dropout == 0:
        return None
    return [dropout_mask(cfg, T, B, rng) for _ in range(cfg.layers)]


def dropout_mask(cfg: ModelConfig, T: int, B: int, rng: np.random.Generator) -> np.ndarray:
    """One layer's mask (T, B, H), the next draws from `rng`."""
    keep = 1.0 - cfg.dropout
    m = np.less(rng.random((T, B, cfg.hidden), dtype=cfg.dtype), keep).astype(cfg.dtype)
    m *= 1.0 / keep
    return m


class Drops:
    """A training step's dropout masks, the very ones `dropout_masks` draws, drawn by `draw` on the calling
    thread while the batch's halves run (`runtime.side_by_side`'s `meanwhile`): a half waits for layer l's
    mask only when it needs it, so that drawing them no longer holds both halves back. `rows(r)` gives the
    masks of rows r, as `forward` takes them."""

    def __init__(self, cfg: ModelConfig, T: int, B: int, rng: np.random.Generator):
        self.cfg, self.T, self.B, self.rng = cfg, T, B, rng
        self.masks: list[np.ndarray | None] = [None] * cfg.layers
        self.ready = [threading.Event() for _ in range(cfg.layers)]

    def draw(self, each: Callable[[int, np.ndarray], None] | None = None) -> None:
        """Draw every layer's mask, in layer order as dropout_masks draws them; each(l, mask) once drawn."""
        try:
            for l in range(self.cfg.layers):
                self.masks[l] = dropout_mask(self.cfg, self.T, self.B, self.rng)
                self.ready[l].set()
                if each:
                    each(l, self.masks[l])
        finally:
            for e in self.ready:  # a failed draw leaves no half waiting: it finds no mask and stops
                e.set()

    def rows(self, r: slice) -> Sequence[np.ndarray]:
        return MaskRows(self, r)

    def get(self, l: int, r: slice) -> np.ndarray:
        """Layer l's mask, rows r: once drawn."""
        self.ready[l].wait()
        m = self.masks[l]
        if m is None:
            raise RuntimeError("the dropout masks were not drawn (see the error that stopped the step)")
        return m[:, r]


class MaskRows(Sequence):
    """The masks of some rows of a batch, layer by layer, as each is drawn (`Drops`)."""

    def __init__(self, drops: Drops, r: slice):
        self.drops, self.r = drops, r

    def __len__(self) -> int:
        return len(self.drops.masks)

    def __getitem__(self, l):  # type: ignore[override]
        return self.drops.get(l, self.r)


class Elsewhere(Protocol):
    """What runs a batch's second half somewhere else than a thread of this process (model/twin.py's Twin):
    `pair` runs run(first half) here and the same step's second half there, for batches of B x T."""

    B: int
    T: int

    def pair(
        self,
        run: Callable,
        halves: list[slice],
        p: Params,
        ids: np.ndarray,
        targets: np.ndarray,
        s0: np.ndarray,
        drops: Drops | None,
    ) -> list: ...


def grads(
    p: Params,
    cfg: ModelConfig,
    ids: np.ndarray,
    targets: np.ndarray,
    s0: np.ndarray,
    rng: np.random.Generator | None = None,
    twin: Elsewhere | None = None,
) -> tuple[float, Params, np.ndarray]:
    """One training step's mean loss, gradients and last state (`forward`, then `backward`). When the
    process allows 2 BLAS threads and the batch's shape suits it (`runtime.halves`), the two halves of the
    batch run side by side, each on one thread (the second in `twin`'s process when given one: model/twin.py),
    and their losses and gradients are averaged, weighted by rows: the same values up to rounding, with the
    same dropout masks."""
    keep_freed_memory()
    B, T = ids.shape
    drops = Drops(cfg, T, B, rng) if rng is not None and cfg.dropout > 0 else None

    def run(r: slice) -> tuple[float, Params, np.ndarray]:
        masks = drops.rows(r) if drops else None
        loss, cache, sT = forward(p, cfg, ids[r], targets[r], s0[:, :, r], masks=masks)
        return loss, backward(p, cfg, cache), sT

    groups = halves(B, cfg.hidden)
    if twin is not None and len(groups) == 2:
        if (B, T) != (twin.B, twin.T):
            raise ValueError(f"a batch of {B} x {T} for a twin made for {twin.B} x {twin.T}")
        outs = twin.pair(run, groups, p, ids, targets, s0, drops)
    else:
        outs = side_by_side(run, groups, meanwhile=drops.draw if drops else None)
    if len(outs) == 1:
        return outs[0]
    (l1, g, s1), (l2, g2, s2) = outs
    w1, w2 = (len(range(B)[r]) / B for r in groups)

    def combine(names: list[str]) -> None:  # in place, into the first half's arrays
        for k in names:
            v, u = g[k], g2[k]
            v *= w1
            u *= w2
            v += u

    side_by_side(combine, shares(g))
    return w1 * l1 + w2 * l2, g, np.concatenate([s1, s2], axis=2)


def embed_grad(ids: np.ndarray, d: np.ndarray, V: int) -> np.ndarray:
    """The sum of the rows of each gate block of d (k, N, H) per id (N,), as a (V, kH) array: a one-hot
    product when that is small, else a scatter-add."""
    k, N, H = d.shape
    g = np.zeros((V, k * H), d.dtype)
    if V <= N and V * N <= 1 << 26:
        onehot = np.zeros((V, N), d.dtype)
        onehot[ids, np.arange(N)] = 1.0
        np.matmul(onehot, d, out=blocks(g, k))
    else:
        np.add.at(blocks(g, k), (slice(None), ids), d)
    return g


def backward(p: Params, cfg: ModelConfig, c: Cache) -> Params:
    """Gradients of the mean loss with respect to every parameter (truncated at the chunk start)."""
    T, B = c.ids.shape
    cell, H, N = CELLS[cfg.cell], cfg.hidden, T * B
    k = cell.gates
    g: Params = {}
    dz = c.dz  # reused in place: (N, V)
    dz[np.arange(N), c.tgt] -= 1.0 / N
    g["V"] = c.outs[-1].reshape(N, H).T @ dz
    g["c"] = dz.sum(axis=0)
    dout = (dz @ p["V"].T).reshape(T, B, H)  # (T, B, H)
    for l in reversed(range(cfg.layers)):
        if c.masks[l] is not None:
            dout *= c.masks[l]
        da, gq = cell.backward(dout, c.cells[l], layer(p, cfg, l))  # (k, T, B, H)
        g |= {f"{name}{l}": v for name, v in gq.items()}
        da = da.reshape(k, N, H)
        if l == 0:
            g["U0"] = embed_grad(c.ids.reshape(-1), da, cfg.vocab_size)
            g["b0"] = g["U0"].sum(axis=0)
        else:
            g[f"U{l}"] = np.empty((H, k * H), da.dtype)
            np.matmul(c.outs[l - 1].reshape(N, H).T, da, out=blocks(g[f"U{l}"], k))
            g[f"b{l}"] = da.sum(axis=1).reshape(-1)
            dout = np.matmul(da, blocks(p[f"U{l}"], k).transpose(0, 2, 1)).sum(axis=0).reshape(T, B, H)
    return g


class Stepper:
    """One character per row for one model, through each cell's cheap step; the per-model work (layer 0's rows
    with their bias added, each layer's parameters) done once."""

    def __init__(self, p: Params, cfg: ModelConfig):
        self.cell = CELLS[cfg.cell]
        k = self.cell.gates
        # Gate-major (k, ..., H) and contiguous, so that a step's inputs come out contiguous (k, B, H):
        # numpy's pointwise work on row-strided views of (B, kH) cost about 3 times as much. Layer 0: its rows
        # with their bias (k, V, H); the layers above: U's gate blocks (k, H, H), aligned as Recur's W, and b.
        self.embed = np.ascontiguousarray(blocks(p["U0"] + p["b0"], k))
        self.ins = [
            (aligned(blocks(p[f"U{l}"], k)), blocks(p[f"b{l}"], k)[:, None]) for l in range(1, cfg.layers)
        ]
        self.layers = [layer(p, cfg, l) for l in range(cfg.layers)]
        self.products = [Product(q["W"]) for q in self.layers]  # each layer's h W, in blocks BLAS likes

    def __call__(self, ids: np.ndarray, s: np.ndarray, out: np.ndarray | None = None) -> np.ndarray:
        """Advance the state `s` (L, S, B, H) by `ids` (B,) into `out` (a new array when None; never `s`)."""
        out = np.empty_like(s) if out is None else out
        a = self.embed.take(ids, axis=1)  # (k, B, H)
        for l, (q, mul) in enumerate(zip(self.layers, self.products, strict=True)):
            if l:
                U, b = self.ins[l - 1]
                a = np.matmul(out[l - 1, 0], U)  # (B, H) x (k, H, H): (k, B, H)
                a += b
            self.cell.step(a, q, s[l], out[l], mul)
        return out


def logits(p: Params, s: np.ndarray) -> np.ndarray:
    """Next-character logits (B, V) from the top layer's h in the state `s` (L, S, B, H)."""
    return s[-1, 0] @ p["V"] + p["c"]
