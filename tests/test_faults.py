"""Fault injection: damaged checkpoints and promoted models, two pipeline runs at once. Nothing is lost."""

import fcntl
import json
import logging
import os
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
from conftest import damage

from model import checkpoint, corpus, files, net, train
from model.vocab import Vocab

ROOT = Path(__file__).resolve().parent.parent
CFG = train.TrainConfig(steps=60, batch=8, seq=16, warmup=5, eval_every=20, checkpoint_every=10, keep=10)


def fit(text: str, out: Path, cfg: train.TrainConfig = CFG, **kw) -> checkpoint.Checkpoint:
    vocab = Vocab.from_text(text)
    tr, va = corpus.split(vocab.encode(text))
    mcfg = net.ModelConfig(vocab_size=len(vocab), hidden=24, layers=1, dropout=0.1)
    return train.train(tr, va[:2000], vocab, mcfg, cfg, out, **kw)


@pytest.mark.parametrize("how", ["truncate", "flip"])
def test_resume_past_a_damaged_latest_checkpoint_still_matches_bitwise(tmp_path, small_text, how, caplog):
    full = fit(small_text, tmp_path / "full")
    cut = tmp_path / "cut"
    with pytest.raises(Stop):
        fit(small_text, cut, on_progress=stop_at(35))
    damage(cut / "step-0000030" / "optim.npz", how)
    with caplog.at_level(logging.WARNING, "char_rnn"):
        resumed = fit(small_text, cut, resume=True)  # falls back to step 20 and recomputes
    assert re.search(r"refused checkpoint.*step-0000030/optim.npz: checksum mismatch", caplog.text)
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
def store(tmp_path):
    """A registry of its own (history file and lock) over the session's model store."""
    from registry import Registry

    return Registry(tmp_path / "registry")


@pytest.mark.parametrize("how", ["truncate", "flip"])
def test_service_side_falls_back_to_the_previous_promoted_model(tmp_path, small_text, store, how, caplog):
    a = fit(small_text, tmp_path / "a", CFG.model_copy(update={"steps": 20}))
    b = fit(small_text, tmp_path / "b", CFG.model_copy(update={"steps": 40}))
    tag_a = store.promote(a.path, {"run_id": "a"}).tag
    tag_b = store.promote(b.path, {"run_id": "b"}).tag
    assert store.current().tag == tag_b
    import bentoml

    damage(Path(bentoml.models.get(tag_b).path) / "weights.npz", how)
    with caplog.at_level(logging.WARNING, "char_rnn"):
        cur = store.current()
    assert cur.tag == tag_a and cur.checkpoint.meta.step == 20
    (warned,) = [r for r in caplog.records if r.name == "char_rnn.registry"]
    assert warned.levelno == logging.WARNING
    assert re.search(f"refused promoted model.*{tag_b}.*weights.npz.*serving {tag_a}", warned.getMessage())


def test_promote_refuses_a_damaged_candidate(tmp_path, small_text, store):
    a = fit(small_text, tmp_path / "a", CFG.model_copy(update={"steps": 10}))
    damage(a.path / "weights.npz", "flip")
    with pytest.raises(checkpoint.CheckpointError, match="checksum mismatch"):
        store.promote(a.path, {"run_id": "a"})
    assert store.history() == []


WORSE = ["--steps", "40", "--hidden", "8", "--batch", "4", "--seq", "16"]
BETTER = ["--steps", "150", "--hidden", "24", "--batch", "4", "--seq", "16"]
SERVED = (  # what a service would serve from this home, and the history's tags
    "import os; from pathlib import Path; from registry import Registry; "
    "r = Registry(Path(os.environ['BENTOML_HOME'])); "
    "print(r.current().tag, *[e.tag for e in r.history()])"
)


def waiting_for(lock: Path) -> set[int]:
    """The processes blocked on the flock of `lock` now (Linux's /proc/locks marks a waiter with "->")."""
    st = lock.stat()
    dev_ino = f"{os.major(st.st_dev):02x}:{os.minor(st.st_dev):02x}:{st.st_ino}"
    waiting = set()
    for line in Path("/proc/locks").read_text().splitlines():
        fields = line.split()
        if "->" in fields and "FLOCK" in fields and dev_ino in fields:
            waiting.add(int(fields[fields.index("FLOCK") + 3]))
    return waiting


def until(condition, procs: dict, what: str, seconds: float = 600) -> None:
    """Wait for `condition` (checked every 50 ms), failing early when a run exits."""
    deadline = time.monotonic() + seconds
    while not condition():
        exited = {k: p.returncode for k, p in procs.items() if p.poll() is not None}
        assert not exited, f"{exited} ended while waiting for {what}"
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.005)


@pytest.mark.parametrize("first", ["better", "worse"])
def test_two_pipeline_runs_with_different_candidates_at_once_the_better_ends_current(
    tmp_path, small_text, first
):
    """Two `char-rnn pipeline` processes (each with its own Prefect) train different candidates on one corpus
    into one registry. Whichever promotes first, the better model ends current, and the other run says which
    model it lost to. HOME is an empty folder that must stay empty. The order is made by events, not by time:
    the test holds the registry's lock until the first run waits for it, starts the second, stops it as soon
    as it trains (it has read that no model is promoted), lets the first promote, then lets the second go
    on."""
    data = tmp_path / "texts"
    data.mkdir()
    (data / "a.txt").write_text(small_text[:8000], encoding="utf-8")
    shared, empty_home = tmp_path / "home", tmp_path / "user-home"
    empty_home.mkdir()
    lock = shared / "bentoml" / ".char-rnn.lock"
    lock.parent.mkdir(parents=True)
    second = "worse" if first == "better" else "better"
    procs: dict[str, subprocess.Popen] = {}

    def start(name: str) -> None:
        env = os.environ | {
            "HOME": str(empty_home),
            "CHAR_RNN_HOME": str(shared),
            "BENTOML_HOME": str(shared / "bentoml"),
            "PREFECT_HOME": str(tmp_path / f"prefect-{name}"),
            "OPENBLAS_NUM_THREADS": "1",
        }
        env.pop("PREFECT_API_URL", None)
        args = ["pipeline", "--data", str(data), *(BETTER if name == "better" else WORSE)]
        procs[name] = subprocess.Popen(
            [sys.executable, "-m", "cli", *args],
            env=env,
            cwd=ROOT,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )

    def training(name: str) -> bool:
        """Whether run `name` owns a run folder (model.files.owned names its owner in the folder's lock)."""
        owner = f"process {procs[name].pid} "
        return any(owner in f.read_text() for f in shared.glob("runs/run-*/checkpoints/.lock"))

    with open(lock, "a") as held:
        fcntl.flock(held, fcntl.LOCK_EX)
        start(first)
        until(
            lambda: procs[first].pid in waiting_for(lock), procs, f"the {first} run to wait for the registry"
        )
        start(second)
        until(lambda: training(second), procs, f"the {second} run to start training")
        os.kill(procs[second].pid, signal.SIGSTOP)
        assert waiting_for(lock) == {procs[first].pid}, (
            "the second run reached the registry before it stopped"
        )
    until(lambda: procs[first].poll() is not None, {}, f"the {first} run to end")
    os.kill(procs[second].pid, signal.SIGCONT)
    outs = {name: p.communicate(timeout=300) for name, p in procs.items()}
    assert [p.returncode for p in procs.values()] == [0, 0], {k: err[-2000:] for k, (_, err) in outs.items()}
    said = {name: out.splitlines()[0] for name, (out, _) in outs.items()}
    env = os.environ | {"CHAR_RNN_HOME": str(shared), "BENTOML_HOME": str(shared / "bentoml")}
    r = subprocess.run(
        [sys.executable, "-c", SERVED], env=env, cwd=ROOT, capture_output=True, text=True, timeout=120
    )
    assert r.returncode == 0, r.stderr
    current, *history_tags = r.stdout.split()
    assert said["better"].startswith(f"promoted {current}:"), said
    if first == "better":  # the worse one compared itself with the better one, promoted meanwhile, and lost
        assert said["worse"].startswith(f"kept {current}:") and f"does not beat {current}" in said["worse"]
        assert history_tags == [current]
    else:
        assert said["worse"].startswith("promoted") and history_tags[-1] == current and len(history_tags) == 2
    assert list(empty_home.iterdir()) == []


def test_odd_files_in_the_corpus_folder(tmp_path, small_text, monkeypatch):
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
    monkeypatch.setenv("CHAR_RNN_ALLOWED_ROOTS", str(tmp_path))
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


def test_a_run_folder_in_use_is_refused_or_waited_for_naming_its_owner(tmp_path):
    """The CLI refuses a run folder another process trains in; the pipeline (the same run asked twice at once,
    e.g. the schedule and an on-demand run) waits its turn. Both name the owner. Ordered by events: the waiter
    is seen blocked on the lock in /proc/locks before the owner lets go."""
    folder = tmp_path / "checkpoints"
    owner = subprocess.Popen(
        [sys.executable, "-c", OWNER, str(folder)], cwd=ROOT, stdin=subprocess.PIPE, stdout=subprocess.PIPE
    )
    try:
        assert owner.stdout.readline() == b"owned\n"
        with pytest.raises(files.FolderBusy, match=f"process {owner.pid} on .* is training there; wait"):
            with files.owned(folder, "training"):
                pass
        heard, entered = [], threading.Event()

        def second() -> None:
            with files.owned(folder, "training", heard.append):
                entered.set()

        waiter = threading.Thread(target=second)
        waiter.start()
        until(lambda: heard and os.getpid() in waiting_for(folder / ".lock"), {"owner": owner}, "the wait")
        assert not entered.is_set() and f"process {owner.pid} on " in heard[0] and "waiting" in heard[0]
        owner.stdin.close()  # the owner lets go and ends
        waiter.join(timeout=60)
        assert entered.is_set()
    finally:
        owner.kill()
        owner.wait()


OWNER = (
    "import sys; from pathlib import Path; from model.files import owned\n"
    "with owned(Path(sys.argv[1]), 'training'):\n"
    "    print('owned', flush=True); sys.stdin.read()\n"
)
