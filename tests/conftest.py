"""Shared fixtures. Every test session writes under its own temporary CHAR_RNN_HOME, never under ~ or ./,
and removes it at the end."""

import os
import shutil
import signal
import socket
import subprocess
import tempfile
from pathlib import Path

import pytest
from threadpoolctl import threadpool_limits

from settings import isolated_env

SESSION_HOME = Path(tempfile.mkdtemp(prefix="char-rnn-tests-"))
ROOT = Path(__file__).resolve().parent.parent
# uv's cache stays the one `make test` installed from: a cache of the session's own would download every
# package again for each Bento the tests build.
UV = shutil.which("uv") or str(ROOT / ".venv" / "bin" / "uv")
UV_CACHE = os.environ.get("UV_CACHE_DIR") or subprocess.check_output([UV, "cache", "dir"], text=True).strip()
os.environ.update(isolated_env(SESSION_HOME) | {"UV_CACHE_DIR": UV_CACHE})
os.environ.pop("CHAR_RNN_RUNS", None)


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    shutil.rmtree(SESSION_HOME, ignore_errors=True)


SHAKESPEARE = ROOT / "data" / "tinyshakespeare.txt"


@pytest.fixture(scope="session")
def small_text() -> str:
    """The first 20k characters of tiny shakespeare: enough to learn something in a few seconds."""
    return SHAKESPEARE.read_text(encoding="utf-8")[:20_000]


@pytest.fixture
def small_corpus(tmp_path, small_text) -> Path:
    path = tmp_path / "corpus.txt"
    path.write_text(small_text, encoding="utf-8")
    return path


def damage(f: Path, how: str) -> None:
    """Truncate `f` to a third, or flip bits in its middle byte."""
    raw = bytearray(f.read_bytes())
    if how == "truncate":
        raw = raw[: len(raw) // 3]
    else:
        raw[len(raw) // 2] ^= 0x5A
    f.write_bytes(bytes(raw))


@pytest.fixture(scope="module")
def prefect_api():
    """A temporary Prefect server and database for a module's flow runs (and one BLAS thread)."""
    from prefect.testing.utilities import prefect_test_harness  # Prefect reads its home when imported

    with prefect_test_harness(server_startup_timeout=120), threadpool_limits(1):
        yield


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def stop(proc: subprocess.Popen) -> None:
    """End `proc` and its process group (it was started in a session of its own)."""
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(20)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(10)
