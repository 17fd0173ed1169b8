"""Shared benchmark helpers: telemetry off, the corpus as ids, BLAS thread info, alternated timing."""

from __future__ import annotations

import os
import socket
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np
from threadpoolctl import threadpool_info

from model import corpus
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
    """The API URL of PREFECT_API_URL's server, or of one started (and stopped) with the project's script."""
    if url := os.environ.get("PREFECT_API_URL"):
        yield url
        return
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = os.environ | {"PREFECT_SERVER_API_PORT": str(port), "PYTHON": sys.executable}
    script = ROOT / "scripts" / "prefect-server.sh"
    try:
        subprocess.run([script, "start"], env=env, check=True, capture_output=True)
        yield f"http://127.0.0.1:{port}/api"
    finally:
        subprocess.run([script, "stop"], env=env, capture_output=True)
