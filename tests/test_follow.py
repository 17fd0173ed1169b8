"""flows.follow's terminal view, driven by a fake Prefect client: what it prints, in which order."""

import io
from datetime import UTC, datetime, timedelta
from types import SimpleNamespace
from uuid import uuid4

from flows import follow

T0 = datetime(2026, 1, 1, tzinfo=UTC)


class State(SimpleNamespace):
    def is_final(self) -> bool:
        return self.name == "Completed"

    def is_completed(self) -> bool:
        return self.name == "Completed"


def log(second: float, message: str) -> SimpleNamespace:
    return SimpleNamespace(id=uuid4(), timestamp=T0 + timedelta(seconds=second), level=20, message=message)


class Client:
    """Answers each poll from a script: (run state, new log lines, the progress artifact's data and time)."""

    def __init__(self, polls: list[tuple[str, list, float, float]]):
        self.polls, self.at = polls, -1
        self.artifact = uuid4()

    def read_flow_run(self, run_id):
        self.at = min(self.at + 1, len(self.polls) - 1)
        state = State(name=self.polls[self.at][0], message="")
        return SimpleNamespace(id=run_id, name="brave-fox", state=state)

    def read_logs(self, log_filter, sort):
        return self.polls[self.at][1]

    def read_artifacts(self, artifact_filter, sort, limit):
        _, _, data, second = self.polls[self.at]
        done = T0 + timedelta(seconds=second)
        return [SimpleNamespace(id=self.artifact, data=data, description=f"{data:g}%", updated=done)]


def test_a_line_logged_after_the_training_ended_prints_below_its_last_progress(monkeypatch):
    """The run ends training and logs its candidate between two polls: the line that arrives with the
    final progress must still come after the finished bar, not above it (it did on a busy CI machine)."""
    monkeypatch.setattr(follow.time, "sleep", lambda s: None)
    client = Client(
        [
            ("Running", [log(0, "Corpus of 9 characters"), log(1, "Training from scratch")], 50.0, 2),
            ("Completed", [log(10, "Candidate: 1.9 nats/char"), log(11, "Promoted char-rnn:x")], 100.0, 9),
        ]
    )
    out = io.StringIO()
    run = SimpleNamespace(id=uuid4(), name="brave-fox")
    assert follow.watch(client, run, None, follow.Screen(out)).name == "Completed"
    said = [line.strip() for line in out.getvalue().splitlines() if "/runs/flow-run/" not in line]
    assert said == [
        "Corpus of 9 characters",
        "Training from scratch",
        f"{follow.bar(1.0)} 100%",
        "Candidate: 1.9 nats/char",
        "Promoted char-rnn:x",
    ]
