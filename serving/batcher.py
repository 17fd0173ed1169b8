"""The generation thread: the rows of concurrent requests for the same model run together, one matrix product
per step (`sample.generate_ids`, with per-row settings and seeds, so a seeded request reads the same batched
or not). Requests wait on asyncio futures; results come back on the request's event loop. What the thread
does is reported to an `Observer` (serving.metrics)."""

from __future__ import annotations

import asyncio
import logging
import queue
import threading
import time
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np

from model import sample

GATHER_GAP, GATHER_MAX = 0.002, 0.01  # seconds: how long the batcher waits for stragglers
log = logging.getLogger("char_rnn.serving")


class Observer(Protocol):
    """What the generation thread reports; called on that thread (or on submit's), so it must be cheap."""

    def queued(self, depth: int) -> None: ...  # requests waiting, not yet in a batch
    def step(self, rows: int) -> None: ...  # one generation step computed `rows` rows
    def first_char(self, seconds: float) -> None: ...  # a request's first character, after `seconds`


@dataclass(eq=False)
class Job:
    """One request's rows, queued to the generation thread."""

    model: Any  # the immutable snapshot the request holds (params, config); batched only with its own kind
    prompts: list[np.ndarray]
    rows: list[sample.Settings]
    length: int
    loop: asyncio.AbstractEventLoop
    done: asyncio.Future[np.ndarray]
    timeout: float
    stream: asyncio.Queue[np.ndarray | None] | None = None
    deadline: float = 0.0
    since: float = 0.0  # when it was made (monotonic)
    cancelled: bool = False

    def __post_init__(self) -> None:
        self.since = time.monotonic()
        self.deadline = self.since + self.timeout

    def emit(self, ids: np.ndarray) -> None:
        if self.stream is not None:
            self.loop.call_soon_threadsafe(self.stream.put_nowait, ids)

    def settle(self, result: np.ndarray | BaseException) -> None:
        self.loop.call_soon_threadsafe(_settle, self.done, result)
        if self.stream is not None:
            self.loop.call_soon_threadsafe(self.stream.put_nowait, None)


def _settle(fut: asyncio.Future[np.ndarray], result: np.ndarray | BaseException) -> None:
    if fut.done():
        return
    if isinstance(result, BaseException):
        fut.set_exception(result)
    else:
        fut.set_result(result)


class Batcher:
    """One generation thread. Jobs waiting together for the same model run as one batch."""

    def __init__(self, max_rows: int, observer: Observer):
        self.max_rows, self.observer = max_rows, observer
        self.jobs: queue.SimpleQueue[Job | None] = queue.SimpleQueue()
        self.stopping = False
        self.thread = threading.Thread(target=self.run, name="char-rnn-generate", daemon=True)
        self.thread.start()

    def submit(self, job: Job) -> None:
        self.jobs.put(job)
        self.observer.queued(self.jobs.qsize())

    def stop(self) -> None:
        self.stopping = True
        self.jobs.put(None)  # wakes the thread
        self.thread.join(timeout=10)

    def run(self) -> None:
        carry: Job | None = None
        last_rows = 0
        while not self.stopping:
            first = carry or self.jobs.get()
            if first is None:
                continue
            batch, rows, carry = [first], len(first.rows), None
            # After a batch of several requests, more are likely on their way: wait for them while they
            # keep arriving (each within GATHER_GAP), up to GATHER_MAX. A lone client never waits.
            until = time.monotonic() + GATHER_MAX if last_rows > rows else 0.0
            while rows < self.max_rows:
                try:
                    wait = min(GATHER_GAP, until - time.monotonic())
                    job = self.jobs.get(timeout=wait) if wait > 0 else self.jobs.get_nowait()
                except queue.Empty:
                    break
                if job is None:
                    break
                if job.model is not first.model or rows + len(job.rows) > self.max_rows:
                    carry = job  # starts the next batch
                    break
                batch.append(job)
                rows += len(job.rows)
            last_rows = rows
            self.observer.queued(self.jobs.qsize() + (carry is not None))
            self.run_batch(batch)

    def run_batch(self, batch: list[Job]) -> None:
        snap = batch[0].model
        live: list[tuple[Job, slice]] = []
        start = 0
        for job in batch:
            live.append((job, slice(start, start + len(job.rows))))
            start += len(job.rows)
        prompts = [q for job in batch for q in job.prompts]
        rows = [r for job in batch for r in job.rows]
        length = max(job.length for job in batch)
        cols: list[np.ndarray] = []
        try:
            steps = sample.generate_ids(snap.params, snap.config, prompts, length, rows)
            for t, ids in enumerate(steps, 1):
                cols.append(ids)
                self.observer.step(len(prompts))
                now, out, still = time.monotonic(), None, []
                for job, rs in live:
                    if job.cancelled:
                        continue
                    job.emit(ids[rs])
                    if t == 1:
                        self.observer.first_char(now - job.since)
                    if t == job.length:
                        out = np.stack(cols, axis=1) if out is None else out
                        job.settle(out[rs])
                    elif now > job.deadline:
                        job.settle(TimeoutError(f"generation took longer than {job.timeout:g} s"))
                    else:
                        still.append((job, rs))
                live = still
                if not live:
                    return
        except Exception as e:  # keep the thread alive; the requests get the error
            log.exception("generation failed")
            for job, _ in live:
                job.settle(e)
