import numpy as np
import pytest

from model.vocab import UnknownCharsError, Vocab


def test_sorted_and_round_trip():
    v = Vocab.from_text("hello world")
    assert v.chars == tuple(sorted(set("hello world")))
    ids = v.encode("hello")
    assert ids.dtype == np.int32 and v.decode(ids) == "hello"


def test_same_vocab_in_every_process():
    """The seed's list(set(data)) changed order between processes; ours is sorted."""
    assert Vocab.from_text("zyxabc").chars == ("a", "b", "c", "x", "y", "z")


def test_unknown_chars_raise_naming_them_or_are_skipped():
    v = Vocab.from_text("abc")
    with pytest.raises(UnknownCharsError) as e:
        v.encode("abxyx")
    assert e.value.chars == ["x", "y"] and "'x'" in str(e.value) and "skip" in str(e.value)
    assert v.decode(v.encode("abxyc", unknown="skip")) == "abc"


def test_grow_keeps_old_ids():
    v = Vocab.from_text("cab")
    g = v.grow("zebra!")
    assert g.chars[:3] == v.chars and set(g.chars[3:]) == {"!", "e", "r", "z"}
    assert list(g.encode("abc")) == list(v.encode("abc"))
    assert v.grow("abc") == v


def test_rejects_duplicates():
    with pytest.raises(ValueError):
        Vocab(("a", "a"))


def test_characters_are_spelled_through_their_decomposed_form():
    v = Vocab.from_text("ïi\u0301a\u0303 ")
    assert v.encode("ḯ ã").tolist() == v.encode("ï\u0301 a\u0303").tolist()
    assert v.unknown("ḯ ã ñ") == ["ñ"]
    with pytest.raises(UnknownCharsError, match="'ñ'"):
        v.encode("ñ")
    assert v.decode(v.encode("ñã", unknown="skip")) == "a\u0303"
