"""Flow parameters are untrusted input: types and bounds come from ModelConfig/TrainConfig (defined once
there), and paths must resolve inside the allowed roots before any work starts."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

from pydantic import AfterValidator, AllowInfNan, BaseModel

import settings

if TYPE_CHECKING:
    from prefect import Flow


def like(model: type[BaseModel], name: str) -> Any:
    """The type and bounds of `model`'s field `name`, for a flow parameter of the same meaning."""
    f = model.model_fields[name]
    rules = [*f.metadata, *([AllowInfNan(False)] if f.annotation is float else [])]
    return Annotated[(f.annotation, *rules)] if rules else f.annotation


def default(model: type[BaseModel], name: str) -> Any:
    return model.model_fields[name].default


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


DataDir = Annotated[Path, AfterValidator(confined), AfterValidator(existing)]
Folder = Annotated[Path, AfterValidator(confined)]


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
