"""The pipeline's tasks through .fn(), and the whole flow on a tiny corpus under prefect_test_harness."""

import base64
import json
import logging
import os
import pickle
from pathlib import Path
from uuid import UUID

import bentoml
import numpy as np
import pytest
from conftest import damage
from prefect.artifacts import Artifact
from prefect.exceptions import ParameterTypeError

from flows.params import checked
from flows.pipeline import pipeline
from model import checkpoint, corpus
from model.corpus import CorpusError
from registry import Registry
from stages import promotion
from stages.data import encode, ingest
from stages.records import Encoded, Score, Trained

ROOT = Path(__file__).resolve().parent.parent
TINY = {"steps": 40, "hidden": 16, "batch": 4, "seq": 16, "checkpoint_every": 20}


@pytest.fixture(autouse=True)
def home(tmp_path, monkeypatch) -> Path:
    """Each test its own CHAR_RNN_HOME and promoted-model pointer (BENTOML_HOME)."""
    home = tmp_path / "home"
    monkeypatch.setenv("CHAR_RNN_HOME", str(home))
    monkeypatch.setenv("BENTOML_HOME", str(home / "bentoml"))
    monkeypatch.setenv("CHAR_RNN_ALLOWED_ROOTS", str(tmp_path))  # the test's corpus folders
    monkeypatch.delenv("CHAR_RNN_RUNS", raising=False)
    return home


@pytest.fixture
def texts(tmp_path, small_text) -> Path:
    """A folder with a few KB of usable text, a file that is not UTF-8 and an empty one."""
    folder = tmp_path / "texts"
    folder.mkdir()
    (folder / "a.txt").write_text(small_text[:6000], encoding="utf-8")
    (folder / "latin1.txt").write_bytes("caf\xe9\n".encode("latin-1"))
    (folder / "empty.txt").write_text("")
    return folder


def run_dirs(home: Path) -> list[Path]:
    return sorted((home / "runs").glob("run-*"))


def promoted(home: Path) -> list[str]:
    return [e.tag for e in Registry(home / "bentoml").history()]


def test_ingest_fingerprints_and_names_skipped_files(texts):
    info = ingest(texts)
    assert info.files == ["a.txt"]
    assert info.skipped == {"empty.txt": "empty", "latin1.txt": "not valid UTF-8 (byte 3)"}
    assert info.fingerprint == corpus.read(texts).fingerprint


def test_ingest_of_nothing_usable_is_a_clear_error(texts):
    (texts / "a.txt").unlink()
    with pytest.raises(CorpusError, match="no usable text.*empty.txt: empty"):
        ingest(texts)


def test_encode_writes_split_arrays_and_a_manifest(texts, tmp_path):
    info = ingest(texts)
    data = encode(info, tmp_path / "runs")
    assert data == Encoded.model_validate_json(data.manifest.read_bytes())
    train, val = data.load("train"), data.load("val")
    assert train.dtype == np.uint8 and (data.train_chars, data.val_chars) == (len(train), len(val))
    assert isinstance(train.base, np.memmap) and not train.flags.writeable  # read from disk as needed
    text = corpus.read(texts).text
    assert "".join(data.vocab[i] for i in val) == text[len(train) :]  # the last 10%
    assert len(val) == round(0.1 * len(text))

    grown = encode(info, tmp_path / "runs", ["é", "a"])
    assert grown.vocab[:2] == ["é", "a"] and grown.new_chars == grown.vocab[2:]
    assert grown.dir != data.dir


def test_damaged_encoded_arrays_are_refused(texts, tmp_path):
    data = encode(ingest(texts), tmp_path)
    damage(data.dir / "val.npy", "flip")
    assert len(data.load("train")) == data.train_chars
    with pytest.raises(ValueError, match=r"val.npy: checksum mismatch"):
        data.load("val")


def test_encode_refuses_a_corpus_that_changed_since_ingest(texts, tmp_path):
    info = ingest(texts)
    (texts / "b.txt").write_text("more")  # a new file is for the next run: this one encodes what it ingested
    assert encode(info, tmp_path).fingerprint == info.fingerprint
    with open(texts / "a.txt", "a") as f:
        f.write("more")
    with pytest.raises(RuntimeError, match="a.txt changed while the pipeline ran"):
        encode(info, tmp_path / "elsewhere")


def test_encode_reuses_what_it_wrote_and_rewrites_what_was_damaged(texts, tmp_path, caplog):
    info = ingest(texts)
    first = encode(info, tmp_path)
    stamp = (first.dir / "train.npy").stat().st_mtime_ns
    with caplog.at_level(logging.INFO):
        again = encode(info, tmp_path)
    assert again == first and (first.dir / "train.npy").stat().st_mtime_ns == stamp
    assert "Reusing the encoded corpus" in caplog.text
    damage(first.dir / "train.npy", "flip")
    assert encode(info, tmp_path).load("train").size == first.train_chars


@pytest.mark.parametrize("bad", [{"steps": 0}, {"hidden": 100_000}, {"data_dir": "/no/such/folder"}])
def test_bad_parameters_fail_before_any_work(prefect_api, texts, home, bad):
    with pytest.raises(ParameterTypeError):
        pipeline(**({"data_dir": texts} | TINY | bad))
    assert not (home / "runs").exists()


def test_pipeline_trains_reports_and_promotes(prefect_api, texts, home):
    decision = pipeline(data_dir=texts, **TINY)

    assert decision.promoted and decision.reason == "there was no promoted model yet"
    assert Registry(home / "bentoml").current().tag == decision.tag
    (run,) = run_dirs(home)
    assert decision.run_dir == run
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["step"] == 40 and metrics["skipped"].keys() == {"empty.txt", "latin1.txt"}
    assert metrics["candidate"]["bits"] == pytest.approx(metrics["candidate"]["nats"] / np.log(2))
    assert [s for s, _ in metrics["history"]["val"]] == [20, 40]
    assert (run / "loss.png").read_bytes().startswith(b"\x89PNG")
    report = (run / "report.md").read_text()
    assert f"**Promoted** as `{decision.tag}`" in report and "prompt 'The '" in report

    labels = bentoml.models.get(decision.tag).info.labels
    assert labels == {
        "fingerprint": metrics["fingerprint"],
        "val_loss": f"{metrics['candidate']['nats']:.6f}",
        "parent": "",
        "run_id": run.name,
        "corpus_chars": str(len(corpus.read(texts).text)),
        "val_chars": str(metrics["candidate"]["chars"]),
        "val_sampled": "false",
        "promoted_at": Registry(home / "bentoml").history()[-1].at,
    }
    for key in ("char-rnn-report", "char-rnn-metrics", "char-rnn-files", "char-rnn-training"):
        assert Artifact.get(key).flow_run_id == UUID(metrics["flow_run_id"]), key


def test_second_run_on_unchanged_text_is_a_noop(prefect_api, texts, home):
    first = pipeline(data_dir=texts, **TINY)
    again = pipeline(data_dir=texts, only_if_changed=True, **TINY)

    assert not again.promoted and again.tag == first.tag and again.run_dir is None
    assert again.reason.startswith("corpus unchanged since")
    assert promoted(home) == [first.tag] and len(run_dirs(home)) == 1


def test_new_characters_grow_the_vocabulary_and_still_train(prefect_api, texts, home):
    first = pipeline(data_dir=texts, **TINY)
    old = checkpoint.read_meta(next(run_dirs(home)[0].glob("checkpoints/step-*"))).vocab
    added = "Zoë’s façade — naïve “quotes” 0123456789\n"
    (texts / "b.txt").write_text(added * 20, encoding="utf-8")

    second = pipeline(data_dir=texts, only_if_changed=True, **TINY)

    metrics = json.loads((second.run_dir / "metrics.json").read_text())
    assert metrics["warm_start"] == first.tag and metrics["step"] == TINY["steps"]
    assert metrics["new_chars"] == sorted(set(added) - set(old)) and len(metrics["new_chars"]) > 10
    new = checkpoint.read_meta(next((second.run_dir / "checkpoints").glob("step-*"))).vocab
    assert new == old + metrics["new_chars"]  # old ids unchanged
    assert second.against.current.dropped > 0 and "new to" in (second.run_dir / "report.md").read_text()


def test_worse_candidate_is_kept_and_the_report_says_why(prefect_api, texts, home):
    first = pipeline(data_dir=texts, **(TINY | {"steps": 100}))
    worse = pipeline(data_dir=texts, **(TINY | {"steps": 1, "hidden": 8}))  # another shape: from scratch

    assert not worse.promoted and worse.tag == first.tag and promoted(home) == [first.tag]
    assert "does not beat" in worse.reason
    assert f"**Kept** `{first.tag}`: {worse.reason}" in (worse.run_dir / "report.md").read_text()


def test_promote_compares_with_a_model_promoted_meanwhile(prefect_api, texts, home):
    first = pipeline(data_dir=texts, **TINY)
    metrics = json.loads((first.run_dir / "metrics.json").read_text())
    data = Encoded.model_validate_json(next(first.run_dir.parent.glob("data-*/manifest.json")).read_bytes())
    latest = checkpoint.load(first.run_dir / "checkpoints", with_optim=False).path
    same = Trained(checkpoint=latest, step=40, resumed_from=0, warm_start=None, seconds=0)
    score = Score.model_validate(metrics["candidate"])

    # This candidate believes there is no promoted model; under the lock it must find the current one.
    decision = promotion.promote(same, score, None, data, first.run_dir, home / "bentoml")

    assert not decision.promoted and decision.against.current.model == first.tag
    assert decision.lost_to == first.tag and promoted(home) == [first.tag]


class Evil:
    """Unpickling this runs a shell command, as a planted cache file would."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def pickles(root: Path) -> list[Path]:
    """Files under `root` that hold a pickle: raw, or inside a Prefect result record."""
    found = []
    for f in root.rglob("*"):
        if f.is_file():
            raw = f.read_bytes()
            if raw.startswith(b"\x80") or b'"pickle"' in raw or b"cloudpickle" in raw:
                found.append(f)
    return found


def test_nothing_is_pickled_and_planted_pickles_are_never_loaded(prefect_api, texts, home, tmp_path):
    first = pipeline(data_dir=texts, **TINY)
    storage = Path(os.environ["PREFECT_HOME"]) / "storage"
    assert pickles(home) == [] and (not storage.exists() or pickles(storage) == [])
    marker = tmp_path / "pwned"
    evil = pickle.dumps(Evil(marker))
    record = {"metadata": {"serializer": {"type": "pickle"}}, "result": base64.b64encode(evil).decode()}
    storage.mkdir(parents=True, exist_ok=True)
    for name in ("encode", "char-rnn", *[f.name for f in storage.iterdir()]):
        (storage / name).write_text(json.dumps(record))
    (data,) = (home / "runs").glob("data-*")
    with open(data / "train.npy", "wb") as f:
        np.save(f, np.array([Evil(marker)], dtype=object), allow_pickle=True)

    again = pipeline(data_dir=texts, **(TINY | {"seed": 1}))  # another run: encode and train again

    assert not marker.exists()
    assert again.run_dir != first.run_dir and pickles(home) == []


@pytest.mark.parametrize(
    "param,value",
    [("data_dir", "/etc/passwd"), ("data_dir", "/etc"), ("artifacts_root", "/"), ("data_dir", "link-out")],
)
def test_paths_outside_the_allowed_roots_are_refused_before_any_work(
    prefect_api, home, tmp_path, param, value
):
    (tmp_path / "link-out").symlink_to("/etc")  # inside an allowed root, pointing outside
    value = str(tmp_path / value) if value == "link-out" else value
    with pytest.raises(ParameterTypeError, match="outside the allowed roots"):
        pipeline(**{"data_dir": ROOT / "data" / "smoke", param: value, **TINY})
    assert not (home / "runs").exists()
    with pytest.raises(ValueError, match=rf"{param}: .*outside the allowed roots \(.*{ROOT / 'data'}"):
        checked(pipeline, {param: value})


def test_relative_paths_start_at_the_checkout_and_roots_cannot_be_added_through_parameters():
    assert checked(pipeline, {"data_dir": "data/smoke"})["data_dir"] == ROOT / "data" / "smoke"
    with pytest.raises(ValueError, match="allowed_roots"):
        checked(pipeline, {"data_dir": "data/smoke", "allowed_roots": ["/"]})


def test_files_linking_out_of_the_corpus_folder_are_skipped(texts):
    (texts / "passwd.txt").symlink_to("/etc/passwd")
    assert "outside the folder" in ingest(texts).skipped["passwd.txt"]


def test_every_file_gives_its_share_of_validation_text(prefect_api, texts, home):
    """A new file that sorts last and holds only characters the promoted model does not know: the
    validation text still holds the old file's tail, so the retrain compares and completes."""
    first = pipeline(data_dir=texts, **TINY)
    (texts / "zz-greek.txt").write_text(
        "Ἐν ἀρχῇ ἦν ὁ λόγος, καὶ ὁ λόγος ἦν πρὸς τὸν θεόν.\n" * 200, encoding="utf-8"
    )
    second = pipeline(data_dir=texts, only_if_changed=True, **TINY)
    assert second.against.current.model == first.tag and second.against.current.chars > 500
    assert second.against.current.dropped > 0  # the Greek tail, which the old model cannot read


def test_a_run_that_could_not_be_compared_fails_before_training(prefect_api, texts, home):
    pipeline(data_dir=texts, **TINY)
    for f in texts.iterdir():
        f.unlink()
    (texts / "greek.txt").write_text("αβγδεζηθικλμνξοπρστυφχψω" * 400, encoding="utf-8")  # not one known
    before = set(run_dirs(home))
    with pytest.raises(ValueError, match="knows none of the validation text"):
        pipeline(data_dir=texts, **TINY)
    assert set(run_dirs(home)) == before  # no training time spent


def test_a_damaged_newest_model_is_a_warning_and_the_run_compares_with_the_one_served(
    prefect_api, texts, home, caplog
):
    first = pipeline(data_dir=texts, **TINY)
    reg = Registry(home / "bentoml")
    newer = reg.promote(checkpoint.load(first.run_dir / "checkpoints").path, {"run_id": "manual"}).tag
    damage(Path(bentoml.models.get(newer).path) / "weights.npz", "flip")
    with caplog.at_level(logging.INFO):
        again = pipeline(data_dir=texts, **(TINY | {"seed": 3}))
    assert again.against.current.model == first.tag
    refused = [r for r in caplog.records if "refused promoted model" in r.getMessage()]
    assert refused and all(r.levelno == logging.WARNING for r in refused)
    assert newer in refused[0].getMessage() and f"serving {first.tag}" in refused[0].getMessage()
    assert "became current during this run" not in caplog.text


def pickled(data: bytes) -> bool:
    """Whether `data` is a pickle (protocol 2 or later), raw or base64-encoded. It is never unpickled."""
    head = data[:4]
    if head[:1] == b"\x80" and head[1:2] in (b"\x02", b"\x03", b"\x04", b"\x05"):
        return True
    try:
        decoded = base64.b64decode(data[:64] + b"=" * (-len(data[:64]) % 4), validate=False)
    except ValueError:
        return False
    return decoded[:1] == b"\x80" and decoded[1:2] in (b"\x02", b"\x03", b"\x04", b"\x05")


def test_pickled_is_a_pickle_detector_that_works():
    assert pickled(pickle.dumps(ValueError("x"), protocol=5))
    assert pickled(base64.b64encode(pickle.dumps(ValueError("x"), protocol=4)))
    assert not pickled(b'{"__exc_type__": "builtins.ValueError", "message": "x"}') and not pickled(b"")


def test_a_failed_run_leaves_no_pickle(prefect_api, texts, home):
    """Prefect stores a failed flow run's exception even when results are not persisted: as JSON here."""
    with pytest.raises(ValueError, match="too few for batch"):
        pipeline(data_dir=texts, **(TINY | {"batch": 512}))
    storage = Path(os.environ["PREFECT_HOME"])
    written = [f for root in (home, storage) for f in root.rglob("*") if f.is_file()]
    assert any("storage" in f.parts for f in written), "Prefect stored nothing: the check checks nothing"
    assert [f for f in written if pickled(f.read_bytes())] == []


def test_a_retrain_whose_candidate_lost_is_not_done_again_until_the_text_changes(prefect_api, texts, home):
    first = pipeline(data_dir=texts, **(TINY | {"steps": 100}))
    (texts / "more.txt").write_text("Enter the Second Citizen, with news.\n" * 40, encoding="utf-8")
    weak = TINY | {"steps": 1, "hidden": 8}  # another shape: from scratch, and it loses
    lost = pipeline(data_dir=texts, only_if_changed=True, **weak)
    assert not lost.promoted and lost.lost_to == first.tag
    published = (lost.run_dir / "metrics.json").stat().st_mtime_ns

    again = pipeline(data_dir=texts, only_if_changed=True, **weak)

    assert not again.promoted and again.lost_to == first.tag and "tried already" in again.reason
    assert (lost.run_dir / "metrics.json").stat().st_mtime_ns == published  # not scored or published again
    (texts / "more.txt").write_text("Enter the Third Citizen.\n" * 40, encoding="utf-8")
    changed = pipeline(data_dir=texts, only_if_changed=True, **weak)
    assert "tried already" not in changed.reason and changed.run_dir != lost.run_dir
