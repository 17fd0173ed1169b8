"""What a run tells the outside at each stage: a log line, and the same as a Prefect event with its record.

`announce(stage, line, record)` logs `line` on the run's logger and, inside a flow or task run, emits the
event `char-rnn.<stage>` whose payload is the line, its log level and the stage's record as JSON. Prefect
relates the event to the flow run (and its flow, deployment and tags), so whatever follows a run reads what
happened from its events, not from the wording of its log: `python -m flows.follow` shows their lines, an
automation can act on a `char-rnn.decided` whose record says `promoted`. Outside a run (a task called through
`.fn()`, a test) it only logs.

The stages a pipeline run announces, in order: `skipped` (a file of the corpus left out, a WARNING),
`ingested`, `encoded`, `training` (started: from scratch, warm-started or resumed), `evaluated`, `compared`,
then `decided` (promoted, kept, or an unchanged corpus), always its last. A sweep announces `trial` each
time a trial finishes a rung, then `decided`.

Prefect is imported inside the functions: `flows.follow` reads the names below before it has set Prefect's
home, which Prefect reads when it is imported.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING
from uuid import UUID

if TYPE_CHECKING:
    from pydantic import BaseModel

PREFIX = "char-rnn."  # every event's name starts with it
STAGES = ("skipped", "ingested", "encoded", "training", "evaluated", "compared", "trial", "decided")
DECIDED = f"{PREFIX}decided"  # a run's outcome: its last event
PROGRESS = "char-rnn-training"  # the key of the training's progress artifact (its data is the percent done)


def log() -> logging.Logger | logging.LoggerAdapter:
    """The run logger inside a flow or task run; a plain Prefect logger elsewhere."""
    from prefect.exceptions import MissingContextError
    from prefect.logging import get_logger, get_run_logger

    try:
        return get_run_logger()
    except MissingContextError:
        return get_logger("char-rnn")


def flow_run_id() -> UUID | None:
    """The flow run this code runs in (directly, or in one of its task runs), if any."""
    from prefect.context import FlowRunContext, TaskRunContext

    flow = FlowRunContext.get()
    if flow is not None and flow.flow_run is not None:
        return flow.flow_run.id
    task = TaskRunContext.get()
    return task.task_run.flow_run_id if task is not None else None


def announce(stage: str, line: str, record: BaseModel | None = None, level: int = logging.INFO) -> None:
    """Log `line` and, inside a run, emit the event `char-rnn.<stage>` with `line`, `level` and `record`."""
    if stage not in STAGES:
        raise ValueError(f"unknown stage {stage!r}: announce one of {', '.join(STAGES)}")
    log().log(level, line)
    run = flow_run_id()
    if run is None:
        return
    from prefect.events import emit_event

    emit_event(
        f"{PREFIX}{stage}",
        resource={"prefect.resource.id": f"{PREFIX}flow-run.{run}"},
        payload={
            "line": line,
            "level": level,
            "record": None if record is None else record.model_dump(mode="json"),
        },
    )
