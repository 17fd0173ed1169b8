"""The registry of promoted models: promotion under one lock, history, rollback, and damaged history files."""

import json
import logging
import threading
from pathlib import Path

import pytest
from test_service import tiny_checkpoint

from registry import Registry, Verdict


@pytest.fixture(scope="module")
def models(tmp_path_factory, small_text):
    """Three tiny trained checkpoints (different seeds)."""
    root = tmp_path_factory.mktemp("models")
    return [tiny_checkpoint(small_text[:4000], root / f"m{i}", seed=i).path for i in range(3)]


@pytest.fixture
def reg(tmp_path) -> Registry:
    return Registry(tmp_path / "registry")


def test_promote_rollback_and_history(reg, models):
    a = reg.promote(models[0], {"run_id": "a"}).tag
    b = reg.promote(models[1], {"run_id": "b"}, judge=lambda cur: Verdict(True, f"beats {cur.tag}")).tag
    assert reg.current().tag == b and reg.current().labels["promoted_at"]
    kept = reg.promote(models[2], {}, judge=lambda cur: Verdict(False, "worse"))
    assert not kept.promoted and kept.lost_to == b and reg.current().tag == b
    back = reg.rollback(reason="b writes nonsense")
    assert back.tag == a and reg.current().tag == a
    assert [(e.tag, e.action) for e in reg.history()] == [(a, "promote"), (b, "promote"), (a, "rollback")]
    assert reg.history()[-1].reason == "b writes nonsense"
    assert reg.rollback(b).tag == b
    with pytest.raises(ValueError, match="was never promoted"):
        reg.rollback("char-rnn:nosuchtag")


@pytest.mark.parametrize(
    "content",
    [
        b'{"format": 2, "entries": [{"tag": "char-rnn:abc", "at": "2026',  # truncated
        b"not json at all",
        b'{"format": 2, "entries": {"tag": 3}}',  # wrong types
        b'{"format": 2, "entries": [{"tag": "char-rnn:doesnotexist", "at": "x"}]}',  # unknown tag
        b'{"format": 2, "entries": [{"tag": "../../etc:passwd!", "at": "x"}]}',  # not a tag at all
        b"",
    ],
)
def test_a_damaged_history_falls_back_to_the_store_and_is_reported_once(reg, models, content, caplog):
    a = reg.promote(models[0], {}).tag
    b = reg.promote(models[1], {}).tag
    reg.pointer.write_bytes(content)
    with caplog.at_level(logging.WARNING, "char_rnn"):
        got = [reg.current().tag for _ in range(3)]
    # the newest model the store says was promoted (other tests' models share the store; b is newest here)
    assert got == [b] * 3
    warned = [r.getMessage() for r in caplog.records if r.name == "char_rnn.registry"]
    assert len(warned) == 1 and str(reg.pointer) in warned[0]
    assert a  # promoted earlier, still in the store
    c = reg.promote(models[2], {}).tag  # the next promotion rewrites the history whole
    assert json.loads(reg.pointer.read_text())["entries"][-1]["tag"] == c and reg.current().tag == c


def test_concurrent_promotions_keep_the_history_whole(reg, models):
    tags: list[str] = []
    threads = [threading.Thread(target=lambda m=m: tags.append(reg.promote(m, {}).tag)) for m in models]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(e.tag for e in reg.history()) == sorted(tags) and len(set(tags)) == 3


def test_format_1_pointer_files_still_read(reg, models):
    a = reg.promote(models[0], {}).tag
    reg.pointer.write_text(json.dumps({"promoted": [a]}))
    assert reg.current().tag == a and reg.history()[0].reason == "(format 1)"
    assert not list(Path(reg.home).glob("*.tmp"))
