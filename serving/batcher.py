"""The generation thread, continuous batching: a request's rows join the running batch at the next step (where
they read its prompt, one character per step) and leave it as they finish, are cancelled (the client left) or
pass their deadline. The rows of one model
snapshot step together (`sample.Rows`: one matrix product per layer per step, per-row settings and seeds, so a
seeded request reads the same batched or not); a request is served wholly by the snapshot it started with.
Requests wait on asyncio futures; results come back on the request's event loop. What the thread does is
reported to an `Observer` (serving.metrics)."""

from __future__ import annotations

import asyncio
import logging
import math
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
    prompt: np.ndarray  # ids, the same for every row
    rows: list[sample.Settings]
    length: int
    loop: asyncio.AbstractEventLoop
    done: asyncio.Future[np.ndarray]
    timeout: float
    stream: asyncio.Queue[np.ndarray | None] | None = None
    deadline: float = 0.0
    since: float = 0.0  # when it was made (monotonic)
    cancelled: bool = False  # set by Batcher.cancel: its client has gone, or it stopped waiting
    cols: list[np.ndarray] = field(default_factory=list)  # (rows,) per step so far

    def __post_init__(self) -> None:
        self.since = time.monotonic()
        self.deadline = self.since + self.timeout

    def send(self, fn: Any, *args: Any) -> None:
        """Run `fn(*args)` on the request's event loop; nothing once that loop has closed (its worker is
        stopping, and nobody waits), so that the generation thread goes on for the others."""
        try:
            self.loop.call_soon_threadsafe(fn, *args)
        except RuntimeError:
            pass

    def settle(self, result: np.ndarray | BaseException | None) -> None:
        """Resolve the request with its ids (rows, length) or an error; None cancels it (nobody waits)."""
        self.send(_settle, self, result)


def _settle(job: Job, result: np.ndarray | BaseException | None) -> None:
    """On the request's loop: its future resolved, and its stream (if any) ended."""
    if job.stream is not None:
        job.stream.put_nowait(None)
    fut = job.done
    if fut.done():
        return
    if result is None:
        fut.cancel()
    elif isinstance(result, BaseException):
        fut.set_exception(result)
    else:
        fut.set_result(result)


class Group:
    """The live rows of one snapshot: their jobs in the order their rows lie in `rows`, each job's slice of a
    step's ids, the step at which each has all its characters and the nearest deadline, so that a step costs
    little Python per job."""

    def __init__(self, rows: sample.Rows):
        self.rows, self.jobs, self.t = rows, [], 0  # t: steps taken
        self.starts: dict[int, list[Job]] = {}  # step -> the jobs whose first character it gives
        self.ends: dict[int, list[Job]] = {}  # step -> the jobs complete after it (left ones included)
        self.writing: set[Job] = set()  # jobs past their prompt
        self.layout()

    def add(self, job: Job) -> None:
        """The job's rows read its prompt within the batch, then generate."""
        self.rows.join(job, job.prompt, job.rows)
        self.jobs.append(job)
        first = self.t + max(len(job.prompt), 1)
        self.starts.setdefault(first, []).append(job)
        self.ends.setdefault(first + job.length - 1, []).append(job)
        self.layout()

    def remove(self, gone: set[Job]) -> None:
        self.rows.remove(gone)
        self.jobs = [job for job in self.jobs if job not in gone]
        self.writing -= gone
        self.layout()

    def layout(self) -> None:
        self.cuts, start = [], 0
        for job in self.jobs:
            if job in self.writing:
                self.cuts.append((job, slice(start, start + len(job.rows))))
            start += len(job.rows)
        self.streams = [(job, rs) for job, rs in self.cuts if job.stream is not None]
        self.members = set(self.jobs)
        self.deadline = min((job.deadline for job in self.jobs), default=math.inf)


class Batcher:
    """One generation thread stepping every live row; at most `max_rows` rows at once, later jobs wait."""

    def __init__(self, max_rows: int, observer: Observer):
        self.max_rows, self.observer = max_rows, observer
        self.jobs: queue.SimpleQueue[Job | None] = queue.SimpleQueue()
        self.cancels: queue.SimpleQueue[Job] = queue.SimpleQueue()
        self.waiting: deque[Job] = deque()  # taken from `jobs`, not yet admitted (no room)
        self.groups: dict[int, Group] = {}  # id(snapshot) -> its rows
        self.stopping = False
        self.thread = threading.Thread(target=self.run, name="char-rnn-generate", daemon=True)
        self.thread.start()

    def submit(self, job: Job) -> None:
        self.jobs.put(job)
        self.observer.queued(self.jobs.qsize() + len(self.waiting))

    def cancel(self, job: Job) -> None:
        """The request no longer waits (its client left): its rows leave at the next step, if still there."""
        job.cancelled = True
        self.cancels.put(job)

    def stop(self) -> None:
        self.stopping = True
        self.jobs.put(None)  # wakes the thread
        self.thread.join(timeout=10)

    def live(self) -> int:
        return sum(len(g.rows) for g in self.groups.values())

    def run(self) -> None:
        rows = 0  # live rows as last reported; counted again only after rows joined or left
        while not self.stopping:
            changed = False  # whether rows joined or left this round
            if not self.groups or self.waiting or not self.jobs.empty():
                changed = self.admit()
            cancelled = set()
            while not self.cancels.empty():
                cancelled.add(self.cancels.get())
            for key, group in list(self.groups.items()):
                changed |= self.step(group, cancelled)
                if not group.jobs:
                    del self.groups[key]
            if changed and (live := self.live()) != rows:
                rows = live
                self.observer.live(rows)

    def admit(self) -> bool:
        """Take new jobs (waiting for one when nothing runs); add those that fit to their snapshot's rows.
        Whether any rows joined."""
        joined = False
        new = [self.jobs.get()] if not self.groups and not self.waiting else []
        while not self.jobs.empty():
            new.append(self.jobs.get())
        self.waiting.extend(job for job in new if job is not None)  # None: stop() waking the thread
        room = self.max_rows - self.live()
        while self.waiting:
            job = self.waiting[0]
            if len(job.rows) > room and room < self.max_rows:
                break  # FIFO: it starts when enough rows have left (alone if it is wider than max_rows)
            self.waiting.popleft()
            if self.leaves(job, time.monotonic()):
                continue
            group = self.groups.get(id(job.model))
            if group is None:
                group = self.groups[id(job.model)] = Group(sample.Rows(job.model.params, job.model.config))
            try:
                group.add(job)
            except Exception as e:  # a bad request must not stop the thread
                log.exception("priming failed")
                job.settle(e)
                continue
            room -= len(job.rows)
            joined = True
        self.observer.queued(self.jobs.qsize() + len(self.waiting))
        return joined

    def leaves(self, job: Job, now: float) -> bool:
        """Whether `job` must stop now (cancelled, or past its deadline: settled with a TimeoutError)."""
        if job.cancelled:
            self.observer.cancelled("disconnect", len(job.rows))
            job.settle(None)
            return True
        if now > job.deadline:
            self.observer.cancelled("deadline", len(job.rows))
            job.settle(TimeoutError(f"generation took longer than {job.timeout:g} s"))
            return True
        return False

    def begin(self, group: Group, starts: list[Job], now: float) -> None:
        """`starts`, the jobs whose first character this step gave, write from now on (those still there)."""
        if fresh := [job for job in starts if job in group.members]:
            group.writing.update(fresh)
            group.layout()
            for job in fresh:
                self.observer.first_char(now - job.since)

    def step(self, group: Group, cancelled: set[Job]) -> bool:
        """One step of a snapshot's rows; jobs that finished, were cancelled or passed their deadline leave
        before the next. Whether any left."""
        try:
            ids = group.rows.step()  # (B,)
        except Exception as e:  # keep the thread alive; the requests get the error
            log.exception("generation failed")
            for job in group.jobs:
                job.settle(e)
            group.jobs = []
            return True
        group.t += 1
        self.observer.step(len(ids))
        now, gone = time.monotonic(), set()
        if starts := group.starts.pop(group.t, None):
            self.begin(group, starts, now)
        for job, rs in group.cuts:
            job.cols.append(ids[rs])
        for job, rs in group.streams:
            job.send(job.stream.put_nowait, ids[rs])
        for job in group.ends.pop(group.t, ()):
            if job in group.members:
                job.settle(np.concatenate(job.cols).reshape(job.length, -1).T)  # (rows, length)
                gone.add(job)
        if now > group.deadline or cancelled & group.members:
            gone |= {job for job in group.jobs if job not in gone and self.leaves(job, now)}
        if gone:
            group.remove(gone)
        return bool(gone)
