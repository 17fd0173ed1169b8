"""Batched generation: prime on prompts, then sample with temperature, top-k and top-p."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import numpy as np

from model import net
from model.net import ModelConfig, Params
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
    """The state (L, S, B, H) after reading each prompt's ids; rows of different lengths advance masked."""
    B = len(prompts)
    h = net.zeros_state(cfg, B)
    lens = np.array([len(q) for q in prompts])
    for t in range(int(lens.max(initial=0))):
        live = lens > t  # (B,)
        ids = np.array([q[t] if len(q) > t else 0 for q in prompts], dtype=np.int64)
        h = np.where(live[:, None], net.step(p, cfg, ids, h), h)  # live (B, 1) against (..., B, H)
    return h


class Filter:
    """Each row's temperature, top-k and top-p as arrays, built once per batch."""

    def __init__(self, rows: Sequence[Settings], vocab_size: int):
        self.inv_temp = np.array([1.0 / r.temperature for r in rows])[:, None]  # (B, 1)
        self.k = np.array([r.top_k or vocab_size for r in rows])[:, None]
        self.top_p = np.array([r.top_p for r in rows])[:, None]
        self.active = bool((self.k < vocab_size).any() or (self.top_p < 1).any())

    def __call__(self, logits: np.ndarray) -> np.ndarray:
        """Unnormalised probabilities (B, V) after temperature, top-k and top-p."""
        z = logits * self.inv_temp  # float64 (B, V)
        z -= z.max(axis=1, keepdims=True)
        probs = np.exp(z, out=z)
        if self.active:
            probs /= probs.sum(axis=1, keepdims=True)
            order = np.argsort(-probs, axis=1, kind="stable")  # (B, V) most likely first
            sorted_p = np.take_along_axis(probs, order, axis=1)
            rank = np.arange(probs.shape[1])[None, :]
            before = np.cumsum(sorted_p, axis=1) - sorted_p  # mass strictly ahead of each entry
            keep_sorted = (rank < self.k) & ((before < self.top_p) | (rank == 0))
            keep = np.zeros_like(keep_sorted)
            np.put_along_axis(keep, order, keep_sorted, axis=1)
            probs[~keep] = 0.0
        return probs


def generate_ids(
    p: Params,
    cfg: ModelConfig,
    prompts: Sequence[np.ndarray],
    length: int,
    rows: Sequence[Settings],
) -> Iterator[np.ndarray]:
    """Yield the next id of every row (B,), `length` times; one matrix product per layer per step.

    Row i draws its uniforms from its own generator seeded by rows[i].seed, so its text does not depend
    on what else is in the batch."""
    if len(rows) != len(prompts):
        raise ValueError("one Settings per prompt")
    filt = Filter(rows, cfg.vocab_size)
    u = np.stack([np.random.default_rng(r.seed).random(length) for r in rows]) if rows else None  # (B, N)
    h = prime(p, cfg, prompts)
    for t in range(length):
        cdf = np.cumsum(filt(net.logits(p, h)), axis=1)  # (B, V) unnormalised
        ids = (cdf < u[:, t : t + 1] * cdf[:, -1:]).sum(axis=1)
        ids = np.minimum(ids, cfg.vocab_size - 1)
        yield ids
        h = net.step(p, cfg, ids, h)


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
