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


def curves_png(curves: dict[str, list[list[float]]], styles: dict[str, dict] | None = None) -> bytes:
    """Loss curves (name -> [step, nats/char] pairs) on one chart, as PNG bytes."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg  # imported here: it costs ~0.7 s
    from matplotlib.figure import Figure

    fig = Figure(figsize=(7, 4), dpi=100)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    for name, points in curves.items():
        if points:
            steps, losses = zip(*points, strict=True)
            ax.plot(steps, losses, label=name, **(styles or {}).get(name, {"marker": "."}))
    ax.set_xlabel("step")
    ax.set_ylabel("loss (nats/char)")
    ax.grid(alpha=0.3)
    if ax.has_data():
        ax.legend(fontsize="small")
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    return buf.getvalue()


def loss_curve_png(history: dict[str, list[list[float]]]) -> bytes:
    """Train and validation loss (nats/char) against the step, as PNG bytes."""
    curves = {name: history.get(name) or [] for name in ("train", "val")}
    return curves_png(curves, {"train": {"lw": 1}, "val": {"marker": "o"}})


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
    m = o.model
    return f"""# char-rnn run `{o.run_id}`

- corpus: `{o.data_dir}`, {len(o.files)} file(s), fingerprint `{o.fingerprint[:16]}`{skipped}
- model: {m["cell"]}, {m["hidden"]} hidden x {m["layers"]} layer(s), vocabulary {o.vocab_size}{grown}
- training: {o.step} steps, batch {o.train["batch"]} x seq {o.train["seq"]}, {start}, {o.train_seconds:.0f} s

## Validation

{head}{body}
## Decision

{verdict}: {d.reason}{note}

## Samples
{shown}"""


class Rung(BaseModel):
    """A sweep trial trained to a rung's step: its validation loss there, or why it failed."""

    rung: int
    step: int
    val: float | None  # nats/char on the validation sample at `step`
    seconds: float  # wall seconds this rung trained (from resumed_from)
    chars_per_s: float
    worker: str  # the Dask worker's address
    resumed_from: int  # the step this rung started at (a checkpoint, after a killed worker)
    failed: str | None = None


class TrialOutcome(BaseModel):
    """One trial of a sweep: what it drew, what each rung it reached recorded, and how it ended."""

    index: int
    name: str  # its run directory's name
    drawn: dict[str, Any]
    rungs: list[Rung]
    status: str  # "winner", "stopped after rung 1", "failed in rung 0: ...", "out of time after rung 2"
    history: list[list[float]]  # validation [step, nats/char] pairs

    @property
    def last(self) -> Rung:
        return self.rungs[-1]


class SweepOutcome(BaseModel):
    """Everything trials.json records about one sweep."""

    sweep_id: str
    dir: Path
    flow_run_id: str | None
    data_dir: str
    fingerprint: str
    plan: list[int]  # the step each rung trains to
    trials: list[TrialOutcome]
    winner: int | None  # index of the winning trial
    candidate: Score | None  # the winner on the whole validation text
    decision: Decision
    seconds: float  # wall seconds from the first trial to the last


def sweep_table(o: SweepOutcome) -> list[dict[str, Any]]:
    """One row per trial: its configuration, steps, validation loss, time, speed, worker and fate."""
    rows = []
    for t in o.trials:
        val = t.last.val
        rows.append(
            {"trial": t.index}
            | t.drawn
            | {
                "steps": t.last.step,
                "val nats/char": None if val is None else round(val, 4),
                "val bits/char": None if val is None else round(val / math.log(2), 4),
                "wall s": round(sum(r.seconds for r in t.rungs), 1),
                "chars/s": round(t.last.chars_per_s),
                "worker": " ".join(dict.fromkeys(r.worker for r in t.rungs)),
                "result": t.status,
            }
        )
    return rows


def sweep_markdown(o: SweepOutcome) -> str:
    """The sweep's report: the plan, the winner and the promotion decision, the trials table."""
    rows = sweep_table(o)
    head = "| " + " | ".join(rows[0]) + " |\n|" + "---|" * len(rows[0]) + "\n"
    body = "".join("| " + " | ".join("" if v is None else str(v) for v in r.values()) + " |\n" for r in rows)
    cpu = sum(r.seconds for t in o.trials for r in t.rungs)
    d = o.decision
    if o.winner is None:
        won = "No trial finished its first rung, so there is no winner."
    else:
        w = next(t for t in o.trials if t.index == o.winner)
        setting = ", ".join(f"{k}={v}" for k, v in w.drawn.items())
        won = (
            f"**Winner: trial {w.index}** ({setting}): {w.last.step} steps, validation sample "
            f"{w.last.val:.4f} nats/char; whole validation text {o.candidate.nats:.4f} nats/char "
            f"({o.candidate.bits:.4f} bits/char)."
        )
    verdict = f"**Promoted** as `{d.tag}`" if d.promoted else f"**Not promoted** (current: `{d.tag}`)"
    return f"""# char-rnn sweep `{o.sweep_id}`

- corpus: `{o.data_dir}`, fingerprint `{o.fingerprint[:16]}`
- {len(o.trials)} trials; rungs train to steps {", ".join(map(str, o.plan))}, each keeping the better half
- training time: {cpu:.0f} s summed over trials, {o.seconds:.0f} s wall

{won}

## Decision

{verdict}: {d.reason}

## Trials

{head}{body}
Validation curves: `{o.dir / "curves.png"}`.
"""
