"""The registry of promoted models: the BentoML model store `char-rnn` plus an atomic pointer file.

BentoML copies a model into its store in place, so readers never trust the store alone: the pointer
`$BENTOML_HOME/char-rnn-promoted.json` (written atomically, last) lists promoted tags oldest first, and
every load verifies the checkpoint's checksums, falling back to the previous promoted model if needed.
Imports bentoml but not prefect, so the service can use it.
"""

from __future__ import annotations

import fcntl
import json
import os
import shutil
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from model import paths

paths.configure_env()

import bentoml  # noqa: E402

from model import checkpoint  # noqa: E402
from model.checkpoint import Checkpoint, CheckpointError  # noqa: E402

NAME = "char-rnn"


def store_root() -> Path:
    return Path(os.environ["BENTOML_HOME"])


def pointer() -> Path:
    return store_root() / f"{NAME}-promoted.json"


@contextmanager
def locked() -> Iterator[None]:
    """An exclusive lock over compare-and-promote, across processes."""
    store_root().mkdir(parents=True, exist_ok=True)
    with open(store_root() / f".{NAME}.lock", "w") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def promoted_tags() -> list[str]:
    """Promoted tags, oldest first."""
    try:
        return json.loads(pointer().read_text())["promoted"]
    except FileNotFoundError:
        return []


def promote(ck_dir: Path, labels: dict[str, str], metadata: dict | None = None) -> str:
    """Copy checkpoint `ck_dir` (weights + meta) into the store and make it the promoted model; its tag.

    Call under `locked()` when the decision depends on the current model."""
    ck = checkpoint.load_dir(ck_dir, with_optim=False)  # verify before publishing
    with bentoml.models.create(NAME, labels=labels, metadata=metadata or {}) as m:
        for name in ("weights.npz", "meta.json"):
            shutil.copy2(ck.path / name, Path(m.path) / name)
        tag = str(m.tag)
    published = Path(bentoml.models.get(tag).path)
    checkpoint.load_dir(published, with_optim=False)  # the copy in the store verifies too
    tags = promoted_tags() + [tag]
    checkpoint.write_atomic(pointer(), json.dumps({"promoted": tags}, indent=1).encode())
    return tag


def load_promoted() -> tuple[str, Checkpoint] | None:
    """The newest promoted model that passes its checks, or None if there is none."""
    for tag in reversed(promoted_tags()):
        try:
            ck = checkpoint.load_dir(Path(bentoml.models.get(tag).path), with_optim=False)
        except (CheckpointError, bentoml.exceptions.NotFound) as e:
            warnings.warn(f"refused promoted model {tag}: {e}", stacklevel=2)
            continue
        return tag, ck
    return None


def current_tag() -> str | None:
    """The tag the pointer names last (cheap: no loading), for change detection."""
    tags = promoted_tags()
    return tags[-1] if tags else None
