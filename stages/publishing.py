"""The files a run or a sweep leaves for people: metrics.json (or trials.json), the loss curves as PNG and
report.md, written atomically beside the checkpoints."""

from __future__ import annotations

from model import checkpoint
from model.files import write_atomic
from stages import report
from stages.records import CorpusInfo, Decision, Encoded, Outcome, Score, SweepOutcome, Trained


def outcome(
    info: CorpusInfo,
    data: Encoded,
    trained: Trained,
    candidate: Score,
    decision: Decision,
    flow_run_id: str | None = None,
    steps_why: str | None = None,
) -> Outcome:
    """Everything one run did, as metrics.json records it (`steps_why`: why it trained the steps it did)."""
    meta = checkpoint.read_meta(trained.checkpoint)
    return Outcome(
        run_id=decision.run_dir.name,
        flow_run_id=flow_run_id,
        data_dir=str(info.dir),
        fingerprint=info.fingerprint,
        files=info.files,
        skipped=info.skipped,
        vocab_size=len(data.vocab),
        new_chars=data.new_chars,
        model=meta.model,
        train=meta.train,
        warm_start=trained.warm_start,
        resumed_from=trained.resumed_from,
        step=trained.step,
        train_seconds=trained.seconds,
        steps_why=steps_why,
        candidate=candidate,
        decision=decision,
        history={k: meta.metrics.get(k, []) for k in ("train", "val")},
    )


def write_run(o: Outcome) -> str:
    """Write metrics.json, loss.png and report.md into the run folder; the report's text."""
    run_dir = o.decision.run_dir
    text = report.markdown(o)
    write_atomic(run_dir / "metrics.json", o.model_dump_json(indent=1).encode())
    write_atomic(run_dir / "loss.png", report.loss_curve_png(o.history))
    write_atomic(run_dir / "report.md", text.encode())
    return text


def write_sweep(o: SweepOutcome) -> tuple[str, bytes]:
    """Write trials.json, curves.png and report.md into the sweep's folder; the report's text and the plot."""
    png = report.curves_png({f"trial {t.index}": t.history for t in o.trials})
    text = report.sweep_markdown(o)
    write_atomic(o.dir / "trials.json", o.model_dump_json(indent=1).encode())
    write_atomic(o.dir / "curves.png", png)
    write_atomic(o.dir / "report.md", text.encode())
    return text, png
