"""The generation thread: continuous batching, cancellation, one model snapshot per row group."""

import asyncio
import threading
from collections import Counter
from types import SimpleNamespace

import numpy as np
import pytest

from model import net, sample
from model.sample import Settings
from model.vocab import Vocab
from serving.batcher import Batcher, Job

VOCAB = Vocab.from_text("abcdefgh \n")


def snapshot(seed: int, cell: str = "gru") -> SimpleNamespace:
    cfg = net.ModelConfig(vocab_size=len(VOCAB), cell=cell, hidden=16, layers=2)
    return SimpleNamespace(params=net.init(cfg, np.random.default_rng(seed)), config=cfg)


class Seen:
    """An Observer that keeps what the thread reports."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.steps: list[int] = []  # rows per step
        self.cancelled_rows: Counter[str] = Counter()

    def queued(self, depth: int) -> None:
        pass

    def first_char(self, seconds: float) -> None:
        pass

    def live(self, rows: int) -> None:
        pass

    def step(self, rows: int) -> None:
        with self.lock:
            self.steps.append(rows)

    def cancelled(self, reason: str, rows: int) -> None:
        with self.lock:
            self.cancelled_rows[reason] += rows


def job(snap, prompt: str, length: int, seeds: list[int], timeout: float = 60.0) -> Job:
    loop = asyncio.get_running_loop()
    rows = [Settings(0.9, seed=s) for s in seeds]
    j = Job(snap, VOCAB.encode(prompt), rows, length, loop, loop.create_future(), timeout)
    j.stream = asyncio.Queue()
    return j


def alone(snap, j: Job) -> np.ndarray:
    """What `j` must read: its rows sampled unbatched."""
    prompts = [j.prompt] * len(j.rows)
    return np.stack(list(sample.generate_ids(snap.params, snap.config, prompts, j.length, j.rows)), axis=1)


def run(scenario) -> Seen:
    seen = Seen()
    batcher = Batcher(64, seen)
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
    assert max(seen.steps) <= 4 and sum(seen.steps) < 3 * 1000  # the cancelled rows stopped early


def test_a_short_request_joins_the_running_batch_and_finishes_before_the_long_ones():
    snap = snapshot(2)

    async def scenario(batcher: Batcher) -> None:
        long = [job(snap, "a", 2000, [i]) for i in range(8)]
        for j in long:
            batcher.submit(j)
        for j in long:
            await j.stream.get()  # every long request is generating
        short = job(snap, "hg", 20, [99])
        batcher.submit(short)
        got = await short.done
        assert not any(j.done.done() for j in long)
        np.testing.assert_array_equal(got, alone(snap, short))  # joined mid-way, reads what it reads alone
        for j in long:
            batcher.cancel(j)
        await asyncio.gather(*(j.done for j in long), return_exceptions=True)

    seen = run(scenario)
    assert 9 in seen.steps  # the short request's row stepped with the 8 long ones
