"""End to end on a real Prefect server (`prefect server start`): prefect.yaml's deployments shipped both ways,
`prefect deploy` to a process work pool with a real worker and `python -m flows.serve`; their runs, the
automation that reports a failed scheduled retrain to a webhook, and no pickle left by a failed run.

Everything started here is stopped by PID in its fixture's teardown. Tests wait for states, files and
requests, never for a fixed time.
"""

import base64
import json
import os
import queue
import re
import signal
import subprocess
import sys
import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import timedelta
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import httpx
import pytest
import yaml
from conftest import free_port, stop

import settings
from flows import automations, serve
from settings import isolated_env

ROOT = Path(__file__).resolve().parent.parent
TINY = {"steps": "40", "hidden": "16", "batch": "4", "seq": "16", "checkpoint_every": "20"}
# What `make run` gives its server besides the port: its screen shows a stage within a second (events are
# written every second), and the UI two future runs per schedule, not an hour's worth.
SERVER = {"PREFECT_SERVER_SERVICES_EVENT_PERSISTER_FLUSH_INTERVAL": "1"}
SERVER |= {"PREFECT_SERVER_SERVICES_SCHEDULER_MAX_RUNS": "2"}
DEPLOYMENTS = (
    "char-rnn-pipeline/on-demand",
    "char-rnn-pipeline/scheduled-retrain",
    "char-rnn-sweep/on-demand",
)


@dataclass
class Stack:
    home: Path
    env: dict[str, str]
    url: str
    serve_log: Path  # the runner's, or the worker's (its flow runs' output included)

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
        return f"log:\n{self.serve_log.read_text()[-5000:]}"


def started(cmd: list[str], env: dict[str, str], log: Path, cwd: Path = ROOT) -> subprocess.Popen:
    """`cmd` in a session of its own (so that `stop` ends it and its children), its output in `log`."""
    with open(log, "w") as out:
        return subprocess.Popen(
            cmd, env=env, cwd=cwd, stdout=out, stderr=subprocess.STDOUT, start_new_session=True
        )


def wait_for(check, what: str, proc: subprocess.Popen, log: Path, timeout: float = 180) -> None:
    """Until `check()` holds; fails at once if `proc` exits, else after `timeout` (a busy machine)."""
    end = time.monotonic() + timeout
    while not check():
        assert proc.poll() is None, f"{what}: the process exited:\n{log.read_text()[-5000:]}"
        assert time.monotonic() < end, f"{what}: not within {timeout} s:\n{log.read_text()[-5000:]}"
        time.sleep(0.2)


def answers(url: str) -> bool:
    try:
        return httpx.get(url, timeout=2, trust_env=False).status_code == 200
    except httpx.HTTPError:
        return False


@contextmanager
def prefect_server(home: Path, env: dict[str, str]):
    """`prefect server start` on env's PREFECT_SERVER_API_PORT (127.0.0.1, Prefect's default), until the
    block ends; its log in `home`."""
    log = home / "server.log"
    proc = started([sys.executable, "-m", "prefect", "server", "start"], env | SERVER, log)
    try:
        wait_for(lambda: answers(env["PREFECT_API_URL"] + "/health"), "prefect server", proc, log, 300)
        yield
    finally:
        stop(proc)


class Listener:
    """A webhook on loopback: each request's body, in order of arrival."""

    def __init__(self):
        self.got: queue.Queue[str] = queue.Queue()
        got = self.got

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):
                got.put(self.rfile.read(int(self.headers.get("content-length", 0))).decode())
                self.send_response(204)
                self.end_headers()

            def log_message(self, *args):  # quiet
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_port}/hook"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def next(self, timeout: float = 240) -> str:
        """The next request's body, as soon as it arrives."""
        try:
            return self.got.get(timeout=timeout)
        except queue.Empty:
            raise AssertionError(f"no request reached {self.url} within {timeout} s") from None


@pytest.fixture(scope="module")
def listener():
    hook = Listener()
    yield hook
    hook.server.shutdown()


PICKLE = re.compile(rb"\x80[\x02-\x05]")  # the opcode that starts a pickle of protocol 2 to 5


def pickled(data: bytes) -> bool:
    """Whether `data` holds a pickle: raw at its start, or base64-encoded anywhere in a text file (how Prefect
    keeps one in a result record), or a record whose serializer is pickle. It is never unpickled."""
    if PICKLE.match(data) or b'"pickle"' in data or b"cloudpickle" in data:
        return True
    try:
        text = data.decode()
    except UnicodeDecodeError:
        return False
    return any(PICKLE.match(base64.b64decode(t[:4])) for t in re.findall(r"[A-Za-z0-9+/]{4,}", text))


def test_the_pickle_check_finds_pickles_raw_and_base64_inside_json():
    import pickle

    blob = pickle.dumps(ValueError("x"), protocol=5)
    assert pickled(blob) and pickled(json.dumps({"result": base64.b64encode(blob).decode()}).encode())
    assert not pickled(b'{"__exc_type__": "builtins.ValueError", "message": "too few for batch"}')


def no_pickles(home: Path) -> None:
    """Nothing under `home` is a pickle, and Prefect stored something there (else this checks nothing)."""
    written = [f for f in home.rglob("*") if f.is_file()]
    assert any("storage" in f.parts for f in written), "Prefect stored nothing: the check checks nothing"
    assert [f for f in written if pickled(f.read_bytes())] == []


def fails_and_notifies(stack: Stack, listener: Listener) -> None:
    """A scheduled retrain on a corpus too small for the batch: Failed, reported to the webhook, no pickle."""
    texts = stack.corpus(f"tiny-{time.monotonic_ns()}", "abc\n" * 5)
    run = flow_run(stack, DEPLOYMENTS[1], {"data_dir": str(texts)}, lambda r: r["state_type"] in ENDED)
    assert run["state_type"] == "FAILED", run["state"]
    said = json.loads(listener.next())["text"]
    assert f"scheduled retrain {run['name']} ended Failed" in said and "too few for batch" in said, said
    assert "char-rnn-pipeline/scheduled-retrain" in said and f"/runs/flow-run/{run['id']}" in said, said
    no_pickles(stack.home)


def user_env(home: Path, port: int) -> dict[str, str]:
    """A shell with only Prefect's variables (their home under `home`) and CHAR_RNN_HOME: the pull step has
    to give the worker's flow runs the project's other homes. HOME is empty and must stay so."""
    (home / "user-home").mkdir()
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PREFECT_", "CHAR_RNN_", "BENTOML_"))}
    env = {k: v for k, v in env.items() if k not in ("MPLCONFIGDIR", "UV_CACHE_DIR")}
    env |= {
        "HOME": str(home / "user-home"),
        "CHAR_RNN_HOME": str(home),
        "PREFECT_HOME": str(home / "prefect"),
    }
    env |= {"PREFECT_SERVER_API_PORT": str(port), "PREFECT_API_URL": f"http://127.0.0.1:{port}/api"}
    return env | settings.TELEMETRY_OFF | {"OPENBLAS_NUM_THREADS": "1"}


def python(env: dict[str, str], *args: str) -> str:
    """`python ARGS` from the checkout, which must succeed; its output."""
    done = subprocess.run([sys.executable, *args], env=env, cwd=ROOT, capture_output=True, text=True)
    assert done.returncode == 0, f"{' '.join(args)}:\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}"
    return done.stdout


@pytest.fixture(scope="class")
def pool(tmp_path_factory) -> Stack:
    """docs/pipeline.md's path: `prefect work-pool create`, `prefect deploy --all`, `prefect worker start`, on
    a server of its own (flows.serve's deployments below have the same names), stopped after its class."""
    home = tmp_path_factory.mktemp("work-pool")
    env = user_env(home, free_port())
    with prefect_server(home, env):
        python(env, "-m", "prefect", "work-pool", "create", "char-rnn", "--type", "process")
        python(env, "-m", "prefect", "--no-prompt", "deploy", "--all")
        log = home / "worker.log"
        cmd = [sys.executable, "-m", "prefect", "worker", "start", "--pool", "char-rnn"]
        worker = started(cmd, env | {"PREFECT_WORKER_QUERY_SECONDS": "1"}, log, home)
        try:
            yield Stack(home, env, env["PREFECT_API_URL"], log)
        finally:
            stop(worker)


class TestPrefectDeployToAWorkPool:
    def test_prefect_deploy_made_what_prefect_yaml_says_and_flows_serve_serves_the_same(self, pool):
        specs = yaml.safe_load((ROOT / "prefect.yaml").read_text())["deployments"]
        served = serve.deployments({})
        assert len(specs) == len(served) == len(DEPLOYMENTS)
        for name, spec, runner in zip(DEPLOYMENTS, specs, served, strict=True):
            made = api(pool, "GET", f"/deployments/name/{name}")
            assert made["entrypoint"] == spec["entrypoint"] == runner.entrypoint, name
            assert made["parameters"] == spec["parameters"] == runner.parameters, name
            assert made["tags"] == spec["tags"] == runner.tags and made["work_pool_name"] == "char-rnn", name
            assert made["global_concurrency_limit"]["limit"] == 1 == runner.concurrency_limit, name
            assert made["pull_steps"][0] == {
                "prefect.deployments.steps.set_working_directory": {"directory": str(ROOT)}
            }
            strategy = (made["concurrency_options"] or {}).get("collision_strategy")
            runner_strategy = runner.concurrency_options and runner.concurrency_options.collision_strategy
            assert strategy == (runner_strategy and runner_strategy.value), name
            assert [s["schedule"].get("interval") for s in made["schedules"]] == [
                s.schedule.interval.total_seconds() for s in runner.schedules
            ]
        retrain = api(pool, "GET", f"/deployments/name/{DEPLOYMENTS[1]}")
        assert retrain["concurrency_options"]["collision_strategy"] == "CANCEL_NEW"
        assert (
            retrain["parameters"] == {"only_if_changed": True}
            and retrain["schedules"][0]["schedule"]["interval"] == 3600
        )
        (auto,) = api(pool, "POST", "/automations/filter")  # made by prefect.yaml's build step
        assert auto["name"] == automations.NAME and auto["actions"] == [{"type": "do-nothing"}]

    def test_each_deployment_completes_through_a_process_worker(self, pool, small_text):
        texts = pool.corpus("each", small_text[:8000])
        tiny = {k: int(v) for k, v in TINY.items()} | {"data_dir": str(texts)}
        grid = {"hidden": [16], "batch": [4], "seq": [16], "lr": [0.003, 0.01]}
        sweep = {"data_dir": str(texts), "space": grid, "trials": 2, "steps": 40, "checkpoint_every": 20}
        params = (tiny, tiny, sweep | {"local_workers": 2})
        ids = {}
        for name, p in zip(DEPLOYMENTS, params, strict=True):  # all three at once, on the one worker
            dep = api(pool, "GET", f"/deployments/name/{name}")
            ids[name] = api(pool, "POST", f"/deployments/{dep['id']}/create_flow_run", parameters=p)["id"]
        for name, run_id in ids.items():
            run = wait_run(pool, run_id, lambda r: r["state_type"] in ENDED, 600)
            assert run["state_type"] == "COMPLETED", f"{name}: {run['state']}\n{pool.explain_log()}"
        assert pool.promoted()
        # the worker had no BENTOML_HOME: its runs used CHAR_RNN_HOME/bentoml (the pull step), not ~/bentoml
        assert sorted((pool.home / "user-home").rglob("*")) == []

    def test_a_failed_scheduled_retrain_notifies_the_webhook_and_leaves_no_pickle(self, pool, listener):
        python(pool.env, "-m", "flows.automations", "--notify", listener.url)
        (auto,) = api(pool, "POST", "/automations/filter")
        assert [a["type"] for a in auto["actions"]] == ["send-notification"]
        fails_and_notifies(pool, listener)
        assert sorted((pool.home / "user-home").rglob("*")) == []


RETRY = {429, 502, 503}  # what Prefect's own client retries: a busy server's "database is locked" is a 503
ENDED = ("COMPLETED", "FAILED", "CRASHED", "CANCELLED")


def api(stack: Stack, method: str, path: str, **body: object) -> object:
    """A call to the stack's Prefect REST API, retried as Prefect's client does; the decoded answer."""
    for wait in (0.5, 1, 2, 4, 8, 0):
        r = httpx.request(method, f"{stack.url}{path}", json=body or None, timeout=30, trust_env=False)
        if r.status_code not in RETRY or not wait:
            break
        time.sleep(wait)
    r.raise_for_status()
    return r.json() if r.content else None


def wait_run(stack: Stack, run_id: str, until, timeout: float = 300) -> dict:
    """Flow run `run_id` once `until(run)` is true."""
    end = time.monotonic() + timeout
    while not until(run := api(stack, "GET", f"/flow_runs/{run_id}")):
        assert time.monotonic() < end, f"{run['name']} stayed {run['state']['name']}:\n{stack.explain_log()}"
        time.sleep(0.5)
    return run


def flow_run(stack: Stack, deployment: str, params: dict, until, timeout: float = 300) -> dict:
    """Start a run of `deployment` through the API; its state once `until(run)` is true."""
    dep = api(stack, "GET", f"/deployments/name/{deployment}")
    run = api(stack, "POST", f"/deployments/{dep['id']}/create_flow_run", parameters=params)
    return wait_run(stack, run["id"], until, timeout)


@pytest.fixture(scope="module")
def stack(tmp_path_factory, listener) -> Stack:
    """A server and `python -m flows.serve --notify <the listener>`, with the project's environment."""
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
    }
    log = home / "serve.log"
    with prefect_server(home, env):
        cmd = [sys.executable, "-m", "flows.serve", "--cron", "0 0 1 1 *", "--notify", listener.url]
        runner = started(cmd, env, log)
        try:
            for name in DEPLOYMENTS:
                wait_for(lambda n=name: answers(f"{url}/deployments/name/{n}"), name, runner, log, 90)
            yield Stack(home, env, url, log)
        finally:
            stop(runner)


def test_a_failed_retrain_through_flows_serve_notifies_the_webhook_and_leaves_no_pickle(stack, listener):
    (auto,) = api(stack, "POST", "/automations/filter")  # flows.serve made it, with --notify's target
    assert auto["name"] == automations.NAME and [a["type"] for a in auto["actions"]] == ["send-notification"]
    fails_and_notifies(stack, listener)


def running_flow(run_id: str) -> int | None:
    """The process that runs flow run `run_id` (the runner gives it PREFECT__FLOW_RUN_ID), if it is up."""
    mark = f"PREFECT__FLOW_RUN_ID={run_id}".encode()
    for environ in Path("/proc").glob("[0-9]*/environ"):
        try:
            if mark in environ.read_bytes().split(b"\0"):
                return int(environ.parent.name)
        except OSError:
            continue
    return None


def test_a_crashed_scheduled_retrain_notifies_the_webhook(stack, listener, small_text):
    """The retrain killed outright while it runs: the runner reports it Crashed, and the automation fires."""
    texts = stack.corpus("crashed", small_text[:12000])
    params = {"data_dir": str(texts), "steps": 20000, "hidden": 32, "batch": 8, "seq": 32}
    run = flow_run(stack, DEPLOYMENTS[1], params, lambda r: r["state_type"] == "RUNNING")
    wait_run(stack, run["id"], lambda r: running_flow(run["id"]) is not None, 60)
    os.kill(running_flow(run["id"]), signal.SIGKILL)
    run = wait_run(stack, run["id"], lambda r: r["state_type"] in ENDED)
    assert run["state_type"] == "CRASHED", run["state"]
    said = json.loads(listener.next())["text"]
    assert f"scheduled retrain {run['name']} ended Crashed" in said, said


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


def test_the_ui_calls_the_api_on_the_port_the_server_moved_to(stack):
    """PREFECT_SERVER_API_PORT (Prefect's own setting) moves the API and the address the UI calls."""
    ui = stack.url.removesuffix("/api")
    assert httpx.get(f"{ui}/ui-settings", trust_env=False).json()["api_url"] == stack.url


def test_a_schedule_gets_two_future_runs_not_an_hours_worth(stack):
    """Prefect's scheduler creates an hour's worth of runs at least (60 for a 60 s interval) unless told
    (PREFECT_SERVER_SERVICES_SCHEDULER_MAX_RUNS, which `make run` sets as SERVER here does)."""
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
    assert serve.timing(None, None, settings.load()) == {}  # prefect.yaml's: hourly
    assert serve.deployments({})[1].schedules[0].schedule.interval == timedelta(hours=1)
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
        (["--notify", "ops team"], {}, "argument --notify: 'ops team': expected an http(s):// URL or BLOCK"),
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
