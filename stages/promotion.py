"""The promoted model and the decisions around it: is there anything new to learn, can a candidate start from
the promoted model, and does the candidate replace it."""

from __future__ import annotations

import logging
from pathlib import Path

from model.config import ModelConfig
from registry import Current, Registry, Verdict
from stages import scoring
from stages.records import Comparison, CurrentModel, Decision, Encoded, Outcome, Score, Trained

log = logging.getLogger("char_rnn")


def current(store: Path) -> CurrentModel | None:
    """The promoted model a candidate has to beat (the newest that passes its checks), or None."""
    registry = Registry(store)
    cur = registry.current()
    return None if cur is None else CurrentModel.of(cur, registry)


def unchanged(current: CurrentModel | None, fingerprint: str) -> Decision | None:
    """The decision to train nothing, when the promoted model has learnt this very corpus already."""
    if current is None or (reason := current.knows(fingerprint)) is None:
        return None
    return Decision(promoted=False, tag=current.tag, reason=reason)


def tried(run_dir: Path, current: CurrentModel | None) -> Decision | None:
    """The decision of this very run when it was made already and still holds: its candidate lost to the model
    that is current now. Training it again would give the same candidate and the same defeat."""
    try:
        done = Outcome.model_validate_json((run_dir / "metrics.json").read_bytes()).decision
    except (OSError, ValueError):  # not run yet, or not to the end: train it
        return None
    if done.promoted or current is None or done.lost_to != current.tag:
        return None
    why = f"this text and configuration were tried already ({run_dir.name}): {done.reason}"
    return done.model_copy(update={"reason": f"{why}; waiting for new text"})


def warm_start(current: CurrentModel | None, model: ModelConfig) -> tuple[CurrentModel | None, str | None]:
    """The model a candidate of config `model` starts from (the promoted one, when the shapes agree), and why
    it starts from scratch instead."""
    why_not = current.shape_differs(model) if current else None
    return (None if why_not else current), why_not


def promote(
    trained: Trained,
    candidate: Score,
    against: Comparison | None,
    data: Encoded,
    run_dir: Path,
    store: Path,
    about: dict | None = None,
    limit: int = scoring.LIMIT,
) -> Decision:
    """Register the candidate if it beats the model that is current once the registry's lock is held (another
    run may have promoted meanwhile: then the candidate is compared again, with that one)."""
    compared = [against]

    def judge(cur: Current) -> Verdict:
        if against is None or cur.tag != against.current.model:
            log.info("%s became current during this run; comparing the candidate with it", cur.tag)
            compared[0] = scoring.compare(trained.checkpoint, CurrentModel.of(cur), data, limit)
        return Verdict(compared[0].wins, compared[0].reason)

    labels = {
        "fingerprint": data.fingerprint,
        "val_loss": f"{candidate.nats:.6f}",
        "parent": trained.warm_start or "",
        "run_id": run_dir.name,
        "corpus_chars": str(data.train_chars + data.val_chars),
        "val_chars": str(candidate.chars),  # the validation characters val_loss was measured on
        "val_sampled": str(candidate.sampled).lower(),
    }
    about = {"bits": candidate.bits, "perplexity": candidate.perplexity} | (about or {})
    p = Registry(store).promote(trained.checkpoint, labels, about, judge)
    return Decision(
        promoted=p.promoted,
        tag=p.tag,
        reason=p.reason,
        run_dir=run_dir,
        against=compared[0],
        lost_to=p.lost_to,
    )
