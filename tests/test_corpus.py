import numpy as np
import pytest

from model import corpus


def test_folder_with_bad_files(tmp_path):
    (tmp_path / "a.txt").write_bytes("\ufeffcaf\u0065\u0301\r\nline two\r".encode())
    (tmp_path / "b.txt").write_text("emoji \U0001f600 outside the BMP\n", encoding="utf-8")
    (tmp_path / "empty.txt").write_text("")
    (tmp_path / "latin1.txt").write_bytes("caf\xe9".encode("latin-1"))
    (tmp_path / "blob.txt").write_bytes(b"\x00\x01\x02binary")
    (tmp_path / "ignored.md").write_text("not a .txt")
    c = corpus.read(tmp_path)
    assert c.files == ["a.txt", "b.txt"]
    assert set(c.skipped) == {"empty.txt", "latin1.txt", "blob.txt"}
    assert "UTF-8" in c.skipped["latin1.txt"] and c.skipped["empty.txt"] == "empty"
    assert c.text == "caf\u00e9\nline two\n" + "emoji \U0001f600 outside the BMP\n"  # NFC, BOM, newlines


def test_fingerprint_follows_content_and_names(tmp_path):
    (tmp_path / "a.txt").write_text("one\n")
    f1 = corpus.read(tmp_path).fingerprint
    assert corpus.read(tmp_path).fingerprint == f1
    (tmp_path / "b.txt").write_text("two\n")
    f2 = corpus.read(tmp_path).fingerprint
    (tmp_path / "b.txt").rename(tmp_path / "c.txt")
    assert len({f1, f2, corpus.read(tmp_path).fingerprint}) == 3


def test_nothing_usable_is_a_clear_error(tmp_path):
    with pytest.raises(corpus.CorpusError, match="no .txt files"):
        corpus.read(tmp_path)
    (tmp_path / "e.txt").write_text("  \n")
    with pytest.raises(corpus.CorpusError, match="e.txt: empty"):
        corpus.read(tmp_path)
    with pytest.raises(corpus.CorpusError, match="no such file"):
        corpus.read(tmp_path / "missing")


def test_split_last_tenth_is_validation():
    tr, va = corpus.split(np.arange(100))
    assert len(tr) == 90 and va[0] == 90
