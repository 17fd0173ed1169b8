"""`python -m flows.serve`: register the pipeline's two deployments with Prefect and run their flow runs.

  char-rnn-pipeline/on-demand          runs when asked (`prefect deployment run ... --param steps=300`)
  char-rnn-pipeline/scheduled-retrain  on an interval or cron; ends at once when the corpus has not changed

The schedule comes from --interval/--cron, else CHAR_RNN_RETRAIN_INTERVAL (seconds) / CHAR_RNN_RETRAIN_CRON,
else hourly. PREFECT_API_URL names the server.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from datetime import timedelta
from typing import Any

from model import paths

paths.configure_env()

from prefect import serve  # noqa: E402
from prefect.deployments.runner import EntrypointType, RunnerDeployment  # noqa: E402
from prefect.exceptions import ParameterTypeError, SignatureMismatchError  # noqa: E402
from prefect.settings import get_current_settings  # noqa: E402

from flows.pipeline import pipeline  # noqa: E402


def deployments(params: dict[str, Any], **timing: timedelta | str) -> list[RunnerDeployment]:
    """The on-demand deployment and the scheduled retrain (`timing`: interval= or cron=), given `params`."""
    common = {"entrypoint_type": EntrypointType.MODULE_PATH, "tags": ["char-rnn"]}
    return [
        pipeline.to_deployment(
            "on-demand", description="Train, evaluate and maybe promote, now.", parameters=params, **common
        ),
        pipeline.to_deployment(
            "scheduled-retrain",
            description="Retrain, warm-starting from the promoted model, when the corpus has changed.",
            parameters=params | {"only_if_changed": True},
            **timing,
            **common,
        ),
    ]


def param(text: str) -> tuple[str, Any]:
    """KEY=VALUE; VALUE read as JSON when it is JSON (300, 3e-3, true), else as a string."""
    key, sep, value = text.partition("=")
    if not sep or not key:
        raise argparse.ArgumentTypeError(f"{text!r}: expected KEY=VALUE, for example steps=500")
    try:
        return key, json.loads(value)
    except json.JSONDecodeError:
        return key, value


def timing(interval: float | None, cron: str | None) -> dict[str, timedelta | str]:
    """When the retrain is scheduled: the command line, else the environment (cron first), else hourly."""
    if interval is None and not cron:
        cron = os.environ.get("CHAR_RNN_RETRAIN_CRON")
        interval = None if cron else float(os.environ.get("CHAR_RNN_RETRAIN_INTERVAL") or 3600)
    if cron:
        return {"cron": cron}
    if not interval > 0:
        raise ValueError(f"the retrain interval must be > 0 seconds, not {interval}")
    return {"interval": timedelta(seconds=interval)}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m flows.serve", description=__doc__.split("\n\n")[0])
    when = parser.add_mutually_exclusive_group()
    when.add_argument("--interval", type=float, help="seconds between retrains ($CHAR_RNN_RETRAIN_INTERVAL)")
    when.add_argument("--cron", help="cron expression for retrains ($CHAR_RNN_RETRAIN_CRON)")
    parser.add_argument(
        "--param",
        type=param,
        action="append",
        default=[],
        help="a default flow parameter, KEY=VALUE (repeatable)",
    )
    parser.add_argument("--limit", type=int, default=1, help="flow runs executed at once (default 1)")
    args = parser.parse_args(argv)
    params = dict(args.param)
    if not get_current_settings().api.url:
        sys.exit(
            "PREFECT_API_URL is not set: start a server with `scripts/prefect-server.sh start`, then "
            "`export PREFECT_API_URL=http://127.0.0.1:4200/api`"
        )
    try:
        when = timing(args.interval, args.cron)
        pipeline.validate_parameters(params)
    except (ValueError, ParameterTypeError, SignatureMismatchError) as e:
        parser.error(str(e))
    serve(*deployments(params, **when), limit=args.limit)


if __name__ == "__main__":
    main()
