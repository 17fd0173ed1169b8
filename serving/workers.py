"""Worker processes come and go under BentoML's arbiter: a worker that was killed is restarted silently. Each
worker records its PID on start, so the next one in its place can say that its predecessor died."""

from __future__ import annotations

import os
from pathlib import Path

from model.files import make_dirs, write_atomic


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def replaced(folder: Path, index: int) -> str | None:
    """Record this process as worker `index` of its server; a message if it replaces one that died."""
    f = make_dirs(folder) / f"worker-{index}.pid"
    me, server = os.getpid(), os.getppid()
    try:
        old_server, old = map(int, f.read_text().split())
    except (OSError, ValueError):
        old_server = old = 0
    write_atomic(f, f"{server} {me}".encode())
    if old_server == server and old != me and not alive(old):
        return f"worker {index} (pid {old}) died; the server started pid {me} in its place"
    return None
