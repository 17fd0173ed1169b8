"""The sweep: its search space and rungs, a trial task, and the flow on real Dask clusters under a temporary
Prefect server: a LocalCluster of 2 worker processes, and a `dask scheduler` with two `dask worker` processes
(one of them SIGKILLed mid-trial). Everything started here is stopped by PID."""

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from uuid import UUID

import numpy as np
import pytest
from conftest import free_port, stop
from prefect.artifacts import Artifact
from prefect.exceptions import ParameterTypeError
from pydantic import TypeAdapter
from threadpoolctl import threadpool_limits

from flows.sweep import sweep
from model import checkpoint, files, train
from model.config import ModelConfig
from model.vocab import Vocab
from registry import Registry
from settings import isolated_env
from stages import sweeping as sp
from stages.data import encode, ingest
from stages.records import Encoded, Rung, Trial
from stages.sweeping import in_time
from stages.training import train_trial

ROOT = Path(__file__).resolve().parent.parent
TINY = {"hidden": [16], "batch": [4], "seq": [16]}


@pytest.fixture(autouse=True)
def home(tmp_path, monkeypatch) -> Path:
    home = tmp_path / "home"
    monkeypatch.setenv("CHAR_RNN_HOME", str(home))
    monkeypatch.setenv("BENTOML_HOME", str(home / "bentoml"))
    monkeypatch.setenv("CHAR_RNN_ALLOWED_ROOTS", str(tmp_path))
    return home


@pytest.fixture
def texts(tmp_path, small_text) -> Path:
    folder = tmp_path / "texts"
    folder.mkdir()
    (folder / "a.txt").write_text(small_text, encoding="utf-8")
    return folder


def space(**values) -> dict:
    return TypeAdapter(sp.Space).validate_python(values)


# --- the search space, the draws, the rungs ------------------------------------------------------------


@pytest.mark.parametrize(
    "bad,message",
    [
        ({"hiden": [64]}, "'hiden' is not a setting a sweep can vary (choose among cell, hidden, layers,"),
        ({"hidden": [64, 0]}, "hidden=0: Input should be greater than or equal to 1"),
        ({"steps": [10]}, "'steps' is not a setting a sweep can vary"),
        (
            {"optimizer": ["adam", "rmsprop"]},
            "optimizer='rmsprop': Input should be 'adam', 'adagrad' or 'sgd'",
        ),
        ({"dtype": {"low": 1, "high": 2}}, "dtype: a range needs a numeric setting"),
        ({"lr": {"low": 0.1, "high": 0.01}}, "lr: a range needs low <= high"),
        ({"lr": {"low": 0, "high": 0.01, "log": True}}, "lr=0.0: Input should be greater than 0"),
        ({"layers": []}, "layers: give at least one value"),
        ({"hidden": ["64"]}, "hidden='64': Input should be a valid integer"),
    ],
)
def test_the_space_is_checked_against_the_configs_fields(bad, message):
    with pytest.raises(ValueError, match="validation error") as e:
        space(**bad)
    assert message in str(e.value)


def test_any_config_field_can_be_searched_and_builds_the_configs():
    """Keys are ModelConfig/TrainConfig fields: a Literal field (as `cell` will be) takes its choices."""
    s = space(dtype=["float64"], optimizer=["sgd", "adagrad"], hidden=[8], lr={"low": 1e-3, "high": 1e-2})
    (a, b) = sp.draw(s, 2, seed=3)
    model, config = sp.configs(a, vocab_size=5, steps=50, seed=3)
    assert model == ModelConfig(vocab_size=5, hidden=8, dtype="float64")
    assert config.optimizer == a["optimizer"] and config.steps == 50 and 1e-3 <= config.lr <= 1e-2
    assert a != b


def test_draws_are_reproducible_and_a_grid_is_drawn_without_repeats():
    s = space(hidden=[16, 32], layers=[1, 2], dropout=[0.0, 0.1])
    assert sp.draw(s, 8, seed=1) == sp.draw(s, 8, seed=1) != sp.draw(s, 8, seed=2)
    assert len({json.dumps(d, sort_keys=True) for d in sp.draw(s, 8, seed=1)}) == 8
    with pytest.raises(ValueError, match="the space holds 8 configuration"):
        sp.draw(s, 9, seed=1)
    lrs = [d["lr"] for d in sp.draw(space(lr={"low": 1e-4, "high": 1e-1, "log": True}), 40, seed=0)]
    assert min(lrs) >= 1e-4 and max(lrs) <= 1e-1 and sum(x < 1e-2 for x in lrs) > 20  # log-uniform
    ints = [d["hidden"] for d in sp.draw(space(hidden={"low": 8, "high": 64}), 10, seed=0)]
    assert all(isinstance(h, int) and 8 <= h <= 64 for h in ints)


def test_each_rung_doubles_the_one_before_and_the_last_is_the_budget():
    assert sp.rungs(8, 1600) == [200, 400, 800, 1600]
    assert sp.rungs(5, 100) == [25, 50, 100]  # 5 -> 2 -> 1
    assert sp.rungs(1, 100) == [100] and sp.rungs(8, 100, halving=False) == [100]
    with pytest.raises(ValueError, match="use steps >= 8"):
        sp.rungs(8, 5)


def test_the_time_budget_stops_a_trial_whose_next_rung_would_not_fit():
    done = [Rung(rung=0, step=100, val=2.0, seconds=20, chars_per_s=1, worker="w", resumed_from=0)]
    assert in_time(done, 200, minutes=1) and not in_time(done, 400, minutes=1)  # 40 s and 80 s in all
    done.append(done[0].model_copy(update={"rung": 1, "step": 200, "seconds": 30}))  # slower: 50 s for 200
    assert not in_time(done, 400, minutes=1.5) and in_time(done, 400, minutes=1.7)


# --- one trial, without Dask -------------------------------------------------------------------------


@pytest.fixture
def encoded(texts, tmp_path) -> Encoded:
    return encode(ingest(texts), tmp_path / "data")


def trial(encoded: Encoded, folder: Path, **drawn) -> Trial:
    model, config = sp.configs(drawn, len(encoded.vocab), steps=60, seed=0, checkpoint_every=20)
    return Trial(index=0, dir=folder, drawn=drawn, model=model, config=config)


def test_a_diverging_trial_is_a_failed_rung_not_an_error(encoded, tmp_path):
    wild = trial(encoded, tmp_path / "wild", hidden=16, batch=4, seq=16, optimizer="sgd", lr=9.0, clip=0.0)
    r = train_trial(encoded, wild, 0, 30)
    assert r.failed and "loss" in r.failed and r.val is None and r.worker == "local"


def test_the_same_trial_asked_twice_at_once_waits_its_turn(encoded, tmp_path):
    """The same sweep run twice at once (a CLI sweep and the deployment's): a trial whose folder another run
    owns waits, saying whom for, then reads back or trains its rung. Ordered by events: the lock is held until
    the trial has said it waits."""
    t = trial(encoded, tmp_path / "t", hidden=16, batch=4, seq=16)
    heard, got = [], []
    with files.owned(t.dir / "checkpoints", "training trial 0"):  # the other run
        waiter = threading.Thread(
            target=lambda: got.append(train_trial(encoded, t, 0, 30, waiting=heard.append))
        )
        waiter.start()
        deadline = time.monotonic() + 60
        while not heard:
            assert time.monotonic() < deadline and waiter.is_alive(), "the trial did not wait"
            time.sleep(0.01)
        assert not got and f"process {os.getpid()} on " in heard[0] and "training trial 0" in heard[0]
    waiter.join(timeout=120)
    assert got[0].step == 30 and got[0].failed is None
    assert train_trial(encoded, t, 0, 30, waiting=heard.append) == got[0]  # read back, not trained again


def test_a_finished_rung_is_read_back_and_a_trial_resumes_to_the_next(encoded, tmp_path):
    t = trial(encoded, tmp_path / "t", hidden=16, batch=4, seq=16)
    first = train_trial(encoded, t, 0, 30)
    assert train_trial(encoded, t, 0, 30) == first  # not trained again (same wall seconds)
    second = train_trial(encoded, t, 1, 60)
    assert (first.step, second.step, second.resumed_from) == (30, 60, 30) and second.val < first.val
    assert t.rungs() == [first, second]
    assert same_weights(
        checkpoint.load(t.dir / "checkpoints").params, uninterrupted(encoded, t, tmp_path / "u")
    )


def same_weights(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a)


def uninterrupted(data: Encoded, t: Trial, out: Path, stop: int | None = None) -> dict:
    """The weights of `t` trained in one go, on one BLAS thread as on the workers (2 threads sum in
    another order)."""
    with threadpool_limits(1):
        vocab = Vocab(tuple(data.vocab))
        return train.train(
            data.load("train"), data.load("val"), vocab, t.model, t.config, out, stop=stop
        ).params


# --- the flow on a LocalCluster ------------------------------------------------------------------------


def test_sweep_on_a_local_cluster_halves_records_and_promotes(prefect_api, texts, home):
    """4 trials on 2 worker processes: one diverges, halving leaves one that trains the whole budget."""
    grid = TINY | {"lr": [0.003, 0.01, 0.02, 9.0], "clip": [0.0]}
    o = sweep(data_dir=texts, space=grid, trials=4, steps=80, checkpoint_every=20, local_workers=2)

    assert o.plan == [20, 40, 80] and len(o.trials) == 4
    by_lr = {t.drawn["lr"]: t for t in o.trials}
    assert by_lr[9.0].status.startswith("failed in rung 0: loss")
    assert sorted(t.status for t in o.trials) == [
        "failed in rung 0: " + by_lr[9.0].status.split(": ", 1)[1],
        "stopped after rung 0",
        "stopped after rung 1",
        "winner",
    ]
    w = next(t for t in o.trials if t.status == "winner")
    assert o.winner == w.index and [r.step for r in w.rungs] == [20, 40, 80]
    assert [r.resumed_from for r in w.rungs] == [0, 20, 40] and [s for s, _ in w.history] == [20, 40, 60, 80]
    assert len({r.worker for t in o.trials for r in t.rungs}) == 2  # both workers trained
    assert o.decision.promoted and Registry(home / "bentoml").current().tag == o.decision.tag
    assert o.dir.parent == home / "sweeps" and (o.dir / "curves.png").read_bytes().startswith(b"\x89PNG")
    rows = json.loads((o.dir / "trials.json").read_text())["trials"]
    assert [r["status"] for r in rows] == [t.status for t in o.trials]
    for key in ("char-rnn-sweep-trials", "char-rnn-sweep-curves", "char-rnn-sweep-report"):
        assert Artifact.get(key).flow_run_id == UUID(o.flow_run_id), key
    assert f"**Winner: trial {w.index}**" in (o.dir / "report.md").read_text()
    table = Artifact.get("char-rnn-sweep-trials").data
    assert "val bits/char" in table and "stopped after rung 1" in table

    again = sweep(data_dir=texts, space=grid, trials=4, steps=80, checkpoint_every=20, local_workers=2)

    assert again.dir == o.dir and again.trials == o.trials  # every rung read back, none trained again
    assert not again.decision.promoted and "does not beat" in again.decision.reason


def test_bad_parameters_fail_before_any_work(prefect_api, texts, home, monkeypatch):
    with pytest.raises(ParameterTypeError, match="hiden"):
        sweep(data_dir=texts, space={"hiden": [8]})
    with pytest.raises(ValueError, match="use steps >= 4"):
        sweep(data_dir=texts, space=TINY | {"lr": [1e-3, 2e-3, 3e-3, 4e-3]}, trials=4, steps=3)
    dead = f"tcp://127.0.0.1:{free_port()}"
    monkeypatch.setenv("CHAR_RNN_DASK_SCHEDULERS", dead)  # listed where flows run, but nothing listens
    with pytest.raises(ValueError, match=r"^no Dask scheduler answers at dask_address=tcp://127.0.0.1:\d+ "):
        sweep(data_dir=texts, space=TINY, trials=1, dask_address=dead)
    assert not (home / "sweeps").exists()


# --- the multi-machine shape: dask scheduler + dask worker processes, one killed mid-trial --------------


def wait_for_workers(address: str, n: int, log: Path) -> None:
    from distributed import Client

    with Client(address, timeout=60, set_as_default=False) as c:
        try:
            c.wait_for_workers(n, timeout=120)
        except TimeoutError:
            pytest.fail(f"{n} Dask workers did not join {address}:\n{log.read_text()[-5000:]}")


@pytest.fixture
def dask_cluster(tmp_path):
    """`dask scheduler` and two `dask worker --nthreads 1` processes on 127.0.0.1, with an empty HOME."""
    port, scratch, user = free_port(), tmp_path / "dask", tmp_path / "user-home"
    user.mkdir()
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PREFECT_", "CHAR_RNN_"))}
    env |= isolated_env(tmp_path / "workers-home") | {"HOME": str(user), "OPENBLAS_NUM_THREADS": "1"}
    env["DASK_TEMPORARY_DIRECTORY"] = str(scratch)  # the scheduler's scratch space (it has no option)
    dask = str(Path(sys.executable).parent / "dask")
    address, log = f"tcp://127.0.0.1:{port}", tmp_path / "dask.log"
    scheduler = [dask, "scheduler", "--host", "127.0.0.1", "--port", str(port), "--no-dashboard"]
    worker = [dask, "worker", address, "--nthreads", "1", "--host", "127.0.0.1", "--no-dashboard"]
    worker += ["--local-directory", str(scratch)]
    procs: list[subprocess.Popen] = []
    try:
        with open(log, "w") as out:
            for cmd in (scheduler, worker, worker):
                procs.append(
                    subprocess.Popen(
                        cmd,
                        env=env,
                        cwd=ROOT,
                        stdout=out,
                        stderr=subprocess.STDOUT,
                        start_new_session=True,
                    )
                )
        wait_for_workers(address, 2, log)
        yield address, procs[1:], user, log
    finally:
        for p in reversed(procs):
            stop(p)


def kill_a_worker_mid_trial(home: Path, workers: list[subprocess.Popen], seconds: float = 300) -> dict:
    """SIGKILL the `dask worker` (its process group) training a trial that has a checkpoint but has not
    finished its first rung; the trial's folder and the step of its newest checkpoint then."""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        for folder in home.glob("sweeps/sweep-*/trial-*"):
            steps = checkpoint.step_dirs(folder / "checkpoints")
            if (folder / "rungs.json").exists() or not steps or not (folder / "worker.json").exists():
                continue
            pid = json.loads((folder / "worker.json").read_text())["pid"]
            (victim,) = [w for w in workers if w.poll() is None and os.getpgid(pid) == w.pid]
            os.killpg(victim.pid, signal.SIGKILL)
            victim.wait(30)
            return {"trial": folder, "step": int(steps[0].name[5:])}
        time.sleep(0.01)
    raise AssertionError("no trial was caught between its first checkpoint and the end of its first rung")


def test_sweep_on_dask_worker_processes_survives_a_killed_worker(
    prefect_api, texts, home, dask_cluster, monkeypatch
):
    address, workers, user, log = dask_cluster
    monkeypatch.setenv("CHAR_RNN_DASK_SCHEDULERS", address)  # the scheduler named where flows run
    grid = {"hidden": [64], "batch": [8], "seq": [32], "lr": [0.003, 0.006]}
    killed: dict = {}
    killer = threading.Thread(target=lambda: killed.update(kill_a_worker_mid_trial(home, workers)))
    killer.start()
    try:
        o = sweep(data_dir=texts, space=grid, trials=2, steps=400, checkpoint_every=20, dask_address=address)
    finally:
        killer.join()

    assert killed, f"no worker was killed:\n{log.read_text()[-3000:]}"
    assert sorted(t.status for t in o.trials) == ["stopped after rung 0", "winner"]
    hit = next(t for t in o.trials if t.name == killed["trial"].name)
    survivor = next(w for w in workers if w.poll() is None)
    assert 20 <= hit.rungs[0].resumed_from == killed["step"] < 200  # resumed from its last checkpoint
    assert len({r.worker for t in o.trials for r in t.rungs}) == 1  # the survivor finished every rung
    assert o.decision.promoted and Registry(home / "bentoml").current().tag == o.decision.tag
    data = Encoded.model_validate_json(next((home / "sweeps").glob("data-*/manifest.json")).read_bytes())
    t = Trial.model_validate_json((killed["trial"] / "trial.json").read_bytes())
    whole = uninterrupted(data, t, home / "uninterrupted", stop=hit.last.step)
    assert same_weights(checkpoint.load(t.dir / "checkpoints").params, whole)
    assert survivor.poll() is None and sorted(user.rglob("*")) == []  # nothing under the workers' HOME


# --- the command line ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "args,message",
    [
        (["--space", "{hidden: 1}"], "char-rnn: error: --space is not JSON"),
        (["--trials", "8", "--steps", "4"], "use steps >= 8"),
        (
            ["--dask-address", "tcp://127.0.0.1:9"],
            "no Dask scheduler answers at dask_address=tcp://127.0.0.1:9",
        ),
    ],
)
def test_cli_refuses_bad_parameters_in_one_line_before_any_work(tmp_path, texts, args, message):
    env = os.environ | isolated_env(tmp_path / "cli-home")
    r = subprocess.run(
        ["char-rnn", "sweep", "--data", str(texts), *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert r.returncode == 1 and r.stderr.count("\n") == 1 and message in r.stderr, r.stderr
    assert not (tmp_path / "cli-home" / "sweeps").exists()
