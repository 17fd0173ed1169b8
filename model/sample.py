"""Batched generation: prime on prompts, then sample with temperature, top-k and top-p."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import numpy as np

from model import rnn
from model.rnn import ModelConfig, Params
from model.vocab import Unknown, Vocab


@dataclass(frozen=True)
class Settings:
    """How one row samples: temperature > 0, top_k 0 = off, top_p 1.0 = off, seed None = random."""

    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    seed: int | None = None

    def __post_init__(self) -> None:
        if not self.temperature > 0:
            raise ValueError("temperature must be > 0")
        if self.top_k < 0:
            raise ValueError("top_k must be >= 0 (0 = off)")
        if not 0 < self.top_p <= 1:
            raise ValueError("top_p must be in (0, 1]")


def prime(p: Params, cfg: ModelConfig, prompts: Sequence[np.ndarray]) -> np.ndarray:
    """The state (L, B, H) after reading each prompt's ids; rows of different lengths advance masked."""
    B = len(prompts)
    h = rnn.zeros_hidden(cfg, B)
    lens = np.array([len(q) for q in prompts])
    for t in range(int(lens.max(initial=0))):
        live = lens > t  # (B,)
        ids = np.array([q[t] if len(q) > t else 0 for q in prompts], dtype=np.int64)
        h = np.where(live[None, :, None], rnn.step(p, cfg, ids, h), h)
    return h


def filter_probs(logits: np.ndarray, rows: Sequence[Settings]) -> np.ndarray:
    """Probabilities (B, V) after each row's temperature, top-k and top-p."""
    temp = np.array([r.temperature for r in rows], dtype=np.float64)[:, None]
    z = logits.astype(np.float64) / temp
    z -= z.max(axis=1, keepdims=True)
    probs = np.exp(z)
    probs /= probs.sum(axis=1, keepdims=True)
    if any(r.top_k or r.top_p < 1 for r in rows):
        order = np.argsort(-probs, axis=1, kind="stable")  # (B, V) most likely first
        sorted_p = np.take_along_axis(probs, order, axis=1)
        rank = np.arange(probs.shape[1])[None, :]
        k = np.array([r.top_k or probs.shape[1] for r in rows])[:, None]
        top_p = np.array([r.top_p for r in rows])[:, None]
        before = np.cumsum(sorted_p, axis=1) - sorted_p  # mass strictly ahead of each entry
        keep_sorted = (rank < k) & ((before < top_p) | (rank == 0))
        keep = np.zeros_like(keep_sorted)
        np.put_along_axis(keep, order, keep_sorted, axis=1)
        probs = np.where(keep, probs, 0.0)
        probs /= probs.sum(axis=1, keepdims=True)
    return probs


def generate_ids(
    p: Params,
    cfg: ModelConfig,
    prompts: Sequence[np.ndarray],
    length: int,
    rows: Sequence[Settings],
) -> Iterator[np.ndarray]:
    """Yield the next id of every row (B,), `length` times; one matrix product per layer per step."""
    if len(rows) != len(prompts):
        raise ValueError("one Settings per prompt")
    rngs = [np.random.default_rng(r.seed) for r in rows]
    h = prime(p, cfg, prompts)
    for _ in range(length):
        probs = filter_probs(rnn.logits(p, h), rows)
        u = np.array([g.random() for g in rngs])[:, None]
        ids = (np.cumsum(probs, axis=1) < u * probs.sum(axis=1, keepdims=True)).sum(axis=1)
        ids = np.minimum(ids, probs.shape[1] - 1)
        yield ids
        h = rnn.step(p, cfg, ids, h)


def sample(
    p: Params,
    cfg: ModelConfig,
    vocab: Vocab,
    prompts: Sequence[str],
    length: int,
    rows: Sequence[Settings] | Settings = Settings(),
    unknown: Unknown = "error",
) -> list[str]:
    """Continue every prompt by `length` characters (prompt excluded)."""
    if isinstance(rows, Settings):
        rows = [rows] * len(prompts)
    encoded = [vocab.encode(q, unknown) for q in prompts]
    cols = list(generate_ids(p, cfg, encoded, length, rows))
    if not cols:
        return [""] * len(prompts)
    out = np.stack(cols, axis=1)  # (B, length)
    return [vocab.decode(r) for r in out]
