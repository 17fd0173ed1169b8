"""One settings object: CHAR_RNN_* variables checked once, a bad one named in one line, homes in the home."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

import settings

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.parametrize(
    "var,value,says",
    [
        ("CHAR_RNN_TIMEOUT", "inf", "finite number"),
        ("CHAR_RNN_TIMEOUT", "0", "greater than 0"),
        ("CHAR_RNN_RELOAD_INTERVAL", "nan", "finite number"),
        ("CHAR_RNN_MAX_BATCH", "many", "valid integer"),
        ("CHAR_RNN_WORKERS", "0", "greater than or equal to 1"),
        ("CHAR_RNN_HOST", "localhost:3000", "IPv4 or IPv6"),
        ("CHAR_RNN_PORT", "70000", "less than or equal to 65535"),
        ("CHAR_RNN_RETRAIN_INTERVAL", "-5", "greater than 0"),
    ],
)
def test_a_bad_variable_is_refused_in_one_line_naming_it(monkeypatch, var, value, says):
    monkeypatch.setenv(var, value)
    with pytest.raises(settings.SettingsError) as e:
        settings.load()
    assert str(e.value).startswith(f"{var}={value!r}: ") and says in str(e.value)
    assert "\n" not in str(e.value)


def test_defaults_and_derived_paths(monkeypatch, tmp_path):
    for var in [k for k in os.environ if k.startswith("CHAR_RNN_")] + ["PREFECT_HOME", "BENTOML_HOME"]:
        monkeypatch.delenv(var)
    s = settings.load()
    assert s.home == ROOT / ".char-rnn" and s.runs_dir == s.home / "runs"
    assert s.bentoml_dir == s.home / "bentoml" and s.prefect_dir == s.home / "prefect"
    assert str(s.host) == "127.0.0.1" and s.api_key is None
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("CHAR_RNN_HOME", "rel")  # relative to the current directory, once
    monkeypatch.setenv("CHAR_RNN_ALLOWED_ROOTS", f"/srv/a{os.pathsep}/srv/b")
    s = settings.load()
    assert s.home == tmp_path / "rel" and s.allowed_roots == [Path("/srv/a"), Path("/srv/b")]
    assert {Path("/srv/a"), ROOT / "data", tmp_path / "rel"} <= set(s.roots())


def test_configure_exports_homes_but_keeps_what_the_user_set(monkeypatch, tmp_path):
    monkeypatch.setenv("CHAR_RNN_HOME", str(tmp_path / "h"))
    monkeypatch.setenv("BENTOML_HOME", str(tmp_path / "mine"))
    env = settings.configure()
    assert env["BENTOML_HOME"] == str(tmp_path / "mine") and env["PREFECT_HOME"] == os.environ["PREFECT_HOME"]
    assert env["MPLCONFIGDIR"] == os.environ["MPLCONFIGDIR"] and env["DO_NOT_TRACK"] == "1"
    assert settings.load().environment()["MPLCONFIGDIR"] == str(tmp_path / "h" / "matplotlib")


def test_service_refuses_a_bentoml_that_chose_its_home_under_the_user_home(tmp_path):
    """`bentoml serve` without BENTOML_HOME has already picked ~/bentoml when it imports service.py."""
    env = {k: v for k, v in os.environ.items() if k not in ("BENTOML_HOME", "PREFECT_HOME")}
    env |= {"HOME": str(tmp_path), "CHAR_RNN_HOME": str(tmp_path / "h")}
    code = "import bentoml, service"
    r = subprocess.run(
        [sys.executable, "-c", code], env=env, cwd=ROOT, capture_output=True, text=True, timeout=120
    )
    assert r.returncode != 0 and "BENTOML_HOME is not set" in r.stderr and "char-rnn serve" in r.stderr
