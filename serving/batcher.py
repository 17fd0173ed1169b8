"""The generation thread, continuous batching: a request's rows join the running batch at the next step (where
they read its prompt, one character per step) and leave it as they finish, are cancelled (the client left) or
pass their deadline. The rows of one model snapshot step together (`sample.Rows`: one matrix product per layer
per step, per-row settings and seeds, so a seeded request reads the same batched or not); a request is served
wholly by the snapshot it started with. Requests wait on asyncio futures; results come back on the request's
event loop. What the thread does is reported to an `Observer` (serving.metrics).

What a step costs beyond the model is kept small, because at one row it is a sizeable part of the step:
  - between steps the thread looks at one flag, which `submit` and `cancel` raise; it reads its queues only
    then, so a request joins (or leaves) after at most the step in progress;
  - a step's ids go to one list; they are handed to the requests (and streams) in blocks, at the steps where
    something happens (a first character, an end, a deadline) and at most every STREAM_EVERY seconds to a
    stream, not one call per request per step;
  - the steps are reported to the observer in counts, not one call each.

Short requests are not queued behind long ones. In one batch with them, a short request would take one step
of the whole batch per character; instead a request of at most FAST_STEPS steps (its prompt and characters)
runs in a lane of its own, beside the long requests' lane of the same snapshot. The thread gives the lanes
(and the snapshots) equal shares of its CPU time, the one that has had least going next: a lane of a few rows
takes many of its cheap steps while the long lane takes one, and neither waits for much more than one step of
the long lane. A cancelled request's rows leave before the thread's next step; the steps computed for it
after its `cancel` are reported (`after_disconnect`)."""

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

FAST_STEPS = 128  # a request of at most this many steps runs in the fast lane
STREAM_EVERY = 0.001  # seconds between the hand-offs of a stream's characters (its first one at once)
REPORT_EVERY = 0.1  # seconds between the hand-offs of other requests' characters and the step counts


class Observer(Protocol):
    """What the generation thread reports; called on that thread (or on submit's), so it must be cheap."""

    def queued(self, depth: int) -> None: ...  # requests waiting, not yet in the batch
    def steps(self, rows: int, n: int) -> None: ...  # n generation steps computed `rows` rows each
    def first_char(self, seconds: float) -> None: ...  # a request's first character, after `seconds`
    def live(self, rows: int) -> None: ...  # rows in the batch after a step
    def cancelled(self, reason: str, rows: int) -> None: ...  # rows left unfinished: "disconnect", "deadline"
    def after_disconnect(self, steps: int) -> None: ...  # steps computed for a request after its cancel


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
    group: Group | None = None  # where its rows run, once admitted
    joined: int = 0  # its group's step count when its rows joined
    first: int = 0  # the step of its group that gives its first character
    cancel_at: int | None = -1  # its group's steps at its cancel (None: not running then, -1: not yet known)
    parts: list[np.ndarray] = field(default_factory=list)  # (steps, rows) blocks of its ids so far

    def __post_init__(self) -> None:
        self.since = time.monotonic()
        self.deadline = self.since + self.timeout

    def steps(self) -> int:
        """Steps its rows take: one per prompt id (at least one), then one per further character."""
        return max(len(self.prompt), 1) + self.length - 1

    def after_cancel(self) -> int:
        """Steps its rows took since Batcher.cancel was called (all, if they joined after that)."""
        g, at = self.group, self.cancel_at
        if g is None or (at is not None and at < 0):  # never ran, or cancel() is reading the step right now
            return 0
        return g.t - (self.joined if at is None else at)

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


def _feed(stream: asyncio.Queue[np.ndarray | None], cols: np.ndarray) -> None:
    """On the request's loop: a block of steps (steps, rows) into its stream, one item (rows,) per step."""
    for ids in cols:
        stream.put_nowait(ids)


class Group:
    """The live rows of one snapshot in one lane; the ids of its steps not yet handed out (`log`, one array
    per step, steps t - len(log) + 1 .. t); the steps at which its jobs get their first character or end
    (`events`, the nearest in `next`); the nearest deadline; the CPU time its steps took beside others'
    (`used`)."""

    def __init__(self, model: Any, observer: Observer):
        self.model, self.observer = model, observer
        self.rows = sample.Rows(model.params, model.config)
        self.jobs: list[Job] = []
        self.members: set[Job] = set()
        self.t = 0  # steps taken
        self.log: list[np.ndarray] = []
        self.events: dict[int, list[Job]] = {}
        self.next = math.inf
        self.deadline = math.inf
        self.streams = False
        self.flush_at = 0.0  # when the log is handed out at the latest
        self.used = 0.0
        self.counted = 0  # steps not yet reported

    def add(self, job: Job) -> None:
        """The job's rows read its prompt within the batch, then generate."""
        self.sync()
        self.rows.join(job, job.prompt, job.rows)
        job.group, job.joined, job.first = self, self.t, self.t + max(len(job.prompt), 1)
        for t in {job.first, self.t + job.steps()}:
            self.events.setdefault(t, []).append(job)
        self.jobs.append(job)
        self.layout()

    def remove(self, gone: set[Job]) -> None:
        self.sync()
        self.rows.remove(gone)
        self.jobs = [job for job in self.jobs if job not in gone]
        for t in [t for t, js in self.events.items() if gone.intersection(js)]:
            if not (kept := [job for job in self.events[t] if job not in gone]):
                del self.events[t]
            else:
                self.events[t] = kept
        self.layout()

    def layout(self) -> None:
        self.members = set(self.jobs)
        self.deadline = min((job.deadline for job in self.jobs), default=math.inf)
        self.streams = any(job.stream is not None for job in self.jobs)
        self.next = min(self.events, default=math.inf)

    def sync(self) -> None:
        """Hand the logged steps' ids to the jobs (their columns from their first character on; a stream's go
        to its event loop at once), and report the steps; the log starts again."""
        if self.counted:
            self.observer.steps(len(self.rows), self.counted)
            self.counted = 0
        if not self.log:
            return
        block = np.stack(self.log)  # (steps, B)
        start = self.t - len(block)  # block[i] holds step start + i + 1
        self.log = []
        for job in self.jobs:
            if (i := job.first - start - 1) < len(block):
                cols = block[max(i, 0) :, self.rows.spans[job]]
                job.parts.append(cols)
                if job.stream is not None:
                    job.send(_feed, job.stream, cols)


class Batcher:
    """One generation thread stepping every live row; at most `max_rows` rows at once, later jobs wait (in the
    order they came)."""

    def __init__(self, max_rows: int, observer: Observer):
        self.max_rows, self.observer = max_rows, observer
        self.jobs: queue.SimpleQueue[Job | None] = queue.SimpleQueue()
        self.cancels: queue.SimpleQueue[Job] = queue.SimpleQueue()
        self.waiting: deque[Job] = deque()  # taken from `jobs`, not yet admitted (no room)
        self.groups: dict[tuple[int, bool], Group] = {}  # (id(snapshot), fast lane) -> its rows
        self.latest: Any = None  # the snapshot of the newest admitted job: its groups stay, even empty
        self.news = False  # raised by submit and cancel: the thread reads its queues before its next step
        self.reported = 0  # live rows as last reported
        self.stopping = False
        self.thread = threading.Thread(target=self.run, name="char-rnn-generate", daemon=True)
        self.thread.start()

    def submit(self, job: Job) -> None:
        self.jobs.put(job)
        self.news = True
        self.observer.queued(self.jobs.qsize() + len(self.waiting))

    def cancel(self, job: Job) -> None:
        """The request no longer waits (its client left): its rows leave before the next step, if there."""
        if job.cancelled:
            return
        job.cancelled = True
        self.cancels.put(job)
        # No call between reading the step and raising the flag: the thread cannot take the GIL in between
        # (it would step on, unaware, for a switch interval).
        group = job.group
        job.cancel_at = None if group is None else group.t
        self.news = True

    def stop(self) -> None:
        self.stopping = self.news = True
        self.jobs.put(None)  # wakes the thread
        self.thread.join(timeout=10)

    def live(self) -> int:
        return sum(len(g.rows) for g in self.groups.values())

    def active(self) -> list[Group]:
        return [g for g in self.groups.values() if g.jobs]

    def run(self) -> None:
        while not self.stopping:
            self.news = False  # lowered before the queues are read: what comes later raises it again
            self.admit()
            self.drop()
            self.report()
            self.serve()
            self.report()

    def serve(self) -> None:
        """Steps, of the group that has used least CPU time first, until a request comes or is cancelled, or
        until rows left while others wait for room."""
        active, cpu = self.active(), time.thread_time()
        while active and not self.news:
            try:
                if len(active) == 1:
                    g = active[0]
                    now = self.alone(g)
                else:
                    g = min(active, key=lambda a: a.used)
                    g.log.append(g.rows.step())
                    g.t += 1
                    g.counted += 1
                    # the groups share the thread by CPU time: waits for the GIL are no one's
                    spent, cpu = cpu, time.thread_time()
                    g.used += cpu - spent
                    now = time.monotonic()
            except Exception as e:  # keep the thread alive; the requests get the error
                self.fail(g, e)
                return
            if g.t == g.next or now > g.deadline or now >= g.flush_at:
                if self.tick(g, now) and (self.waiting or not g.jobs):
                    if self.waiting:
                        return
                    active, cpu = self.active(), time.thread_time()

    def alone(self, g: Group) -> float:
        """Steps of `g`, the one active group, until a step brings one of its events (a first character, an
        end, a deadline, the log's hand-out) or a request comes or is cancelled: the time after the last.
        `serve`'s step for several groups, with what it reads each step held in locals (at one row the
        bookkeeping is a sizeable part of a step)."""
        step, log, clock, t0 = g.rows.step, g.log.append, time.monotonic, g.t
        nxt, deadline, flush = g.next, g.deadline, g.flush_at
        try:
            while True:
                log(step())
                g.t += 1  # current at every step: `cancel` reads it
                now = clock()
                if g.t == nxt or now > deadline or now >= flush or self.news:
                    return now
        finally:
            g.counted += g.t - t0

    def tick(self, g: Group, now: float) -> bool:
        """What step g.t brings: first characters, ends, deadlines, the log handed out. Whether rows left."""
        due = g.events.pop(g.t, []) if g.t == g.next else []  # (remove() takes the jobs that left out)
        for job in due:
            if job.first == g.t:
                self.observer.first_char(now - job.since)
        ended = {job for job in due if job.joined + job.steps() == g.t}
        late = {job for job in g.jobs if now > job.deadline} - ended if now > g.deadline else set()
        g.sync()
        g.flush_at = now + (STREAM_EVERY if g.streams else REPORT_EVERY)
        if not (ended or late):
            g.next = min(g.events, default=math.inf)
            return False
        g.remove(ended | late)  # before the results go: their event loops wait for this thread's GIL
        for job in ended:
            job.settle(np.concatenate(job.parts).T)  # (rows, length)
        for job in late:
            self.leaves(job, now)
        return True

    def fail(self, g: Group, e: Exception) -> None:
        log.exception("generation failed")
        for job in g.jobs:
            job.settle(e)
        self.groups = {k: v for k, v in self.groups.items() if v is not g}  # its rows are of no more use

    def admit(self) -> None:
        """Take new jobs (waiting for one when nothing runs); add those that fit to their snapshot's rows."""
        if not self.waiting and not self.active():
            self.take(self.jobs.get())
        while not self.jobs.empty():
            self.take(self.jobs.get_nowait())
        room, now = self.max_rows - self.live(), time.monotonic()
        while self.waiting:
            job = self.waiting[0]
            gone = self.leaves(job, now)
            if not gone and len(job.rows) > room and room < self.max_rows:
                break  # it starts when enough rows have left (alone if it is wider than max_rows)
            self.waiting.popleft()
            if not gone:
                self.place(job)
                room -= len(job.rows)
        self.observer.queued(self.jobs.qsize() + len(self.waiting))

    def take(self, job: Job | None) -> None:
        if job is not None:  # None: stop() waking the thread
            self.waiting.append(job)

    def place(self, job: Job) -> None:
        """`job` into the group of its snapshot and lane; a group that starts again starts level in time."""
        if job.length < 1:
            job.settle(np.zeros((len(job.rows), 0), np.intp))
            return
        key = (id(job.model), job.steps() <= FAST_STEPS)
        g = self.groups.get(key)
        if g is None:
            g = self.groups[key] = Group(job.model, self.observer)
        if not g.jobs:
            g.used = max(g.used, min((a.used for a in self.active()), default=0.0))
            g.flush_at = time.monotonic() + REPORT_EVERY
        try:
            g.add(job)
        except Exception as e:  # a bad request must not stop the thread
            log.exception("priming failed")
            job.settle(e)
        self.latest = job.model

    def drop(self) -> None:
        """The rows of cancelled jobs out of their groups (those still queued leave when they come up)."""
        gone: dict[Group, set[Job]] = {}
        while not self.cancels.empty():
            job = self.cancels.get_nowait()
            if job.group is not None and job in job.group.members:
                gone.setdefault(job.group, set()).add(job)
        for g, jobs in gone.items():
            g.remove(jobs)
            for job in jobs:
                self.leaves(job, 0.0)

    def leaves(self, job: Job, now: float) -> bool:
        """Whether `job` must stop now (cancelled, or past its deadline: settled with a TimeoutError)."""
        if job.cancelled:
            self.observer.after_disconnect(job.after_cancel())  # first: counted by the time its rows are
            self.observer.cancelled("disconnect", len(job.rows))
            job.settle(None)
            return True
        if now > job.deadline:
            self.observer.cancelled("deadline", len(job.rows))
            job.settle(TimeoutError(f"generation took longer than {job.timeout:g} s"))
            return True
        return False

    def report(self) -> None:
        """The live rows, when they changed; empty groups of older snapshots dropped."""
        for key, g in list(self.groups.items()):
            if not g.jobs and g.model is not self.latest:
                g.sync()
                del self.groups[key]
        if (live := self.live()) != self.reported:
            self.reported = live
            self.observer.live(live)
