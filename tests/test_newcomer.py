"""The two commands as a newcomer meets them: `make install` with Debian's own Python (PEP 668: pip may not
install into it), and `make run` in a terminal (a pseudo-terminal here) on their own folder of text, typed as
the README says (`CHAR_RNN_DATA=~/my-texts make run`): "Everything is up" before the training starts, the
training as one updating line, a second run that says it reuses the promoted model, a third that asks for more
steps and trains, and Ctrl-C (or a TERM) that stops everything with status 0."""

import contextlib
import os
import shutil
import signal
import subprocess
import time
from pathlib import Path

import httpx
import pty_terminal
import pytest
from conftest import UV_CACHE, free_port

ROOT = Path(__file__).resolve().parent.parent
DEBIAN_PYTHON = Path("/usr/bin/python3")


def can_make_venvs(python: Path) -> bool:
    return python.exists() and subprocess.run([python, "-c", "import ensurepip, venv"]).returncode == 0


@pytest.fixture(scope="module")
def debian_python() -> Path:
    """Debian's /usr/bin/python3 with its venv module, installed with apt when missing (CI runs as root)."""
    if not can_make_venvs(DEBIAN_PYTHON):
        if os.geteuid() != 0 or not shutil.which("apt-get"):
            pytest.skip(
                "needs Debian's python3 and python3-venv (apt-get install python3 python3-venv, as root)"
            )
        apt = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
        subprocess.run(["apt-get", "update", "-q"], env=apt, check=True, capture_output=True)
        subprocess.run(["apt-get", "install", "-y", "-q", "python3", "python3-venv"], env=apt, check=True)
    assert can_make_venvs(DEBIAN_PYTHON)
    return DEBIAN_PYTHON


def clean_env(**extra: str) -> dict[str, str]:
    """This environment without the test session's homes (so the checkout's defaults apply), venv and, under
    `make test`, the outer make's variables (a newcomer's make is no sub-make)."""
    drop = ("CHAR_RNN_", "PREFECT_", "BENTOML_HOME", "VIRTUAL_ENV", "MPLCONFIGDIR", "MAKE", "MFLAGS")
    return {k: v for k, v in os.environ.items() if not k.startswith(drop)} | extra


def uv_cache() -> dict[str, str]:
    """The uv cache `make test` installed from (conftest keeps it), so that a HOME of the test's own still
    installs from that cache."""
    return {"UV_CACHE_DIR": UV_CACHE}


def test_make_install_bootstraps_uv_without_touching_debians_python(debian_python, tmp_path):
    repo, home = tmp_path / "checkout", tmp_path / "user-home"
    home.mkdir()
    listed = subprocess.run(
        ["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
        cwd=ROOT,
        capture_output=True,
        check=True,
    )
    for name in filter(None, listed.stdout.decode().split("\0")):
        if (ROOT / name).is_file():
            (repo / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(ROOT / name, repo / name)
    env = clean_env(PATH="/usr/bin:/bin", HOME=str(home), **uv_cache())  # no uv on PATH
    make = ["make", "install", f"PYTHON={debian_python}"]

    first = subprocess.run(make, cwd=repo, env=env, capture_output=True, text=True, timeout=900)

    assert first.returncode == 0, first.stdout[-3000:] + first.stderr[-3000:]
    assert f"uv is not installed: installing it into {repo}/.char-rnn/uv" in first.stdout
    base = subprocess.run(
        [repo / ".venv/bin/python", "-c", "import sys; print(sys.base_prefix)"], capture_output=True
    )
    assert base.stdout.decode().strip() == "/usr", "the project's venv is not Debian's Python's"
    assert (
        subprocess.run([repo / ".venv/bin/char-rnn", "models", "--help"], capture_output=True).returncode == 0
    )
    assert subprocess.run([debian_python, "-c", "import uv"], capture_output=True).returncode != 0
    again = subprocess.run(make, cwd=repo, env=env, capture_output=True, text=True, timeout=300)
    assert again.returncode == 0 and "uv is not installed" not in again.stdout
    for target in ("run", "test"):  # the two commands install the same way
        plan = subprocess.run(
            ["make", "-n", target, f"PYTHON={debian_python}"], cwd=repo, env=env, capture_output=True
        )
        assert plan.stdout.decode().startswith(f"{repo}/.char-rnn/uv/bin/uv sync --frozen"), plan.stdout
    assert sorted(home.rglob("*")) == [], "something was written under ~"


class Terminal(pty_terminal.Terminal):
    """`make run` in a pseudo-terminal of its own session: what it shows, and Ctrl-C as a user types it."""

    def __init__(self, env: dict[str, str], command: tuple[str, ...] = ("make", "run")):
        super().__init__(list(command), env, rows=40, cols=120)
        self.env = env

    def wait_for(self, what: str, timeout: float) -> float:
        """The time (time.monotonic) `what` was first seen on the screen, waiting for it."""
        end = time.monotonic() + timeout
        while what not in self.text:
            assert self.proc.poll() is None, f"make run ended ({self.proc.returncode}):\n{self.text[-5000:]}"
            assert time.monotonic() < end, f"no {what!r} within {timeout:.0f} s:\n{self.text[-5000:]}"
            time.sleep(0.1)
        return time.monotonic()

    def ctrl_c(self) -> int:
        os.write(self.master, b"\x03")
        try:
            code = self.proc.wait(120)
        finally:
            if self.proc.poll() is None:  # a failed test leaves nothing running: make run's jobs have groups
                os.killpg(self.proc.pid, signal.SIGKILL)  # of their own
                for pid in started_under(Path(self.env["CHAR_RNN_HOME"])):
                    with contextlib.suppress(ProcessLookupError):
                        os.kill(pid, signal.SIGKILL)
        self.reader.join(10)
        os.close(self.master)
        return code


def started_under(home: Path) -> dict[int, str]:
    """Processes whose environment names `home` as CHAR_RNN_HOME: pid -> command line."""
    found = {}
    for environ in Path("/proc").glob("[0-9]*/environ"):
        try:
            if f"\0CHAR_RNN_HOME={home}\0".encode() in b"\0" + environ.read_bytes():
                cmd = (environ.parent / "cmdline").read_bytes().replace(b"\0", b" ").decode()
                found[int(environ.parent.name)] = cmd
        except OSError:
            continue
    return found


def ppid(pid: int) -> int:
    """The parent of process `pid` (0 once it is gone)."""
    try:
        return int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1])
    except (OSError, IndexError, ValueError):
        return 0


def lines_of(shown: str) -> list[str]:
    return shown.replace("\r\n", "\n").split("\n")


def index(lines: list[str], text: str) -> int:
    return next(i for i, line in enumerate(lines) if text in line)


def test_make_run_on_my_texts_is_up_first_trains_on_one_line_reuses_and_trains_more(tmp_path, small_text):
    home, user = tmp_path / "home", tmp_path / "user-home"
    texts = user / "my-texts"
    texts.mkdir(parents=True)
    mine = small_text + "Ω marks this text as the user's own.\n"
    (texts / "mine.txt").write_text(mine, encoding="utf-8")
    env = clean_env(
        CHAR_RNN_HOME=str(home),
        PREFECT_SERVER_API_PORT=str(free_port()),
        CHAR_RNN_PORT=str(free_port()),
        STEPS="400",
        HIDDEN="32",
        HOME=str(user),
        TERM="xterm",
        **uv_cache(),
    )
    # As the README's first screen has it: the shell expands the ~.
    first = Terminal(env, ("bash", "-c", "CHAR_RNN_DATA=~/my-texts exec make run"))
    try:
        started = first.wait_for("Starting the service", 600)  # after `make install`
        up = first.wait_for("Everything is up", 180)
        first.wait_for("The service serves the promoted model", 600)
        served = httpx.post(f"http://127.0.0.1:{env['CHAR_RNN_PORT']}/model_info", json={}, timeout=10).json()
    finally:
        code = first.ctrl_c()
    shown = first.text
    lines = lines_of(shown)
    assert code == 0 and lines[-1].strip() == "" and "Bye." in lines[-2], shown[-3000:]
    assert "Error" not in shown and up - started < 120, (
        f"Everything is up {up - started:.0f} s after the start"
    )
    assert f"Corpus {texts}: 1 file(s)" in shown and sorted(texts.iterdir()) == [texts / "mine.txt"]
    assert "Ω" in served["vocab"] and served["train"]["steps"] == 400  # the model learnt the user's text
    trained = next(line for line in lines if "] 400/400 loss " in line)
    assert trained.count("\r  [") >= 2, "the training is not one line updated in place"
    order = ["Everything is up", "Corpus ", "Training from scratch", "] 400/400 loss ", "Candidate: "]
    order += ["Promoted char-rnn:", "The service serves the promoted model"]
    assert [index(lines, s) for s in order] == sorted(index(lines, s) for s in order), shown[-3000:]
    assert len(lines) < 45 and "prefect.artifact" not in shown and "export PREFECT_API_URL" not in shown
    assert started_under(home) == {}, "a process make run started is still running"

    env["CHAR_RNN_DATA"] = str(texts)
    second = Terminal(env)
    try:
        second.wait_for("Reusing the promoted model", 600)
    finally:
        code = second.ctrl_c()
    shown = second.text
    assert code == 0 and "Bye." in shown and "Error" not in shown, shown[-3000:]
    assert "Reusing the promoted model: corpus unchanged since char-rnn:" in shown and "Training" not in shown
    assert started_under(home) == {}, "a process make run started is still running"

    # More steps than the promoted model learnt: this run trains (continuing it) instead of reusing it. And
    # without a terminal (a supervisor, `timeout`, nohup), a TERM to the script stops everything at once, also
    # while that training runs (the script waits for it a second at a time, never in one foreground job).
    log = tmp_path / "no-tty.log"
    with log.open("wb") as out:
        make = subprocess.Popen(
            ["make", "run"], cwd=ROOT, env=env | {"STEPS": "20000"}, stdin=subprocess.DEVNULL, stdout=out,
            stderr=out, start_new_session=True,
        )  # fmt: skip
    try:
        end = time.monotonic() + 900
        while "Training warm-started from char-rnn:" not in log.read_text(errors="replace"):
            assert make.poll() is None and time.monotonic() < end, log.read_text(errors="replace")[-3000:]
            time.sleep(0.2)
        script = next(p for p, cmd in started_under(home).items() if ppid(p) == make.pid and "run.sh" in cmd)
        os.kill(script, signal.SIGTERM)
        make.wait(30)
    finally:
        if make.poll() is None:
            os.killpg(make.pid, signal.SIGKILL)
            for pid in started_under(home):
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
    shown = log.read_text(errors="replace")
    assert "Bye." in shown and "Reusing" not in shown
    assert "it learnt 400 steps in all, 19600 short of the 20000 asked" in shown, shown[-3000:]
    assert "gru 2x32, 19600 steps (" in shown
    assert started_under(home) == {}, "a process make run started is still running"
    assert sorted(user.rglob("*")) == [texts, texts / "mine.txt"], "something was written under ~"
    assert (texts / "mine.txt").read_text(encoding="utf-8") == mine
