"""The two commands as a newcomer meets them: `make install` with Debian's own Python (PEP 668: pip may not
install into it), and `make run` in a terminal (a pseudo-terminal here): the training as one updating line,
a second run that says it reuses the promoted model, and Ctrl-C that stops everything with status 0."""

import contextlib
import os
import pty
import shutil
import signal
import subprocess
import termios
import threading
import time
from pathlib import Path

import pytest
from conftest import free_port

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
    """UV_CACHE_DIR of the uv at hand, so that a HOME of the test's own still installs from the cache."""
    uv = shutil.which("uv")
    found = subprocess.run([uv, "cache", "dir"], capture_output=True, text=True) if uv else None
    return {"UV_CACHE_DIR": found.stdout.strip()} if found and found.returncode == 0 else {}


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


class Terminal:
    """`make run` in a pseudo-terminal of its own session: what it shows, and Ctrl-C as a user types it."""

    def __init__(self, env: dict[str, str]):
        self.env = env
        self.master, slave = pty.openpty()
        termios.tcsetwinsize(slave, (40, 120))
        # A session whose controlling terminal is the pty, with SIGINT at its default as a terminal's shell
        # leaves it: a test run started in the background (`make test &` from a script) would pass it on
        # ignored, and a script cannot trap a signal ignored on entry.
        self.proc = subprocess.Popen(
            ["setsid", "--ctty", "env", "--default-signal=INT", "make", "run"],
            cwd=ROOT,
            env=env,
            stdin=slave,
            stdout=slave,
            stderr=slave,
        )
        os.close(slave)
        self.output = b""
        self.reader = threading.Thread(target=self.read, daemon=True)
        self.reader.start()

    def read(self) -> None:
        while True:
            try:
                chunk = os.read(self.master, 65536)
            except OSError:  # the other side closed
                return
            if not chunk:
                return
            self.output += chunk

    @property
    def text(self) -> str:
        return self.output.decode(errors="replace")

    def wait_for(self, what: str, timeout: float) -> None:
        end = time.monotonic() + timeout
        while what not in self.text:
            assert self.proc.poll() is None, f"make run ended ({self.proc.returncode}):\n{self.text[-5000:]}"
            assert time.monotonic() < end, f"no {what!r} within {timeout:.0f} s:\n{self.text[-5000:]}"
            time.sleep(0.2)

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


def test_make_run_trains_on_one_line_then_reuses_and_ctrl_c_says_goodbye(tmp_path, small_text):
    corpus, home, user = tmp_path / "corpus", tmp_path / "home", tmp_path / "user-home"
    corpus.mkdir()
    user.mkdir()
    (corpus / "a.txt").write_text(small_text, encoding="utf-8")
    env = clean_env(
        CHAR_RNN_HOME=str(home),
        CHAR_RNN_DATA=str(corpus),
        PREFECT_SERVER_API_PORT=str(free_port()),
        CHAR_RNN_PORT=str(free_port()),
        STEPS="800",
        HIDDEN="32",
        HOME=str(user),
        TERM="xterm",
        **uv_cache(),
    )
    first = Terminal(env)
    try:
        first.wait_for("Everything is up", 600)
    finally:
        code = first.ctrl_c()
    shown = first.text
    lines = shown.split("\n")
    trained = next(line for line in lines if "] 800/800 loss " in line)
    assert code == 0 and lines[-1].strip() == "" and "Bye." in lines[-2] and "Error" not in shown, shown[
        -3000:
    ]
    assert trained.count("\r  [") >= 2, "the training is not one line updated in place"
    order = ["Corpus ", "Training from scratch", "] 800/800 loss ", "Candidate: ", "Promoted char-rnn:"]
    assert [next(i for i, line in enumerate(lines) if s in line) for s in order] == sorted(
        next(i for i, line in enumerate(lines) if s in line) for s in order
    )
    assert len(lines) < 40 and "prefect.artifact" not in shown and "export PREFECT_API_URL" not in shown
    assert started_under(home) == {}, "a process make run started is still running"

    second = Terminal(env)
    try:
        second.wait_for("Starting the service", 600)  # Ctrl-C while the service starts
    finally:
        code = second.ctrl_c()
    shown = second.text
    assert code == 0 and "Bye." in shown and "Error" not in shown, shown[-3000:]
    assert "Reusing the promoted model: corpus unchanged since char-rnn:" in shown and "Training" not in shown
    assert started_under(home) == {}, "a process make run started is still running"

    # Without a terminal (a supervisor, `timeout`, nohup), a TERM to the script stops everything too: a wait
    # in one foreground job for good held it off while everything was up
    log = tmp_path / "no-tty.log"
    with log.open("wb") as out:
        make = subprocess.Popen(
            ["make", "run"], cwd=ROOT, env=env, stdin=subprocess.DEVNULL, stdout=out, stderr=out,
            start_new_session=True,
        )  # fmt: skip
    try:
        end = time.monotonic() + 600
        while "Everything is up" not in log.read_text(errors="replace"):
            assert make.poll() is None and time.monotonic() < end, log.read_text(errors="replace")[-3000:]
            time.sleep(0.2)
        script = next(p for p, cmd in started_under(home).items() if ppid(p) == make.pid and "run.sh" in cmd)
        os.kill(script, signal.SIGTERM)
        make.wait(60)
    finally:
        if make.poll() is None:
            os.killpg(make.pid, signal.SIGKILL)
            for pid in started_under(home):
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
    assert "Bye." in log.read_text(errors="replace")
    assert started_under(home) == {}, "a process make run started is still running"
    assert sorted(user.rglob("*")) == [], "something was written under ~"
