"""The generation thread: continuous batching, cancellation, one model snapshot per row group, a lane of its
own for short requests, and few hand-offs to the event loop."""

import asyncio
import sys
import threading
from collections import Counter
from types import SimpleNamespace
from typing import Any

import numpy as np
import pytest

from model import net, sample
from model.sample import Settings
from model.vocab import Vocab
from serving.batcher import FAST_STEPS, Batcher, Job

VOCAB = Vocab.from_text("abcdefgh \n")


def snapshot(seed: int, cell: str = "gru", hidden: int = 16, layers: int = 2) -> SimpleNamespace:
    cfg = net.ModelConfig(vocab_size=len(VOCAB), cell=cell, hidden=hidden, layers=layers)
    return SimpleNamespace(params=net.init(cfg, np.random.default_rng(seed)), config=cfg)


class Seen:
    """An Observer that keeps what the thread reports."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.stepped: list[int] = []  # rows per step
        self.cancelled_rows: Counter[str] = Counter()
        self.after: list[int] = []  # steps after a cancel, per cancelled request
        self.probe: Any = None  # when set, called at each report of steps, on the thread
        self.probed: list[tuple[int, int]] = []  # (rows, probe()) at each report of steps

    def queued(self, depth: int) -> None:
        pass

    def first_char(self, seconds: float) -> None:
        pass

    def live(self, rows: int) -> None:
        pass

    def steps(self, rows: int, n: int) -> None:
        with self.lock:
            self.stepped += [rows] * n
            if self.probe is not None:
                self.probed.append((rows, self.probe()))

    def cancelled(self, reason: str, rows: int) -> None:
        with self.lock:
            self.cancelled_rows[reason] += rows

    def after_disconnect(self, steps: int) -> None:
        with self.lock:
            self.after.append(steps)


def job(snap, prompt: str, length: int, seeds: list[int], timeout: float = 60.0, stream: bool = True) -> Job:
    loop = asyncio.get_running_loop()
    rows = [Settings(0.9, seed=s) for s in seeds]
    j = Job(snap, VOCAB.encode(prompt), rows, length, loop, loop.create_future(), timeout)
    j.stream = asyncio.Queue() if stream else None
    return j


def alone(snap, j: Job) -> np.ndarray:
    """What `j` must read: its rows sampled unbatched."""
    prompts = [j.prompt] * len(j.rows)
    return np.stack(list(sample.generate_ids(snap.params, snap.config, prompts, j.length, j.rows)), axis=1)


def run(scenario, max_rows: int = 64, seen: Seen | None = None) -> Seen:
    seen = seen or Seen()
    batcher = Batcher(max_rows, seen)
    try:
        asyncio.run(asyncio.wait_for(scenario(batcher), 60))
    finally:
        batcher.stop()
    return seen


def test_cancelled_and_expired_rows_leave_at_the_next_step_and_neighbours_read_the_same():
    a, b = snapshot(0), snapshot(1, "lstm")

    async def scenario(batcher: Batcher) -> None:
        gone, stay, other = job(a, "ab", 2000, [1, 2, 3]), job(a, "h", 300, [4]), job(b, "", 300, [5])
        for j in (gone, stay, other):
            batcher.submit(j)
        await gone.stream.get()  # it runs
        batcher.cancel(gone)  # its client left
        late = job(a, "c", 2000, [6], timeout=0.0)  # past its deadline at its first step
        batcher.submit(late)
        with pytest.raises(TimeoutError):
            await late.done
        np.testing.assert_array_equal(await stay.done, alone(a, stay))  # a neighbour left mid-way
        np.testing.assert_array_equal(await other.done, alone(b, other))  # its own model, beside a's rows
        assert gone.done.cancelled()

    seen = run(scenario)
    assert seen.cancelled_rows == {"disconnect": 3, "deadline": 1}
    assert len(seen.after) == 1 and seen.after[0] <= 2  # the steps computed for `gone` after its cancel
    assert max(seen.stepped) <= 4 and sum(seen.stepped) < 3 * 1000  # the cancelled rows stopped early


def test_the_steps_after_a_cancel_are_counted_once_per_request_none_while_it_was_queued():
    """A request cancelled while its rows run leaves before the thread's next step (the one in progress may
    finish); one cancelled while it waits for room is counted with 0 steps, and never runs."""
    snap = snapshot(3)

    async def scenario(batcher: Batcher) -> None:
        running = job(snap, "a", 2000, [1, 2])
        batcher.submit(running)
        await running.stream.get()  # it generates
        queued = job(snap, "b", 2000, [3, 4])  # no room: the batch holds 3 rows at most
        batcher.submit(queued)
        for j in (running, queued):
            batcher.cancel(j)
            batcher.cancel(j)  # twice (the service may): counted once
        await asyncio.gather(running.done, queued.done, return_exceptions=True)
        assert running.done.cancelled() and queued.done.cancelled()

    seen = run(scenario, max_rows=3)
    assert sorted(seen.after)[0] == 0 and len(seen.after) == 2 and max(seen.after) <= 2
    assert seen.cancelled_rows == {"disconnect": 4} and max(seen.stepped) == 2  # `queued` never ran


def test_a_short_request_runs_in_a_lane_of_its_own_beside_long_ones_and_reads_the_same():
    """A short request beside 128 long rows does not take one long step per step of its own: it is done
    while the long rows take a few steps (it would take all of its own steps in their batch), and reads what
    it reads alone."""
    snap = snapshot(2, hidden=256, layers=1)
    switch = sys.getswitchinterval()
    sys.setswitchinterval(0.0005)  # as the service hands the GIL to its event loop often

    async def scenario(batcher: Batcher) -> None:
        long = [job(snap, "a", 2000, list(range(16 * i, 16 * i + 16))) for i in range(8)]
        for j in long:
            batcher.submit(j)
        for j in long:
            await j.stream.get()  # every long request is generating
        short = job(snap, "hg", 20, [99])
        assert short.steps() <= FAST_STEPS < long[0].steps()
        t0 = long[0].group.t
        batcher.submit(short)
        got = await short.done
        assert long[0].group.t - t0 < 12 < short.steps()
        assert not any(j.done.done() for j in long)
        np.testing.assert_array_equal(got, alone(snap, short))  # joined mid-way, reads what it reads alone
        for j in long:
            batcher.cancel(j)
        await asyncio.gather(*(j.done for j in long), return_exceptions=True)

    try:
        seen = run(scenario, max_rows=256)
    finally:
        sys.setswitchinterval(switch)
    assert 1 in seen.stepped and 129 not in seen.stepped  # the short row stepped apart from the long ones


def test_long_requests_keep_their_share_while_short_ones_fill_their_lane():
    """The lanes share the thread's time: while 40 short requests run, a long one goes on generating (its
    steps, read on the thread from the first report of steps of the 40 to the last)."""
    snap, seen = snapshot(4), Seen()

    async def scenario(batcher: Batcher) -> None:
        long = job(snap, "a", 2000, [1])
        batcher.submit(long)
        await long.stream.get()
        seen.probe = lambda: long.group.t
        shorts = [job(snap, "b", FAST_STEPS, [10 + i], stream=False) for i in range(40)]
        for j in shorts:
            batcher.submit(j)
        for j in shorts:
            np.testing.assert_array_equal(await j.done, alone(snap, j))
        batcher.cancel(long)

    run(scenario, seen=seen)
    t = [probed for rows, probed in seen.probed if rows == 40]
    assert t[-1] - t[0] >= 8  # strict priority to the short lane would give 0


class Counting(asyncio.SelectorEventLoop):
    """An event loop that counts the callbacks other threads hand it."""

    handed = 0

    def call_soon_threadsafe(self, *args, **kwargs):
        self.handed += 1
        return super().call_soon_threadsafe(*args, **kwargs)


def test_a_lone_request_hands_its_characters_to_the_event_loop_in_blocks():
    """Alone, a request costs its event loop one hand-off (its result), a stream one per block of steps (its
    first character at once), not one per step; the stream reads every character, in order."""
    snap, seen = snapshot(5), Seen()
    batcher, loop = Batcher(64, seen), Counting()

    async def scenario() -> tuple[int, int]:
        plain, streamed = job(snap, "ab", 1500, [1], stream=False), job(snap, "ab", 1500, [1])
        batcher.submit(plain)
        np.testing.assert_array_equal(await plain.done, alone(snap, plain))
        handed = loop.handed
        batcher.submit(streamed)
        ids = []
        while (got := await streamed.stream.get()) is not None:
            ids.append(int(got[0]))
        assert ids == (await streamed.done)[0].tolist() == alone(snap, plain)[0].tolist()
        return handed, loop.handed - handed

    try:
        plain, streamed = loop.run_until_complete(asyncio.wait_for(scenario(), 60))
    finally:
        batcher.stop()
        loop.close()
    assert plain == 1 and streamed <= 1500 // 4
