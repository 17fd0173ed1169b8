"""What a pipeline run tells people: scores, the decision, metrics.json, the loss curve, report.md.

Plain data and plain functions (no Prefect); flows/tasks.py writes the files and publishes the artifacts.
"""

from __future__ import annotations

import io
import math
from pathlib import Path
from typing import Any

from pydantic import BaseModel, computed_field


class Score(BaseModel):
    """One model's loss on the validation text, or on the part of it the model has ids for."""

    model: str  # "candidate" or a registry tag
    nats: float  # mean cross-entropy, nats per character
    chars: int  # validation characters scored
    dropped: int = 0  # validation characters left out because the model's vocabulary lacks them
    samples: dict[str, str] = {}  # prompt -> continuation

    @computed_field
    @property
    def bits(self) -> float:
        return self.nats / math.log(2)

    @computed_field
    @property
    def perplexity(self) -> float:
        return math.exp(self.nats)


class Comparison(BaseModel):
    """The promoted model and the candidate, scored on the same text."""

    current: Score
    candidate: Score

    @property
    def wins(self) -> bool:
        """Whether the candidate beats the promoted model."""
        return self.candidate.nats < self.current.nats

    @property
    def reason(self) -> str:
        verb = "beats" if self.wins else "does not beat"
        return (
            f"the candidate ({self.candidate.nats:.4f} nats/char) {verb} {self.current.model} "
            f"({self.current.nats:.4f}) on the same validation text"
        )

    @property
    def note(self) -> str:
        if not self.current.dropped:
            return "both models scored on the whole validation text"
        return (
            f"{self.current.dropped} of {self.current.chars + self.current.dropped} validation characters "
            f"are new to {self.current.model}; both models were scored without them"
        )


class Decision(BaseModel):
    """What the run did with its candidate, and why."""

    promoted: bool
    tag: str | None  # the promoted model after this run
    reason: str
    run_dir: Path | None = None
    against: Comparison | None = None  # the comparison the decision rests on
    lost_to: str | None = None  # the model that stayed current when the candidate lost


class Outcome(BaseModel):
    """Everything metrics.json records about one run."""

    run_id: str
    flow_run_id: str | None
    data_dir: str
    fingerprint: str
    files: list[str]
    skipped: dict[str, str]
    vocab_size: int
    new_chars: list[str]
    model: dict[str, Any]
    train: dict[str, Any]
    warm_start: str | None
    resumed_from: int
    step: int
    train_seconds: float
    candidate: Score
    decision: Decision
    history: dict[str, list[list[float]]]  # "train" / "val": [step, loss] pairs


def loss_curve_png(history: dict[str, list[list[float]]]) -> bytes:
    """Train and validation loss (nats/char) against the step, as PNG bytes."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg  # imported here: it costs ~0.7 s
    from matplotlib.figure import Figure

    fig = Figure(figsize=(7, 4), dpi=100)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    for name, style in (("train", {"lw": 1}), ("val", {"marker": "o"})):
        points = history.get(name) or []
        if points:
            steps, losses = zip(*points, strict=True)
            ax.plot(steps, losses, label=name, **style)
    ax.set_xlabel("step")
    ax.set_ylabel("loss (nats/char)")
    ax.grid(alpha=0.3)
    if ax.has_data():
        ax.legend()
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    return buf.getvalue()


def table(o: Outcome) -> list[dict[str, Any]]:
    """Rows of the metrics table: the candidate, and the comparison the decision rests on."""
    rows = [("candidate, whole validation text", o.candidate)]
    if o.decision.against:
        c = o.decision.against
        rows += [(f"current {c.current.model}", c.current), ("candidate, same text", c.candidate)]
    return [
        {
            "model": name,
            "nats/char": round(s.nats, 4),
            "bits/char": round(s.bits, 4),
            "perplexity": round(s.perplexity, 3),
            "chars scored": s.chars,
            "chars dropped": s.dropped,
        }
        for name, s in rows
    ]


def markdown(o: Outcome) -> str:
    """The human-readable report: corpus, training, scores, decision, samples."""
    d = o.decision
    skipped = "".join(f"\n  - skipped `{f}`: {why}" for f, why in o.skipped.items())
    grown = f" (+{len(o.new_chars)} new: {''.join(o.new_chars)!r})" if o.new_chars else ""
    start = f"warm-started from `{o.warm_start}`" if o.warm_start else "trained from scratch"
    if o.resumed_from:
        start += f", resumed from its checkpoint at step {o.resumed_from}"
    rows = table(o)
    head = "| " + " | ".join(rows[0]) + " |\n|" + "---|" * len(rows[0]) + "\n"
    body = "".join("| " + " | ".join(str(v) for v in r.values()) + " |\n" for r in rows)
    verdict = f"**Promoted** as `{d.tag}`" if d.promoted else f"**Kept** `{d.tag}`"
    note = f"\n\n_{d.against.note}._" if d.against else ""
    samples = [("candidate", o.candidate.samples)]
    if d.against:
        samples.append((f"current `{d.against.current.model}`", d.against.current.samples))
    shown = "".join(
        f"\n### {who}\n" + "".join(f"\nprompt {p!r}:\n```text\n{p}{s}\n```\n" for p, s in got.items())
        for who, got in samples
        if got
    )
    return f"""# char-rnn run `{o.run_id}`

- corpus: `{o.data_dir}`, {len(o.files)} file(s), fingerprint `{o.fingerprint[:16]}`{skipped}
- model: {o.model["hidden"]} hidden x {o.model["layers"]} layer(s), vocabulary {o.vocab_size}{grown}
- training: {o.step} steps, batch {o.train["batch"]} x seq {o.train["seq"]}, {start}, {o.train_seconds:.0f} s

## Validation

{head}{body}
## Decision

{verdict}: {d.reason}{note}

## Samples
{shown}"""
