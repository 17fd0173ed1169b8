"""Corpora larger than memory: a file read in chunks gives exactly what the whole text gives, the arrays are
memory-mapped (a resumed run bitwise the same), evaluation above a bound scores the same windows for every
model, and an unchanged folder is recognised without reading its text."""

import os
import unicodedata

import numpy as np
import pytest

from model import checkpoint, corpus, net, train
from model.vocab import Vocab
from stages import data, scoring
from stages.records import CurrentModel

# BOM, CRLF and lone CR, combining marks to compose (e + U+0301, several marks reordered by NFC), an Indic
# vowel sign that composes with the one before it (U+09C7 U+09BE -> U+09CB), Hangul jamo that compose into a
# syllable, a character outside the BMP, and a character whose NFC form decomposes (U+212B -> U+00C5).
TRICKY = (
    "\ufeffcafe\u0301\r\nnai\u0308ve\rline\r\n"
    "a\u0323\u0307b\u0307\u0323 \u09c7\u09be \u1100\u1161\u11a8 \U0001f600 \u212b\r"
    "q\u0301\u0301\u0301\r\n\r\n"
)


def write(path, text: str, encoding: str = "utf-8") -> None:
    path.write_bytes(text.encode(encoding))


@pytest.mark.parametrize("chunk", [1, 2, 3, 4, 5, 7, 11, 16])
def test_chunks_give_exactly_the_whole_text_normalised(tmp_path, chunk):
    f = tmp_path / "t.txt"
    write(f, TRICKY * 3)
    whole = corpus.normalise(TRICKY * 3)
    assert whole != unicodedata.normalize("NFC", TRICKY * 3)  # the BOM and the line endings did change
    assert "".join(corpus.texts(f, chunk)) == whole
    scanned, ref = corpus.scan(f, chunk), corpus.scan(f)
    assert (scanned.digest, scanned.chars, scanned.alphabet) == (ref.digest, ref.chars, ref.alphabet)
    assert scanned.chars == len(whole) + (not whole.endswith("\n"))
    assert scanned.alphabet == "".join(sorted(set(whole) | {"\n"}))


@pytest.mark.parametrize("chunk", [1, 2, 5])
def test_bad_utf8_is_named_at_its_byte_whatever_the_chunks(tmp_path, chunk):
    f = tmp_path / "bad.txt"
    f.write_bytes("é".encode() * 5 + b"\xff" + b"tail")
    assert corpus.scan(f, chunk).skipped == "not valid UTF-8 (byte 10)"
    f.write_bytes(b"ok " + "é".encode()[:1])  # cut in the middle of a character at the end
    assert corpus.scan(f, chunk).skipped == "not valid UTF-8 (byte 3)"


def reference(folder) -> tuple[Vocab, np.ndarray, np.ndarray]:
    """The whole-text path: each file normalised whole, its last 10% to validation."""
    c = corpus.read(folder)
    vocab = Vocab.from_text(c.text)
    tr, va = c.split()
    return vocab, vocab.encode(tr), vocab.encode(va)


def corpus_folder(tmp_path):
    folder = tmp_path / "texts"
    folder.mkdir()
    write(folder / "a.txt", TRICKY * 40)
    write(folder / "b.txt", "no final newline " * 97)
    write(folder / "c.txt", "ROMEO:\r\nWhat light\u2019s through yonder window?\r\n" * 60)
    return folder


@pytest.mark.parametrize("chunk", [3, 64, None])
def test_encoding_in_chunks_equals_the_whole_text_path(tmp_path, monkeypatch, chunk):
    folder = corpus_folder(tmp_path)
    if chunk:
        monkeypatch.setattr(corpus, "CHUNK", chunk)
    info = data.ingest(folder)
    e = data.encode(info, tmp_path / "runs")
    vocab, tr, va = reference(folder)
    assert e.vocab == list(vocab.chars) and info.fingerprint == corpus.read(folder).fingerprint
    assert np.array_equal(e.load("train"), tr) and np.array_equal(e.load("val"), va)
    assert e.load("train").dtype == np.uint8 and isinstance(e.load("val").base, np.memmap)  # mapped, not read


def test_a_vocabulary_over_256_symbols_takes_two_bytes_an_id(tmp_path):
    folder = tmp_path / "texts"
    folder.mkdir()
    write(folder / "wide.txt", "".join(chr(0x4E00 + i) for i in range(400)) * 5 + "\n")
    e = data.encode(data.ingest(folder), tmp_path / "runs")
    vocab, tr, va = reference(folder)
    assert e.load("train").dtype == np.uint16 and np.array_equal(e.load("train"), tr)
    assert np.array_equal(e.load("val"), va)


def test_the_unchanged_check_reads_no_text_and_sees_a_same_size_edit(tmp_path, monkeypatch):
    folder, cache = corpus_folder(tmp_path), tmp_path / "cache"
    first = data.ingest(folder, cache)
    real_scan = corpus.scan

    def no_reading(path, chunk=None):
        raise AssertionError(f"{path} was read again")

    monkeypatch.setattr(corpus, "scan", no_reading)
    assert data.ingest(folder, cache) == first  # names, sizes, times and inodes alone
    f = folder / "c.txt"
    old = f.stat()
    write(f, f.read_text().replace("ROMEO", "JULIE", 1))  # the same size
    os.utime(f, ns=(old.st_atime_ns, old.st_mtime_ns))  # and the same modification time
    with pytest.raises(AssertionError, match="c.txt was read again"):
        data.ingest(folder, cache)
    monkeypatch.setattr(corpus, "scan", real_scan)
    second = data.ingest(folder, cache)
    assert second.fingerprint != first.fingerprint and second.fingerprint == corpus.read(folder).fingerprint


def test_resuming_a_memory_mapped_run_is_bitwise_the_uninterrupted_one(tmp_path, small_text):
    folder = tmp_path / "texts"
    folder.mkdir()
    (folder / "s.txt").write_text(small_text)
    e = data.encode(data.ingest(folder), tmp_path / "runs")
    tr, va, vocab = e.load("train"), e.load("val"), Vocab(tuple(e.vocab))
    cfg = net.ModelConfig(vocab_size=len(vocab), cell="gru", hidden=24, dropout=0.1)
    tc = train.TrainConfig(steps=40, batch=8, seq=16, checkpoint_every=10, eval_every=20, warmup=4)
    whole = train.train(tr, va, vocab, cfg, tc, tmp_path / "whole")
    train.train(tr, va, vocab, cfg, tc, tmp_path / "cut", stop=20)
    resumed = train.train(tr, va, vocab, cfg, tc, tmp_path / "cut", resume=True)
    assert all(np.array_equal(whole.params[k], resumed.params[k]) for k in whole.params)
    in_memory = train.train(np.array(tr), np.array(va), vocab, cfg, tc, tmp_path / "ram")
    assert all(np.array_equal(whole.params[k], in_memory.params[k]) for k in whole.params)


def test_above_the_bound_both_models_are_scored_on_the_same_windows(tmp_path, small_text):
    folder = tmp_path / "texts"
    folder.mkdir()
    (folder / "s.txt").write_text(small_text * 20)
    e = data.encode(data.ingest(folder), tmp_path / "runs")
    val = e.load("val")
    limit = 5 * scoring.WINDOW + 100  # under a third of the validation text
    picked = scoring.sample(val, limit)
    assert len(picked) == limit // scoring.WINDOW * scoring.WINDOW
    assert np.array_equal(picked, scoring.sample(val, limit))  # by position alone
    assert np.array_equal(picked[: scoring.WINDOW], val[: scoring.WINDOW])  # first window at the start,
    assert np.array_equal(picked[-scoring.WINDOW :], val[-scoring.WINDOW :])  # the last at the end
    assert np.array_equal(scoring.sample(val, len(val)), val)  # at or under the bound: all of it
    vocab = Vocab(tuple(e.vocab))
    cfg = net.ModelConfig(vocab_size=len(vocab), cell="rnn", hidden=16)
    tc = train.TrainConfig(steps=20, batch=8, seq=16, checkpoint_every=10)
    models = [
        train.train(e.load("train"), val, vocab, cfg, tc.model_copy(update={"seed": s}), tmp_path / f"m{s}")
        for s in (0, 1)
    ]
    current = CurrentModel(
        tag="char-rnn:a", path=models[0].path, fingerprint=e.fingerprint, vocab=e.vocab, config=cfg
    )
    c = scoring.compare(models[1].path, current, e, limit)
    assert c.current.sampled and c.candidate.sampled and c.current.of == c.candidate.of == len(val)
    assert c.current.chars == c.candidate.chars == len(picked) and "a sample of" in c.note
    whole = scoring.compare(models[1].path, current, e, len(val))
    assert not whole.current.sampled and whole.current.chars == len(val)
    ck = checkpoint.load_dir(models[1].path, with_optim=False)
    assert c.candidate.nats == pytest.approx(train.evaluate(ck.params, ck.config, picked.astype(np.int64)))
