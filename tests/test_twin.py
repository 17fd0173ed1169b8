"""The batch's second half in a process of its own (model/twin.py): the threads' numbers bit for bit, errors
told on either side without a hang or a lost step, and a child that never outlives its parent."""

import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from threadpoolctl import threadpool_limits

from model import net, train, twin
from model.twin import Twin, TwinFailed

pytestmark = pytest.mark.skipif(not twin.available(), reason="no memfd on this platform")
ROOT = Path(__file__).resolve().parent.parent


def case(cell="gru", B=16, T=4, dropout=0.3):
    cfg = net.ModelConfig(vocab_size=7, cell=cell, hidden=5, layers=2, dropout=dropout, dtype="float64")
    r = np.random.default_rng(0)
    p = net.init(cfg, r)
    s0 = 0.5 * r.standard_normal(net.zeros_state(cfg, B).shape)
    x, y = r.integers(0, 7, (B, T)), r.integers(0, 7, (B, T))
    return cfg, p, s0, x, y


def same(a, b) -> bool:
    (l1, g1, s1), (l2, g2, s2) = a, b
    return (
        l1 == l2
        and np.array_equal(s1, s2)
        and g1.keys() == g2.keys()
        and all(np.array_equal(g1[k], g2[k]) for k in g1)
    )


def copied(out):
    loss, g, s = out
    return loss, {k: v.copy() for k, v in g.items()}, s.copy()


@pytest.mark.parametrize("cell", ["rnn", "gru", "lstm"])
@pytest.mark.parametrize("B", [16, 17])
def test_gradients_equal_the_threads_bit_for_bit(cell, B):
    """Each step, with new weights each time (they are sent every step), halves of unequal size and dropout:
    loss, gradients and last state are exactly those of the two halves on threads."""
    cfg, p, s0, x, y = case(cell, B)
    with threadpool_limits(2, user_api="blas"), Twin(cfg, B, 4) as tw:
        for step in range(3):
            threads = copied(net.grads(p, cfg, x, y, s0, np.random.default_rng(step)))
            paired = copied(net.grads(p, cfg, x, y, s0, np.random.default_rng(step), twin=tw))
            assert same(threads, paired), step
            for k in p:
                p[k] += 0.05 * paired[1][k]


def test_a_failed_mask_draw_stops_both_halves_and_the_next_step_is_whole():
    """Drawing the second layer's mask fails: the step raises that error (the child, waiting for the mask,
    is told to give up, not left waiting), and the next step gives the threads' numbers."""

    class FailsSecond:
        def __init__(self):
            self.rng, self.calls = np.random.default_rng(1), 0

        def random(self, *args, **kwargs):
            self.calls += 1
            if self.calls == 2:
                raise MemoryError("no room for a mask")
            return self.rng.random(*args, **kwargs)

    cfg, p, s0, x, y = case()
    with threadpool_limits(2, user_api="blas"), Twin(cfg, 16, 4) as tw:
        with pytest.raises(MemoryError, match="no room"):
            net.grads(p, cfg, x, y, s0, FailsSecond(), twin=tw)
        threads = copied(net.grads(p, cfg, x, y, s0, np.random.default_rng(2)))
        assert same(threads, net.grads(p, cfg, x, y, s0, np.random.default_rng(2), twin=tw))


def test_an_error_in_the_child_is_told_and_it_stays_for_the_next_step():
    """A character outside the vocabulary in the second half only: the step raises the child's error, by
    name, and the child takes the next step."""
    cfg, p, s0, x, y = case()
    bad = x.copy()
    bad[-1, 0] = 99
    with threadpool_limits(2, user_api="blas"), Twin(cfg, 16, 4) as tw:
        with pytest.raises(TwinFailed, match="IndexError"):
            net.grads(p, cfg, bad, y, s0, np.random.default_rng(3), twin=tw)
        threads = copied(net.grads(p, cfg, x, y, s0, np.random.default_rng(3)))
        assert same(threads, net.grads(p, cfg, x, y, s0, np.random.default_rng(3), twin=tw))
        with pytest.raises(ValueError, match="made for 16 x 4"):
            net.grads(p, cfg, x[:, :3], y[:, :3], s0, twin=tw)


def test_a_dead_child_is_an_error_not_a_hang():
    cfg, p, s0, x, y = case(dropout=0.0)
    with threadpool_limits(2, user_api="blas"), Twin(cfg, 16, 4) as tw:
        tw.proc.kill()
        tw.proc.wait()
        with pytest.raises(TwinFailed, match="ended"):
            net.grads(p, cfg, x, y, s0, twin=tw)


def test_closing_stops_the_child():
    cfg, *_ = case()
    with Twin(cfg, 16, 4) as tw:
        pid = tw.proc.pid
        assert tw.proc.poll() is None
    assert tw.proc.returncode == 0 and not alive(pid)


def alive(pid: int) -> bool:
    """Whether `pid` runs (a zombie, left for its reaper, has ended)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().split(")")[-1].split()[0] != "Z"
    except (FileNotFoundError, ProcessLookupError):
        return False


def test_the_child_never_outlives_its_parent():
    """A parent that dies without closing its twin (killed, say): the child sees its stdin close, leaves."""
    code = (
        "import os, sys\n"
        "from model import net, twin\n"
        "cfg = net.ModelConfig(vocab_size=7, cell='rnn', hidden=5, layers=1, dropout=0.0)\n"
        "tw = twin.Twin(cfg, 16, 4)\n"
        "print(tw.proc.pid, flush=True)\n"
        "os._exit(0)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    pid = int(out.stdout.split()[0])
    deadline = time.monotonic() + 60  # a bound only: the child leaves as soon as it reads the end of stdin
    while alive(pid) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not alive(pid)


def test_training_runs_the_second_half_in_a_twin_and_matches_threads(tmp_path, small_text, monkeypatch):
    """model.train with a batch that splits (2 BLAS threads, B >= 16): every step goes through a twin, and the
    run's weights equal a run with the halves on threads, bit for bit."""
    from model import corpus
    from model.vocab import Vocab

    vocab = Vocab.from_text(small_text)
    tr, va = corpus.split(vocab.encode(small_text))
    mcfg = net.ModelConfig(vocab_size=len(vocab), cell="gru", hidden=16, layers=2, dropout=0.2)
    cfg = train.TrainConfig(steps=12, batch=16, seq=8, warmup=2, checkpoint_every=6, eval_chars=500)
    pairs = []
    pair = Twin.pair
    monkeypatch.setattr(Twin, "pair", lambda self, *a: pairs.append(1) or pair(self, *a))
    with threadpool_limits(2, user_api="blas"):
        a = train.train(tr, va, vocab, mcfg, cfg, tmp_path / "twin")
        assert len(pairs) == 12
        monkeypatch.setattr(twin, "wanted", lambda *a: False)
        b = train.train(tr, va, vocab, mcfg, cfg, tmp_path / "threads")
    assert len(pairs) == 12
    assert all(np.array_equal(a.params[k], b.params[k]) for k in a.params)
    assert a.meta.metrics["val"] == b.meta.metrics["val"]


def test_the_child_runs_one_blas_thread(monkeypatch):
    """The child's BLAS runs on one thread (the other core is this process's half), whatever this process's
    environment allows."""
    monkeypatch.setenv("OPENBLAS_NUM_THREADS", "2")
    cfg, *_ = case()
    with Twin(cfg, 16, 4) as tw:
        env = Path(f"/proc/{tw.proc.pid}/environ").read_bytes().split(b"\0")
    assert b"OPENBLAS_NUM_THREADS=1" in env and b"OMP_NUM_THREADS=1" in env


def test_training_falls_back_to_threads_when_no_child_starts(tmp_path, small_text, monkeypatch):
    """No Python to start the child with: a warning says why, and the run goes on, the halves on threads."""
    from model import corpus
    from model.vocab import Vocab

    vocab = Vocab.from_text(small_text)
    tr, va = corpus.split(vocab.encode(small_text))
    mcfg = net.ModelConfig(vocab_size=len(vocab), cell="rnn", hidden=16, layers=1, dropout=0.0)
    cfg = train.TrainConfig(steps=4, batch=16, seq=8, warmup=0, checkpoint_every=4, eval_chars=500)
    monkeypatch.setattr(sys, "executable", str(tmp_path / "no-such-python"))
    with threadpool_limits(2, user_api="blas"), pytest.warns(UserWarning, match="halves run on threads"):
        ck = train.train(tr, va, vocab, mcfg, cfg, tmp_path / "run")
    assert ck.meta.step == 4
