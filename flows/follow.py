"""`python -m flows.follow DEPLOYMENT [--param KEY=VALUE ...]`: run a deployment and show it in the terminal.

What `make run` shows while the pipeline runs, read from structured data only: the lines of the run's
`char-rnn.*` events (flows/events.py) as they come, one line updated in place while the model trains (the
run's progress artifact: its percent and its summary line), and the outcome, the `char-rnn.decided` event.
Rewording a line changes what is shown, never whether. Exit status 0 when the run completes, 1 when it does
not, 130 on Ctrl-C (the runner keeps the run). When the retrain deployment's concurrency limit cancels this
run before it starts because a run of it is running already, it follows that one instead. With --next it
starts nothing and follows the deployment's next run (scripts/demo-retrain.sh).

Prefect's own `prefect flow-run watch` streams every log line and engine event of a run, with no status
line, and its subscription looks back a minute only; this polls the run, its events and its artifact instead,
so a run followed half way through shows what it said before.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from datetime import UTC, datetime, timedelta
from typing import Any
from uuid import UUID

import settings
from flows.events import DECIDED, PREFIX, PROGRESS
from terminal import Parser, Screen, param

ACTIVE = ["PENDING", "RUNNING"]
# The server stores events in batches (every few seconds), so an event can be read after a later one, and
# after the run's final state.
LATE = timedelta(seconds=30)  # how far back each poll reads again for events not seen yet
GRACE_COMPLETED, GRACE = 60.0, 10.0  # s to wait after the final state for the outcome: completed, other


def alive(pid: int | None) -> bool:
    if pid is None:
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def deployment(client: Any, name: str, runner: int | None, screen: Screen, timeout: float = 300) -> Any:
    """The deployment `name`, waiting for the runner to register it."""
    from prefect.exceptions import ObjectNotFound

    end = time.monotonic() + timeout
    screen.show(f"waiting for the runner to register {name}", passing=True)
    while True:
        try:
            return client.read_deployment_by_name(name)
        except ObjectNotFound:
            if not alive(runner):
                raise RuntimeError(f"the runner (PID {runner}) exited before registering {name}") from None
            if time.monotonic() > end:
                raise RuntimeError(f"{name} was not registered within {timeout:.0f} s") from None
        time.sleep(1)


def runs(client: Any, deployment_id: UUID, states: list[str], **where: Any) -> list:
    """Runs of a deployment in one of `states` (StateType names), soonest first."""
    from prefect.client.schemas.filters import FlowRunFilter
    from prefect.client.schemas.sorting import FlowRunSort

    match = FlowRunFilter(deployment_id={"any_": [deployment_id]}, state={"type": {"any_": states}}, **where)
    return client.read_flow_runs(flow_run_filter=match, sort=FlowRunSort.EXPECTED_START_TIME_ASC, limit=5)


def schedule(dep: Any) -> str:
    """When the deployment runs, in words."""
    found = [d.schedule for d in dep.schedules if d.active]
    if not found:
        return "it has no active schedule"
    s = found[0]
    return f"every {s.interval.total_seconds():g} s" if hasattr(s, "interval") else f"on cron '{s.cron}'"


def next_run(client: Any, name: str, dep: Any, runner: int | None, screen: Screen) -> Any:
    """The first run of deployment `dep` that starts from now on (waiting for it)."""
    since = datetime.now(UTC)
    screen.line(f"{name} runs {schedule(dep)}")
    while True:
        started = runs(
            client,
            dep.id,
            ["PENDING", "RUNNING", "COMPLETED", "FAILED", "CRASHED"],
            start_time={"after_": since},
        )
        if started:
            return started[0]
        if not alive(runner):
            raise RuntimeError(f"the runner (PID {runner}) exited")
        due = runs(client, dep.id, ["SCHEDULED"])
        left = (due[0].expected_start_time - datetime.now(UTC)).total_seconds() if due else None
        wait = f"waiting for its next run (in {max(left, 0):.0f} s)" if left is not None else "waiting"
        screen.show(wait, passing=True)
        time.sleep(1)


def stage_events(client: Any, run_id: UUID, since: datetime) -> list:
    """The run's `char-rnn.*` events that occurred since `since`, oldest first."""
    from prefect.events.filters import (
        EventFilter,
        EventNameFilter,
        EventOccurredFilter,
        EventOrder,
        EventRelatedFilter,
    )

    match = EventFilter(
        occurred=EventOccurredFilter(since=since, until=datetime.now(UTC) + LATE),  # LATE: another's clock
        event=EventNameFilter(prefix=[PREFIX]),
        related=EventRelatedFilter(id=[f"prefect.flow-run.{run_id}"]),
        order=EventOrder.ASC,
    )
    page = client.read_events(filter=match, limit=50)  # the server's largest page
    found = list(page.events)
    while page.next_page:
        page = client.read_events_page(page.next_page)
        found += page.events
    return found


def progress(client: Any, run_id: UUID) -> Any:
    """The run's newest training progress artifact, or None."""
    from prefect.client.schemas.filters import ArtifactFilter
    from prefect.client.schemas.sorting import ArtifactSort

    match = ArtifactFilter(flow_run_id={"any_": [run_id]}, key={"any_": [PROGRESS]})
    found = client.read_artifacts(artifact_filter=match, sort=ArtifactSort.UPDATED_DESC, limit=1)
    return found[0] if found else None


class View:
    """What one flow run has shown so far: the events seen, the trainings finished, whether it decided."""

    def __init__(self, client: Any, run: Any, screen: Screen):
        self.client, self.id, self.screen = client, run.id, screen
        self.seen: set[UUID] = set()
        self.newest: datetime = run.created
        self.done: set[UUID] = set()  # finished progress artifacts
        self.finished: datetime | None = None  # when the training now on the status line reached 100%
        self.decided = False

    def update(self, run: Any) -> None:
        found = stage_events(self.client, self.id, self.newest - LATE)
        # read after the events: an event sent once the training ended finds its 100% here, not next poll
        self.status(progress(self.client, self.id), run)
        for event in found:
            if event.id in self.seen:
                continue
            self.seen.add(event.id)
            self.newest = max(self.newest, event.occurred)
            if self.finished and event.occurred >= self.finished:  # what came before stays above it
                self.screen.keep()
                self.finished = None
            self.say(event)

    def status(self, artifact: Any, run: Any) -> None:
        if artifact is not None and artifact.id not in self.done:
            percent = float(artifact.data)
            self.screen.show(artifact.description or "", fraction=percent / 100)
            if percent >= 100:
                self.done.add(artifact.id)
                self.finished = artifact.updated
        elif artifact is None and not run.state.is_final():
            self.screen.show(f"{run.state.name}...", passing=True)

    def say(self, event: Any) -> None:
        line, level = event.payload.get("line"), event.payload.get("level", 20)
        if isinstance(line, str):
            kind = "error: " if level >= 40 else "warning: " if level >= 30 else ""
            self.screen.line(kind + line)
        self.decided = self.decided or event.event == DECIDED

    def close(self) -> None:
        if self.finished:
            self.screen.keep()
        self.screen.clear()


def watch(client: Any, run: Any, runner: int | None, screen: Screen) -> Any:
    """Show flow run `run` until it has ended and said its outcome; the flow run, final."""
    from prefect.settings import get_current_settings

    if ui := get_current_settings().ui_url:
        screen.line(f"flow run '{run.name}': {ui}/runs/flow-run/{run.id}")
    view = View(client, run, screen)
    ended = None
    while True:
        run = client.read_flow_run(run.id)
        view.update(run)
        if run.state.is_final():
            ended = ended or time.monotonic()
            grace = GRACE_COMPLETED if run.state.is_completed() else GRACE
            if view.decided or run.run_count == 0 or time.monotonic() - ended > grace:  # 0: never ran
                view.close()
                return run
        if not alive(runner):
            raise RuntimeError(f"the runner (PID {runner}) exited while {run.name} was {run.state.name}")
        time.sleep(1)


def running_instead(client: Any, run: Any, dep: Any) -> Any:
    """The run of `dep` that is running while `run` was cancelled before it started (what a concurrency limit
    that cancels new runs does), or None."""
    if not run.state.is_cancelled() or run.run_count > 0:  # run_count: the times it entered Running
        return None
    others = [r for r in runs(client, dep.id, ACTIVE) if r.id != run.id]
    return others[0] if others else None


def follow(args: argparse.Namespace, screen: Screen) -> Any:
    """Start (or, with --next, wait for) a run of the deployment and show it; its final state."""
    from prefect import get_client  # Prefect reads its home when imported: only after configure()
    from prefect.exceptions import PrefectHTTPStatusError

    with get_client(sync_client=True) as client:
        dep = deployment(client, args.deployment, args.runner_pid, screen)
        if args.next:
            run = next_run(client, args.deployment, dep, args.runner_pid, screen)
        else:
            screen.show(f"starting {args.deployment}", passing=True)
            try:
                run = client.create_flow_run_from_deployment(dep.id, parameters=dict(args.param))
            except PrefectHTTPStatusError as e:
                raise RuntimeError(f"{args.deployment} refused the parameters: {e.response.text}") from None
        run = watch(client, run, args.runner_pid, screen)
        if other := running_instead(client, run, dep):
            screen.line(f"a run of {args.deployment} was running already: following it")
            run = watch(client, other, args.runner_pid, screen)
        return run.state


def main(argv: list[str] | None = None) -> int:
    parser = Parser(prog="python -m flows.follow", description=__doc__.split("\n\n")[0])
    parser.add_argument("deployment", help="FLOW/DEPLOYMENT, e.g. char-rnn-pipeline/scheduled-retrain")
    parser.add_argument("--param", type=param, action="append", default=[], help="KEY=VALUE (repeatable)")
    parser.add_argument("--runner-pid", type=int, help="give up if this process (the runner) exits")
    parser.add_argument("--next", action="store_true", help="start nothing: follow the next run that starts")
    args = parser.parse_args(argv)
    screen = Screen()
    try:
        os.environ.update(settings.configure())
        state = follow(args, screen)
    except KeyboardInterrupt:
        screen.keep()
        return 130
    except (RuntimeError, ValueError) as e:  # SettingsError included
        screen.clear()
        print(f"{parser.prog}: error: {e}", file=sys.stderr)
        return 1
    if not state.is_completed():
        print(f"{parser.prog}: the run ended {state.name}: {state.message}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
