"""The models view of the service (POST /models): the promoted history with each model's labels, which model
serves, and the served model's loss curve (from its checkpoint's meta.json, so no run folder is needed)."""

from __future__ import annotations

from pydantic import BaseModel, Field

from model.checkpoint import CheckpointError
from registry import Registry


class Curve(BaseModel):
    train: list[tuple[int, float]] = Field(description="[step, training loss (nats/char)]")
    val: list[tuple[int, float]] = Field(description="[step, validation loss (nats/char)]")


class Row(BaseModel):
    """One change of the current model, with the labels the model was promoted with."""

    tag: str
    at: str = Field(description="when this entry was recorded (ISO time)")
    action: str = Field(description="promote, rollback, rebuilt (from the store), or bundled (in this Bento)")
    reason: str
    val_loss: float | None = Field(description="full validation loss when it was promoted, nats/char")
    parent: str | None = Field(description="the model it was warm-started from")
    corpus_chars: int | None
    promoted_at: str | None
    run_id: str | None
    serving: bool = Field(description="this entry made the served model current (the newest such entry)")


class Models(BaseModel):
    serving: str | None
    history: list[Row] = Field(description="oldest first")
    curve: Curve | None = Field(description="the served model's training history")


def number(labels: dict[str, str], key: str, kind: type[float] | type[int]) -> float | int | None:
    try:
        return kind(labels[key])
    except (KeyError, ValueError):
        return None


def view(registry: Registry, serving: str | None, curve: Curve | None) -> Models:
    """The history of `registry` with labels (read from the store), the served tag marked on its newest entry;
    a served model missing from the history (a Bento's own) is added as "bundled"."""
    entries = [(e.tag, e.at, e.action, e.reason) for e in registry.history()]
    labels: dict[str, dict[str, str]] = {}
    for tag in {e[0] for e in entries} | ({serving} if serving else set()):
        try:
            labels[tag] = dict(registry.get(tag).info.labels)
        except CheckpointError:  # deleted from the store: the row keeps what the history says
            labels[tag] = {}
    if serving and serving not in {e[0] for e in entries}:
        at = labels[serving].get("promoted_at", "")
        entries.append((serving, at, "bundled", "the model this Bento was built with"))
    last = max((i for i, e in enumerate(entries) if e[0] == serving), default=None)
    rows = []
    for i, (tag, at, action, reason) in enumerate(entries):
        got = labels[tag]
        rows.append(
            Row(
                tag=tag,
                at=at,
                action=action,
                reason=reason,
                val_loss=number(got, "val_loss", float),
                parent=got.get("parent") or None,
                corpus_chars=number(got, "corpus_chars", int),
                promoted_at=got.get("promoted_at"),
                run_id=got.get("run_id"),
                serving=i == last,
            )
        )
    return Models(serving=serving, history=rows, curve=curve)
