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


OWN_API = 'active = "ephemeral"\n[profiles.ephemeral]\nPREFECT_API_URL = "http://10.0.0.5:4200/api"\n'


@pytest.mark.parametrize(
    "profiles,env,own",
    [
        (None, {}, False),
        (
            'active = "ephemeral"\n[profiles.ephemeral]\nPREFECT_SERVER_EPHEMERAL_ENABLED = "true"\n',
            {},
            False,
        ),
        ("this is not TOML", {}, False),
        (OWN_API, {}, True),  # `prefect config set PREFECT_API_URL=...`
        ('active = "work"\n[profiles.work]\n', {}, True),  # `prefect profile use work`
        (None, {"PREFECT_PROFILE": "work"}, True),
        (OWN_API, {"PREFECT_PROFILES_PATH": "/nonexistent/profiles.toml"}, False),
    ],
)
def test_a_prefect_profile_of_the_users_own_is_told_from_prefects_default(
    monkeypatch, tmp_path, profiles, env, own
):
    monkeypatch.setenv("HOME", str(tmp_path))
    for var in ("PREFECT_PROFILE", "PREFECT_PROFILES_PATH"):
        monkeypatch.delenv(var, raising=False)
    for var, value in env.items():
        monkeypatch.setenv(var, value)
    if profiles is not None:
        (tmp_path / ".prefect").mkdir()
        (tmp_path / ".prefect" / "profiles.toml").write_text(profiles)
    assert settings.own_prefect_profile() is own


CONFIGURED = (
    "import os, settings; os.environ.update(settings.configure()); "
    "from prefect.settings import get_current_settings as current; print(current().home, current().api.url)"
)


@pytest.mark.parametrize("profile", [False, True])
def test_prefect_uses_the_users_profile_and_home_else_one_under_char_rnn_home(tmp_path, profile):
    user = tmp_path / "user"
    user.mkdir()
    if profile:
        (user / ".prefect").mkdir()
        (user / ".prefect" / "profiles.toml").write_text(OWN_API)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PREFECT_", "BENTOML_", "CHAR_RNN_"))}
    env |= {"HOME": str(user), "CHAR_RNN_HOME": str(tmp_path / "h"), "MPLCONFIGDIR": str(tmp_path / "mpl")}
    r = subprocess.run(
        [sys.executable, "-c", CONFIGURED], env=env, cwd=ROOT, capture_output=True, text=True, timeout=120
    )
    assert r.returncode == 0, r.stderr
    home, url = r.stdout.split()
    if profile:
        assert (home, url) == (str(user / ".prefect"), "http://10.0.0.5:4200/api")
    else:
        assert (home, url) == (str(tmp_path / "h" / "prefect"), "None")
        assert sorted(user.rglob("*")) == []  # nothing written outside CHAR_RNN_HOME
