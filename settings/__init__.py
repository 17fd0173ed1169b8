"""The one configuration object: `CHAR_RNN_*` environment variables, read and checked once per entry point.

Each entry point (`cli.py`, `python -m flows.serve`, `service.py`) runs `os.environ.update(configure())`
before it imports Prefect or BentoML: a bad variable is refused in one line naming it, then Prefect's and
BentoML's homes are set under CHAR_RNN_HOME (unless the user set them) and telemetry is turned off. Library
code gets the settings (or paths from them) from its caller or from `current()`; nothing else reads the
environment.
"""

from __future__ import annotations

import os
import sys
import tomllib
from ipaddress import IPv4Address
from pathlib import Path
from typing import Annotated

from pydantic import (
    AliasChoices,
    BeforeValidator,
    Field,
    IPvAnyAddress,
    SecretStr,
    ValidationError,
    field_validator,
)
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

ROOT = Path(__file__).resolve().parent.parent  # the checkout: relative paths in flow parameters start here
TELEMETRY_OFF = {
    "DO_NOT_TRACK": "1",
    "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
    "BENTOML_DO_NOT_TRACK": "True",
}
PREFECT_DEFAULT_PROFILES = {"ephemeral", "default"}  # the profile Prefect activates when nobody chose one


class SettingsError(ValueError):
    """An environment variable holds a value the project cannot use."""


def _path_list(v: object) -> object:
    """CHAR_RNN_ALLOWED_ROOTS is a list of folders separated by ':' (os.pathsep), as PATH is."""
    return [p for p in v.split(os.pathsep) if p.strip()] if isinstance(v, str) else v


def _word_list(v: object) -> object:
    """CHAR_RNN_DASK_SCHEDULERS is a list of addresses separated by commas or spaces."""
    return v.replace(",", " ").split() if isinstance(v, str) else v


def scheduler_key(address: str) -> str:
    """A Dask address compared by its scheme, host and port (Dask reads a bare host:port as tcp://)."""
    return address.strip().lower() if "://" in address else f"tcp://{address.strip().lower()}"


class Settings(BaseSettings):
    """Where state lives, and how the service and the schedule behave. Field `x` is `CHAR_RNN_X`."""

    model_config = SettingsConfigDict(
        env_prefix="CHAR_RNN_",
        extra="ignore",
        frozen=True,
        allow_inf_nan=False,
        validate_default=True,
        populate_by_name=True,
    )

    home: Path = Field(ROOT / ".char-rnn", description="all state: runs, Prefect's and BentoML's homes")
    runs: Path | None = Field(None, description="run directories (default HOME/runs)")
    data: Path = Field(ROOT / "data", description="the corpus folder flows use by default")
    allowed_roots: Annotated[list[Path], NoDecode, BeforeValidator(_path_list)] = Field(
        [], description="more folders flow parameters may point into, ':'-separated"
    )
    prefect_home: Path | None = Field(None, validation_alias=AliasChoices("PREFECT_HOME"))
    bentoml_home: Path | None = Field(None, validation_alias=AliasChoices("BENTOML_HOME"))
    # the sweep's Dask schedulers: the only ones a flow run may name (dask_address); TLS files for tls:// ones
    dask_schedulers: Annotated[list[str], NoDecode, BeforeValidator(_word_list)] = Field(
        [],
        description="Dask schedulers flow runs may use, e.g. tls://10.0.0.5:8786 (comma- or space-separated)",
    )
    dask_tls_ca: Path | None = Field(None, description="CA certificate that signed the scheduler's (PEM)")
    dask_tls_cert: Path | None = Field(None, description="this client's certificate (PEM)")
    dask_tls_key: Path | None = Field(None, description="this client's private key (PEM)")
    # scoring a candidate and the current model (the pipeline, the sweep, char-rnn evaluate)
    eval_chars: int = Field(
        2_000_000, ge=1000, le=10**10, description="validation characters scored whole; above, an even sample"
    )
    # the scheduled retrain (python -m flows.serve)
    retrain_interval: float | None = Field(None, gt=0, le=366 * 86400, description="seconds")
    retrain_cron: str | None = None
    # the service (service.py)
    host: IPvAnyAddress = Field(IPv4Address("127.0.0.1"), description="address to listen on")
    port: int = Field(3000, ge=1, le=65535)
    api_key: SecretStr | None = Field(None, description="when set, generation routes need 'Bearer <key>'")
    metrics_key: SecretStr | None = Field(None, description="when set, /metrics needs 'Bearer <key>'")
    reload_interval: float = Field(2.0, gt=0, le=3600, description="seconds between registry checks")
    max_prompt: int = Field(2000, ge=1, le=100_000, description="characters")
    timeout: float = Field(30.0, gt=0, le=3600, description="seconds per request")
    body_timeout: float = Field(5.0, gt=0, le=300, description="seconds to receive a request body")
    max_batch: int = Field(64, ge=1, le=4096, description="rows per generation step; 1 = no batching")
    max_concurrency: int = Field(512, ge=1, le=100_000, description="requests in progress per worker")
    workers: int = Field(1, ge=1, le=64, description="service processes")
    blas_threads: int = Field(1, ge=1, le=256, description="BLAS threads per service process")

    @field_validator(
        "home",
        "runs",
        "data",
        "prefect_home",
        "bentoml_home",
        "allowed_roots",
        "dask_tls_ca",
        "dask_tls_cert",
        "dask_tls_key",
    )
    @classmethod
    def _absolute(cls, v: Path | list[Path] | None) -> Path | list[Path] | None:
        """Relative paths in variables are taken from the current directory, once, here."""
        if isinstance(v, list):
            return [p.expanduser().absolute() for p in v]
        return None if v is None else v.expanduser().absolute()

    @field_validator("api_key", "metrics_key")
    @classmethod
    def _non_empty(cls, v: SecretStr | None) -> SecretStr | None:
        return v if v is None or v.get_secret_value() else None  # CHAR_RNN_API_KEY= means no key

    @property
    def runs_dir(self) -> Path:
        return self.runs or self.home / "runs"

    @property
    def prefect_dir(self) -> Path:
        return self.prefect_home or self.home / "prefect"

    @property
    def bentoml_dir(self) -> Path:
        return self.bentoml_home or self.home / "bentoml"

    def roots(self) -> list[Path]:
        """Folders that flow parameters (data_dir, artifacts_root) may resolve into, symlinks followed."""
        found = [ROOT / "data", self.home, self.data, self.runs_dir, *self.allowed_roots]
        return list(dict.fromkeys(p.resolve() for p in found))

    def environment(self) -> dict[str, str]:
        """Variables for this process and its children: telemetry off, every home under `home`."""
        return TELEMETRY_OFF | {
            "CHAR_RNN_HOME": str(self.home),
            "PREFECT_HOME": str(self.prefect_dir),
            "BENTOML_HOME": str(self.bentoml_dir),
            "MPLCONFIGDIR": str(self.home / "matplotlib"),  # matplotlib's font cache, not ~/.cache
            "UV_CACHE_DIR": str(self.home / "uv-cache"),  # `bentoml build` runs uv: its cache, not ~/.cache
            "PREFECT_LOGGING_EXTRA_LOGGERS": "char_rnn",  # model/'s and the registry's logs reach run logs
            "PREFECT_LOGGING_TO_API_WHEN_MISSING_FLOW": "ignore",  # ... and outside a run stay local, quietly
        }


def variable(loc: tuple) -> str:
    """The environment variable behind a settings field."""
    name = str(loc[0]) if loc else "?"
    if name in ("prefect_home", "bentoml_home"):
        return name.upper()
    return f"CHAR_RNN_{name.upper()}"


def load(**overrides: object) -> Settings:
    """Settings from the environment (and `overrides`); a bad value raises one line naming its variable."""
    try:
        return Settings(**overrides)
    except ValidationError as e:
        raise SettingsError(
            "; ".join(f"{variable(x['loc'])}={x.get('input')!r}: {x['msg']}" for x in e.errors())
        ) from None


def own_prefect_profile() -> bool:
    """Whether the user chose a Prefect profile of their own: PREFECT_PROFILE set, or a profiles file
    (PREFECT_PROFILES_PATH, else ~/.prefect/profiles.toml) whose active profile is not Prefect's default or
    names an API URL (`prefect config set PREFECT_API_URL=...`, `prefect cloud login`)."""
    if os.environ.get("PREFECT_PROFILE"):
        return True
    path = Path(os.environ.get("PREFECT_PROFILES_PATH") or Path.home() / ".prefect" / "profiles.toml")
    try:
        profiles = tomllib.loads(path.expanduser().read_text(encoding="utf-8"))
    except (OSError, ValueError):  # none, or not TOML: no profile to keep
        return False
    active = profiles.get("active", "ephemeral")
    chosen = profiles.get("profiles", {}).get(active, {})
    return active not in PREFECT_DEFAULT_PROFILES or bool(chosen.get("PREFECT_API_URL"))


def configure(**overrides: object) -> dict[str, str]:
    """Check the settings (with `overrides`) and return the variables to export before Prefect or BentoML is
    imported: `os.environ.update(settings.configure())`. Homes the user set are kept; `overrides` are
    exported too, so that `current()` sees them. PREFECT_HOME goes under CHAR_RNN_HOME only when the user has
    no Prefect configuration of their own: with a profile of their own, Prefect keeps its home (~/.prefect),
    where that profile lives; PREFECT_API_URL, when set, names the server either way. Refuses when Prefect
    or BentoML was imported already without the home set that this would set (it chose one under ~)."""
    s = load(**overrides)
    env = {k: os.environ.get(k, v) for k, v in s.environment().items()}
    if "PREFECT_HOME" not in os.environ and own_prefect_profile():
        del env["PREFECT_HOME"]
    if "allowed_roots" in overrides:
        env["CHAR_RNN_ALLOWED_ROOTS"] = os.pathsep.join(map(str, s.allowed_roots))
    if "dask_schedulers" in overrides:
        env["CHAR_RNN_DASK_SCHEDULERS"] = " ".join(s.dask_schedulers)
    for module, var in (("prefect", "PREFECT_HOME"), ("bentoml", "BENTOML_HOME")):
        if module in sys.modules and var in env and var not in os.environ:
            raise SettingsError(
                f"{var} is not set and {module} has already chosen its home under ~; start this through "
                f"`char-rnn` (e.g. `char-rnn serve`), or export {var}={env[var]}"
            )
    if "PREFECT_HOME" in env:
        Path(env["PREFECT_HOME"]).mkdir(parents=True, exist_ok=True)  # Prefect makes only the last level
    return env


def current() -> Settings:
    """The settings as the environment says now (after the entry point's `configure()`)."""
    return load()


def isolated_env(root: Path) -> dict[str, str]:
    """Variables for a child process that keeps all its state under `root` (tests and benchmarks)."""
    return Settings(home=Path(root), prefect_home=None, bentoml_home=None).environment()
