"""What bench/serve_latency.py drives the service with: a `bentoml serve` started and stopped by process id, a
cheap keep-alive HTTP/1.1 client (plain and server-sent-event responses), the server's CPU time from /proc and
its Prometheus metrics."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
from prometheus_client.parser import text_string_to_metric_families

from settings import ROOT


class Server:
    """`bentoml serve` from the repository root; stopped by the ids of its process and its workers."""

    def __init__(self, env: dict[str, str], log: Path, service: tuple[str, ...] = ()):
        """`service`: what `bentoml serve` serves (its arguments); the repository's service by default."""
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.url = f"http://127.0.0.1:{s.getsockname()[1]}"
        port = self.url.rsplit(":", 1)[1]
        cmd = [sys.executable, "-m", "bentoml", "serve", *service, "--host", "127.0.0.1", "--port", port]
        self.log = open(log, "wb")  # noqa: SIM115
        self.proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=self.log, stderr=subprocess.STDOUT)
        self.pids = [self.proc.pid]

    def __enter__(self) -> Server:
        end = time.monotonic() + 120
        with httpx.Client(trust_env=False) as c:
            while time.monotonic() < end and self.proc.poll() is None:
                try:
                    if c.get(f"{self.url}/readyz").status_code == 200:
                        self.pids = process_tree(self.proc.pid)
                        return self
                except httpx.TransportError:
                    pass
                time.sleep(0.2)
        self.__exit__()
        raise RuntimeError(f"the server did not become ready; see {self.log.name}")

    def __exit__(self, *_: object) -> None:
        pids = process_tree(self.proc.pid)
        self.proc.terminate()  # the arbiter stops its workers
        try:
            self.proc.wait(20)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        for pid in pids[1:]:  # any worker left behind
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        self.log.close()


class Connection:
    """A minimal HTTP/1.1 keep-alive client for the generation routes: the load generator shares the cores
    with the server, so it must cost little CPU per request (httpx costs about as much as the server's HTTP
    stack)."""

    def __init__(self, url: str):
        host, port = url.removeprefix("http://").split(":")
        self.host, self.port = host, int(port)
        self.reader: asyncio.StreamReader | None = None
        self.writer: asyncio.StreamWriter | None = None
        self.closed_by_server = 0  # responses with `Connection: close` (a worker spreading its clients)

    async def send(self, path: str, body: dict) -> None:
        if self.writer is None:
            self.reader, self.writer = await asyncio.open_connection(self.host, self.port)
        data = json.dumps(body).encode()
        head = f"POST {path} HTTP/1.1\r\nHost: {self.host}\r\nContent-Type: application/json\r\n"
        self.writer.write(f"{head}Content-Length: {len(data)}\r\n\r\n".encode() + data)
        await self.writer.drain()

    async def head(self) -> dict[str, str]:
        """The response's status line and headers; an error unless 200."""
        status, *lines = (await self.reader.readuntil(b"\r\n\r\n")).decode("latin-1").split("\r\n")
        if status.split()[1] != "200":
            raise RuntimeError(status)
        return {k.strip().lower(): v.strip() for k, _, v in (h.partition(":") for h in lines if h)}

    async def post(self, path: str, body: dict) -> dict:
        await self.send(path, body)
        head = await self.head()
        data = await self.reader.readexactly(int(head["content-length"]))
        if head.get("connection", "").lower() == "close":  # the server asks for a new connection next time
            self.closed_by_server += 1
            self.close()
            self.writer = None
        return json.loads(data)

    async def first_text(self, path: str, body: dict) -> str:
        """Send a streaming request and read its server-sent events until the first characters arrive."""
        await self.send(path, body)
        await self.head()  # then chunks: hex size, CRLF, data, CRLF; a size of 0 ends the body
        raw = b""
        while True:
            size = int((await self.reader.readuntil(b"\r\n")).strip(), 16)
            raw += (await self.reader.readexactly(size + 2))[:size]
            events, _, raw = raw.rpartition(b"\n\n")  # whole events only (a chunk may split a character)
            lines = events.decode().split("\n")
            if text := "".join(json.loads(x[6:]).get("text", "") for x in lines if x.startswith("data: ")):
                return text
            if size == 0:
                raise RuntimeError("the stream ended without text")

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()


def process_tree(pid: int) -> list[int]:
    """`pid` and its descendants, from /proc (the server's workers run in sessions of their own)."""
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            children.setdefault(int(stat.read_text().rsplit(")", 1)[1].split()[1]), []).append(
                int(stat.parent.name)
            )
        except (OSError, IndexError, ValueError):
            continue
    tree, todo = [], [pid]
    while todo:
        tree.append(todo.pop())
        todo += children.get(tree[-1], [])
    return tree


def cpu_seconds(pids: list[int], main_thread: bool = False) -> float:
    """CPU time (user + system) used so far by the live processes `pids`, or by their main threads only (a
    worker's event loop; its other threads are the generation thread and two that mostly sleep)."""
    total = 0.0
    for pid in pids:
        stat = f"/proc/{pid}/task/{pid}/stat" if main_thread else f"/proc/{pid}/stat"
        try:
            fields = Path(stat).read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        total += (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    return total


async def quiet(pids: list[int]) -> None:
    """Until the server uses less than 4% of a core (its work done), checked every 0.25 s."""
    before = cpu_seconds(pids)
    while True:
        await asyncio.sleep(0.25)
        now = cpu_seconds(pids)
        if now - before < 0.01:
            return
        before = now


async def metrics(url: str, flush: float) -> dict[str, float]:
    """The server's Prometheus samples, summed over labels and workers, by sample name (`x_count`, `x_sum`,
    ...), once its flusher (every `flush` seconds) has reported what the generation thread did."""
    await asyncio.sleep(flush + 0.2)
    async with httpx.AsyncClient(trust_env=False) as c:
        text = (await c.get(f"{url}/metrics")).text
    total: dict[str, float] = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            total[s.name] = total.get(s.name, 0.0) + s.value
    return total
