"""The corpus stages: ingest (read and fingerprint), encode (vocabulary and id arrays on disk), preflight
(everything training, evaluation and comparison will need, checked before any training time is spent)."""

from __future__ import annotations

import hashlib
import io
import json
import logging
from pathlib import Path

import numpy as np
from pydantic import ValidationError

from model import corpus
from model.config import TrainConfig
from model.files import make_dirs, write_atomic
from model.train import Streams
from model.vocab import Vocab
from stages.records import CorpusInfo, CurrentModel, Encoded

log = logging.getLogger("char_rnn")


def ingest(data_dir: Path) -> CorpusInfo:
    """Read the corpus's .txt files as NFC UTF-8 (unusable ones skipped, with the reason); fingerprint it."""
    c = corpus.read(data_dir)
    return CorpusInfo(
        dir=Path(data_dir), fingerprint=c.fingerprint, files=c.files, skipped=c.skipped, chars=len(c.text)
    )


def reuse(out: Path) -> Encoded | None:
    """The encoded data already in `out`, if its manifest and arrays check out."""
    try:
        found = Encoded.model_validate_json((out / "manifest.json").read_bytes())
        for name in ("train", "val"):
            found.load(name)
    except (OSError, ValueError, ValidationError):
        return None
    return found if found.dir == out else None


def encode(info: CorpusInfo, root: Path, base_vocab: list[str] | None = None) -> Encoded:
    """The vocabulary (grown from `base_vocab`, old ids kept), every file's first 90% as training ids and its
    last 10% as validation ids, in `root/data-<fingerprint>-<vocabulary hash>/`; reused when a run encoded the
    same text with the same vocabulary before."""
    c = corpus.read(info.dir)
    if c.fingerprint != info.fingerprint:
        raise RuntimeError(f"{info.dir} changed while the pipeline ran (fingerprint differs); run it again")
    base = Vocab(tuple(base_vocab or ()))
    vocab = base.grow(c.text)
    blob = json.dumps(vocab.chars).encode()
    out = Path(root) / f"data-{info.fingerprint[:12]}-{hashlib.sha256(blob).hexdigest()[:8]}"
    if found := reuse(out):
        log.info("Reusing the encoded corpus in %s", out)
        return found
    make_dirs(out)
    train_text, val_text = c.split()
    files = {"vocab.json": blob}
    for name, text in (("train", train_text), ("val", val_text)):
        buf = io.BytesIO()
        np.save(buf, vocab.encode(text), allow_pickle=False)
        files[f"{name}.npy"] = buf.getvalue()
    for name, data in files.items():
        write_atomic(out / name, data)
    encoded = Encoded(
        dir=out,
        fingerprint=info.fingerprint,
        vocab=list(vocab.chars),
        new_chars=list(vocab.chars[len(base) :]) if base_vocab else [],
        train_chars=len(train_text),
        val_chars=len(val_text),
        sha256={name: hashlib.sha256(data).hexdigest() for name, data in files.items()},
    )
    write_atomic(encoded.manifest, encoded.model_dump_json(indent=1).encode())  # last: marks it complete
    return encoded


def preflight(data: Encoded, configs: list[TrainConfig], current: CurrentModel | None) -> None:
    """Raise, in one line, what would make training, evaluation or the comparison fail later."""
    for config in {(c.batch, c.seq): c for c in configs}.values():
        Streams(np.zeros(data.train_chars, np.int32), config.batch, config.seq)  # raises when too short
    if data.val_chars < 2:
        raise ValueError(f"{data.dir}: the validation text has {data.val_chars} characters; add text")
    if current is not None:
        known = set(current.vocab)
        usable = sum(1 for i in data.load("val") if data.vocab[i] in known)
        if usable < 2:
            raise ValueError(
                f"the promoted model {current.tag} knows none of the validation text's characters, so the "
                "candidate cannot be compared with it; keep some of the text it was trained on in the corpus "
                "folder, or train this text under a new CHAR_RNN_HOME"
            )
