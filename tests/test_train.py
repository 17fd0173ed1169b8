"""The training loop: it learns, it is deterministic, it resumes bitwise, it refuses to diverge quietly."""

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from model import checkpoint, corpus, net, optim, train
from model.vocab import Vocab

CFG = train.TrainConfig(
    steps=60, batch=8, seq=16, lr=1e-2, min_lr=1e-3, warmup=5, eval_every=20, checkpoint_every=20, log_every=5
)


def data(text: str, cell: str = "rnn"):
    vocab = Vocab.from_text(text)
    tr, va = corpus.split(vocab.encode(text))
    return tr, va[:2000], vocab, net.ModelConfig(vocab_size=len(vocab), cell=cell, hidden=32)


def same_weights(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a)


def test_learns_and_reports_progress(tmp_path, small_text):
    tr, va, vocab, mcfg = data(small_text)
    seen: list[train.Progress] = []
    ck = train.train(tr, va, vocab, mcfg, CFG, tmp_path, on_progress=seen.append)
    uniform = np.log(len(vocab))
    assert ck.meta.step == 60 and ck.meta.metrics["val_loss"] < uniform - 0.8
    assert [p.step for p in seen] == list(range(5, 61, 5))
    assert all(p.chars_per_s > 0 and p.eta_s >= 0 for p in seen) and seen[-1].eta_s == 0
    assert [s for s, _ in ck.meta.metrics["val"]] == [20, 40, 60]


def test_deterministic_for_a_seed(tmp_path, small_text):
    tr, va, vocab, mcfg = data(small_text)
    a = train.train(tr, va, vocab, mcfg, CFG, tmp_path / "a")
    b = train.train(tr, va, vocab, mcfg, CFG, tmp_path / "b")
    c = train.train(tr, va, vocab, mcfg, CFG.model_copy(update={"seed": 1}), tmp_path / "c")
    assert same_weights(a.params, b.params) and not same_weights(a.params, c.params)


class Crash(Exception):
    pass


@pytest.mark.parametrize(
    "cell,dropout,average",
    [("rnn", 0.0, 0), ("rnn", 0.2, 0), ("gru", 0.2, 0), ("lstm", 0.2, 0), ("gru", 0.2, 0.9)],
)
def test_resume_after_crash_is_bitwise_identical(tmp_path, small_text, cell, dropout, average):
    tr, va, vocab, mcfg = data(small_text, cell)
    mcfg = mcfg.model_copy(update={"dropout": dropout, "layers": 2})
    cfg = CFG.model_copy(update={"average": average})
    full = train.train(tr, va, vocab, mcfg, cfg, tmp_path / "full")

    def crash_at_45(p: train.Progress) -> None:
        if p.step == 45:
            raise Crash

    with pytest.raises(Crash):
        train.train(tr, va, vocab, mcfg, cfg, tmp_path / "cut", on_progress=crash_at_45)
    assert checkpoint.load(tmp_path / "cut").meta.step == 40
    resumed = train.train(tr, va, vocab, mcfg, cfg, tmp_path / "cut", resume=True)
    assert resumed.meta.step == 60 and same_weights(full.params, resumed.params)
    assert same_weights(full.optim, resumed.optim)
    assert resumed.meta.metrics["val"] == full.meta.metrics["val"]


def test_the_weights_average_is_the_model_and_the_optimizer_keeps_its_own(tmp_path, small_text, monkeypatch):
    """With `average`, the checkpoint's weights are the moving average written out by hand from the weights
    each step left (the optimizer's own, which the checkpoint keeps beside its state); validation scores the
    average. A checkpoint that lacks the optimizer's weights is refused for resuming, not resumed from the
    average."""
    tr, va, vocab, mcfg = data(small_text, "gru")
    cfg = CFG.model_copy(update={"steps": 30, "average": 0.9})
    seen: list[dict] = []
    step = train.step

    def spy(run, *a, **kw):
        out = step(run, *a, **kw)
        seen.append({k: v.copy() for k, v in run.params.items()})
        return out

    monkeypatch.setattr(train, "step", spy)
    ck = train.train(tr, va, vocab, mcfg, cfg, tmp_path / "avg")
    expect = {k: v.astype(np.float64) for k, v in train.start(mcfg, cfg, None, None).params.items()}
    for t, w in enumerate(seen, start=1):
        d = min(0.9, (1 + t) / (10 + t))
        expect = {k: d * expect[k] + (1 - d) * w[k] for k in expect}
    for k in expect:
        np.testing.assert_allclose(ck.params[k], expect[k], rtol=1e-4, atol=1e-6)
        assert np.array_equal(ck.optim[f"raw.{k}"], seen[-1][k])
        assert not np.array_equal(ck.params[k], seen[-1][k])
    assert ck.meta.metrics["val"][-1][1] == pytest.approx(train.evaluate(ck.params, mcfg, va), abs=1e-6)

    data_path = ck.path / "optim.npz"
    kept = {k: v for k, v in np.load(data_path).items() if not k.startswith("raw.")}
    np.savez(data_path, **kept)
    meta = json.loads((ck.path / "meta.json").read_text())
    meta["sha256"]["optim.npz"] = checkpoint.sha256(data_path)
    (ck.path / "meta.json").write_text(json.dumps(meta))
    with pytest.raises(ValueError, match="optimizer's own weights"):
        train.train(tr, va, vocab, mcfg, cfg.model_copy(update={"steps": 40}), tmp_path / "avg", resume=True)


def test_stopping_at_rungs_then_resuming_equals_one_uninterrupted_run(tmp_path, small_text):
    """What successive halving relies on: a run stopped at steps 15 and 35 (not checkpoint steps) and resumed
    each time ends bitwise where an uninterrupted run ends, optimizer state included. Resuming a run trained
    with a smaller `steps` does not: the learning-rate schedule spans `steps`."""
    tr, va, vocab, mcfg = data(small_text)
    mcfg = mcfg.model_copy(update={"dropout": 0.2})
    full = train.train(tr, va, vocab, mcfg, CFG, tmp_path / "full")

    rungs = [train.train(tr, va, vocab, mcfg, CFG, tmp_path / "rungs", resume=True, stop=s) for s in (15, 35)]
    last = train.train(tr, va, vocab, mcfg, CFG, tmp_path / "rungs", resume=True)

    assert [r.meta.step for r in rungs] == [15, 35] and [s for s, _ in rungs[1].meta.metrics["val"]] == [
        15,
        20,
        35,
    ]
    assert last.meta.step == 60 and same_weights(full.params, last.params)
    assert same_weights(checkpoint.load(tmp_path / "full").optim, checkpoint.load(tmp_path / "rungs").optim)
    short = train.train(tr, va, vocab, mcfg, CFG.model_copy(update={"steps": 35}), tmp_path / "short")
    longer = train.train(tr, va, vocab, mcfg, CFG, tmp_path / "short", resume=True)
    assert short.meta.step == 35 and longer.meta.step == 60 and not same_weights(full.params, longer.params)


def test_resume_refuses_another_run(tmp_path, small_text):
    tr, va, vocab, mcfg = data(small_text)
    train.train(tr, va, vocab, mcfg, CFG.model_copy(update={"steps": 20}), tmp_path)
    with pytest.raises(ValueError, match="model config"):
        train.train(tr, va, vocab, mcfg.model_copy(update={"hidden": 16}), CFG, tmp_path, resume=True)
    with pytest.raises(ValueError, match="batch"):
        train.train(tr, va, vocab, mcfg, CFG.model_copy(update={"batch": 4}), tmp_path, resume=True)


def test_resume_keeps_where_the_schedule_ends(tmp_path, small_text):
    """A checkpoint records min_lr resolved (None means lr / 100 today, lr / 10 in older code): a run resumes
    under its own schedule, and a checkpoint written by the older code with min_lr None is refused rather than
    resumed onto another schedule, until its end is named."""
    tr, va, vocab, mcfg = data(small_text)
    cfg = CFG.model_copy(update={"steps": 20, "min_lr": None})
    ck = train.train(tr, va, vocab, mcfg, cfg, tmp_path)
    meta = json.loads((ck.path / "meta.json").read_text())
    assert meta["train"]["min_lr"] == cfg.lr / 100
    assert train.train(tr, va, vocab, mcfg, cfg.model_copy(update={"steps": 30}), tmp_path, resume=True)
    ck = checkpoint.load(tmp_path)
    meta = json.loads((ck.path / "meta.json").read_text())
    meta["train"]["min_lr"] = None  # as the older code wrote it
    (ck.path / "meta.json").write_text(json.dumps(meta))
    with pytest.raises(ValueError, match="min_lr"):
        train.train(tr, va, vocab, mcfg, cfg.model_copy(update={"steps": 40}), tmp_path, resume=True)
    named = cfg.model_copy(update={"steps": 40, "min_lr": cfg.lr / 10})
    assert train.train(tr, va, vocab, mcfg, named, tmp_path, resume=True).meta.step == 40


def test_divergence_stops_without_a_bad_checkpoint(tmp_path, small_text):
    tr, va, vocab, mcfg = data(small_text)
    wild = CFG.model_copy(
        update={"optimizer": "sgd", "lr": 10.0, "clip": 0.0, "warmup": 0, "checkpoint_every": 1}
    )
    with pytest.raises(train.TrainingDiverged, match="lower the learning rate|Lower the learning rate"):
        train.train(tr, va, vocab, mcfg, wild, tmp_path)
    for d in checkpoint.step_dirs(tmp_path):
        assert all(np.isfinite(v).all() for v in checkpoint.load_dir(d).params.values())


def test_clipping_bounds_the_global_norm():
    g = {"a": np.full((3, 3), 10.0, np.float32), "b": np.full(4, -10.0, np.float32)}
    before = optim.clip_(g, 1.0)
    assert before == pytest.approx(np.sqrt(13) * 10)
    assert np.sqrt(sum((v.astype(np.float64) ** 2).sum() for v in g.values())) == pytest.approx(1.0, rel=1e-5)
    assert optim.clip_(g, 0.0) == pytest.approx(1.0, rel=1e-5)  # 0 = off


def test_adam_matches_the_textbook_update():
    """Kingma & Ba's Adam with bias correction, plus decoupled weight decay on matrices (not biases), written
    out plainly in float64, against the optimizer's in-place float32 version over a few steps."""
    rng = np.random.default_rng(0)
    p = {"W": rng.standard_normal((4, 6)), "b": rng.standard_normal(6)}
    opt = optim.Adam({k: v.astype(np.float32) for k, v in p.items()}, weight_decay=0.1)
    mine = {k: v.astype(np.float32) for k, v in p.items()}
    m = {k: np.zeros_like(v) for k, v in p.items()}
    v2 = {k: np.zeros_like(v) for k, v in p.items()}
    b1, b2, eps = 0.9, 0.99, 1e-8
    for t, lr in enumerate([1e-2, 5e-3, 2e-3], start=1):
        g = {k: rng.standard_normal(x.shape) for k, x in p.items()}
        opt.step(mine, {k: x.astype(np.float32) for k, x in g.items()}, lr)
        for k in p:
            if k == "W":
                p[k] = p[k] * (1 - lr * 0.1)
            m[k] = b1 * m[k] + (1 - b1) * g[k]
            v2[k] = b2 * v2[k] + (1 - b2) * g[k] ** 2
            p[k] = p[k] - lr * (m[k] / (1 - b1**t)) / (np.sqrt(v2[k] / (1 - b2**t)) + eps)
        for k in p:
            np.testing.assert_allclose(mine[k], p[k], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("name", ["adam", "adagrad", "sgd"])
def test_a_step_shared_between_two_threads_equals_one_thread(name):
    """Parameters large enough are updated on two threads (runtime.shares), each array by one of them: bitwise
    the update of one thread, weight decay included."""
    from threadpoolctl import threadpool_limits

    from model import runtime

    rng = np.random.default_rng(1)
    shapes = {"W0": (256, 768), "U1": (256, 768), "W1": (256, 768), "b0": (768,), "V": (256, 65), "c": (65,)}
    p = {k: rng.standard_normal(s).astype(np.float32) for k, s in shapes.items()}
    out = []
    for threads in (1, 2):
        with threadpool_limits(threads, user_api="blas"):
            assert len(runtime.shares(p)) == threads
            mine, r = {k: v.copy() for k, v in p.items()}, np.random.default_rng(2)
            opt = optim.make(name, mine, weight_decay=0.1)
            for lr in (1e-2, 5e-3):
                opt.step(mine, {k: r.standard_normal(v.shape).astype(np.float32) for k, v in p.items()}, lr)
            out.append(mine)
    assert same_weights(*out)


def test_schedule_warms_up_then_decays():
    lrs = [optim.lr_at(s, 1.0, 100, 10, 0.1) for s in range(100)]
    assert lrs[0] == pytest.approx(0.1) and lrs[9] == pytest.approx(1.0)
    assert all(a >= b for a, b in zip(lrs[9:], lrs[10:], strict=False)) and lrs[-1] > 0.1


@pytest.mark.parametrize("name", ["adam", "adagrad", "sgd"])
def test_every_optimizer_lowers_the_loss(tmp_path, small_text, name):
    tr, va, vocab, mcfg = data(small_text)
    lr = {"adam": 1e-2, "adagrad": 5e-2, "sgd": 0.5}[name]
    ck = train.train(tr, va, vocab, mcfg, CFG.model_copy(update={"optimizer": name, "lr": lr}), tmp_path)
    assert ck.meta.metrics["val_loss"] < np.log(len(vocab)) - 0.5


@pytest.mark.parametrize("cell", ["rnn", "gru", "lstm"])
def test_warm_start_with_a_grown_vocabulary(tmp_path, small_text, cell):
    tr, va, vocab, mcfg = data(small_text, cell)
    old = train.train(tr, va, vocab, mcfg, CFG, tmp_path / "old")
    new_text = small_text + "\u00e9\u00e8\U0001f600 " * 50
    big = vocab.grow(new_text)
    tr2, va2 = corpus.split(big.encode(new_text))
    cfg2 = mcfg.model_copy(update={"vocab_size": len(big)})
    init = net.grow(old.params, mcfg, len(big), np.random.default_rng(0))
    ck = train.train(tr2, va2, big, cfg2, CFG, tmp_path / "new", init_params=init, parent=str(old.path))
    assert ck.meta.vocab[: len(vocab)] == list(vocab.chars) and ck.meta.parent == str(old.path)
    # before any step of its own, a warm start is about as good at the old text as the old model (the new
    # characters take a little probability mass), and much better than a fresh start
    old_text = small_text[-2000:]
    warm = train.evaluate(init, cfg2, big.encode(old_text))
    assert warm < train.evaluate(old.params, mcfg, vocab.encode(old_text)) + 0.1
    assert warm < train.evaluate(net.init(cfg2, np.random.default_rng(0)), cfg2, big.encode(old_text)) - 0.5


def run_cli(*args: str, **kw) -> subprocess.Popen:
    env = os.environ | {"OPENBLAS_NUM_THREADS": "1"}
    return subprocess.Popen([sys.executable, "-m", "cli", *args], env=env, **kw)


@pytest.mark.parametrize(
    "cell,kills", [("rnn", 3), ("gru", 1), ("lstm", 1), pytest.param("lstm", 12, marks=pytest.mark.slow)]
)
def test_sigkill_mid_run_then_resume_is_bitwise_identical(tmp_path, small_corpus, cell, kills):
    """A real training process killed with SIGKILL at random points, resumed each time."""
    flags = ["--data", str(small_corpus), "--cell", cell, "--steps", "300", "--hidden", "32"]
    flags += ["--layers", "2", "--batch", "8", "--seq", "16"]
    flags += ["--checkpoint-every", "10", "--eval-every", "40"]
    assert run_cli("train", *flags, "--out", str(tmp_path / "full")).wait(120) == 0
    cut = tmp_path / "cut"
    rng = random.Random()
    points = sorted(rng.sample(range(20, 220, 10), kills))  # checkpoints come every 10 steps
    print("killing a little after the checkpoints at steps", points)
    for kill_after in points:
        p = run_cli("train", *flags, "--out", str(cut), "--resume", stderr=subprocess.DEVNULL)
        deadline = time.time() + 60
        while time.time() < deadline and p.poll() is None:
            latest = checkpoint.read_pointer(cut, "latest")
            if latest and int(latest.name[5:]) >= kill_after:
                break
            time.sleep(0.01)
        time.sleep(rng.uniform(0, 0.05))  # mid-step or mid-save
        assert p.poll() is None, "training ended before it could be killed; make it longer"
        p.send_signal(signal.SIGKILL)
        p.wait()
    assert checkpoint.load(cut).meta.step < 300
    assert run_cli("train", *flags, "--out", str(cut), "--resume").wait(120) == 0
    a, b = checkpoint.load(tmp_path / "full"), checkpoint.load(cut)
    assert b.meta.step == 300 and same_weights(a.params, b.params)
    assert not list(Path(cut).glob(".tmp-*"))


def test_a_live_run_folder_refuses_a_second_writer_and_a_killed_one_resumes(tmp_path, small_corpus):
    """While one `char-rnn train` owns its --out folder, a second one (--overwrite and --resume included) is
    refused in one line naming the owner, and writes nothing there; after the owner is killed with SIGKILL,
    the folder's lock is gone with it and --resume continues the run."""
    out = tmp_path / "run"
    flags = [
        "--data",
        str(small_corpus),
        "--out",
        str(out),
        "--cell",
        "rnn",
        "--hidden",
        "16",
        "--batch",
        "4",
    ]
    flags += ["--seq", "16", "--checkpoint-every", "10"]
    owner = run_cli("train", *flags, "--steps", "100000", stderr=subprocess.DEVNULL)
    try:
        deadline = time.time() + 120
        while not checkpoint.step_dirs(out):  # the owner is training: it has written a checkpoint
            assert owner.poll() is None and time.time() < deadline, "the first run did not start training"
            time.sleep(0.01)
        for extra in (["--overwrite", "--hidden", "8"], ["--resume"], []):
            second = run_cli("train", *flags, "--steps", "20", *extra, stderr=subprocess.PIPE, text=True)
            _, err = second.communicate(timeout=120)
            assert second.returncode == 1 and err.count("\n") == 1, (extra, err)
            assert err.startswith("char-rnn: error: ") and f"process {owner.pid} " in err and "in use" in err
            assert owner.poll() is None
        assert checkpoint.load(out, with_optim=False).config.hidden == 16  # only the owner's checkpoints
    finally:
        owner.kill()  # SIGKILL: no chance to release anything
        owner.wait()
    done = checkpoint.load(out, with_optim=False).meta.step
    resumed = run_cli(
        "train", *flags, "--steps", str(done + 20), "--resume", stderr=subprocess.PIPE, text=True
    )
    _, err = resumed.communicate(timeout=120)
    assert resumed.returncode == 0, err
    assert checkpoint.load(out, with_optim=False).meta.step == done + 20
