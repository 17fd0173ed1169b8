"""A stacked vanilla tanh RNN over characters, batched and time-major.

Layer l:  h_t = tanh(x_t U_l + h_{t-1} W_l + b_l)   (layer 0 looks its input up: x_t U_0 = U_0[id_t])
Output:   y_t = h_t V + c,  p_t = softmax(y_t),     loss = mean cross-entropy in nats per character.
Dropout (inverted) applies to each layer's output, never to the recurrence.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field

Params = dict[str, np.ndarray]


class ModelConfig(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    vocab_size: int = Field(ge=1, le=1_000_000)
    hidden: int = Field(256, ge=1, le=8192)
    layers: int = Field(1, ge=1, le=8)
    dropout: float = Field(0.0, ge=0.0, le=0.9)
    dtype: Literal["float32", "float64"] = "float32"


def init(cfg: ModelConfig, rng: np.random.Generator) -> Params:
    """Fresh parameters: small random inputs and outputs, orthogonal recurrences, zero biases."""
    H, V, dt = cfg.hidden, cfg.vocab_size, cfg.dtype
    p: Params = {}
    for l in range(cfg.layers):
        fan_in = V if l == 0 else H
        scale = 0.3 if l == 0 else 1.0 / np.sqrt(fan_in)
        p[f"U{l}"] = (rng.standard_normal((fan_in, H)) * scale).astype(dt)
        q, r = np.linalg.qr(rng.standard_normal((H, H)))
        p[f"W{l}"] = (q * np.sign(np.diag(r))).astype(dt)
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
    probs: np.ndarray  # (T*B, V)


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
    H, L = cfg.hidden, cfg.layers
    ids_t = np.ascontiguousarray(ids.T)  # (T, B)
    tgt = np.ascontiguousarray(targets.T).reshape(-1)  # (T*B,)
    hs, outs, masks = [], [], []
    x = None  # (T, B, H) the layer below's output
    tmp = np.empty((B, H), cfg.dtype)
    for l in range(L):
        h = np.empty((T + 1, B, H), cfg.dtype)
        h[0] = h0[l]
        if l == 0:
            np.take(p["U0"], ids_t, axis=0, out=h[1:])  # (T, B, H) embedding rows
        else:
            np.matmul(x.reshape(T * B, H), p[f"U{l}"], out=h[1:].reshape(T * B, H))
        h[1:] += p[f"b{l}"]
        W = p[f"W{l}"]
        for t in range(T):
            np.matmul(h[t], W, out=tmp)
            h[t + 1] += tmp
            np.tanh(h[t + 1], out=h[t + 1])
        x, mask = h[1:], None
        if rng is not None and cfg.dropout > 0:
            keep = 1.0 - cfg.dropout
            mask = (rng.random((T, B, H)) < keep).astype(cfg.dtype)
            mask *= 1.0 / keep
            x = x * mask
        hs.append(h)
        outs.append(x)
        masks.append(mask)
    logits = x.reshape(T * B, H) @ p["V"]  # (T*B, V)
    logits += p["c"]
    logits -= logits.max(axis=1, keepdims=True)
    np.exp(logits, out=logits)
    logits /= logits.sum(axis=1, keepdims=True)
    probs = logits
    picked = probs[np.arange(T * B), tgt]
    loss = float(-np.log(np.maximum(picked, np.finfo(cfg.dtype).tiny)).astype(np.float64).mean())
    hT = np.stack([h[-1] for h in hs])  # (L, B, H)
    return loss, Cache(ids_t, tgt, hs, outs, masks, probs), hT


def backward(p: Params, cfg: ModelConfig, c: Cache) -> Params:
    """Gradients of the mean loss with respect to every parameter (truncated at the chunk start)."""
    T, B = c.ids.shape
    H, N = cfg.hidden, T * B
    g: Params = {}
    dy = c.probs  # reused in place: (N, V)
    dy[np.arange(N), c.tgt] -= 1.0
    dy /= N
    top = c.outs[-1].reshape(N, H)
    g["V"] = top.T @ dy
    g["c"] = dy.sum(axis=0)
    dout = (dy @ p["V"].T).reshape(T, B, H)  # (T, B, H)
    dnext = np.empty((B, H), cfg.dtype)
    for l in reversed(range(cfg.layers)):
        h, W = c.hs[l], p[f"W{l}"]
        if c.masks[l] is not None:
            dout *= c.masks[l]
        draw = dout  # overwritten in place: (T, B, H) gradient before tanh
        dtanh = 1.0 - h[1:] * h[1:]  # (T, B, H)
        dnext.fill(0.0)
        WT = np.ascontiguousarray(W.T)
        for t in reversed(range(T)):
            draw[t] += dnext
            draw[t] *= dtanh[t]
            np.matmul(draw[t], WT, out=dnext)
        flat = draw.reshape(N, H)
        g[f"W{l}"] = h[:-1].reshape(N, H).T @ flat
        g[f"b{l}"] = flat.sum(axis=0)
        if l == 0:
            gU = np.zeros_like(p["U0"])
            np.add.at(gU, c.ids.reshape(-1), flat)
            g["U0"] = gU
        else:
            below = c.outs[l - 1].reshape(N, H)
            g[f"U{l}"] = below.T @ flat
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
