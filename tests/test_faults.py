"""Fault injection: damaged checkpoints and promoted models, two pipeline runs at once. Nothing is lost."""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from conftest import damage

from model import checkpoint, corpus, rnn, train
from model.vocab import Vocab

ROOT = Path(__file__).resolve().parent.parent
CFG = train.TrainConfig(steps=60, batch=8, seq=16, warmup=5, eval_every=20, checkpoint_every=10, keep=10)


def fit(text: str, out: Path, cfg: train.TrainConfig = CFG, **kw) -> checkpoint.Checkpoint:
    vocab = Vocab.from_text(text)
    tr, va = corpus.split(vocab.encode(text))
    mcfg = rnn.ModelConfig(vocab_size=len(vocab), hidden=24, layers=1, dropout=0.1)
    return train.train(tr, va[:2000], vocab, mcfg, cfg, out, **kw)


@pytest.mark.parametrize("how", ["truncate", "flip"])
def test_resume_past_a_damaged_latest_checkpoint_still_matches_bitwise(tmp_path, small_text, how):
    full = fit(small_text, tmp_path / "full")
    cut = tmp_path / "cut"
    with pytest.raises(Stop):
        fit(small_text, cut, on_progress=stop_at(35))
    damage(cut / "step-0000030" / "optim.npz", how)
    with pytest.warns(UserWarning, match=r"step-0000030/optim.npz: checksum mismatch"):
        resumed = fit(small_text, cut, resume=True)  # falls back to step 20 and recomputes
    assert resumed.meta.step == 60
    assert all(np.array_equal(full.params[k], resumed.params[k]) for k in full.params)


class Stop(Exception):
    pass


def stop_at(step: int):
    def cb(p: train.Progress) -> None:
        if p.step >= step:
            raise Stop

    return cb


@pytest.fixture
def store(tmp_path, monkeypatch):
    """A registry of its own (pointer file) in this test's BENTOML_HOME."""
    from flows import registry

    monkeypatch.setattr(registry, "pointer", lambda: tmp_path / "promoted.json")
    return registry


@pytest.mark.parametrize("how", ["truncate", "flip"])
def test_service_side_falls_back_to_the_previous_promoted_model(tmp_path, small_text, store, how):
    a = fit(small_text, tmp_path / "a", CFG.model_copy(update={"steps": 20}))
    b = fit(small_text, tmp_path / "b", CFG.model_copy(update={"steps": 40}))
    tag_a = store.promote(a.path, {"run_id": "a"})
    tag_b = store.promote(b.path, {"run_id": "b"})
    assert store.load_promoted()[0] == tag_b
    import bentoml

    damage(Path(bentoml.models.get(tag_b).path) / "weights.npz", how)
    with pytest.warns(UserWarning, match=f"refused promoted model {tag_b}.*weights.npz"):
        tag, ck = store.load_promoted()
    assert tag == tag_a and ck.meta.step == 20


def test_promote_refuses_a_damaged_candidate(tmp_path, small_text, store):
    a = fit(small_text, tmp_path / "a", CFG.model_copy(update={"steps": 10}))
    damage(a.path / "weights.npz", "flip")
    with pytest.raises(checkpoint.CheckpointError, match="checksum mismatch"):
        store.promote(a.path, {"run_id": "a"})
    assert store.promoted_tags() == []


def test_two_pipeline_runs_at_once_both_finish_and_the_registry_stays_consistent(tmp_path, small_text):
    """Two `char-rnn pipeline` processes on one corpus and one registry, each with its own Prefect."""
    data = tmp_path / "texts"
    data.mkdir()
    (data / "a.txt").write_text(small_text[:8000], encoding="utf-8")
    shared = tmp_path / "home"
    procs = []
    for name in ("one", "two"):
        env = os.environ | {
            "CHAR_RNN_HOME": str(shared),
            "BENTOML_HOME": str(shared / "bentoml"),
            "PREFECT_HOME": str(tmp_path / f"prefect-{name}"),
            "OPENBLAS_NUM_THREADS": "1",
        }
        env.pop("PREFECT_API_URL", None)
        args = [
            "pipeline",
            "--data",
            str(data),
            "--steps",
            "60",
            "--hidden",
            "16",
            "--batch",
            "4",
            "--seq",
            "16",
        ]
        procs.append(
            subprocess.Popen(
                [sys.executable, "-m", "cli", *args],
                env=env,
                cwd=ROOT,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                text=True,
            )
        )
    outs = [p.communicate(timeout=240) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], [err[-2000:] for _, err in outs]
    decisions = [out.splitlines()[0] for out, _ in outs]
    assert sum(d.startswith("promoted") for d in decisions) >= 1, decisions
    tags = json.loads((shared / "bentoml" / "char-rnn-promoted.json").read_text())["promoted"]
    assert len(tags) == len(set(tags)) >= 1
    code = (  # every promoted model loads and verifies; the newest is what a service would serve
        "from flows import registry; from model import checkpoint; import bentoml; "
        "tags = registry.promoted_tags(); "
        "[checkpoint.load_dir(bentoml.models.get(t).path, with_optim=False) for t in tags]; "
        "print(registry.load_promoted()[0])"
    )
    env = os.environ | {"CHAR_RNN_HOME": str(shared), "BENTOML_HOME": str(shared / "bentoml")}
    r = subprocess.run(
        [sys.executable, "-c", code], env=env, cwd=ROOT, capture_output=True, text=True, timeout=120
    )
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == tags[-1]


def test_odd_files_in_the_corpus_folder(tmp_path, small_text, store):
    """Empty, binary, invalid UTF-8, BOM, CRLF and astral characters: usable text in, the rest named."""
    from prefect.testing.utilities import prefect_test_harness

    from flows.pipeline import pipeline

    folder = tmp_path / "texts"
    folder.mkdir()
    (folder / "a.txt").write_text(small_text[:5000], encoding="utf-8")
    (folder / "bom.txt").write_bytes(("\ufeff" + "With a byte-order mark.\n" * 20).encode())
    (folder / "windows.txt").write_bytes(b"Windows line endings.\r\n" * 20)
    (folder / "astral.txt").write_text("Beyond the BMP: \U0001f600 \U0001d11e \U00010348.\n" * 20)
    (folder / "empty.txt").write_text("")
    (folder / "binary.txt").write_bytes(bytes(range(256)) * 4)
    (folder / "latin1.txt").write_bytes("caf\xe9 cr\xe8me\n".encode("latin-1"))
    params = {"steps": 20, "hidden": 16, "batch": 4, "seq": 16, "checkpoint_every": 10}
    with prefect_test_harness(server_startup_timeout=120):
        d = pipeline(data_dir=folder, artifacts_root=tmp_path, **params)
    metrics = json.loads((d.run_dir / "metrics.json").read_text())
    assert set(metrics["skipped"]) == {"empty.txt", "binary.txt", "latin1.txt"}
    assert metrics["files"] == ["a.txt", "astral.txt", "bom.txt", "windows.txt"]
    vocab = checkpoint.load(d.run_dir / "checkpoints").vocab
    assert {"\U0001f600", "\U0001d11e", "\U00010348"} <= set(vocab.chars)
    assert "\r" not in vocab and "\ufeff" not in vocab
    from model.sample import Settings, sample

    ck = checkpoint.load(d.run_dir / "checkpoints")
    assert len(sample(ck.params, ck.config, ck.vocab, ["\U0001f600 "], 10, Settings(seed=1))[0]) == 10
