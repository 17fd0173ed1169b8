"""Spreading clients over a server's workers. BentoML's workers accept connections from one shared listening
socket, and a worker that wakes first takes every connection waiting: clients that connect at once (a pool
of keep-alive connections, a load test) can all land on one worker while the other sits idle, and a worker is
one core at most (its Python holds the GIL). So each worker counts its requests in progress in a small file
shared by the server's workers (a slot each, its own to write), and a worker holding more than one request
above the least busy one answers with `Connection: close`: the client's next request opens a new connection,
which the idle worker, waiting on the socket, is first to accept. A client sees no error (HTTP clients
reconnect after `Connection: close`), and with one worker, or an even load, nothing changes.
"""

from __future__ import annotations

import mmap
import os
from pathlib import Path
from typing import Any

import numpy as np

from model.files import make_dirs
from serving.workers import alive


class Loads:
    """The requests in progress of a server's workers, in `folder/spread-<server pid>.bin`: a row per worker
    slot, (pid, requests). BentoML's worker ids run from 1 to twice the workers (a replacement may start
    before the worker it replaces has gone), so there are that many rows; a row counts while its pid lives."""

    def __init__(self, folder: Path, worker_id: int, workers: int):
        server = os.getppid()  # the arbiter that started this worker and its peers
        path = make_dirs(folder) / f"spread-{server}.bin"
        for old in folder.glob("spread-*.bin"):  # left by servers that have ended
            pid = old.stem.removeprefix("spread-")
            if pid.isdigit() and int(pid) != server and not alive(int(pid)):
                old.unlink(missing_ok=True)
        rows = 2 * workers
        size = rows * 2 * np.dtype(np.int64).itemsize
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
        try:
            if os.fstat(fd).st_size < size:
                os.ftruncate(fd, size)  # the same size whoever is first: zeros
            self.map = mmap.mmap(fd, size)
        finally:
            os.close(fd)
        self.rows = np.frombuffer(self.map, np.int64, rows * 2).reshape(rows, 2)  # a view of the shared file
        self.mine = self.rows[(worker_id - 1) % rows]  # (pid, requests): only this worker writes it
        self.mine[1] = 0
        self.mine[0] = os.getpid()

    def add(self, n: int) -> None:
        self.mine[1] += n

    def crowded(self) -> bool:
        """Whether this worker holds more than one request above the least busy live worker."""
        if self.mine[1] < 2:  # it cannot be (the common case at low load: no look at the others)
            return False
        live = [int(n) for pid, n in self.rows if pid and (pid == self.mine[0] or alive(int(pid)))]
        return int(self.mine[1]) > min(live) + 1


class Spread:
    """ASGI middleware: counts this worker's requests in progress in `Loads`, and closes the connection
    after a response while the worker is crowded."""

    def __init__(self, app: Any, *, folder: Path, worker_id: int, workers: int):
        self.app = app
        self.loads = Loads(folder, worker_id, workers) if workers > 1 else None

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if self.loads is None or scope["type"] != "http":
            return await self.app(scope, receive, send)
        loads = self.loads

        async def sending(message: dict) -> None:
            if message["type"] == "http.response.start" and loads.crowded():
                headers = [(k, v) for k, v in message.get("headers", []) if k.lower() != b"connection"]
                message = message | {"headers": [*headers, (b"connection", b"close")]}
            await send(message)

        loads.add(1)
        try:
            await self.app(scope, receive, sending)
        finally:
            loads.add(-1)
