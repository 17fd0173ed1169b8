"""Checkpoints: round trip, checksums, fallback to the previous good one, pruning, no pickles."""

import io
import json
import logging
import shutil
from pathlib import Path

import numpy as np
import pytest
from conftest import SHAKESPEARE, damage

from model import checkpoint, corpus, net, sample, train
from model.checkpoint import CheckpointError, Meta
from model.config import TrainConfig
from model.vocab import Vocab

FIXTURES = Path(__file__).parent / "fixtures"


def make(step: int, val: float | None = None, V: int = 5, H: int = 4):
    cfg = net.ModelConfig(vocab_size=V, cell="gru", hidden=H)
    params = net.init(cfg, np.random.default_rng(step))
    meta = Meta(
        format=checkpoint.FORMAT,
        vocab=list("abcde"[:V]),
        model=cfg,
        train=TrainConfig(),
        step=step,
        metrics={"val_loss": val},
    )
    return params, meta, {"t": np.array(step), "state": net.zeros_state(cfg, 2)}


def test_round_trip(tmp_path):
    params, meta, opt = make(10, 1.5)
    path = checkpoint.save(tmp_path, params, meta, opt)
    ck = checkpoint.load(tmp_path)
    assert ck.path == path and ck.meta.step == 10 and ck.vocab.chars == tuple("abcde")
    assert all(np.array_equal(ck.params[k], params[k]) for k in params)
    assert int(ck.optim["t"]) == 10 and set(ck.meta.sha256) == {"weights.npz", "optim.npz"}
    assert checkpoint.load(tmp_path, with_optim=False).optim == {}


@pytest.mark.parametrize("how", ["truncate", "flip"])
def test_damaged_checkpoint_is_refused_and_previous_used(tmp_path, how, caplog):
    for s in (10, 20):
        checkpoint.save(tmp_path, *make(s))
    damage(tmp_path / "step-0000020" / "weights.npz", how)
    with pytest.raises(CheckpointError, match=r"step-0000020/weights.npz: checksum mismatch"):
        checkpoint.load(tmp_path / "step-0000020")
    with caplog.at_level(logging.WARNING, "char_rnn"):
        ck = checkpoint.load(tmp_path)
    assert ck.meta.step == 10
    assert "refused checkpoint" in caplog.text and "step-0000020" in caplog.text


def test_missing_or_garbled_meta(tmp_path):
    checkpoint.save(tmp_path, *make(10))
    d = tmp_path / "step-0000010"
    (d / "meta.json").write_text("{not json")
    with pytest.raises(CheckpointError, match="unreadable checkpoint metadata"):
        checkpoint.load(d)
    meta = make(10)[1].model_dump()
    meta["format"] = 99
    (d / "meta.json").write_text(json.dumps(meta))
    with pytest.raises(CheckpointError, match="format 99"):
        checkpoint.load(d)
    with pytest.raises(CheckpointError, match="no good checkpoint"):
        checkpoint.load(tmp_path)


def test_empty_or_missing_folder(tmp_path):
    with pytest.raises(CheckpointError, match="no checkpoints here"):
        checkpoint.load(tmp_path)
    with pytest.raises(CheckpointError, match="no such checkpoint"):
        checkpoint.load(tmp_path / "nope")


def test_pickled_arrays_are_never_loaded(tmp_path):
    params, meta, _ = make(10)
    path = checkpoint.save(tmp_path, params, meta)
    buf = io.BytesIO()
    np.savez(buf, **(params | {"V": np.array([{"evil": 1}], dtype=object)}))
    (path / "weights.npz").write_bytes(buf.getvalue())
    m = json.loads((path / "meta.json").read_text())
    m["sha256"]["weights.npz"] = checkpoint.sha256(path / "weights.npz")
    (path / "meta.json").write_text(json.dumps(m))
    with pytest.raises(CheckpointError, match="unreadable"):
        checkpoint.load(path)


def test_shapes_must_match_config(tmp_path):
    params, meta, _ = make(10)
    meta = meta.model_copy(update={"model": meta.model.model_copy(update={"hidden": 3})})
    checkpoint.save(tmp_path, params, meta)
    with pytest.raises(CheckpointError, match="do not match the model config"):
        checkpoint.load(tmp_path / "step-0000010")


def test_keeps_last_k_and_the_best(tmp_path):
    vals = {10: 2.0, 20: 1.0, 30: 1.5, 40: 1.7, 50: 1.8}
    for s, v in vals.items():
        checkpoint.save(tmp_path, *make(s, v), keep=2)
    assert [p.name for p in checkpoint.step_dirs(tmp_path)] == [
        "step-0000050",
        "step-0000040",
        "step-0000020",
    ]
    assert checkpoint.read_pointer(tmp_path, "best").name == "step-0000020"
    assert checkpoint.load(tmp_path, pointer="best").meta.step == 20
    assert checkpoint.read_pointer(tmp_path, "latest").name == "step-0000050"


def test_interrupted_write_leaves_no_valid_looking_checkpoint(tmp_path, monkeypatch):
    checkpoint.save(tmp_path, *make(10))

    def boom(*a, **k):
        raise OSError("disk full")

    monkeypatch.setattr(checkpoint.os, "replace", boom)
    with pytest.raises(OSError):
        checkpoint.save(tmp_path, *make(20))
    monkeypatch.undo()
    assert [p.name for p in checkpoint.step_dirs(tmp_path)] == ["step-0000010"]
    assert not list(tmp_path.glob(".tmp-*")) and checkpoint.load(tmp_path).meta.step == 10


def test_a_format1_checkpoint_loads_samples_and_resumes(tmp_path):
    """Written by the code before cells (commit a7fd26d, tests/fixtures/README.md): it loads as the vanilla
    RNN, writes greedily what that code wrote, and resumes training to the weights that code reached."""
    ck = checkpoint.load(FIXTURES / "format1-rnn")
    assert ck.meta.format == 1 and ck.config.cell == "rnn" and ck.meta.step == 20
    assert ck.optim["state"].shape == (2, 1, 4, 8)  # (L, S, B, H) from its per-layer hidden.<l>
    text = sample.sample(ck.params, ck.config, ck.vocab, ["ROMEO:"], 40, sample.Settings(top_k=1))
    assert text == ["n:on:s,eoRehe?n:s,eoRehe?n:s,eoRehe?n:s,"]  # greedy: whatever the random draws
    run = tmp_path / "run"
    shutil.copytree(FIXTURES / "format1-rnn", run)
    t = SHAKESPEARE.read_text(encoding="utf-8")[:3000]
    vocab = Vocab.from_text(t)
    assert vocab == ck.vocab
    tr, va = corpus.split(vocab.encode(t))
    cfg = train.TrainConfig(
        steps=30, batch=4, seq=16, lr=1e-2, min_lr=1e-3, warmup=2, eval_every=10, checkpoint_every=10,
        log_every=5, keep=1, seed=3, weight_decay=0.0,
    )  # fmt: skip
    done = train.train(tr, va, vocab, ck.config, cfg, run, resume=True)
    assert done.meta.step == 30 and done.meta.format == checkpoint.FORMAT == 2
    with np.load(FIXTURES / "format1-rnn-step30.npz", allow_pickle=False) as want:
        assert set(want.files) == set(done.params)
        for k in want.files:
            np.testing.assert_allclose(done.params[k], want[k], rtol=1e-5, atol=1e-6, err_msg=k)
