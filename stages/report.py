"""What runs tell people: the metrics table, the loss curves and the reports (markdown), from the records.

Plain functions over `stages.records`; `stages.publishing` writes them into run and sweep folders, and the
flows publish them as Prefect artifacts.
"""

from __future__ import annotations

import io
import math
from typing import Any

from stages.records import Outcome, SweepOutcome


def curves_png(curves: dict[str, list[list[float]]], styles: dict[str, dict] | None = None) -> bytes:
    """Loss curves (name -> [step, nats/char] pairs) on one chart, as PNG bytes."""
    # imported here: matplotlib is slow to import, and only reports need it
    from matplotlib.backends.backend_agg import FigureCanvasAgg
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


def md_table(rows: list[dict[str, Any]]) -> str:
    """Rows (dicts with the same keys) as a markdown table; None shows as an empty cell."""
    cells = lambda values: "| " + " | ".join("" if v is None else str(v) for v in values) + " |\n"  # noqa: E731
    return cells(rows[0]) + "|" + "---|" * len(rows[0]) + "\n" + "".join(cells(r.values()) for r in rows)


def markdown(o: Outcome) -> str:
    """The human-readable report: corpus, training, scores, decision, samples."""
    d = o.decision
    skipped = "".join(f"\n  - skipped `{f}`: {why}" for f, why in o.skipped.items())
    grown = f" (+{len(o.new_chars)} new: {''.join(o.new_chars)!r})" if o.new_chars else ""
    start = f"warm-started from `{o.warm_start}`" if o.warm_start else "trained from scratch"
    if o.resumed_from:
        start += f", resumed from its checkpoint at step {o.resumed_from}"
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
    why = f"\n- why {o.step} steps: {o.steps_why}" if o.steps_why else ""
    return f"""# char-rnn run `{o.run_id}`

- corpus: `{o.data_dir}`, {len(o.files)} file(s), fingerprint `{o.fingerprint[:16]}`{skipped}
- model: {m.cell}, {m.hidden} hidden x {m.layers} layer(s), vocabulary {o.vocab_size}{grown}
- training: {o.step} steps, batch {o.train.batch} x seq {o.train.seq}, {start}, {o.train_seconds:.0f} s{why}

## Validation

{md_table(table(o))}
## Decision

{verdict}: {d.reason}{note}

## Samples
{shown}"""


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

{md_table(sweep_table(o))}
Validation curves: `{o.dir / "curves.png"}`.
"""
