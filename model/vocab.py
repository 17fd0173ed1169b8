"""Character vocabulary: sorted, stable ids, growable without renumbering."""

from __future__ import annotations

import unicodedata
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Literal

import numpy as np

Unknown = Literal["error", "skip"]


class UnknownCharsError(ValueError):
    """Text holds characters the vocabulary does not know."""

    def __init__(self, chars: Iterable[str]):
        self.chars = sorted(set(chars))
        shown = ", ".join(repr(c) for c in self.chars[:20])
        more = f" (+{len(self.chars) - 20} more)" if len(self.chars) > 20 else ""
        super().__init__(
            f"{len(self.chars)} character(s) not in the vocabulary: {shown}{more}; "
            "drop them with unknown='skip' or retrain on text that contains them"
        )


@dataclass(frozen=True)
class Vocab:
    chars: tuple[str, ...]

    def __post_init__(self) -> None:
        if len(set(self.chars)) != len(self.chars):
            raise ValueError("vocabulary characters must be unique")
        if any(len(c) != 1 for c in self.chars):
            raise ValueError("vocabulary entries must be single characters")
        object.__setattr__(self, "_ids", {c: i for i, c in enumerate(self.chars)})

    @classmethod
    def from_text(cls, text: str) -> Vocab:
        """The sorted set of characters of `text`."""
        return cls(tuple(sorted(set(text))))

    def __len__(self) -> int:
        return len(self.chars)

    def __contains__(self, ch: str) -> bool:
        return ch in self._ids

    def spell(self, ch: str) -> str | None:
        """`ch` as vocabulary characters: itself, else a known character composed from the start of its
        decomposed (NFD) form followed by the remaining marks (a model writes "ï" + U+0301, which a prompt
        normalised to NFC sends back as "ḯ"); None when the vocabulary cannot spell it."""
        if ch in self._ids:
            return ch
        parts = unicodedata.normalize("NFD", ch)
        for k in range(len(parts), 0, -1):
            head = unicodedata.normalize("NFC", parts[:k])
            if head in self._ids and all(p in self._ids for p in parts[k:]):
                return head + parts[k:]
        return None

    def unknown(self, text: str) -> list[str]:
        """Characters of `text` that the vocabulary cannot spell, sorted."""
        return sorted(c for c in set(text) - self._ids.keys() if self.spell(c) is None)

    def encode(self, text: str, unknown: Unknown = "error") -> np.ndarray:
        """Ids of `text` as int32 (characters spelled as `spell` does); unknown ones raise or are dropped."""
        missing = self.unknown(text)
        if missing and unknown == "error":
            raise UnknownCharsError(missing)
        if not set(text) <= self._ids.keys():
            text = "".join(self.spell(c) or "" for c in text)
        ids = self._ids
        return np.fromiter((ids[c] for c in text), dtype=np.int32, count=len(text))

    def decode(self, ids: Iterable[int]) -> str:
        return "".join(self.chars[i] for i in ids)

    def grow(self, text: str) -> Vocab:
        """A vocabulary with the new characters of `text` appended (sorted); old ids unchanged."""
        return Vocab(self.chars + tuple(sorted(set(text) - self._ids.keys())))
