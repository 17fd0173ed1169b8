"""`python -m flows.follow DEPLOYMENT [--param KEY=VALUE ...]`: run a deployment and show it in the terminal.

What `make run` shows while the pipeline runs: the pipeline's own log lines as they come, one line updated in
place while the model trains (step, loss, validation loss, characters/s, time left: the run's progress
artifact) and the outcome. Prefect's engine and event messages stay in the runner's log and the UI. Exit
status 0 when the run completes, 1 when it does not, 130 on Ctrl-C (the runner keeps the run). When the
retrain deployment cancels this run because a retrain was running already, it follows that one instead.
With --next it starts nothing and follows the deployment's next run (scripts/demo-retrain.sh).
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import time
from datetime import UTC, datetime, timedelta
from typing import Any
from uuid import UUID

import settings
from cli import Parser, bar
from flows.serve import param

# The pipeline's log lines worth a line in the terminal (flows/pipeline.py, flows/tasks.py); warnings and
# errors are always shown, Prefect's own INFO lines never.
SAID = (
    "Corpus ",
    "Reusing ",
    "Vocabulary ",
    "Resuming ",
    "Training ",
    "Candidate",
    "Current ",
    "char-rnn:",
    "Promoted ",
    "Kept ",
)
OUTCOME = ("Promoted ", "Kept ", "Reusing the promoted model")  # the run's last line, when it completes
BUSY = "Deployment concurrency limit reached."  # the state message of a retrain cancelled by another
BUSY_STATES = ["PENDING", "RUNNING"]
# A run process sends its log lines in batches (every ~2 s, later on a busy machine): lines may arrive
# after the run's final state, and a batch may hold lines older than the newest one shown.
LATE = timedelta(seconds=30)  # how far back each poll looks again for lines not seen yet
GRACE_COMPLETED, GRACE = 60.0, 5.0  # s to wait after the final state for the outcome line: completed, other


class Screen:
    """Lines for the terminal, below them a status line redrawn in place. Off a terminal (a log file,
    `| tee`) the status is printed as a line of its own every `every` s instead."""

    def __init__(self, out=sys.stdout, every: float = 15.0):
        self.out, self.tty, self.every = out, out.isatty(), every
        self.status, self.printed, self.at = "", "", time.monotonic()

    def draw(self, text: str) -> None:
        width = shutil.get_terminal_size().columns - 1  # the last column would wrap on some terminals
        self.out.write("\r" + text[:width].ljust(width) + ("" if text else "\r"))
        self.out.flush()

    def print(self, text: str) -> None:
        print(f"  {text}", file=self.out, flush=True)
        self.printed, self.at = text, time.monotonic()

    def line(self, text: str) -> None:
        """A line above the status line."""
        if self.tty and self.status:
            self.draw("")
        self.print(text)
        if self.tty and self.status:
            self.draw(f"  {self.status}")

    def show(self, status: str, passing: bool = False) -> None:
        """Redraw the status line; off a terminal, print it now and then, unless it is `passing` (a wait)."""
        if status == self.status:
            return
        self.status = "" if passing and not self.tty else status
        if self.tty:
            self.draw(f"  {status}")
        elif not passing and time.monotonic() - self.at >= self.every:
            self.print(status)

    def keep(self) -> None:
        """Leave the status line where it is, as a line of its own (a finished training's last state)."""
        if self.tty and self.status:
            self.out.write("\n")
        elif self.status and self.status != self.printed:
            self.print(self.status)
        self.status = ""

    def clear(self) -> None:
        """Take a passing status away."""
        if self.tty and self.status:
            self.draw("")
        self.status = ""


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
        screen.show(
            f"waiting for its next run (in {max(left, 0):.0f} s)" if left is not None else "waiting", True
        )
        time.sleep(1)


def watch(client: Any, run: Any, runner: int | None, screen: Screen) -> Any:
    """Show flow run `run` until it ends; its final state."""
    from prefect.client.schemas.filters import ArtifactFilter, LogFilter
    from prefect.client.schemas.sorting import ArtifactSort, LogSort
    from prefect.settings import get_current_settings

    if ui := get_current_settings().ui_url:
        screen.line(f"flow run '{run.name}': {ui}/runs/flow-run/{run.id}")
    seen: set[UUID] = set()
    done: set[UUID] = set()  # finished progress artifacts
    after = ended = finished = None  # finished: when the training's progress reached 100%
    said = ""
    progress = ArtifactFilter(flow_run_id={"any_": [run.id]}, type={"any_": ["progress"]})
    while True:
        run = client.read_flow_run(run.id)
        since = {"after_": after - LATE} if after else {}
        logs = LogFilter(flow_run_id={"any_": [run.id]}, level={"ge_": 20}, timestamp=since)
        lines = client.read_logs(log_filter=logs, sort=LogSort.TIMESTAMP_ASC)
        # read after the lines: a line sent once the training ended finds its 100% here, not at the next poll
        found = client.read_artifacts(artifact_filter=progress, sort=ArtifactSort.UPDATED_DESC, limit=1)
        if found and found[0].id not in done:
            screen.show(f"{bar(float(found[0].data) / 100)} {found[0].description or ''}")
            if float(found[0].data) >= 100:
                done.add(found[0].id)
                finished = found[0].updated
        elif not found and not run.state.is_final():
            screen.show(f"{run.state.name}...", passing=True)
        for log in lines:
            if log.id in seen:
                continue
            seen.add(log.id)
            after = max(after or log.timestamp, log.timestamp)
            if finished and log.timestamp >= finished:  # lines logged before the training ended stay above it
                screen.keep()
                finished = None
            first = log.message.splitlines()[0] if log.message else ""
            if log.level >= 30:
                screen.line(f"{'error' if log.level >= 40 else 'warning'}: {first}")
            elif first.startswith(SAID):
                screen.line(first)
                said = first
        if run.state.is_final():  # its last log lines may still be on their way
            ended = ended or time.monotonic()
            waited = time.monotonic() - ended > (GRACE_COMPLETED if run.state.is_completed() else GRACE)
            if said.startswith(OUTCOME) or run.state.message == BUSY or waited:
                if finished:
                    screen.keep()
                screen.clear()
                return run.state
        if not alive(runner):
            raise RuntimeError(f"the runner (PID {runner}) exited while {run.name} was {run.state.name}")
        time.sleep(1)


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
        state = watch(client, run, args.runner_pid, screen)
        if state.is_cancelled() and state.message == BUSY and (other := runs(client, dep.id, BUSY_STATES)):
            screen.line(f"a run of {args.deployment} was running already: following it")
            state = watch(client, other[0], args.runner_pid, screen)
        return state


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
