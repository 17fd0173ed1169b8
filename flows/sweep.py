"""The `char-rnn-sweep` flow: ingest and encode once, train many configurations on a Dask cluster with
successive halving, then promote the best through the pipeline's gate.

Every trial trains on Dask (prefect-dask's DaskTaskRunner) into its own run directory under
CHAR_RNN_HOME/sweeps/<sweep>/, named by its configuration, so a re-run of the same sweep resumes it. A trial's
learning-rate schedule spans the whole budget (`steps`) from the start, and each rung stops it early: a
survivor continued from its checkpoint is bitwise the trial that was never stopped.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import socket
import time
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any

import dask
from prefect import flow, get_run_logger, runtime
from prefect.artifacts import (
    create_image_artifact,
    create_link_artifact,
    create_markdown_artifact,
    create_table_artifact,
)
from prefect.futures import as_completed
from prefect_dask import DaskTaskRunner
from pydantic import Field, TypeAdapter

import settings
from flows import report, tasks
from flows.params import DataDir, default, like
from flows.report import Decision, Rung, SweepOutcome, TrialOutcome
from flows.space import DEFAULT_SPACE, Space, configs, draw, rungs
from flows.tasks import (
    Trained,
    Trial,
    compare,
    current_model,
    encode,
    evaluate,
    ingest,
    preflight,
    train_trial,
)
from model import checkpoint
from model.files import make_dirs, write_atomic
from model.net import ModelConfig
from model.train import TrainConfig as T
from model.train import bits

DaskAddress = Annotated[str, Field(pattern=r"^((tcp|tls)://)?\S+:\d{1,5}$", max_length=300)]
Count = Annotated[int, Field(ge=1, le=256)]
Minutes = Annotated[float, Field(gt=0, le=7 * 24 * 60, allow_inf_nan=False)]


def design(space: dict | None, trials: int, seed: int, steps: int, halving: bool) -> tuple[list, list[int]]:
    """The drawn configurations and the rungs' steps; a ValueError (one line) when they cannot be made."""
    checked = TypeAdapter(Space).validate_python(space or DEFAULT_SPACE)
    return draw(checked, trials, seed), rungs(trials, steps, halving)


def reachable(address: str) -> None:
    """Raise a one-line error unless something listens at the Dask scheduler's `address`."""
    host, _, port = address.split("://")[-1].rpartition(":")
    try:
        socket.create_connection((host.strip("[]"), int(port)), timeout=5).close()
    except OSError as e:
        raise ValueError(
            f"no Dask scheduler answers at dask_address={address} ({e.strerror or e.__class__.__name__}); "
            "start one with `dask scheduler` (and workers with `dask worker <address> --nthreads 1`), or "
            "leave dask_address out for a local cluster"
        ) from None


def cluster(address: str | None, workers: int | None, scratch: Path) -> DaskTaskRunner:
    """The task runner for the trials: the scheduler at `address`, else a LocalCluster of one single-threaded
    worker process per core (its nannies pin BLAS to one thread), with Dask's files under `scratch`."""
    if address:
        return DaskTaskRunner(address=address)
    cores = len(os.sched_getaffinity(0))
    kw = {"n_workers": workers or cores, "threads_per_worker": 1, "processes": True}
    return DaskTaskRunner(cluster_kwargs=kw | {"local_directory": str(scratch), "dashboard_address": None})


def digest(*parts: Any) -> str:
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:8]


def halve(
    runner: DaskTaskRunner,
    data: tasks.Encoded,
    trials: list[Trial],
    plan: list[int],
    minutes: float | None,
    say: Callable,
) -> tuple[dict[int, list[Rung]], set[int]]:
    """Successive halving: every trial trains to the first rung's step, the better half (by validation loss)
    continue to the next, and so on. Returns each trial's rungs and the trials the time budget stopped."""
    results: dict[int, list[Rung]] = {t.index: [] for t in trials}
    alive, out_of_time = trials, set()
    for k, stop in enumerate(plan):
        futures = {
            runner.submit(train_trial, {"data": data, "trial": t, "rung": k, "stop": stop}): t for t in alive
        }
        for f in as_completed(list(futures)):
            t, r = futures[f], f.result()
            results[t.index].append(r)
            say(progress(t, r, len(plan)))
        ok = sorted(
            (t for t in alive if results[t.index][-1].failed is None), key=lambda t: results[t.index][-1].val
        )
        if k + 1 == len(plan):
            break
        alive = ok[: max(1, len(alive) // 2)]
        if minutes is not None:
            fits = [t for t in alive if in_time(results[t.index], plan[k + 1], minutes)]
            out_of_time |= {t.index for t in alive if t not in fits}
            alive = fits
        if not alive:
            break
    return results, out_of_time


def in_time(done: list[Rung], stop: int, minutes: float) -> bool:
    """Whether a trial would train to `stop` within `minutes` in all, at the speed of its rungs so far."""
    return sum(r.seconds for r in done) * stop / done[-1].step <= minutes * 60


def progress(t: Trial, r: Rung, rungs: int) -> str:
    """The line logged when a trial finishes a rung."""
    head = f"trial {t.index} rung {r.rung + 1}/{rungs}"
    if r.failed:
        return f"{head}: failed at step {r.step}: {r.failed}"
    resumed = f", resumed at step {r.resumed_from}" if r.resumed_from else ""
    return (
        f"{head} (step {r.step}): val {r.val:.4f} nats/char ({bits(r.val):.3f} bits/char), "
        f"{r.seconds:.1f} s, {r.chars_per_s:,.0f} chars/s on {r.worker}{resumed}"
    )


def fates(
    trials: list[Trial], results: dict[int, list[Rung]], out_of_time: set[int], rungs: int
) -> tuple[int | None, dict]:
    """The winner (best validation loss among the trials that went furthest) and each trial's status."""
    finished = [t for t in trials if results[t.index] and results[t.index][-1].failed is None]
    depth = max((results[t.index][-1].rung for t in finished), default=-1)
    best = min(
        (t for t in finished if results[t.index][-1].rung == depth),
        key=lambda t: results[t.index][-1].val,
        default=None,
    )
    status = {}
    for t in trials:
        last = results[t.index][-1]
        if last.failed:
            status[t.index] = f"failed in rung {last.rung}: {last.failed.split(';')[0]}"
        elif best is not None and t.index == best.index:
            status[t.index] = "winner"
        elif t.index in out_of_time:
            status[t.index] = f"out of time after rung {last.rung}"
        elif last.rung == rungs - 1:
            status[t.index] = "finished, not the best"
        else:
            status[t.index] = f"stopped after rung {last.rung}"
    return (None if best is None else best.index), status


def history(trial: Trial) -> list[list[float]]:
    """The trial's validation curve, from its newest checkpoint."""
    newest = checkpoint.read_pointer(trial.dir / "checkpoints", "latest")
    return checkpoint.read_meta(newest).metrics.get("val", []) if newest else []


def publish(o: SweepOutcome) -> None:
    """Write trials.json, curves.png and report.md in the sweep's folder; publish them as artifacts."""
    png = report.curves_png({f"trial {t.index}": t.history for t in o.trials})
    text = report.sweep_markdown(o)
    write_atomic(o.dir / "trials.json", o.model_dump_json(indent=1).encode())
    write_atomic(o.dir / "curves.png", png)
    write_atomic(o.dir / "report.md", text.encode())
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


@flow(name="char-rnn-sweep", persist_result=False)
def sweep(
    data_dir: DataDir | None = None,
    space: Space | None = None,
    trials: Count = 8,
    seed: like(T, "seed") = default(T, "seed"),
    steps: like(T, "steps") = 1600,
    minutes: Minutes | None = None,
    checkpoint_every: like(T, "checkpoint_every") = 100,
    halving: bool = True,
    dask_address: DaskAddress | None = None,
    local_workers: Count | None = None,
    promote: bool = True,
) -> SweepOutcome:
    """Search model and training settings on a Dask cluster; promote the best if it beats the current model.

    Args:
        data_dir: the corpus: a folder of UTF-8 .txt files, or one file (default: CHAR_RNN_DATA)
        space: setting -> list of values, or {"low", "high", "log"} range (default: flows.space.DEFAULT_SPACE)
        trials: configurations drawn from the space
        seed: draws the configurations; every trial's initialisation seed
        steps: the budget per trial: the steps the winner trains (each earlier rung half the next)
        minutes: wall minutes a trial may train in all: a rung it would not finish in time is not started
        checkpoint_every: steps between a trial's checkpoints (a killed worker's trial resumes from the last)
        halving: successive halving; false trains every trial for `steps` (a plain random or grid search)
        dask_address: an existing Dask scheduler, e.g. tcp://10.0.0.5:8786 (default: a local cluster)
        local_workers: worker processes of the local cluster (default: one per core)
        promote: offer the winner for promotion (it is promoted only if it beats the current model)
    """
    logger = get_run_logger()
    s = settings.current()
    drawn, plan = design(space, trials, seed, steps, halving)
    if dask_address:
        reachable(dask_address)
    data_dir, root = data_dir or s.data, s.home / "sweeps"
    corpus = ingest(data_dir)
    current = current_model(s.bentoml_dir)
    data = encode(data_dir, corpus.fingerprint, root)
    fixed = {"steps": steps, "seed": seed, "checkpoint_every": checkpoint_every}
    points: list[tuple[ModelConfig, T]] = [configs(d, len(data.vocab), **fixed) for d in drawn]
    preflight(data, [c for _, c in points], current)
    names = [
        f"trial-{i:02d}-{digest(m.model_dump(), c.model_dump(), corpus.fingerprint)}"
        for i, (m, c) in enumerate(points)
    ]
    folder = make_dirs(root / f"sweep-{corpus.fingerprint[:12]}-{digest(names, plan)}")
    group = [
        Trial(index=i, dir=folder / n, drawn=d, model=m, config=c)
        for i, (n, d, (m, c)) in enumerate(zip(names, drawn, points, strict=True))
    ]
    logger.info("Sweep %s: %d trials, rungs at steps %s", folder, len(group), plan)
    t0 = time.perf_counter()
    with dask.config.set({"temporary-directory": str(s.home / "dask")}):
        with cluster(dask_address, local_workers, s.home / "dask") as runner:
            results, out_of_time = halve(runner, data, group, plan, minutes, logger.info)
    seconds = time.perf_counter() - t0
    winner, status = fates(group, results, out_of_time, len(plan))
    outcomes = [
        TrialOutcome(
            index=t.index,
            name=t.dir.name,
            drawn=t.drawn,
            rungs=results[t.index],
            status=status[t.index],
            history=history(t),
        )
        for t in group
    ]
    candidate = None
    keep = Decision(promoted=False, tag=current.tag if current else None, reason="")
    if winner is None:
        decision = keep.model_copy(update={"reason": "no trial finished its first rung; nothing to promote"})
    else:
        w = group[winner]
        ck = checkpoint.load(w.dir / "checkpoints", with_optim=False).path
        candidate = evaluate(ck, data)
        if promote:
            against = compare(ck, current, data) if current else None
            spent = sum(r.seconds for r in results[winner])
            trained = Trained(
                checkpoint=ck, step=results[winner][-1].step, resumed_from=0, warm_start=None, seconds=spent
            )
            decision = tasks.promote(trained, candidate, against, data, w.dir, s.bentoml_dir)
        else:
            decision = keep.model_copy(
                update={"reason": "promote=false: the winner was not offered", "run_dir": w.dir}
            )
    outcome = SweepOutcome(
        sweep_id=folder.name,
        dir=folder,
        flow_run_id=runtime.flow_run.id,
        data_dir=str(data_dir),
        fingerprint=corpus.fingerprint,
        plan=plan,
        trials=outcomes,
        winner=winner,
        candidate=candidate,
        decision=decision,
        seconds=seconds,
    )
    publish(outcome)
    verdict = f"Promoted {decision.tag}" if decision.promoted else f"Kept {decision.tag or 'no model'}"
    logger.info("%s: %s", verdict, decision.reason)
    return outcome
