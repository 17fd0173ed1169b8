"""End to end: a real `prefect server` (scripts/prefect-server.sh), `python -m flows.serve`, deployment runs.

Everything started here is stopped by PID in the fixture's teardown.
"""

import json
import os
import signal
import subprocess
import sys
import time
import urllib.request
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path

import httpx
import pytest
from conftest import free_port, stop

import settings
from flows import serve
from settings import isolated_env

ROOT = Path(__file__).resolve().parent.parent
TINY = {"steps": "40", "hidden": "16", "batch": "4", "seq": "16", "checkpoint_every": "20"}


@dataclass
class Stack:
    home: Path
    env: dict[str, str]
    url: str
    serve_log: Path

    def corpus(self, name: str, text: str) -> Path:
        folder = self.home / name
        folder.mkdir()
        (folder / "a.txt").write_text(text, encoding="utf-8")
        return folder

    def promoted(self) -> list[str]:
        pointer = self.home / "bentoml" / "char-rnn-promoted.json"
        return [e["tag"] for e in json.loads(pointer.read_text())["entries"]] if pointer.exists() else []

    def run(self, deployment: str, **params: object) -> tuple[subprocess.CompletedProcess, float]:
        """`prefect deployment run NAME --param k=v ... --watch`; the process and its wall time."""
        args = [f"--param={k}={v}" for k, v in params.items()]
        cmd = [sys.executable, "-m", "prefect", "deployment", "run", deployment, *args, "--watch"]
        t0 = time.perf_counter()
        done = subprocess.run(cmd, env=self.env, capture_output=True, text=True, timeout=300)
        return done, time.perf_counter() - t0

    def explain(self, done: subprocess.CompletedProcess) -> str:
        return f"{done.stdout[-3000:]}\n{done.stderr[-3000:]}\n{self.explain_log()}"

    def explain_log(self) -> str:
        return f"serve log:\n{self.serve_log.read_text()[-5000:]}"


def wait_for_deployments(url: str, serve: subprocess.Popen, log: Path) -> None:
    deadline = time.monotonic() + 90
    for name in (
        "char-rnn-pipeline/on-demand",
        "char-rnn-pipeline/scheduled-retrain",
        "char-rnn-sweep/on-demand",
    ):
        while True:
            try:
                urllib.request.urlopen(f"{url}/deployments/name/{name}", timeout=2)
                break
            except OSError:
                assert serve.poll() is None, f"flows.serve exited:\n{log.read_text()[-5000:]}"
                assert time.monotonic() < deadline, f"deployments not registered:\n{log.read_text()[-5000:]}"
                time.sleep(0.5)


@pytest.fixture(scope="module")
def stack(tmp_path_factory) -> Stack:
    home = tmp_path_factory.mktemp("deployments")
    port = free_port()
    url = f"http://127.0.0.1:{port}/api"
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PREFECT_", "CHAR_RNN_"))}
    (home / "user-home").mkdir()
    env |= isolated_env(home) | {
        "HOME": str(home / "user-home"),  # must stay empty: all state goes under CHAR_RNN_HOME
        "PREFECT_SERVER_API_PORT": str(port),
        "PREFECT_API_URL": url,
        "PREFECT_RUNNER_POLL_FREQUENCY": "1",
        "OPENBLAS_NUM_THREADS": "1",
        "PYTHON": sys.executable,
    }
    script = [str(ROOT / "scripts" / "prefect-server.sh")]
    log = home / "serve.log"
    serve = None
    try:
        started = subprocess.run([*script, "start"], env=env, timeout=180, capture_output=True, text=True)
        assert started.returncode == 0, f"prefect server did not start:\n{started.stdout}\n{started.stderr}"
        with open(log, "w") as out:
            serve = subprocess.Popen(
                [sys.executable, "-m", "flows.serve", "--cron", "0 0 1 1 *"],
                env=env,
                cwd=ROOT,
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        wait_for_deployments(url, serve, log)
        yield Stack(home, env, url, log)
    finally:
        if serve is not None:
            stop(serve)
        subprocess.run([*script, "stop"], env=env, timeout=60, capture_output=True)


def test_on_demand_deployment_trains_and_promotes(stack, small_text):
    texts = stack.corpus("on-demand", small_text[:6000])
    before = stack.promoted()

    done, _ = stack.run("char-rnn-pipeline/on-demand", data_dir=texts, **TINY)

    assert done.returncode == 0 and "Completed" in done.stdout, stack.explain(done)
    assert len(stack.promoted()) == len(before) + 1


def test_scheduled_retrain_skips_unchanged_text_and_trains_on_new(stack, small_text):
    texts = stack.corpus("scheduled", small_text[6000:12000])
    seconds = {}
    for case, steps in (("first", 200), ("unchanged", 40), ("new text", 40)):
        if case == "new text":
            (texts / "b.txt").write_text("Zoë’s naïve façade — 0123456789\n" * 20, encoding="utf-8")
        runs, tags = set(stack.home.glob("runs/run-*")), stack.promoted()
        params = TINY | {"steps": steps}
        done, seconds[case] = stack.run("char-rnn-pipeline/scheduled-retrain", data_dir=texts, **params)
        assert done.returncode == 0 and "Completed" in done.stdout, stack.explain(done)
        trained = set(stack.home.glob("runs/run-*")) - runs
        assert bool(trained) == (case != "unchanged"), case
        if case == "first":  # so that the next run finds its fingerprint promoted
            assert len(stack.promoted()) == len(tags) + 1, stack.explain(done)
        if case == "unchanged":
            assert stack.promoted() == tags
    log = stack.serve_log.read_text()
    assert "Reusing the promoted model: corpus unchanged since" in log and "vocabulary grown by" in log
    print(f"scheduled-retrain, wall seconds through `prefect deployment run --watch`: {seconds}")


def test_sweep_deployment_trains_trials_on_dask_and_judges_the_winner(stack, small_text):
    """The run, in flows.serve's runner, starts a LocalCluster of 2 workers that report to the server."""
    texts = stack.corpus("sweep", small_text[:8000])
    before = stack.promoted()
    grid = json.dumps({"hidden": [16], "batch": [4], "seq": [16], "lr": [0.003, 0.01]})
    params = {"data_dir": texts, "space": grid, "trials": 2, "steps": 40, "checkpoint_every": 20}

    done, seconds = stack.run("char-rnn-sweep/on-demand", **params, local_workers=2)

    assert done.returncode == 0 and "Completed" in done.stdout, stack.explain(done)
    (folder,) = (stack.home / "sweeps").glob("sweep-*")
    trials = json.loads((folder / "trials.json").read_text())
    assert sorted(t["status"] for t in trials["trials"]) == ["stopped after rung 0", "winner"]
    d = trials["decision"]  # through the gate: earlier tests here may have promoted a better model
    assert len(stack.promoted()) == len(before) + d["promoted"] and (
        d["promoted"] or "does not beat" in d["reason"]
    )
    print(f"char-rnn-sweep/on-demand, wall seconds through `prefect deployment run --watch`: {seconds:.1f}")


RETRY = {429, 502, 503}  # what Prefect's own client retries: a busy server's "database is locked" is a 503


def api(stack: Stack, method: str, path: str, **body: object) -> object:
    """A call to the stack's Prefect REST API, retried as Prefect's client does; the decoded answer."""
    for wait in (0.5, 1, 2, 4, 8, 0):
        r = httpx.request(method, f"{stack.url}{path}", json=body or None, timeout=30, trust_env=False)
        if r.status_code not in RETRY or not wait:
            break
        time.sleep(wait)
    r.raise_for_status()
    return r.json() if r.content else None


def flow_run(stack: Stack, deployment: str, params: dict, until, timeout: float = 300) -> dict:
    """Start a run of `deployment` through the API; its state once `until(run)` is true."""
    dep = api(stack, "GET", f"/deployments/name/{deployment}")
    run = api(stack, "POST", f"/deployments/{dep['id']}/create_flow_run", parameters=params)
    end = time.monotonic() + timeout
    while not until(run := api(stack, "GET", f"/flow_runs/{run['id']}")):
        assert time.monotonic() < end, f"{run['name']} stayed {run['state']['name']}:\n{stack.explain_log()}"
        time.sleep(0.5)
    return run


def test_the_ui_calls_the_api_on_the_port_the_server_moved_to(stack):
    """PREFECT_SERVER_API_PORT (scripts/prefect-server.sh) moves the API and the address the UI calls."""
    ui = stack.url.removesuffix("/api")
    assert httpx.get(f"{ui}/ui-settings", trust_env=False).json()["api_url"] == stack.url


def test_a_schedule_gets_two_future_runs_not_an_hours_worth(stack):
    """Prefect's scheduler creates an hour's worth of runs at least (60 for a 60 s interval) unless told."""
    code = (
        "from datetime import timedelta; from flows.pipeline import pipeline; "
        "print(pipeline.to_deployment('schedule-check', interval=timedelta(seconds=60)).apply())"
    )
    made = subprocess.run(
        [sys.executable, "-c", code], env=stack.env, cwd=ROOT, capture_output=True, text=True
    )
    assert made.returncode == 0, made.stderr
    dep = made.stdout.split()[-1]
    try:
        match = {"flow_runs": {"deployment_id": {"any_": [dep]}, "state": {"type": {"any_": ["SCHEDULED"]}}}}
        counts: list[int] = []
        end = time.monotonic() + 60
        while time.monotonic() < end:
            counts.append(len(api(stack, "POST", "/flow_runs/filter", **match)))
            if counts[-1] and counts[-6:] == counts[-1:] * 6:  # scheduled, and unchanged for 3 s
                break
            time.sleep(0.5)
        assert counts[-1] == 2, counts
    finally:
        api(stack, "DELETE", f"/deployments/{dep}")


def test_a_retrain_due_during_a_retrain_is_cancelled_not_queued(stack, small_text):
    """The runner takes it at once and the server cancels it: it never waits in the runner's queue, which
    logs "N scheduled runs skipped (at capacity)" at every poll."""
    texts = stack.corpus("busy", small_text[:12000])
    # long enough (~10 s here) that the first is still running when the runner, polling every second, takes
    # the second: 600 steps (~2 s) lost that race once
    params = {"data_dir": str(texts)} | {k: int(v) for k, v in TINY.items()}
    params |= {"steps": 6000, "checkpoint_every": 2000}
    first = flow_run(
        stack, "char-rnn-pipeline/scheduled-retrain", params, lambda r: r["state_type"] == "RUNNING"
    )
    second = flow_run(
        stack, "char-rnn-pipeline/scheduled-retrain", params, lambda r: r["state_type"] != "SCHEDULED"
    )
    while second["state_type"] == "PENDING":  # a moment between the runner's proposal and the answer
        second = api(stack, "GET", f"/flow_runs/{second['id']}")
    assert (
        second["state_type"] == "CANCELLED"
        and second["state"]["message"] == "Deployment concurrency limit reached."
    )
    while (first := api(stack, "GET", f"/flow_runs/{first['id']}"))["state_type"] == "RUNNING":
        time.sleep(0.5)
    assert first["state_type"] == "COMPLETED", stack.explain_log()
    assert "skipped (at capacity)" not in stack.serve_log.read_text()


def test_follow_shows_the_pipeline_not_prefects_event_log(stack, small_text):
    texts = stack.corpus("follow", small_text[:6000])
    params = [f"--param={k}={v}" for k, v in (TINY | {"data_dir": texts}).items()]
    cmd = [sys.executable, "-m", "flows.follow", "char-rnn-pipeline/on-demand", *params]
    done = subprocess.run(cmd, env=stack.env, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout + done.stderr
    lines = done.stdout.splitlines()
    assert lines[0].startswith("  flow run '") and "/runs/flow-run/" in lines[0]
    said = [line.split()[0] for line in lines[1:]]
    trained = said.index("[" + "#" * 30 + "]")
    assert said[0] == "Corpus" and "Training" in said[:trained] and said[trained + 1] == "Candidate:"
    assert said[-1] in ("Promoted", "Kept") and lines[1 + trained].split("] ")[1].startswith("40/40 loss ")
    assert len(lines) < 12 and "prefect" not in done.stdout.lower() and not done.stderr, done.stdout

    bad = subprocess.run([*cmd, "--param=steps=0"], env=stack.env, cwd=ROOT, capture_output=True, text=True)
    assert bad.returncode == 1 and bad.stderr.startswith("python -m flows.follow: error: ")
    assert "refused the parameters" in bad.stderr and bad.stderr.count("\n") == 1


def test_invalid_parameter_is_refused_before_a_run(stack):
    done, _ = stack.run("char-rnn-pipeline/on-demand", steps=0)
    assert done.returncode != 0
    assert "steps" in done.stdout + done.stderr and "minimum of 1" in done.stdout + done.stderr


def test_killed_flow_resumes_from_its_last_checkpoint(stack, small_text):
    texts = stack.corpus("killed", small_text[:12000])
    root = stack.home / "killed-runs"
    code = (
        "import sys; from flows.pipeline import pipeline; "
        "d = pipeline(data_dir=sys.argv[1], steps=2000, hidden=32, batch=8, seq=32, checkpoint_every=100, "
        "artifacts_root=sys.argv[2]); print('RESULT', d.model_dump_json())"
    )
    cmd = [sys.executable, "-c", code, str(texts), str(root)]
    first = subprocess.Popen(
        cmd,
        env=stack.env,
        cwd=ROOT,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    try:
        deadline = time.monotonic() + 120
        while not list(root.glob("run-*/checkpoints/step-*")):
            assert first.poll() is None, "the first run ended before writing a checkpoint"
            assert time.monotonic() < deadline, "no checkpoint within 120 s"
            time.sleep(0.05)
        os.killpg(first.pid, signal.SIGKILL)
    finally:
        stop(first)
    assert first.wait() == -signal.SIGKILL
    assert not list(root.glob("run-*/metrics.json")), "killed too late: the run had finished"

    again = subprocess.run(cmd, env=stack.env, cwd=ROOT, capture_output=True, text=True, timeout=300)

    assert again.returncode == 0, again.stdout[-3000:] + again.stderr[-3000:]
    (metrics,) = root.glob("run-*/metrics.json")
    outcome = json.loads(metrics.read_text())
    assert outcome["resumed_from"] >= 100 and outcome["step"] == 2000
    assert "Training from its checkpoint at step" in again.stdout + again.stderr


def test_retrain_schedule_from_the_command_line_else_the_environment(monkeypatch):
    monkeypatch.delenv("CHAR_RNN_RETRAIN_CRON", raising=False)
    monkeypatch.delenv("CHAR_RNN_RETRAIN_INTERVAL", raising=False)
    assert serve.timing(None, None, settings.load()) == {"interval": timedelta(hours=1)}
    monkeypatch.setenv("CHAR_RNN_RETRAIN_INTERVAL", "600")
    assert serve.timing(None, None, settings.load()) == {"interval": timedelta(minutes=10)}
    monkeypatch.setenv("CHAR_RNN_RETRAIN_CRON", "0 3 * * *")
    assert serve.timing(None, None, settings.load()) == {"cron": "0 3 * * *"}
    assert serve.timing(30, None, settings.load()) == {"interval": timedelta(seconds=30)}


@pytest.mark.parametrize(
    "args,env,message",
    [
        (["--interval", "inf"], {}, "argument --interval: 'inf': expected a number of seconds"),
        (["--interval", "0"], {}, "argument --interval: '0': expected a number of seconds"),
        (["--limit", "0"], {}, "argument --limit: '0': expected a whole number >= 1"),
        (["--cron", "61 * * * *"], {}, "'61 * * * *' is not a valid cron expression"),
        ([], {"CHAR_RNN_RETRAIN_INTERVAL": "nan"}, "CHAR_RNN_RETRAIN_INTERVAL='nan': "),
        ([], {"CHAR_RNN_RETRAIN_CRON": "every day"}, "'every day' is not a valid cron expression"),
        ([], {"PREFECT_API_URL": "http://127.0.0.1:9/api"}, "no Prefect server answers at PREFECT_API_URL="),
        (["--param", "steps=0"], {}, "steps"),
    ],
)
def test_serve_refuses_bad_options_in_one_line(args, env, message):
    env = os.environ | {"PREFECT_API_URL": "http://127.0.0.1:9/api"} | env
    r = subprocess.run(
        [sys.executable, "-m", "flows.serve", *args],
        env=env,
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert r.returncode != 0
    assert r.stderr.count("\n") == 1 and r.stderr.startswith("python -m flows.serve: error: "), r.stderr
    assert message in r.stderr, r.stderr


def test_both_deployments_share_parameters_and_only_the_retrain_is_scheduled():
    on_demand, retrain, sweep = serve.deployments({"steps": 300, "hidden": 64}, cron="0 3 * * *")
    assert (on_demand.name, retrain.name, sweep.name) == ("on-demand", "scheduled-retrain", "on-demand")
    assert sweep.flow_name == "char-rnn-sweep" and sweep.parameters == {"steps": 300} and not sweep.schedules
    assert on_demand.parameters == {"steps": 300, "hidden": 64} and not on_demand.schedules
    assert retrain.parameters == {"steps": 300, "hidden": 64, "only_if_changed": True}
    assert retrain.schedules[0].schedule.cron == "0 3 * * *"
    assert on_demand.entrypoint == "flows.pipeline.pipeline"
    assert serve.param("lr=3e-3") == ("lr", 3e-3) and serve.param("data_dir=/srv/text") == (
        "data_dir",
        "/srv/text",
    )


def test_nothing_was_written_under_home(stack):
    """The server, `python -m flows.serve` and the deployment runs above kept their state out of ~."""
    assert sorted((stack.home / "user-home").rglob("*")) == []
