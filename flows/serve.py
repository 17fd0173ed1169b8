"""`python -m flows.serve`: register the pipeline's and the sweep's deployments and run their flow runs.

  char-rnn-pipeline/on-demand          runs when asked (`prefect deployment run ... --param steps=300`)
  char-rnn-pipeline/scheduled-retrain  on an interval or cron; ends at once when the corpus has not changed
  char-rnn-sweep/on-demand             a hyperparameter sweep on Dask (`--param dask_address=tcp://...:8786`)

The schedule comes from --interval/--cron, else CHAR_RNN_RETRAIN_INTERVAL (seconds) / CHAR_RNN_RETRAIN_CRON,
else hourly. PREFECT_API_URL names the server.

Each deployment runs one flow run at a time. A retrain that falls due while another retrain runs is cancelled
by the server (the next one catches up), so late runs never pile up behind a long training; a second
on-demand run (or sweep) waits for the first. The runner therefore takes one run per deployment at once
(--limit 3): with fewer slots, a due retrain would wait in the runner's queue, logged as "skipped (at
capacity)" at every poll.
"""

from __future__ import annotations

import argparse
import math
import os
import sys
from datetime import timedelta
from typing import Any

import settings
from terminal import Parser, param


def deployments(params: dict[str, Any], **timing: timedelta | str) -> list:
    """The pipeline's on-demand deployment and scheduled retrain (`timing`: interval= or cron=), given
    `params`, and the sweep's on-demand deployment, given those of `params` it takes."""
    from prefect.client.schemas.objects import ConcurrencyLimitConfig, ConcurrencyLimitStrategy
    from prefect.deployments.runner import EntrypointType

    from flows.pipeline import pipeline
    from flows.sweep import sweep

    common = {"entrypoint_type": EntrypointType.MODULE_PATH, "tags": ["char-rnn"]}
    return [
        pipeline.to_deployment(
            "on-demand",
            description="Train, evaluate and maybe promote, now.",
            parameters=params,
            concurrency_limit=1,  # a second run waits for the first
            **common,
        ),
        pipeline.to_deployment(
            "scheduled-retrain",
            description="Retrain, warm-starting from the promoted model, when the corpus has changed.",
            parameters=params | {"only_if_changed": True},
            concurrency_limit=ConcurrencyLimitConfig(
                limit=1, collision_strategy=ConcurrencyLimitStrategy.CANCEL_NEW
            ),
            **timing,
            **common,
        ),
        sweep.to_deployment(
            "on-demand",
            description="Search settings on Dask with successive halving; promote the best if it wins.",
            parameters={k: v for k, v in params.items() if k in sweep.parameters.properties},
            concurrency_limit=1,
            **common,
        ),
    ]


def seconds(text: str) -> float:
    """A positive, finite number of seconds."""
    try:
        v = float(text)
    except ValueError:
        v = math.nan
    if not (math.isfinite(v) and 0 < v <= 366 * 86400):
        raise argparse.ArgumentTypeError(f"{text!r}: expected a number of seconds in (0, 31622400]")
    return v


def positive(text: str) -> int:
    if not text.isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"{text!r}: expected a whole number >= 1")
    return int(text)


def cron(expr: str) -> str:
    """A cron expression Prefect accepts."""
    from prefect.client.schemas.schedules import CronSchedule
    from pydantic import ValidationError

    try:
        CronSchedule(cron=expr)
    except ValidationError as e:
        raise ValueError(f"{expr!r} is not a valid cron expression ({e.errors()[0]['msg']})") from None
    return expr


def timing(interval: float | None, cron_expr: str | None, s: settings.Settings) -> dict[str, timedelta | str]:
    """When the retrain is scheduled: the command line, else the settings (cron first), else hourly."""
    if interval is None and not cron_expr:
        cron_expr = s.retrain_cron
        interval = None if cron_expr else (s.retrain_interval or 3600)
    if cron_expr:
        return {"cron": cron(cron_expr)}
    return {"interval": timedelta(seconds=interval)}


def reachable(url: str) -> None:
    """Raise a one-line error unless the Prefect server at `url` answers its health check."""
    import httpx

    try:
        httpx.get(f"{url.rstrip('/')}/health", timeout=5, trust_env=False).raise_for_status()
    except httpx.HTTPError as e:
        raise ValueError(
            f"no Prefect server answers at PREFECT_API_URL={url} ({e.__class__.__name__}); start one with "
            "`scripts/prefect-server.sh start`"
        ) from None


def parser() -> Parser:
    """`python -m flows.serve`'s command line."""
    parser = Parser(prog="python -m flows.serve", description=__doc__.split("\n\n")[0])
    when = parser.add_mutually_exclusive_group()
    when.add_argument(
        "--interval", type=seconds, help="seconds between retrains ($CHAR_RNN_RETRAIN_INTERVAL)"
    )
    when.add_argument("--cron", help="cron expression for retrains ($CHAR_RNN_RETRAIN_CRON)")
    parser.add_argument(
        "--param",
        type=param,
        action="append",
        default=[],
        help="a default flow parameter, KEY=VALUE (repeatable; the sweep takes those it has)",
    )
    parser.add_argument(
        "--limit", type=positive, default=3, help="flow runs executed at once (default 3: one per deployment)"
    )
    return parser


def main(argv: list[str] | None = None) -> int:
    args = (ap := parser()).parse_args(argv)
    try:
        os.environ.update(settings.configure())
        s = settings.current()
        # Prefect reads its home and API address when imported: only after configure()
        from prefect import serve
        from prefect.settings import get_current_settings

        from flows.params import checked
        from flows.pipeline import pipeline

        url = get_current_settings().api.url
        if not url:
            raise ValueError(
                "PREFECT_API_URL is not set: start a server with `scripts/prefect-server.sh start`, then "
                "export the PREFECT_API_URL it prints"
            )
        when = timing(args.interval, args.cron, s)
        params = dict(args.param)
        checked(pipeline, params)
        reachable(url)
    except ValueError as e:  # SettingsError included
        ap.exit(1, f"{ap.prog}: error: {e}\n")
    serve(*deployments(params, **when), limit=args.limit)
    return 0


if __name__ == "__main__":
    sys.exit(main())
