"""The corpus stages: ingest (read and fingerprint), encode (vocabulary and id arrays on disk), preflight
(everything training, evaluation and comparison will need, checked before any training time is spent).

Memory does not grow with the corpus: ingest reads each file in chunks (model.corpus) and remembers, per
file, what it found under the file's identity on disk, so an unchanged file is not read again; encode reads
the files a second time, chunk by chunk, straight into memory-mapped .npy arrays of the narrowest integer
type the vocabulary fits, computing their checksums as it writes.
"""

from __future__ import annotations

import hashlib
import json
import logging
from pathlib import Path

import numpy as np
from pydantic import TypeAdapter, ValidationError

from model import corpus
from model.config import TrainConfig
from model.files import make_dirs, write_atomic
from model.train import Streams
from model.vocab import Vocab
from stages.arrays import ArrayWriter, Mapper, id_dtype
from stages.records import CorpusInfo, CurrentModel, Encoded, Source

log = logging.getLogger("char_rnn")
SOURCES = TypeAdapter(list[Source])


def remembered(cache: Path | None) -> dict[str, Source]:
    """What the last ingest of this folder found, by file name (nothing when unreadable)."""
    try:
        return {s.name: s for s in SOURCES.validate_json(cache.read_bytes())} if cache else {}
    except (OSError, ValidationError):
        return {}


def ingest(data_dir: Path, cache_root: Path | None = None) -> CorpusInfo:
    """Read the corpus's .txt files as NFC UTF-8 (unusable ones skipped, with the reason) and fingerprint it.
    With `cache_root`, a file whose name, size, times and inode are those of the last ingest is not read
    again (the check of an unchanged folder reads no text)."""
    found, skipped = corpus.listing(data_dir)
    cache = None
    if cache_root is not None:
        key = hashlib.sha256(str(Path(data_dir).resolve()).encode()).hexdigest()[:16]
        cache = make_dirs(cache_root) / f"ingest-{key}.json"
    known, sources = remembered(cache), []
    for f in found:
        s = Source.stat(f)
        if (old := known.get(f.name)) and old.same_file(s):
            sources.append(old)
            continue
        scan = corpus.scan(f)
        sources.append(s.model_copy(update=vars(scan)))
    if cache and sources != list(known.values()):
        write_atomic(cache, SOURCES.dump_json(sources, indent=1))
    used = [s for s in sources if not s.skipped]
    skipped |= {s.name: s.skipped for s in sources if s.skipped}
    if not used:
        raise corpus.CorpusError(
            f"{data_dir}: no usable text ({'; '.join(f'{k}: {v}' for k, v in skipped.items())})"
        )
    return CorpusInfo(
        dir=Path(data_dir),
        fingerprint=corpus.fingerprint({s.name: s.digest for s in used}),
        files=[s.name for s in used],
        skipped=skipped,
        chars=sum(s.chars for s in used),
        alphabet="".join(sorted(set().union(*(s.alphabet for s in used)))),
        sources=used,
    )


def reuse(out: Path) -> Encoded | None:
    """The encoded data already in `out`, if its manifest and arrays check out."""
    try:
        found = Encoded.model_validate_json((out / "manifest.json").read_bytes())
        for name in ("train", "val"):
            found.verify(name)
    except (OSError, ValueError, ValidationError):
        return None
    return found if found.dir == out else None


def encode(info: CorpusInfo, root: Path, base_vocab: list[str] | None = None) -> Encoded:
    """The vocabulary (grown from `base_vocab`, old ids kept), every file's first 90% as training ids and its
    last 10% as validation ids, in `root/data-<fingerprint>-<vocabulary hash>/`; reused when a run encoded the
    same text with the same vocabulary before."""
    base = Vocab(tuple(base_vocab or ()))
    vocab = base.grow(info.alphabet)
    blob = json.dumps(vocab.chars).encode()
    out = Path(root) / f"data-{info.fingerprint[:12]}-{hashlib.sha256(blob).hexdigest()[:8]}"
    if found := reuse(out):
        log.info("Reusing the encoded corpus in %s", out)
        return found
    make_dirs(out)
    splits = [corpus.train_part(s.chars) for s in info.sources]
    dtype = id_dtype(len(vocab))
    train = ArrayWriter(out / "train.npy", dtype, sum(splits))
    val = ArrayWriter(out / "val.npy", dtype, info.chars - sum(splits))
    mapper = Mapper(vocab, dtype)
    for source, cut in zip(info.sources, splits, strict=True):
        write_file(info, source, mapper, train, val, cut)
    write_atomic(out / "vocab.json", blob)
    encoded = Encoded(
        dir=out,
        fingerprint=info.fingerprint,
        vocab=list(vocab.chars),
        new_chars=list(vocab.chars[len(base) :]) if base_vocab else [],
        train_chars=train.n,
        val_chars=val.n,
        sha256={
            "vocab.json": hashlib.sha256(blob).hexdigest(),
            "train.npy": train.close(),
            "val.npy": val.close(),
        },
    )
    write_atomic(encoded.manifest, encoded.model_dump_json(indent=1).encode())  # last: marks it complete
    return encoded


def write_file(
    info: CorpusInfo, source: Source, mapper: Mapper, train: ArrayWriter, val: ArrayWriter, cut: int
) -> None:
    """One file's ids: its first `cut` characters to `train`, the rest to `val` (its added final newline
    included). Refused when the file is no longer the one ingest read."""
    path, done = info.path(source.name), 0
    changed = RuntimeError(f"{path} changed while the pipeline ran; run it again")
    if not source.same_file(Source.stat(path)):
        raise changed
    for piece in corpus.texts(path):
        ids = mapper(piece)
        if ids is None:
            raise changed
        k = min(len(ids), max(cut - done, 0))
        train.write(ids[:k])
        val.write(ids[k:])
        done += len(ids)
    if not source.same_file(Source.stat(path)) or done not in (source.chars, source.chars - 1):
        raise changed
    if done + 1 == source.chars:
        (train if done < cut else val).write(mapper("\n"))


def preflight(data: Encoded, configs: list[TrainConfig], current: CurrentModel | None) -> None:
    """Raise, in one line, what would make training, evaluation or the comparison fail later."""
    for config in {(c.batch, c.seq): c for c in configs}.values():
        Streams.check(data.train_chars, config.batch, config.seq)
    if data.val_chars < 2:
        raise ValueError(f"{data.dir}: the validation text has {data.val_chars} characters; add text")
    if current is not None:
        known = np.array([c in set(current.vocab) for c in data.vocab])
        val, usable = data.load("val"), 0
        for start in range(0, len(val), 1 << 22):
            usable += int(np.count_nonzero(known[val[start : start + (1 << 22)]]))
            if usable >= 2:
                return
        raise ValueError(
            f"the promoted model {current.tag} knows none of the validation text's characters, so the "
            "candidate cannot be compared with it; keep some of the text it was trained on in the corpus "
            "folder, or train this text under a new CHAR_RNN_HOME"
        )
