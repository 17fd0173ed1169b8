"""`python -m flows.serve`: register the pipeline's and the sweep's deployments and run their flow runs.

  char-rnn-pipeline/on-demand          runs when asked (`prefect deployment run ... --param steps=300`)
  char-rnn-pipeline/scheduled-retrain  on an interval or cron; ends at once when the corpus has not changed
  char-rnn-sweep/on-demand             a hyperparameter sweep on Dask (`--param dask_address=tcp://...:8786`)

The deployments are those of prefect.yaml (names, parameters, tags, concurrency, schedule), the file that
`prefect deploy --all` reads for a work pool: one definition for both ways. Here they run in this process,
with no work pool. The schedule comes from --interval/--cron, else CHAR_RNN_RETRAIN_INTERVAL (seconds) /
CHAR_RNN_RETRAIN_CRON, else prefect.yaml's (hourly). PREFECT_API_URL names the server. The automation that
notifies on a failed retrain (flows/automations.py) is created or updated first; --notify gives its target.

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
from flows import automations
from terminal import Parser, param

FILE = settings.ROOT / "prefect.yaml"
START = "start one with `prefect server start --background` (docs/pipeline.md)"


def declared() -> list[dict[str, Any]]:
    """prefect.yaml's deployments, as written there."""
    import yaml

    return yaml.safe_load(FILE.read_text(encoding="utf-8"))["deployments"]


def schedule(spec: dict[str, Any], override: dict[str, timedelta | str]) -> dict[str, timedelta | str]:
    """A deployment's schedule as `to_deployment` takes it: none when prefect.yaml gives it none, else
    `override` (the command line's or the settings'), else prefect.yaml's own."""
    if not spec.get("schedules"):
        return {}
    if override:
        return override
    (first,) = spec["schedules"]
    return {"cron": first["cron"]} if "cron" in first else {"interval": timedelta(seconds=first["interval"])}


def deployments(params: dict[str, Any], **timing: timedelta | str) -> list:
    """prefect.yaml's deployments, for this process to serve. `params` (the command line's) are default
    parameters of each deployment whose flow takes them, over prefect.yaml's; `timing` (interval= or
    cron=) replaces prefect.yaml's schedule."""
    from prefect.client.schemas.objects import ConcurrencyLimitConfig
    from prefect.deployments.runner import EntrypointType
    from prefect.flows import load_flow_from_entrypoint

    made = []
    for spec in declared():
        flow = load_flow_from_entrypoint(spec["entrypoint"])
        limit = spec.get("concurrency_limit")
        own = {k: v for k, v in params.items() if k in flow.parameters.properties}
        made.append(
            flow.to_deployment(
                spec["name"],
                description=spec.get("description"),
                tags=spec.get("tags"),
                parameters=spec.get("parameters", {}) | own,
                enforce_parameter_schema=spec.get("enforce_parameter_schema", True),
                concurrency_limit=ConcurrencyLimitConfig(**limit) if isinstance(limit, dict) else limit,
                entrypoint_type=EntrypointType.MODULE_PATH,
                **schedule(spec, timing),
            )
        )
    return made


def prepare() -> dict[str, str]:
    """prefect.yaml's build step, run by `prefect deploy`: create or update the failed-retrain automation
    (its target kept), and output the checkout's folder for the pull step."""
    return {"checkout": str(settings.ROOT), "automation": str(automations.ensure())}


def environment() -> dict[str, str]:
    """prefect.yaml's pull step, run in each flow run a worker starts: the project's variables (homes under
    CHAR_RNN_HOME unless set, telemetry off), exported before the flow imports BentoML, so that a worker
    started from any shell uses the same model store as the service. Prefect itself is running already:
    its home stays the one it chose."""
    import logging

    from prefect.settings import get_current_settings

    os.environ.setdefault("PREFECT_HOME", str(get_current_settings().home))
    os.environ.update(settings.configure())
    extra = logging.getLogger("prefect.extra")  # what PREFECT_LOGGING_EXTRA_LOGGERS does at Prefect's start
    mine = logging.getLogger("char_rnn")
    for handler in extra.handlers:
        if handler not in mine.handlers:
            mine.addHandler(handler)
    return {"char_rnn_home": os.environ["CHAR_RNN_HOME"]}


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
    """When the retrain is scheduled: the command line, else the settings (cron first), else nothing here
    (prefect.yaml's schedule)."""
    if interval is None and not cron_expr:
        cron_expr, interval = s.retrain_cron, s.retrain_interval
    if cron_expr:
        return {"cron": cron(cron_expr)}
    return {"interval": timedelta(seconds=interval)} if interval else {}


def reachable(url: str) -> None:
    """Raise a one-line error unless the Prefect server at `url` answers its health check."""
    import httpx

    try:
        httpx.get(f"{url.rstrip('/')}/health", timeout=5, trust_env=False).raise_for_status()
    except httpx.HTTPError as e:
        raise ValueError(
            f"no Prefect server answers at PREFECT_API_URL={url} ({e.__class__.__name__}); {START}"
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
    parser.add_argument(
        "--notify",
        type=automations.notify_target,
        help="where a failed retrain is reported: a webhook URL, or BLOCK-TYPE/NAME of a Prefect "
        "notification block (default: the automation's current target)",
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
                f"PREFECT_API_URL is not set: {START}, then export PREFECT_API_URL=<its address>/api"
            )
        when = timing(args.interval, args.cron, s)
        params = dict(args.param)
        checked(pipeline, params)
        reachable(url)
        automations.ensure(args.notify)
    except ValueError as e:  # SettingsError included
        ap.exit(1, f"{ap.prog}: error: {e}\n")
    serve(*deployments(params, **when), limit=args.limit)
    return 0


if __name__ == "__main__":
    sys.exit(main())
