"""Flow parameters are untrusted input: anyone who can create a flow run sets them. Types and bounds come
from ModelConfig/TrainConfig (defined once there: `model.config.like`); paths must resolve inside the allowed
roots, and a Dask scheduler must be one the settings name, before any work or any connection is made."""

from __future__ import annotations

import logging
import socket
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

from pydantic import AfterValidator, Field

import settings

if TYPE_CHECKING:
    from prefect import Flow


def confined(path: Path) -> Path:
    """`path` resolved (relative to the checkout, symlinks followed); refused outside the allowed roots."""
    resolved = (settings.ROOT / path).resolve()
    roots = settings.current().roots()
    if not any(resolved.is_relative_to(r) for r in roots):
        raise ValueError(
            f"{path} resolves to {resolved}, outside the allowed roots ({', '.join(map(str, roots))}); "
            "add a folder with CHAR_RNN_ALLOWED_ROOTS in the environment of the process that runs flows"
        )
    return resolved


def existing(path: Path) -> Path:
    if not path.exists():
        raise ValueError(f"{path} does not exist; pass data_dir=<a folder of UTF-8 .txt files>")
    return path


def listed(address: str) -> str:
    """`address` if it names a scheduler of CHAR_RNN_DASK_SCHEDULERS. Dask's protocol unpickles what its peer
    sends, so a scheduler address is code execution for whoever answers there: like a path, it is configured
    where flows run, never chosen by whoever creates a run."""
    allowed = settings.current().dask_schedulers
    if settings.scheduler_key(address) not in {settings.scheduler_key(a) for a in allowed}:
        named = ", ".join(allowed) or "none"
        raise ValueError(
            f"dask_address {address} is not a scheduler named in CHAR_RNN_DASK_SCHEDULERS ({named}) where "
            "flows run; add it there (only a scheduler you trust, reached over TLS or a trusted network), or "
            "leave dask_address out for a local cluster"
        )
    return address


def reachable(address: str) -> None:
    """Raise a one-line error unless something listens at the (listed) Dask scheduler's `address`."""
    host, _, port = address.split("://")[-1].rpartition(":")
    try:
        socket.create_connection((host.strip("[]"), int(port)), timeout=5).close()
    except OSError as e:
        raise ValueError(
            f"no Dask scheduler answers at dask_address={address} ({e.strerror or e.__class__.__name__}); "
            "start one with `dask scheduler` (and workers with `dask worker <address> --nthreads 1`), or "
            "leave dask_address out for a local cluster"
        ) from None


DataDir = Annotated[Path, AfterValidator(confined), AfterValidator(existing)]
Folder = Annotated[Path, AfterValidator(confined)]
DaskAddress = Annotated[
    str, Field(pattern=r"^((tcp|tls)://)?\S+:\d{1,5}$", max_length=300), AfterValidator(listed)
]


def checked(flow: Flow, params: dict[str, Any]) -> dict[str, Any]:
    """`params` validated as `flow` will validate them; a ValueError listing every bad one, in one line."""
    from prefect.exceptions import ParameterTypeError, SignatureMismatchError

    quiet = logging.getLogger("prefect.flows")  # it would log the same errors at length
    level, quiet.level = quiet.level, logging.CRITICAL
    try:
        return flow.validate_parameters(params)
    except ParameterTypeError as e:  # "...parameters:\n - name: msg\n - name: msg"
        raise ValueError("; ".join(x.removeprefix(" - ") for x in str(e).splitlines()[1:])) from None
    except SignatureMismatchError as e:
        raise ValueError(str(e)) from None
    finally:
        quiet.level = level
