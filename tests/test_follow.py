"""`announce` and `python -m flows.follow` against a real Prefect server: the demo flow of
tests/follow_demo.py says its stages the way the pipeline does, served by a runner as `make run` serves it."""

import json
import logging
import os
import re
import subprocess
import sys
import time
from datetime import UTC, datetime, timedelta
from types import SimpleNamespace
from uuid import UUID, uuid4

import pty_terminal
import pytest
from conftest import ROOT, stop
from follow_demo import Said
from prefect import flow, get_client, runtime

from flows import follow
from flows.events import PREFIX, announce

BAR = "[" + "#" * 30 + "]"  # a finished training's status, off a terminal
FOLLOW = [sys.executable, "-m", "flows.follow"]


@pytest.fixture(scope="module")
def runner(prefect_api, tmp_path_factory):
    """The demo's deployments served by a runner process of their own: its PID and the environment to use."""
    from prefect.settings import PREFECT_API_URL

    env = os.environ | {"PREFECT_API_URL": PREFECT_API_URL.value(), "PREFECT_RUNNER_POLL_FREQUENCY": "1"}
    log = tmp_path_factory.mktemp("runner") / "runner.log"
    with log.open("wb") as out:
        proc = subprocess.Popen(
            [sys.executable, "tests/follow_demo.py"],
            cwd=ROOT,
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    try:
        with get_client(sync_client=True) as client:
            until(lambda: registered(client, "follow-demo/busy"), proc, lambda: log.read_text()[-3000:])
        yield SimpleNamespace(pid=proc.pid, env=env)
    finally:
        stop(proc)


def registered(client, name: str) -> bool:
    from prefect.exceptions import ObjectNotFound

    try:
        return client.read_deployment_by_name(name) is not None
    except ObjectNotFound:
        return False


def until(ready, proc=None, why=lambda: "", timeout: float = 300):
    """Poll `ready()` until it returns something true (or `proc` exits, or `timeout` s pass); that value."""
    end = time.monotonic() + timeout
    while not (found := ready()):
        alive = proc is None or proc.poll() is None
        assert alive and time.monotonic() < end, why()
        time.sleep(0.1)
    return found


def lines_of(*stages: str) -> list[str]:
    """A line per stage, new words every time: what follow shows must not depend on the wording."""
    return [f"{stage} {uuid4().hex[:8]}: {uuid4().hex[:6]} nats/char" for stage in stages]


def params(said: list[str], **more) -> list[str]:
    return [f"--param=lines={json.dumps(said)}", *(f"--param={k}={v}" for k, v in more.items())]


def shown(lines: list[str]) -> list[str]:
    """The lines without a training's intermediate status (printed off a terminal when 15 s pass)."""
    return [line for line in lines if not re.search(r"\] [0-3]/4 loss", line)]


def test_follow_shows_each_stages_line_in_order_and_ends_on_the_decision(runner):
    said, warning = lines_of("ingested", "training", "evaluated", "decided"), f"skipped {uuid4().hex[:8]}"
    cmd = [*FOLLOW, "follow-demo/now", *params(said, warning=warning), f"--runner-pid={runner.pid}"]
    done = subprocess.run(cmd, env=runner.env, cwd=ROOT, capture_output=True, text=True, timeout=300)
    exited = datetime.now(UTC)
    assert done.returncode == 0 and not done.stderr, done.stdout + done.stderr
    lines = done.stdout.splitlines()
    assert lines[0].startswith("  flow run '") and "/runs/flow-run/" in lines[0]
    assert shown(lines[1:]) == [
        f"  {said[0]}",
        f"  warning: {warning}",
        f"  {said[1]}",
        f"  {BAR} 4/4 loss 0.250",
        f"  {said[2]}",
        f"  {said[3]}",
    ]
    # It ended on the decision, not on waiting out the grace a run without one gets after its final state
    with get_client(sync_client=True) as client:
        run = client.read_flow_run(UUID(lines[0].rsplit("/", 1)[1]))
    assert run.state.is_completed() and exited - run.end_time < timedelta(seconds=follow.GRACE_COMPLETED)


class Terminal(pty_terminal.Terminal):
    """A command in a pseudo-terminal, stopped (its process group) and closed at the end."""

    def __init__(self, cmd: list[str], env: dict[str, str]):
        super().__init__(cmd, env | {"TERM": "xterm"})

    def close(self) -> None:
        stop(self.proc)
        self.reader.join(10)
        os.close(self.master)


def test_on_a_terminal_the_status_line_is_the_progress_artifact_redrawn_in_place(runner, tmp_path):
    said, hold = lines_of("ingested", "training", "evaluated", "decided"), tmp_path / "release"
    cmd = [*FOLLOW, "follow-demo/now", *params(said, hold=hold), f"--runner-pid={runner.pid}"]
    term = Terminal(cmd, runner.env)
    try:
        until(lambda: "] 3/4 loss 0.333" in term.text, term.proc, lambda: term.text)  # its last step waits
        hold.touch()
        assert term.proc.wait(300) == 0, term.text
    finally:
        hold.touch()  # a failed test leaves no run waiting
        term.close()
    screen = [line for line in term.screen() if line]
    assert screen[1:] == [
        f"  {said[0]}",
        f"  {said[1]}",
        "  [" + "━" * 30 + "] 4/4 loss 0.250",
        f"  {said[2]}",
        f"  {said[3]}",
    ], term.text
    status = next(line for line in term.text.split("\n") if "] 4/4 loss" in line)
    assert status.count("\r  [") >= 2 and status.index("] 3/4 loss") < status.index("] 4/4 loss"), status


def test_a_run_cancelled_by_the_concurrency_limit_follows_the_running_one(runner, tmp_path):
    first, hold = lines_of("ingested", "training", "evaluated", "decided"), tmp_path / "release"
    with get_client(sync_client=True) as client:
        dep = client.read_deployment_by_name("follow-demo/busy")
        running = client.create_flow_run_from_deployment(
            dep.id, parameters={"lines": first, "hold": str(hold)}
        )
        until(lambda: client.read_flow_run(running.id).state.is_running())
    out = tmp_path / "follow.out"
    cmd = [*FOLLOW, "follow-demo/busy", *params(lines_of("a", "b", "c", "d")), f"--runner-pid={runner.pid}"]
    with out.open("w") as f:
        proc = subprocess.Popen(
            cmd, cwd=ROOT, env=runner.env, stdout=f, stderr=subprocess.STDOUT, start_new_session=True
        )
    try:
        until(lambda: "was running already" in out.read_text(), proc, out.read_text)
        hold.touch()
        assert proc.wait(300) == 0, out.read_text()
    finally:
        hold.touch()
        stop(proc)
    lines = out.read_text().splitlines()
    assert lines[1] == "  a run of follow-demo/busy was running already: following it", lines
    assert lines[2].startswith("  flow run '") and lines[2].endswith(f"/runs/flow-run/{running.id}"), lines
    assert shown(lines[3:]) == [f"  {first[0]}", f"  {first[1]}", f"  {BAR} 4/4 loss 0.250", *(
        f"  {line}" for line in first[2:]
    )], lines  # fmt: skip


@flow(persist_result=False)
def says(stage: str, line: str, level: int = logging.INFO) -> UUID:
    announce(stage, line, Said(lines=1), level=level)
    return UUID(runtime.flow_run.id)


def stage_events(since: datetime, run_id: UUID | None = None) -> list:
    """The char-rnn.* events since `since` (of flow run `run_id` only, if given)."""
    from prefect.events.filters import EventFilter, EventNameFilter, EventOccurredFilter, EventRelatedFilter

    related = EventRelatedFilter(id=[f"prefect.flow-run.{run_id}"]) if run_id else None
    match = EventFilter(
        occurred=EventOccurredFilter(since=since, until=datetime.now(UTC) + timedelta(minutes=1)),
        event=EventNameFilter(prefix=[PREFIX]),
        related=related,
    )
    with get_client(sync_client=True) as client:
        return client.read_events(filter=match, limit=50).events


def test_announce_in_a_run_logs_the_line_and_emits_its_event_related_to_the_run(prefect_api):
    from prefect.client.schemas.filters import LogFilter

    since, line = datetime.now(UTC), f"Kept {uuid4().hex}: worse than the current model"
    run_id = says("compared", line, logging.WARNING)
    (event,) = until(lambda: stage_events(since, run_id), timeout=120)
    assert event.event == "char-rnn.compared"
    assert event.payload == {"line": line, "level": logging.WARNING, "record": {"lines": 1}}
    with get_client(sync_client=True) as client:
        logs = LogFilter(flow_run_id={"any_": [run_id]})
        found = until(
            lambda: [g for g in client.read_logs(log_filter=logs) if g.message == line], timeout=120
        )
    assert [g.level for g in found] == [logging.WARNING]


def test_announce_outside_a_run_only_logs(prefect_api, caplog):
    since, line = datetime.now(UTC), f"outside {uuid4().hex}"
    with caplog.at_level(logging.INFO):
        announce("encoded", line)
    assert [(r.levelno, r.getMessage()) for r in caplog.records] == [(logging.INFO, line)]
    # An event sent after it by the same process is stored: had it sent one, that would be stored as well
    marker = says("decided", f"marker {uuid4().hex}")
    until(lambda: stage_events(since, marker), timeout=120)
    assert [e.payload["line"] for e in stage_events(since) if e.payload.get("line") == line] == []


def test_announce_refuses_an_unknown_stage():
    with pytest.raises(ValueError, match="unknown stage 'promoted'"):
        announce("promoted", "Promoted char-rnn:x")
