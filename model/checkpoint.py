"""Checkpoints on disk: atomic writes, sha256-checked loads, `latest`/`best` pointers, resume state.

A checkpoint is a directory  step-000500/  holding
  weights.npz  the model's arrays                  (loaded with allow_pickle=False)
  optim.npz    optimizer moments + the carried state (L, S, B, H), + the optimizer's own weights (`raw.*`)
               when the model is their moving average   (for bitwise resume; optional in exports)
  meta.json    format, vocab, configs (the cell among them), step, RNG state, data position, metrics,
               fingerprint, parent, and the sha256 of each .npz
It is written under a temporary name, fsynced, then renamed; pointers are updated the same way, last.
Format 1 (before GRU and LSTM) loads as the vanilla `rnn` cell, its per-layer `hidden.<l>` as the state.
"""

from __future__ import annotations

import hashlib
import io
import logging
import os
import secrets
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from pydantic import BaseModel, ConfigDict, ValidationError, model_validator

from model import net
from model.config import ModelConfig, TrainConfig
from model.files import fsync_dir, named, sha256, write_atomic, write_file
from model.net import Params
from model.vocab import Vocab

FORMAT = 2
READS = (1, 2)  # formats this code loads
FILES = ("weights.npz", "optim.npz")
log = logging.getLogger("char_rnn")


class CheckpointError(Exception):
    """A checkpoint is missing, corrupt or of an unknown format."""


class Meta(BaseModel):
    model_config = ConfigDict(extra="allow")

    format: int
    vocab: list[str]
    model: ModelConfig
    train: TrainConfig
    step: int = 0
    rng: dict[str, Any] | None = None
    data_pos: int = 0
    metrics: dict[str, Any] = {}
    fingerprint: str | None = None
    parent: str | None = None
    sha256: dict[str, str] = {}
    created: str | None = None

    @model_validator(mode="before")
    @classmethod
    def migrate(cls, data: Any) -> Any:
        """Older metadata, read as today's, in this one place: format 1 had no `cell` (its models are vanilla
        RNNs, whatever ModelConfig's default is now), and code before min_lr was recorded resolved wrote
        `min_lr: null`, which then meant lr / 10."""
        if not isinstance(data, dict):
            return data
        if data.get("format") == 1 and isinstance(data.get("model"), dict):
            data = data | {"model": {"cell": "rnn"} | data["model"]}
        train = data.get("train")
        if isinstance(train, dict) and "min_lr" in train and train["min_lr"] is None and "lr" in train:
            data = data | {"train": train | {"min_lr": train["lr"] / 10}}
        return data


@dataclass
class Checkpoint:
    path: Path
    params: Params
    meta: Meta
    optim: dict[str, np.ndarray] = field(default_factory=dict)

    @property
    def vocab(self) -> Vocab:
        return Vocab(tuple(self.meta.vocab))

    @property
    def config(self) -> ModelConfig:
        return self.meta.model


def npz_bytes(arrays: dict[str, np.ndarray]) -> bytes:
    buf = io.BytesIO()
    np.savez(buf, **arrays)
    return buf.getvalue()


def write_dir(path: Path, params: Params, meta: Meta, optim: dict[str, np.ndarray] | None = None) -> Path:
    """Write a checkpoint directory atomically at `path` (replacing one that is there)."""
    path = Path(path)
    tmp = path.parent / f".tmp-{path.name}-{secrets.token_hex(4)}"
    try:
        os.makedirs(tmp)  # mode from the umask (mkdtemp would make it 0700)
        blobs = {"weights.npz": npz_bytes(params)}
        if optim is not None:
            blobs["optim.npz"] = npz_bytes(optim)
        for name, data in blobs.items():
            write_file(tmp / name, data)
        digests = {name: hashlib.sha256(data).hexdigest() for name, data in blobs.items()}
        meta = meta.model_copy(update={"sha256": digests, "format": FORMAT})
        write_file(tmp / "meta.json", meta.model_dump_json(indent=1).encode())
        fsync_dir(tmp)
        if path.exists():
            shutil.rmtree(path)
        os.replace(tmp, path)
        fsync_dir(path.parent)
    except OSError as e:
        shutil.rmtree(tmp, ignore_errors=True)
        raise named(e, path, "writing the checkpoint") from e
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return path


def read_npz(path: Path) -> dict[str, np.ndarray]:
    with np.load(path, allow_pickle=False) as z:
        return {k: z[k] for k in z.files}


def read_meta(path: Path) -> Meta:
    """The validated meta.json of the checkpoint directory `path`."""
    f = Path(path) / "meta.json"
    try:
        meta = Meta.model_validate_json(f.read_bytes())
    except FileNotFoundError as e:
        raise CheckpointError(f"{path}: no meta.json; is this a checkpoint directory?") from e
    except (ValidationError, ValueError) as e:
        raise CheckpointError(f"{f}: unreadable checkpoint metadata ({e.__class__.__name__})") from e
    if meta.format not in READS:
        raise CheckpointError(f"{f}: checkpoint format {meta.format}, this code reads {READS}")
    return meta


def load_dir(path: Path, with_optim: bool = True) -> Checkpoint:
    """Load one checkpoint directory, verifying every file's sha256 and every array's shape."""
    path = Path(path)
    meta = read_meta(path)
    arrays: dict[str, dict[str, np.ndarray]] = {}
    for name in FILES:
        if name == "optim.npz" and (not with_optim or name not in meta.sha256):
            continue
        f = path / name
        if name not in meta.sha256:
            raise CheckpointError(f"{path / 'meta.json'}: no checksum recorded for {name}")
        if not f.exists():
            raise CheckpointError(f"{f}: missing")
        if sha256(f) != meta.sha256[name]:
            raise CheckpointError(f"{f}: checksum mismatch (truncated or corrupted file)")
        try:
            arrays[name] = read_npz(f)
        except (ValueError, OSError) as e:
            raise CheckpointError(f"{f}: unreadable ({e})") from e
    params = arrays["weights.npz"]
    check_shapes(params, meta.model, path)
    optim = arrays.get("optim.npz", {})
    if meta.format == 1 and optim:  # per-layer h (B, H) -> the state (L, 1, B, H)
        optim["state"] = np.stack([optim.pop(f"hidden.{l}") for l in range(meta.model.layers)])[:, None]
    return Checkpoint(path, params, meta, optim)


def check_shapes(params: Params, cfg: ModelConfig, where: Path) -> None:
    want = net.shapes(cfg)
    got = {k: v.shape for k, v in params.items()}
    if got != want:
        raise CheckpointError(f"{where}: weights do not match the model config ({got} vs {want})")
    if any(v.dtype != np.dtype(cfg.dtype) for v in params.values()):
        raise CheckpointError(f"{where}: weights are not {cfg.dtype}")


# --- a folder of checkpoints -------------------------------------------------------------------


def step_dirs(root: Path) -> list[Path]:
    """Checkpoint directories under `root`, newest step first."""
    root = Path(root)
    if not root.is_dir():
        return []
    found = [p for p in root.glob("step-*") if p.is_dir() and p.name[5:].isdigit()]
    return sorted(found, key=lambda p: int(p.name[5:]), reverse=True)


def read_pointer(root: Path, name: str) -> Path | None:
    f = Path(root) / name
    if not f.exists():
        return None
    target = Path(root) / f.read_text().strip()
    return target if target.is_dir() else None


def save(
    root: Path,
    params: Params,
    meta: Meta,
    optim: dict[str, np.ndarray] | None = None,
    keep: int = 3,
) -> Path:
    """Save step `meta.step` under `root`, move `latest` (and `best`), prune to the last `keep` + best."""
    root = Path(root)
    path = write_dir(root / f"step-{meta.step:07d}", params, meta, optim)
    val = meta.metrics.get("val_loss")
    best = read_pointer(root, "best")
    if val is not None:
        best_val = None
        if best is not None:
            try:
                best_val = read_meta(best).metrics.get("val_loss")
            except CheckpointError:
                best_val = None
        if best_val is None or val <= best_val:
            write_atomic(root / "best", path.name.encode())
            best = path
    write_atomic(root / "latest", path.name.encode())
    keepers = set(step_dirs(root)[: max(1, keep)]) | {path} | ({best} if best else set())
    for old in step_dirs(root):
        if old not in keepers:
            shutil.rmtree(old, ignore_errors=True)
    for tmp in root.glob(".tmp-step-*"):
        shutil.rmtree(tmp, ignore_errors=True)
    return path


def clear(root: Path) -> None:
    """Delete every checkpoint and pointer under `root` (for an explicit overwrite)."""
    for d in step_dirs(root):
        shutil.rmtree(d)
    for name in ("latest", "best"):
        (Path(root) / name).unlink(missing_ok=True)


def load(path: Path, with_optim: bool = True, pointer: str = "latest") -> Checkpoint:
    """Load a checkpoint directory, or the newest good one in a folder of checkpoints.

    In a folder, `pointer` names where to start; a checkpoint that fails its checks is refused with a
    warning and the next older one is tried."""
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"{path}: no such checkpoint or folder")
    if (path / "meta.json").exists():
        return load_dir(path, with_optim)
    first = read_pointer(path, pointer)
    candidates = ([first] if first else []) + [p for p in step_dirs(path) if p != first]
    if not candidates:
        raise CheckpointError(f"{path}: no checkpoints here; train one with `char-rnn train`")
    errors = []
    for c in candidates:
        try:
            ck = load_dir(c, with_optim)
        except CheckpointError as e:
            log.warning("refused checkpoint: %s", e)
            errors.append(str(e))
            continue
        return ck
    raise CheckpointError(f"{path}: no good checkpoint; " + "; ".join(errors))
