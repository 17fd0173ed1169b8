"""Shared benchmark helpers: telemetry off, the corpus as ids, BLAS thread info, alternated timing, and the
recorder that writes each benchmark's section of docs/benchmarks.md (`begin`, then `record`)."""

from __future__ import annotations

import argparse
import fcntl
import os
import platform
import re
import shlex
import signal
import socket
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
from threadpoolctl import threadpool_info

from model import corpus
from model.files import write_atomic
from model.vocab import Vocab
from settings import ROOT, TELEMETRY_OFF

os.environ.update(TELEMETRY_OFF)  # for this process and what it starts

DATA = ROOT / "data" / "tinyshakespeare.txt"


def load_ids(path: Path = DATA) -> tuple[np.ndarray, Vocab]:
    """The corpus at `path` as int32 ids, and its vocabulary."""
    text = corpus.read(path).text
    vocab = Vocab.from_text(text)
    return vocab.encode(text), vocab


def blas_threads() -> int:
    """Threads of NumPy's BLAS (the first BLAS threadpool found in this process)."""
    for info in threadpool_info():
        if info["user_api"] == "blas" and "numpy" in info["filepath"]:
            return int(info["num_threads"])
    return max(int(info["num_threads"]) for info in threadpool_info() if info["user_api"] == "blas")


def blas_name() -> str:
    for info in threadpool_info():
        if info["user_api"] == "blas" and "numpy" in info["filepath"]:
            return f"{info['internal_api']} {info.get('version')} ({info.get('architecture')})"
    return "unknown"


def alternate(
    contenders: dict[str, Callable[[], int]], rounds: int, seconds: float
) -> dict[str, list[float]]:
    """Run each contender (a step returning the characters it processed) for `seconds` per round,
    rotating the order every round; per-round characters/s for each."""
    rates: dict[str, list[float]] = {k: [] for k in contenders}
    names = list(contenders)
    for r in range(rounds):
        for k in names[r % len(names) :] + names[: r % len(names)]:
            step, n = contenders[k], 0
            t0 = time.perf_counter()
            while True:
                n += step()
                dt = time.perf_counter() - t0
                if dt >= seconds:
                    break
            rates[k].append(n / dt)
    return rates


def median(xs: list[float]) -> float:
    return float(statistics.median(xs))


@contextmanager
def server() -> Iterator[str]:
    """The API URL of PREFECT_API_URL's server, or of one started here (`prefect server start` on a free
    loopback port, in a session of its own) and stopped by its process group at the end."""
    if url := os.environ.get("PREFECT_API_URL"):
        yield url
        return
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = os.environ | {"PREFECT_SERVER_API_PORT": str(port), "PREFECT_SERVER_API_HOST": "127.0.0.1"}
    url = f"http://127.0.0.1:{port}/api"
    proc = subprocess.Popen(
        [sys.executable, "-m", "prefect", "server", "start"],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    try:
        wait = [sys.executable, "-m", "prefect", "server", "status", "--wait", "--timeout", "300"]
        subprocess.run(wait, env=env | {"PREFECT_API_URL": url}, check=True, capture_output=True)
        yield url
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(30)


# The recorder. Each benchmark owns one section of DOC, between `<!-- bench:NAME -->` and
# `<!-- /bench:NAME -->`; a run replaces its own section in place and keeps the rest of the page, so recording
# a figure is running its benchmark, never editing prose.
DOC = ROOT / "docs" / "benchmarks.md"
HEADER = """# Benchmarks

What the project's speed and quality figures are, as measured. This page is written by the benchmarks in
`bench/`: each section between `<!-- bench:NAME -->` and `<!-- /bench:NAME -->` is rewritten in place by the
last run of `bench/NAME.py` (train_quality keeps one per cell, settings and budget; the rest of the page is
kept), with the date, the machine, its load average before and after, the commit and the exact command. To
update a figure, run its benchmark (`--no-record` runs one without touching this page); edits inside a
section are lost at its next run. Other jobs on the cores make every figure noisy (see the load average):
compare ratios, and prefer quiet runs.
"""


@dataclass
class Run:
    """One benchmark run to be recorded: what it is, when it started, the load average then."""

    name: str  # bench/<name>.py; the section's marker
    title: str
    record: bool = True
    started: datetime = field(default_factory=lambda: datetime.now(UTC))
    load_before: tuple[float, ...] = field(default_factory=os.getloadavg)
    command: str = field(default_factory=lambda: command())
    facts: dict[str, str] = field(default_factory=dict)  # more of the setup, for its table (e.g. torch's)


def add_record_flag(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--no-record", dest="record", action="store_false", help=f"do not write this run into {DOC.name}"
    )


def begin(name: str, title: str, args: argparse.Namespace) -> Run:
    """Call first thing in main(): the start time, load average and command of the run."""
    return Run(name, title, getattr(args, "record", True))


def command() -> str:
    """The command line that started this process, with the checkout's path left out: `uv run ...` when uv
    started it (its `--with` says where torch came from), else `python ...`."""
    args = ["python", *sys.argv]
    try:
        parent = Path(f"/proc/{os.getppid()}/cmdline").read_bytes().decode().split("\0")[:-1]
        ours = Path(sys.argv[0]).name  # uv's own command only when it started this very script
        if (
            parent
            and Path(parent[0]).name == "uv"
            and "run" in parent[1:3]
            and any(Path(a).name == ours for a in parent)
        ):
            args = ["uv", *parent[1:]]
    except (OSError, UnicodeDecodeError):
        pass
    return shlex.join(a.replace(f"{ROOT}/", "") for a in args)


def machine() -> dict[str, str]:
    """The hardware and numeric libraries a figure belongs to."""
    info = {"cpu": platform.processor() or platform.machine()}
    try:
        text = Path("/proc/cpuinfo").read_text()
        info["cpu"] = re.search(r"^model name\s*:\s*(.+)$", text, re.M).group(1).strip()
        flags = set(re.search(r"^flags\s*:(.*)$", text, re.M).group(1).split())
        info["cpu"] += ", " + ("AVX-512" if "avx512f" in flags else "AVX2" if "avx2" in flags else "no AVX2")
    except (OSError, AttributeError):
        pass
    usable = len(os.sched_getaffinity(0))
    info["cores"] = f"{os.cpu_count()}" + ("" if usable == os.cpu_count() else f" ({usable} usable)")
    info["BLAS"] = blas_name()
    info["numpy"] = f"{np.__version__} (Python {platform.python_version()})"
    return info


def commit(root: Path = ROOT, page: Path = DOC) -> str:
    """HEAD's short hash, and "+ uncommitted changes" when the tree differs from it (`page` aside: it changes
    with every recorded run)."""
    git = ["git", "-C", str(root)]
    skip = f":!{page.relative_to(root)}" if page.is_relative_to(root) else ":!docs/benchmarks.md"
    try:
        head = subprocess.run(
            [*git, "rev-parse", "--short", "HEAD"], capture_output=True, text=True, check=True
        )
        status = subprocess.run(
            [*git, "status", "--porcelain", "--", ".", skip], capture_output=True, text=True, check=True
        )
    except (OSError, subprocess.CalledProcessError):
        return "unknown (not a git checkout)"
    return head.stdout.strip() + (" + uncommitted changes" if status.stdout.strip() else "")


def markdown_table(header: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
    """A GitHub markdown table; numbers as given (format them first)."""

    def line(cells: Sequence[object]) -> str:
        return "| " + " | ".join(str(c).replace("|", "\\|") for c in cells) + " |"

    return "\n".join([line(header), line(["---"] * len(header)), *map(line, rows)])


def section(run: Run, body: str, load_after: Sequence[float]) -> str:
    """The run's section: its markers, title, the facts every figure needs, then `body`."""
    loads = (" ".join(f"{x:.2f}" for x in xs) for xs in (run.load_before, load_after))
    facts = {"date": run.started.strftime("%Y-%m-%d %H:%M UTC")} | machine() | run.facts
    facts["load average (1, 5, 15 min)"] = "{} before, {} after".format(*loads)
    facts["commit"] = commit()
    facts["command"] = f"`{run.command}`"
    head = markdown_table(["", "this run"], list(facts.items()))
    mark = f"bench:{run.name}"
    return f"<!-- {mark} -->\n## {run.title}\n\n{head}\n\n{body.strip()}\n<!-- /{mark} -->"


def replace_section(page: str, name: str, text: str) -> str:
    """`page` with the section `name` replaced by `text`, in place; appended at the end when it is new."""
    found = re.compile(rf"<!-- bench:{re.escape(name)} -->.*?<!-- /bench:{re.escape(name)} -->", re.S)
    if found.search(page):
        return found.sub(lambda _: text, page, count=1)
    return page.rstrip("\n") + "\n\n" + text + "\n"


def record(run: Run, body: str, load_after: Sequence[float] | None = None, path: Path = DOC) -> None:
    """Write the run's section of `path` (markdown `body`: its tables and notes), unless --no-record.
    Read, replaced and written under a lock on the folder, atomically, so runs that end together both land."""
    if not run.record:
        return
    text = section(run, body, os.getloadavg() if load_after is None else load_after)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path.parent, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        page = path.read_text(encoding="utf-8") if path.exists() else HEADER
        write_atomic(path, replace_section(page, run.name, text).encode())
    finally:
        os.close(fd)  # releases the lock
    print(f"recorded in {path.relative_to(ROOT) if path.is_relative_to(ROOT) else path} ({run.name})")
