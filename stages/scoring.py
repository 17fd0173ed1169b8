"""Scoring models on the validation text: the candidate alone, and the candidate against the promoted model on
the same characters (what the promoted model can read), so the comparison is fair.

The cost is bounded: up to `limit` validation characters are scored whole; above it, windows of them spread
evenly over the whole validation text, chosen by position alone, so every model is scored on the same ones
and the comparison stays paired."""

from __future__ import annotations

from collections.abc import Collection
from pathlib import Path

import numpy as np

from model import checkpoint, train
from model.sample import Settings
from model.sample import sample as sample_text
from stages.records import Comparison, CurrentModel, Encoded, Score

LIMIT = 2_000_000  # validation characters scored whole; above it, a sample of this many
WINDOW = 4096  # characters per window of the sample
PROMPTS = ("\n", "The ", "ROMEO:")  # fixed, so samples are comparable across runs; unknown chars skipped
SAMPLE_CHARS = 200
SAMPLING = [Settings(temperature=0.8, seed=i) for i in range(len(PROMPTS))]


def sample(ids: np.ndarray, limit: int) -> np.ndarray:
    """The ids to score: all of `ids` up to `limit`, else windows of them spread evenly from the first to the
    last, `limit` in all (positions depend on the length and the limit only)."""
    if len(ids) <= limit:
        return np.asarray(ids)
    window = min(WINDOW, limit)
    starts = np.linspace(0, len(ids) - window, max(1, limit // window)).round().astype(np.int64)
    return np.concatenate([ids[s : s + window] for s in starts])


def score(
    model_dir: Path,
    data: Encoded,
    name: str,
    known: Collection[str] | None = None,
    samples: bool = True,
    limit: int = LIMIT,
) -> Score:
    """`name`'s loss on the validation text (or its sample), leaving out characters it (or `known`) lacks;
    and its samples from the fixed prompts."""
    ck = checkpoint.load_dir(model_dir, with_optim=False)
    val = data.load("val")
    chosen = sample(val, limit)
    keep = set(ck.vocab.chars) & set(known if known is not None else ck.vocab.chars)
    ids = {c: i for i, c in enumerate(ck.vocab.chars)}
    lut = np.array([ids[c] if c in keep else -1 for c in data.vocab], np.int64)  # data id -> model id
    mapped = lut[chosen]
    kept = mapped[mapped >= 0]
    nats = train.evaluate(ck.params, ck.config, kept)
    shown = {}
    if samples:
        outs = sample_text(ck.params, ck.config, ck.vocab, PROMPTS, SAMPLE_CHARS, SAMPLING, unknown="skip")
        shown = dict(zip(PROMPTS, outs, strict=True))
    return Score(
        model=name,
        nats=nats,
        chars=len(kept),
        dropped=len(chosen) - len(kept),
        samples=shown,
        sampled=len(chosen) < len(val),
        of=len(val),
    )


def evaluate(model_dir: Path, data: Encoded, limit: int = LIMIT) -> Score:
    """The candidate's validation loss (nats, bits, perplexity) and its samples from the fixed prompts."""
    return score(model_dir, data, "candidate", limit=limit)


def compare(candidate_dir: Path, current: CurrentModel, data: Encoded, limit: int = LIMIT) -> Comparison:
    """The promoted model and the candidate scored on the same text: what the promoted model can read."""
    now = score(current.path, data, current.tag, limit=limit)
    cand = score(candidate_dir, data, "candidate", current.vocab, samples=False, limit=limit)
    return Comparison(current=now, candidate=cand)
