"""The generation thread, continuous batching: a request's rows join the running batch at the next step and
leave it as they finish, are cancelled (the client left) or pass their deadline. The rows of one model
snapshot step together (`sample.Rows`: one matrix product per layer per step, per-row settings and seeds, so a
seeded request reads the same batched or not); a request is served wholly by the snapshot it started with.
Requests wait on asyncio futures; results come back on the request's event loop. What the thread does is
reported to an `Observer` (serving.metrics)."""

from __future__ import annotations

import asyncio
import logging
import queue
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np

from model import sample

log = logging.getLogger("char_rnn.serving")


class Observer(Protocol):
    """What the generation thread reports; called on that thread (or on submit's), so it must be cheap."""

    def queued(self, depth: int) -> None: ...  # requests waiting, not yet in the batch
    def step(self, rows: int) -> None: ...  # one generation step computed `rows` rows
    def first_char(self, seconds: float) -> None: ...  # a request's first character, after `seconds`
    def live(self, rows: int) -> None: ...  # rows in the batch after a step
    def cancelled(self, reason: str, rows: int) -> None: ...  # rows left unfinished: "disconnect", "deadline"


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
    cancelled: bool = False  # set by the request's side when its client has gone or it stopped waiting
    cols: list[np.ndarray] = field(default_factory=list)  # (rows,) per step so far

    def __post_init__(self) -> None:
        self.since = time.monotonic()
        self.deadline = self.since + self.timeout

    def emit(self, ids: np.ndarray) -> None:
        self.cols.append(ids)
        if self.stream is not None:
            self.loop.call_soon_threadsafe(self.stream.put_nowait, ids)

    def settle(self, result: np.ndarray | BaseException | None) -> None:
        """Resolve the request with its ids (rows, length) or an error; None cancels it (nobody waits)."""
        self.loop.call_soon_threadsafe(_settle, self.done, result)
        if self.stream is not None:
            self.loop.call_soon_threadsafe(self.stream.put_nowait, None)


def _settle(fut: asyncio.Future[np.ndarray], result: np.ndarray | BaseException | None) -> None:
    if fut.done():
        return
    if result is None:
        fut.cancel()
    elif isinstance(result, BaseException):
        fut.set_exception(result)
    else:
        fut.set_result(result)


@dataclass(eq=False)
class Group:
    """The live rows of one snapshot and their jobs, in the order their rows lie in `rows`."""

    rows: sample.Rows
    jobs: list[Job] = field(default_factory=list)


class Batcher:
    """One generation thread stepping every live row; at most `max_rows` rows at once, later jobs wait."""

    def __init__(self, max_rows: int, observer: Observer):
        self.max_rows, self.observer = max_rows, observer
        self.jobs: queue.SimpleQueue[Job | None] = queue.SimpleQueue()
        self.waiting: deque[Job] = deque()  # taken from `jobs`, not yet admitted (no room)
        self.groups: dict[int, Group] = {}  # id(snapshot) -> its rows
        self.stopping = False
        self.thread = threading.Thread(target=self.run, name="char-rnn-generate", daemon=True)
        self.thread.start()

    def submit(self, job: Job) -> None:
        self.jobs.put(job)
        self.observer.queued(self.jobs.qsize() + len(self.waiting))

    def stop(self) -> None:
        self.stopping = True
        self.jobs.put(None)  # wakes the thread
        self.thread.join(timeout=10)

    def live(self) -> int:
        return sum(len(g.rows) for g in self.groups.values())

    def run(self) -> None:
        while not self.stopping:
            self.admit()
            for key, group in list(self.groups.items()):
                self.step(group)
                if not group.jobs:
                    del self.groups[key]
            self.observer.live(self.live())

    def admit(self) -> None:
        """Take new jobs (waiting for one when nothing runs); add those that fit to their snapshot's rows."""
        new = [self.jobs.get()] if not self.groups and not self.waiting else []
        try:
            while True:
                new.append(self.jobs.get_nowait())
        except queue.Empty:
            pass
        self.waiting.extend(job for job in new if job is not None)  # None: stop() waking the thread
        room = self.max_rows - self.live()
        while self.waiting:
            job = self.waiting[0]
            if len(job.rows) > room and room < self.max_rows:
                break  # FIFO: it starts when enough rows have left (alone if it is wider than max_rows)
            self.waiting.popleft()
            if self.leaves(job):
                continue
            group = self.groups.get(id(job.model))
            if group is None:
                group = self.groups[id(job.model)] = Group(sample.Rows(job.model.params, job.model.config))
            try:
                group.rows.add(job, job.prompts, job.rows)
            except Exception as e:  # a bad request must not stop the thread
                log.exception("priming failed")
                job.settle(e)
                continue
            group.jobs.append(job)
            room -= len(job.rows)
        self.observer.queued(self.jobs.qsize() + len(self.waiting))

    def leaves(self, job: Job) -> bool:
        """Whether `job` must stop now (cancelled, or past its deadline: settled with a TimeoutError)."""
        if job.cancelled:
            self.observer.cancelled("disconnect", len(job.rows))
            job.settle(None)
            return True
        if time.monotonic() > job.deadline:
            self.observer.cancelled("deadline", len(job.rows))
            job.settle(TimeoutError(f"generation took longer than {job.timeout:g} s"))
            return True
        return False

    def step(self, group: Group) -> None:
        """One step of a snapshot's rows; jobs that finished or must stop leave before the next."""
        try:
            ids = group.rows.step()  # (B,)
        except Exception as e:  # keep the thread alive; the requests get the error
            log.exception("generation failed")
            for job in group.jobs:
                job.settle(e)
            group.jobs = []
            return
        self.observer.step(len(ids))
        now, start, gone, still = time.monotonic(), 0, set(), []
        for job in group.jobs:
            n = len(job.rows)
            job.emit(ids[start : start + n])
            start += n
            if len(job.cols) == 1:
                self.observer.first_char(now - job.since)
            if len(job.cols) == job.length:
                job.settle(np.stack(job.cols, axis=1))  # (rows, length)
                gone.add(job)
            elif self.leaves(job):
                gone.add(job)
            else:
                still.append(job)
        if gone:
            group.rows.remove(gone)
            group.jobs = still
