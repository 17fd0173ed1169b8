"""The live view of training (POST /training): the newest pipeline run's `progress.json` (which the training
stage keeps in its run folder: `stages/training.py`, `ProgressFile`) and the model the service serves, so that
the playground shows a run's step, loss curve and time left, and switches to its model once promoted.

A run that says it is training or trained while the process that trains it is gone (killed, crashed) is
shown as stopped; the process is looked up on this host only, and a run on another host that has said
nothing for `QUIET` seconds counts as stopped too.
"""

from __future__ import annotations

import json
import socket
from datetime import UTC, datetime
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, Field, ValidationError

from serving import workers

QUIET = 600.0  # seconds without news after which a run on another host counts as stopped
CURVE_POINTS = 300  # at most this many points of each curve are sent


class Training(BaseModel):
    """The newest pipeline run's training, as its progress.json says, and the model this service serves."""

    serving: str | None = Field(None, description="the model this service serves now")
    run: str | None = Field(None, description="the run folder's name; null when no run has trained here")
    state: Literal["training", "trained", "promoted", "kept", "failed", "stopped"] | None = Field(
        None, description="trained: being evaluated and compared; stopped: its process is gone"
    )
    step: int | None = None
    steps: int | None = Field(None, description="the steps this run trains")
    loss: float | None = Field(None, description="the latest training loss, nats/char")
    val_loss: float | None = Field(None, description="the latest validation loss, nats/char")
    chars_per_s: float | None = None
    eta_s: float | None = Field(None, description="seconds of training left")
    warm_start: str | None = Field(None, description="the promoted model it continues")
    why: str | None = Field(None, description="why it trains that many steps")
    tag: str | None = Field(None, description="once decided: the model current after it")
    reason: str | None = Field(None, description="once decided, or failed: why")
    updated_at: str | None = None
    train: list[tuple[int, float]] = Field([], description="[step, training loss (nats/char)]")
    val: list[tuple[int, float]] = Field([], description="[step, validation loss (nats/char)]")


def newest(runs: Path) -> Path | None:
    """The progress.json of the run folder under `runs` written last, if any."""
    found = []
    for f in Path(runs).glob("run-*/progress.json"):
        try:
            found.append((f.stat().st_mtime_ns, f))
        except OSError:  # replaced or removed meanwhile
            continue
    return max(found)[1] if found else None


def alive(doc: dict) -> bool:
    """Whether the process that trains the run may still be at it."""
    if doc.get("host") != socket.gethostname():
        try:
            said = datetime.fromisoformat(doc["updated_at"])
        except (KeyError, TypeError, ValueError):
            return False
        return (datetime.now(UTC) - said).total_seconds() < QUIET
    pid = doc.get("pid")
    return isinstance(pid, int) and 0 < pid < 2**31 and workers.alive(pid)


def thinned(points: list) -> list:
    """At most CURVE_POINTS of `points`, evenly spread, the last one kept."""
    if len(points) <= CURVE_POINTS:
        return points
    every = -(-len(points) // CURVE_POINTS)
    return points[::every] + ([points[-1]] if (len(points) - 1) % every else [])


def view(runs: Path, serving: str | None) -> Training:
    """What POST /training answers: the newest run under `runs` and the served model `serving`."""
    empty = Training(serving=serving)
    path = newest(runs)
    try:
        doc = json.loads(path.read_bytes()) if path else None
    except (OSError, ValueError):
        return empty
    if not isinstance(doc, dict):
        return empty
    if doc.get("state") in ("training", "trained") and not alive(doc):
        doc["state"] = "stopped"
    doc |= {"train": thinned(doc.get("train") or []), "val": thinned(doc.get("val") or [])}
    fields = {k: doc.get(k) for k in Training.model_fields if k != "serving"}
    try:
        return Training(serving=serving, **fields | {"reason": doc.get("reason") or doc.get("error")})
    except ValidationError:  # a file of another format: show nothing rather than fail
        return empty
