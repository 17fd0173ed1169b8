"""The `char-rnn-sweep` flow: ingest and encode once, train many configurations on a Dask cluster with
successive halving, then offer the best to the pipeline's promotion gate.

Every trial trains on Dask (prefect-dask's DaskTaskRunner) into its own folder under CHAR_RNN_HOME/sweeps/,
named by its configuration, so a re-run of the same sweep resumes it. A trial's learning-rate schedule spans
the whole budget (`steps`) from the start, and each rung only stops it early: a survivor continued from its
checkpoint is bitwise the trial that was never stopped. The rules (space, rungs, who survives, how each trial
ended) are `stages.sweeping`'s; this module fans the work out and reports it.
"""

from __future__ import annotations

import base64
import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Annotated

import dask
from prefect import flow, get_run_logger, task
from prefect.artifacts import (
    create_image_artifact,
    create_link_artifact,
    create_markdown_artifact,
    create_table_artifact,
)
from prefect.futures import as_completed
from prefect_dask import DaskTaskRunner
from pydantic import Field

import settings
from flows import tasks
from flows.events import announce
from flows.params import DaskAddress, DataDir, reachable
from flows.tasks import NO_PICKLE, compare, current_model, encode, evaluate, ingest, preflight
from model import checkpoint
from model.config import TrainConfig as T
from model.config import like
from stages import publishing, report, sweeping, training
from stages.records import CurrentModel, Decision, Encoded, Rung, Score, SweepOutcome, Trained, Trial
from stages.sweeping import DEFAULTS, Space

Count = Annotated[int, Field(ge=1, le=256)]
Minutes = Annotated[float, Field(gt=0, le=7 * 24 * 60, allow_inf_nan=False)]


def worker_address() -> str:
    """The address of the Dask worker running this task ("local" outside Dask)."""
    from distributed import get_worker  # imported here: only sweep trials run on Dask

    try:
        return get_worker().address
    except ValueError:
        return "local"


@task(**NO_PICKLE)
def train_trial(data: Encoded, trial: Trial, rung: int, stop: int) -> Rung:
    """Train `trial` to step `stop` on the Dask worker that runs this task (see stages.training); the same
    sweep run twice at once takes turns on a trial's folder."""
    return training.train_trial(data, trial, rung, stop, worker_address(), get_run_logger().info)


def security(address: str) -> dict:
    """Dask's client settings for the scheduler at `address`: for a tls:// one, TLS with the certificate files
    the settings name (CHAR_RNN_DASK_TLS_CA, _CERT, _KEY), encryption required."""
    if not address.startswith("tls://"):
        return {}
    s = settings.current()
    files = {"ca": s.dask_tls_ca, "cert": s.dask_tls_cert, "key": s.dask_tls_key}
    if missing := [f"CHAR_RNN_DASK_TLS_{k.upper()}" for k, v in files.items() if v is None]:
        raise ValueError(f"{address} is a TLS scheduler: set {', '.join(missing)} where flows run")
    from distributed.security import Security  # imported here: only sweeps on a cluster need it

    return {
        "security": Security(
            tls_ca_file=str(files["ca"]),
            tls_client_cert=str(files["cert"]),
            tls_client_key=str(files["key"]),
            require_encryption=True,
        )
    }


def cluster(address: str | None, workers: int | None, scratch: Path, client: dict) -> DaskTaskRunner:
    """The task runner for the trials: the scheduler at `address` (over TLS with the settings' certificates
    for a tls:// address), else a LocalCluster of one single-threaded worker process per core (its nannies
    pin BLAS to one thread), with Dask's files under `scratch`."""
    if address:
        return DaskTaskRunner(address=address, client_kwargs=client)
    cores = len(os.sched_getaffinity(0))
    kw = {"n_workers": workers or cores, "threads_per_worker": 1, "processes": True}
    return DaskTaskRunner(cluster_kwargs=kw | {"local_directory": str(scratch), "dashboard_address": None})


def halve(
    runner: DaskTaskRunner,
    data: Encoded,
    trials: list[Trial],
    plan: list[int],
    minutes: float | None,
    say: Callable[[Trial, Rung], None],
) -> tuple[dict[int, list[Rung]], set[int]]:
    """Successive halving: every trial trains to the first rung's step, the better half (by validation loss)
    continue to the next, and so on. Each trial's rungs, and the trials the time budget stopped."""
    results: dict[int, list[Rung]] = {t.index: [] for t in trials}
    alive, out_of_time = trials, set()
    for k, stop in enumerate(plan):
        futures = {
            runner.submit(train_trial, {"data": data, "trial": t, "rung": k, "stop": stop}): t for t in alive
        }
        for f in as_completed(list(futures)):
            t, r = futures[f], f.result()
            results[t.index].append(r)
            say(t, r)
        if k + 1 == len(plan):
            break
        alive, stopped = sweeping.survivors(alive, results, plan[k + 1], minutes)
        out_of_time |= stopped
        if not alive:
            break
    return results, out_of_time


def publish(o: SweepOutcome) -> None:
    """Write trials.json, curves.png and report.md in the sweep's folder; publish them as artifacts."""
    text, png = publishing.write_sweep(o)
    create_table_artifact(
        report.sweep_table(o), key="char-rnn-sweep-trials", description=f"Trials of {o.sweep_id}"
    )
    create_image_artifact(
        "data:image/png;base64," + base64.b64encode(png).decode(),
        key="char-rnn-sweep-curves",
        description="Validation loss of every trial (nats/char)",
    )
    create_markdown_artifact(text, key="char-rnn-sweep-report", description=o.decision.reason)
    create_link_artifact(
        o.dir.as_uri(), link_text=f"{o.dir} (trials.json, curves.png, report.md)", key="char-rnn-sweep-files"
    )


def run_trials(
    group: list[Trial], data: Encoded, plan: list[int], minutes: float | None, where: tuple
) -> tuple[dict[int, list[Rung]], set[int], float]:
    """Every trial through successive halving on the cluster `where` (address, local workers, client
    settings); each trial's rungs, the trials the time budget stopped, and the wall seconds it all took."""
    scratch, t0 = settings.current().home / "dask", time.perf_counter()
    with dask.config.set({"temporary-directory": str(scratch)}):
        with cluster(*where[:2], scratch, where[2]) as runner:
            say = lambda t, r: announce("trial", sweeping.progress(t, r, len(plan)), r)  # noqa: E731
            results, out_of_time = halve(runner, data, group, plan, minutes, say)
    return results, out_of_time, time.perf_counter() - t0


def offer(
    group: list[Trial],
    won: int | None,
    results: dict[int, list[Rung]],
    data: Encoded,
    promote: bool,
    before: CurrentModel | None,
) -> tuple[Score | None, Decision]:
    """The winner scored on the validation text, and the promotion gate's decision about it (nothing to
    decide without a winner: `before`, the model current when the sweep started, stays)."""
    if won is None:
        none = "no trial finished its first rung; nothing to promote"
        return None, Decision(promoted=False, tag=before.tag if before else None, reason=none)
    winner, results = group[won], results[won]
    store = settings.current().bentoml_dir
    current = current_model(store)
    ck = checkpoint.load(winner.dir / "checkpoints", with_optim=False).path
    candidate = evaluate(ck, data)
    if not promote:
        reason = "promote=false: the winner was not offered"
        return candidate, Decision(promoted=False, tag=current.tag if current else None, reason=reason)
    against = compare(ck, current, data) if current else None
    spent = sum(r.seconds for r in results)
    trained = Trained(checkpoint=ck, step=results[-1].step, resumed_from=0, warm_start=None, seconds=spent)
    return candidate, tasks.promote(trained, candidate, against, data, winner.dir, store)


@flow(name="char-rnn-sweep", **NO_PICKLE)
def sweep(
    data_dir: DataDir | None = None,
    space: Space | None = None,
    trials: Count = DEFAULTS["trials"],
    seed: like(T, "seed") = DEFAULTS["seed"],
    steps: like(T, "steps") = DEFAULTS["steps"],
    minutes: Minutes | None = None,
    checkpoint_every: like(T, "checkpoint_every") = DEFAULTS["checkpoint_every"],
    halving: bool = DEFAULTS["halving"],
    dask_address: DaskAddress | None = None,
    local_workers: Count | None = None,
    promote: bool = DEFAULTS["promote"],
) -> SweepOutcome:
    """Search model and training settings on a Dask cluster; promote the best if it beats the current model.

    Args:
        data_dir: the corpus: a folder of UTF-8 .txt files, or one file (default: CHAR_RNN_DATA)
        space: setting -> list of values, or {"low", "high", "log"} range (default: stages.sweeping's)
        trials: configurations drawn from the space
        seed: draws the configurations; every trial's initialisation seed
        steps: the budget per trial: the steps the winner trains (each earlier rung half the next)
        minutes: wall minutes a trial may train in all: a rung it would not finish in time is not started
        checkpoint_every: steps between a trial's checkpoints (a killed worker's trial resumes from the last)
        halving: successive halving; false trains every trial for `steps` (a plain random or grid search)
        dask_address: a Dask scheduler named in CHAR_RNN_DASK_SCHEDULERS where flows run (default: a local
            cluster); reach it only over TLS or a trusted network
        local_workers: worker processes of the local cluster (default: one per core)
        promote: offer the winner for promotion (it is promoted only if it beats the current model)
    """
    s = settings.current()
    drawn, plan = sweeping.design(space, trials, seed, steps, halving)
    client = security(dask_address) if dask_address else {}  # before any connection: TLS set up?
    if dask_address:
        reachable(dask_address)
    corpus = ingest(data_dir or s.data)
    current = current_model(s.bentoml_dir)
    data = encode(corpus, s.home / "sweeps", None)
    fixed = {"steps": steps, "seed": seed, "checkpoint_every": checkpoint_every}
    group = sweeping.trials(drawn, plan, len(data.vocab), corpus.fingerprint, s.home / "sweeps", **fixed)
    preflight(data, [t.config for t in group], current)
    get_run_logger().info("Sweep %s: %d trials, rungs at steps %s", group[0].dir.parent, len(group), plan)
    results, out_of_time, seconds = run_trials(
        group, data, plan, minutes, (dask_address, local_workers, client)
    )
    winner, outcomes = sweeping.outcomes(group, results, out_of_time, len(plan))
    candidate, decision = offer(group, winner, results, data, promote, current)
    folder = group[0].dir.parent
    outcome = SweepOutcome(
        **{"sweep_id": folder.name, "dir": folder, "flow_run_id": tasks.flow_run_id(), "plan": plan},
        **{"data_dir": str(corpus.dir), "fingerprint": corpus.fingerprint, "seconds": seconds},
        **{"trials": outcomes, "winner": winner, "candidate": candidate, "decision": decision},
    )
    publish(outcome)
    tasks.decided(decision)
    return outcome
