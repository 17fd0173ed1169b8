"""The API the service publishes at /docs.json is the API it serves: schemathesis (its command line, as a user
runs it) with every check but positive-data acceptance, against a real `bentoml serve` with a promoted model.

Positive-data acceptance is left out because a prompt's alphabet is the served model's vocabulary, which
changes on hot reload, so the schema cannot state it: a schema-valid prompt may be refused (a 400 naming the
characters). Every other check runs: no 5xx, every status, content type, header and body as documented
(`/generate_stream` answering `text/event-stream`), invalid bodies refused, unsupported methods refused."""

import subprocess
import sys
from pathlib import Path

from test_service import EXTRA, tiny_checkpoint
from test_service_http import promote, running, server_env, serves, wait_for

SCHEMATHESIS = Path(sys.executable).parent / "schemathesis"


def schemathesis(port: int, cwd: Path, env: dict[str, str], *options: str) -> subprocess.CompletedProcess:
    cmd = [
        str(SCHEMATHESIS),
        "run",
        f"http://127.0.0.1:{port}/docs.json",
        "--checks=all",
        "--seed=1",
        "--workers=1",
        "--request-timeout=30",
        *options,
    ]
    return subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=900)


def test_schemathesis_finds_the_served_api_as_published(small_text, tmp_path):
    """Every operation once a model serves; and before, the API's own routes, whose 503 ("no model has been
    promoted yet", documented) is then the answer they must give, and whose models view is empty (nulls)."""
    home = tmp_path / "home"
    home.mkdir()
    env = server_env(home)
    ours = "--include-path-regex=^/(generate|generate_stream|model_info|models|training)$"
    with running(env, home / "server.log") as live:
        empty = schemathesis(
            live.port, tmp_path, env, "--exclude-checks=not_a_server_error", ours, "-n", "10"
        )
        [tag] = promote(env, tiny_checkpoint(small_text + EXTRA, tmp_path / "ck").path)
        wait_for(lambda: serves(live.client, tag), 30, f"the service to serve {tag}")
        served = schemathesis(
            live.port, tmp_path, env, "--exclude-checks=positive_data_acceptance", "-n", "40"
        )
    assert empty.returncode == 0, empty.stdout[-6000:] + empty.stderr[-2000:]
    assert "5 selected / 9 total" in empty.stdout
    assert served.returncode == 0, served.stdout[-6000:] + served.stderr[-2000:]
    assert "9 selected / 9 total" in served.stdout
