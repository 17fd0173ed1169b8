"""Where everything lives on disk: one root, CHAR_RNN_HOME (default ./.char-rnn), each part overridable."""

from __future__ import annotations

import os
from pathlib import Path

TELEMETRY_OFF = {
    "DO_NOT_TRACK": "1",
    "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
    "BENTOML_DO_NOT_TRACK": "True",
}


def home() -> Path:
    return Path(os.environ.get("CHAR_RNN_HOME", ".char-rnn")).absolute()


def runs() -> Path:
    """Run directories: encoded data, checkpoints, metrics, plots (CHAR_RNN_RUNS overrides)."""
    return Path(os.environ.get("CHAR_RNN_RUNS") or home() / "runs").absolute()


def isolated_env(root: Path) -> dict[str, str]:
    """Environment variables for a process that keeps all its state under `root`, telemetry off."""
    root = Path(root)
    return TELEMETRY_OFF | {
        "CHAR_RNN_HOME": str(root),
        "PREFECT_HOME": str(root / "prefect"),
        "BENTOML_HOME": str(root / "bentoml"),
    }


def configure_env() -> None:
    """Telemetry off and project-local Prefect/BentoML homes, unless already set. Call before import."""
    for k, v in TELEMETRY_OFF.items():
        os.environ.setdefault(k, v)
    os.environ.setdefault("PREFECT_HOME", str(home() / "prefect"))
    os.environ.setdefault("BENTOML_HOME", str(home() / "bentoml"))
    Path(os.environ["PREFECT_HOME"]).mkdir(parents=True, exist_ok=True)  # Prefect makes only the last level
