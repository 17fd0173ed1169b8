"""`char-rnn pipeline | sweep`: the flows, run once in this process.

The folder given with --data (and the scheduler given with --dask-address) may be used by this run: the user
who types the command chose them on their own machine. Runs created through Prefect (deployments, schedules,
the UI) get no such grant. Every parameter is checked before Prefect starts, so a mistake costs no start-up.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import settings
from cli.parsing import PIPELINE_FLAGS, SWEEP_FLAGS
from stages import data


class Lines(logging.Handler):
    """Log records as plain lines on stderr, without tracebacks; errors are left to `main`, which says them
    once, in one line."""

    def __init__(self, level: int, skip: str = "") -> None:
        super().__init__(level)
        self.skip = skip  # records from files under this folder (Prefect's engine) are not shown

    def emit(self, record: logging.LogRecord) -> None:
        if record.levelno < logging.ERROR and not (self.skip and record.pathname.startswith(self.skip)):
            level = "warning: " if record.levelno >= logging.WARNING else ""
            print(f"char-rnn: {level}{record.getMessage()}", file=sys.stderr)


@contextmanager
def shown(names: tuple[str, ...]) -> Iterator[None]:
    """The run's own log lines (its flow and task runs') on stderr for the block; Prefect's engine quiet."""
    import prefect

    handler = Lines(logging.INFO, skip=str(Path(prefect.__file__).parent))
    loggers = [logging.getLogger(n) for n in names]
    for lg in loggers:
        lg.addHandler(handler)
    try:
        yield
    finally:
        for lg in loggers:
            lg.removeHandler(handler)


def configure(**grants: list) -> None:
    """Settings for an in-process run, with this command line's grants added to the configured ones."""
    os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "120")  # a busy box is slow
    os.environ.setdefault("PREFECT_LOGGING_HANDLERS_CONSOLE_LEVEL", "CRITICAL")  # `shown` says what matters
    s = settings.load()
    os.environ.update(settings.configure(**{k: [*getattr(s, k), *v] for k, v in grants.items()}))


def cmd_pipeline(a: argparse.Namespace) -> None:
    configure(allowed_roots=[Path(a.data).absolute()])
    from flows.params import checked  # Prefect reads its home when imported: only after configure
    from flows.pipeline import pipeline

    params = {"data_dir": a.data} | {k: getattr(a, k) for k in PIPELINE_FLAGS if getattr(a, k) is not None}
    params = checked(pipeline, params | {"build_bento": a.bento})  # before Prefect's temporary server starts
    s = settings.current()
    data.ingest(params["data_dir"] or s.data, s.runs_dir / "ingest")  # unusable text: say so now, in one line
    with shown(("prefect.flow_runs", "prefect.task_runs")):
        d = pipeline(**params)
    print(
        f"{'promoted' if d.promoted else 'kept'} {d.tag}: {d.reason}"
        + (f"\nrun: {d.run_dir}" if d.run_dir else "")
    )
    if a.bento and d.promoted:
        from stages.bento import SERVICE, version_of

        built = f"{SERVICE}:{version_of(d.tag)}"
        print(f"bento: {built} (`bentoml serve {built}` serves it, `bentoml containerize {built}` images it)")


def cmd_sweep(a: argparse.Namespace) -> None:
    """The char-rnn-sweep flow in-process; a line per trial as it finishes a rung."""
    configure(
        allowed_roots=[Path(a.data).absolute()], dask_schedulers=[a.dask_address] if a.dask_address else []
    )
    given = {k: getattr(a, k) for k in SWEEP_FLAGS if getattr(a, k) is not None}
    if a.space is not None:
        try:
            given["space"] = json.loads(a.space)
        except json.JSONDecodeError as e:
            raise ValueError(f"--space is not JSON ({e}); e.g. --space '{{\"hidden\": [64, 128]}}'") from None
    from flows.local import api_server  # Prefect reads its home when imported: only after configure
    from flows.params import checked, reachable
    from flows.sweep import sweep
    from stages.sweeping import design

    p = checked(sweep, {"data_dir": a.data} | given)
    design(p["space"], p["trials"], p["seed"], p["steps"], p["halving"])  # before Prefect starts
    if p["dask_address"]:
        reachable(p["dask_address"])
    with shown(("prefect.flow_runs",)), api_server():
        o = sweep(**p)
    d = o.decision
    print(f"{'promoted' if d.promoted else 'kept'} {d.tag or 'no model'}: {d.reason}\nsweep: {o.dir}")
