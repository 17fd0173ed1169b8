"""Scoring models on the validation text: the candidate alone, and the candidate against the promoted model on
the same characters (what the promoted model can read), so the comparison is fair."""

from __future__ import annotations

from collections.abc import Collection
from pathlib import Path

from model import checkpoint, train
from model.sample import Settings, sample
from model.vocab import Vocab
from stages.records import Comparison, CurrentModel, Encoded, Score

PROMPTS = ("\n", "The ", "ROMEO:")  # fixed, so samples are comparable across runs; unknown chars skipped
SAMPLE_CHARS = 200
SAMPLING = [Settings(temperature=0.8, seed=i) for i in range(len(PROMPTS))]


def score(
    model_dir: Path, data: Encoded, name: str, known: Collection[str] | None = None, samples: bool = True
) -> Score:
    """`name`'s loss on the validation text, leaving out characters it (or `known`) lacks; and samples."""
    ck = checkpoint.load_dir(model_dir, with_optim=False)
    text = Vocab(tuple(data.vocab)).decode(data.load("val"))
    keep = set(ck.vocab.chars) & set(known if known is not None else ck.vocab.chars)
    kept = "".join(ch for ch in text if ch in keep)
    nats = train.evaluate(ck.params, ck.config, ck.vocab.encode(kept))
    shown = {}
    if samples:
        outs = sample(ck.params, ck.config, ck.vocab, PROMPTS, SAMPLE_CHARS, SAMPLING, unknown="skip")
        shown = dict(zip(PROMPTS, outs, strict=True))
    return Score(model=name, nats=nats, chars=len(kept), dropped=len(text) - len(kept), samples=shown)


def evaluate(model_dir: Path, data: Encoded) -> Score:
    """The candidate's validation loss (nats, bits, perplexity) and its samples from the fixed prompts."""
    return score(model_dir, data, "candidate")


def compare(candidate_dir: Path, current: CurrentModel, data: Encoded) -> Comparison:
    """The promoted model and the candidate scored on the same text: what the promoted model can read."""
    now = score(current.path, data, current.tag)
    return Comparison(
        current=now, candidate=score(candidate_dir, data, "candidate", current.vocab, samples=False)
    )
