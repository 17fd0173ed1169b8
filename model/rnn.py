"""A stacked vanilla tanh RNN over characters, batched and time-major.

Layer l:  h_t = tanh(x_t U_l + h_{t-1} W_l + b_l)   (layer 0 looks its input up: x_t U_0 = U_0[id_t])
Output:   y_t = h_t V + c,  p_t = softmax(y_t),     loss = mean cross-entropy in nats per character.
Dropout (inverted) applies to each layer's output, never to the recurrence.
"""

from __future__ import annotations

from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass
from functools import cache
from typing import Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field
from threadpoolctl import ThreadpoolController

Params = dict[str, np.ndarray]


class ModelConfig(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)

    vocab_size: int = Field(ge=1, le=1_000_000)
    # defaults: the best validation loss found for 5 minutes on 2 cores (bench/train_quality.py)
    hidden: int = Field(384, ge=1, le=8192)
    layers: int = Field(2, ge=1, le=8)
    dropout: float = Field(0.1, ge=0.0, le=0.9)
    dtype: Literal["float32", "float64"] = "float32"


EMBED_STD = 0.6  # std of the layer-0 input rows
RECUR_GAIN = 0.6  # every singular value of W at init


def init(cfg: ModelConfig, rng: np.random.Generator) -> Params:
    """Fresh parameters: embedding rows N(0, 0.6^2), upper inputs N(0, 1/H), recurrences orthogonal
    scaled to gain 0.6 (a contracting start: tanh stays out of saturation and Adam grows what it needs;
    gain 1 learnt markedly slower here), outputs N(0, 1/H), zero biases."""
    H, V, dt = cfg.hidden, cfg.vocab_size, cfg.dtype
    p: Params = {}
    for l in range(cfg.layers):
        fan_in = V if l == 0 else H
        scale = EMBED_STD if l == 0 else 1.0 / np.sqrt(fan_in)
        p[f"U{l}"] = (rng.standard_normal((fan_in, H)) * scale).astype(dt)
        q, r = np.linalg.qr(rng.standard_normal((H, H)))
        p[f"W{l}"] = (RECUR_GAIN * q * np.sign(np.diag(r))).astype(dt)
        p[f"b{l}"] = np.zeros(H, dt)
    p["V"] = (rng.standard_normal((H, V)) / np.sqrt(H)).astype(dt)
    p["c"] = np.zeros(V, dt)
    return p


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


def zeros_hidden(cfg: ModelConfig, batch: int) -> np.ndarray:
    return np.zeros((cfg.layers, batch, cfg.hidden), cfg.dtype)  # (L, B, H)


@dataclass
class Cache:
    ids: np.ndarray  # (T, B) inputs, time-major
    tgt: np.ndarray  # (T*B,) targets
    hs: list[np.ndarray]  # per layer (T+1, B, H), hs[l][0] = initial state
    outs: list[np.ndarray]  # per layer (T, B, H), the layer output after dropout
    masks: list[np.ndarray | None]  # per layer (T, B, H) dropout masks (scaled)
    dz: np.ndarray  # (T*B, V) softmax / (T*B); backward turns it into the logits' gradient in place


SMALL_FLOPS = 1 << 24  # per-step products below this (B * H^2 < 8M) run on one BLAS thread


@cache
def _blas() -> ThreadpoolController:
    return ThreadpoolController()


def one_thread(B: int, H: int) -> AbstractContextManager:
    """BLAS on one thread for the T sequential (B, H) x (H, H) products when they are small: a thread
    hand-off per tiny product costs more than it saves, and much more when other jobs share the cores."""
    if 2 * B * H * H >= SMALL_FLOPS:
        return nullcontext()
    return _blas().limit(limits=1, user_api="blas")


def recur(h: np.ndarray, W: np.ndarray) -> None:
    """In place: h[t+1] = tanh(h[t+1] + h[t] W), where h[1:] holds the input pre-activations."""
    tmp = np.empty_like(h[0])  # (B, H)
    with one_thread(*tmp.shape):
        for t in range(h.shape[0] - 1):
            np.matmul(h[t], W, out=tmp)
            h[t + 1] += tmp
            np.tanh(h[t + 1], out=h[t + 1])


def recur_back(d: np.ndarray, h: np.ndarray, W: np.ndarray) -> None:
    """In place: d (T, B, H) from the gradient w.r.t. the states to the one before tanh, through time."""
    dtanh = np.multiply(h[1:], h[1:])  # (T, B, H)
    np.subtract(1.0, dtanh, out=dtanh)
    tmp = np.empty_like(d[0])  # (B, H)
    WT = W.T
    d[-1] *= dtanh[-1]
    with one_thread(*tmp.shape):
        for t in range(d.shape[0] - 1, 0, -1):
            np.matmul(d[t], WT, out=tmp)
            d[t - 1] += tmp
            d[t - 1] *= dtanh[t - 1]


def forward(
    p: Params,
    cfg: ModelConfig,
    ids: np.ndarray,
    targets: np.ndarray,
    h0: np.ndarray,
    rng: np.random.Generator | None = None,
) -> tuple[float, Cache, np.ndarray]:
    """Mean loss (nats/char) of `targets` given `ids` (both (B, T)), the cache for backward, h_T (L, B, H).

    Dropout is applied only when `rng` is given (training)."""
    B, T = ids.shape
    H, L, N, dt = cfg.hidden, cfg.layers, T * B, cfg.dtype
    ids_t = np.ascontiguousarray(ids.T)  # (T, B)
    tgt = np.ascontiguousarray(targets.T).reshape(-1)  # (N,)
    hs, outs, masks = [], [], []
    x = None  # (T, B, H) the layer below's output
    for l in range(L):
        h = np.empty((T + 1, B, H), dt)
        h[0] = h0[l]
        if l == 0:  # embedding rows with the bias folded in
            np.take(p["U0"] + p["b0"], ids_t, axis=0, out=h[1:])  # (T, B, H)
        else:
            np.matmul(x.reshape(N, H), p[f"U{l}"], out=h[1:].reshape(N, H))
            h[1:] += p[f"b{l}"]
        recur(h, p[f"W{l}"])
        x, mask = h[1:], None
        if rng is not None and cfg.dropout > 0:
            keep = 1.0 - cfg.dropout
            mask = np.less(rng.random((T, B, H), dtype=dt), keep).astype(dt)
            mask *= 1.0 / keep
            x = x * mask
        hs.append(h)
        outs.append(x)
        masks.append(mask)
    z = x.reshape(N, H) @ p["V"]  # (N, V) logits
    z += p["c"]
    z -= z.max(axis=1, keepdims=True)
    zt = z[np.arange(N), tgt]  # (N,) target logits, shifted
    np.exp(z, out=z)
    s = z.sum(axis=1, keepdims=True)  # (N, 1)
    loss = float((np.log(s[:, 0]) - zt).astype(np.float64).mean())
    z *= 1.0 / (s * N)
    hT = np.stack([h[-1] for h in hs])  # (L, B, H)
    return loss, Cache(ids_t, tgt, hs, outs, masks, z), hT


def embed_grad(ids: np.ndarray, d: np.ndarray, V: int) -> np.ndarray:
    """sum of the rows of d (N, H) per id (N,) as a (V, H) array: a one-hot product when that is small."""
    N = len(ids)
    if V <= N and V * N <= 1 << 26:
        onehot = np.zeros((V, N), d.dtype)
        onehot[ids, np.arange(N)] = 1.0
        return onehot @ d
    g = np.zeros((V, d.shape[1]), d.dtype)
    np.add.at(g, ids, d)
    return g


def backward(p: Params, cfg: ModelConfig, c: Cache) -> Params:
    """Gradients of the mean loss with respect to every parameter (truncated at the chunk start)."""
    T, B = c.ids.shape
    H, N = cfg.hidden, T * B
    g: Params = {}
    dz = c.dz  # reused in place: (N, V)
    dz[np.arange(N), c.tgt] -= 1.0 / N
    g["V"] = c.outs[-1].reshape(N, H).T @ dz
    g["c"] = dz.sum(axis=0)
    dout = (dz @ p["V"].T).reshape(T, B, H)  # (T, B, H)
    for l in reversed(range(cfg.layers)):
        h = c.hs[l]
        if c.masks[l] is not None:
            dout *= c.masks[l]
        recur_back(dout, h, p[f"W{l}"])  # dout is now the gradient before tanh
        flat = dout.reshape(N, H)
        g[f"W{l}"] = h[:-1].reshape(N, H).T @ flat
        if l == 0:
            g["U0"] = embed_grad(c.ids.reshape(-1), flat, cfg.vocab_size)
            g["b0"] = g["U0"].sum(axis=0)
        else:
            g[f"U{l}"] = c.outs[l - 1].reshape(N, H).T @ flat
            g[f"b{l}"] = flat.sum(axis=0)
            dout = (flat @ p[f"U{l}"].T).reshape(T, B, H)
    return g


def step(p: Params, cfg: ModelConfig, ids: np.ndarray, h: np.ndarray) -> np.ndarray:
    """Advance the state `h` (L, B, H) by one character per row, `ids` (B,); returns the new state."""
    out = np.empty_like(h)
    x = None
    for l in range(cfg.layers):
        a = p["U0"][ids] if l == 0 else x @ p[f"U{l}"]  # (B, H)
        a += h[l] @ p[f"W{l}"]
        a += p[f"b{l}"]
        x = out[l] = np.tanh(a)
    return out


def logits(p: Params, h: np.ndarray) -> np.ndarray:
    """Next-character logits (B, V) from the top layer of `h` (L, B, H)."""
    return h[-1] @ p["V"] + p["c"]
