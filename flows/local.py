"""Running a flow in this process, without a Prefect server of the user's (`char-rnn pipeline`, `char-rnn
sweep`): Prefect's temporary server, started for the run and stopped after it."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

from prefect.logging.handlers import APILogHandler
from prefect.server.api.server import SubprocessASGIServer
from prefect.settings import PREFECT_API_URL, get_current_settings, temporary_settings


@contextmanager
def api_server() -> Iterator[str]:
    """The Prefect API for the block: PREFECT_API_URL's server when one is set, else a temporary server in a
    subprocess (Dask workers report to Prefect by address, so an in-process ephemeral API would not do: each
    worker would start its own). Yields the API's address."""
    if url := get_current_settings().api.url:
        yield url
        return
    server = SubprocessASGIServer()
    server.start(timeout=120)
    try:
        with temporary_settings({PREFECT_API_URL: server.api_url}):
            yield server.api_url
            APILogHandler().flush()  # the run's queued logs, while the server is still there
    finally:
        server.stop()
