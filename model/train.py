"""The training loop: parallel streams, truncated BPTT, clipping, schedule, validation, checkpoints."""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
from pydantic import BaseModel, ConfigDict, Field

from model import checkpoint, net, optim
from model.cell import halves, side_by_side
from model.checkpoint import Checkpoint, Meta
from model.net import ModelConfig, Params
from model.vocab import Vocab


class TrainConfig(BaseModel):
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)

    steps: int = Field(3000, ge=1, le=10_000_000, description="total optimizer steps")
    batch: int = Field(32, ge=1, le=4096, description="parallel sequences (B)")
    seq: int = Field(64, ge=1, le=4096, description="truncated BPTT length (T)")
    # lr, min_lr and weight_decay: the best of bench/train_quality.py's 5-minute runs (README, "Benchmarks")
    lr: float = Field(5e-3, gt=0, le=10)
    min_lr: float | None = Field(None, ge=0, le=10, description="learning rate at the end; None = lr / 100")
    warmup: int = Field(100, ge=0, description="warmup steps (at most a tenth of the run)")
    optimizer: optim.OptimName = "adam"
    weight_decay: float = Field(0.1, ge=0, le=1, description="decoupled (AdamW), on matrices, not biases")
    clip: float = Field(1.0, ge=0, description="global gradient-norm limit; 0 turns it off")
    seed: int = Field(0, ge=0)
    eval_every: int | None = Field(None, ge=1, description="steps between validations; None = at checkpoints")
    eval_chars: int = Field(40_000, ge=0, description="validation characters per evaluation; 0 = all")
    checkpoint_every: int = Field(500, ge=1)
    keep: int = Field(3, ge=1, description="recent checkpoints kept (besides the best)")
    log_every: int = Field(10, ge=1)
    max_loss_factor: float = Field(3.0, gt=1, description="stop when loss > this x ln(vocab)")

    @property
    def final_lr(self) -> float:
        return self.lr / 100 if self.min_lr is None else self.min_lr


class RunExists(ValueError):
    """The output folder holds another run's checkpoints and neither resume nor overwrite was asked for."""


class TrainingDiverged(RuntimeError):
    """The loss or the gradient became non-finite or exploded."""


@dataclass
class Progress:
    step: int
    steps: int
    loss: float
    lr: float
    grad_norm: float
    chars_per_s: float
    eta_s: float
    val_loss: float | None = None

    def summary(self, last_val: float | None = None) -> str:
        """One short line: step, loss, the latest validation loss, speed and time left."""
        val = f" val {last_val:.3f}" if last_val is not None else ""
        left = self.eta_s
        eta = time.strftime("%M:%S", time.gmtime(left)) if left < 3600 else f"{left / 3600:.1f}h"
        speed = f"{self.chars_per_s / 1000:.0f}k char/s"
        return f"{self.step}/{self.steps} loss {self.loss:.3f}{val} | {speed} | eta {eta}"


class Streams:
    """B contiguous streams over the training ids; each batch is the next T characters of every stream."""

    def __init__(self, ids: np.ndarray, batch: int, seq: int):
        self.length = (len(ids) - 1) // batch  # characters per stream
        if self.length < seq + 1:
            raise ValueError(
                f"the training text has {len(ids)} characters, too few for batch {batch} x seq {seq} "
                f"(needs at least {batch * (seq + 1) + 1}); lower --batch or --seq, or add text"
            )
        self.ids, self.seq = ids, seq
        self.index = np.arange(batch)[:, None] * self.length + np.arange(seq)[None, :]  # (B, T)

    def get(self, pos: int) -> tuple[np.ndarray, np.ndarray, int]:
        """Inputs and targets (B, T) at `pos`, and the next position (0 when the streams wrap)."""
        idx = self.index + pos
        nxt = pos + self.seq
        return self.ids[idx], self.ids[idx + 1], (0 if nxt + self.seq + 1 > self.length else nxt)


def evaluate(p: Params, cfg: ModelConfig, ids: np.ndarray, batch: int = 64, seq: int = 128) -> float:
    """Mean cross-entropy of `ids` in nats/char (each stream starts from a zero state)."""
    if len(ids) < 2:
        raise ValueError("validation needs at least 2 characters")
    b = min(batch, len(ids) - 1)
    n = (len(ids) - 1) // b
    base = np.arange(b)[:, None] * n  # (b, 1): the streams' starts

    def streams(r: slice) -> float:
        h = net.zeros_state(cfg, len(base[r]))
        total = 0.0
        for s in range(0, n, seq):
            idx = base[r] + np.arange(s, min(s + seq, n))[None, :]
            loss, _, h = net.forward(p, cfg, ids[idx], ids[idx + 1], h)
            total += loss * idx.size
        return total

    return sum(side_by_side(streams, halves(b, cfg.hidden))) / (b * n)


def bits(nats: float) -> float:
    return nats / math.log(2)


def train(
    train_ids: np.ndarray,
    val_ids: np.ndarray,
    vocab: Vocab,
    model_cfg: ModelConfig,
    cfg: TrainConfig,
    out: Path,
    *,
    resume: bool = False,
    overwrite: bool = False,
    init_params: Params | None = None,
    parent: str | None = None,
    fingerprint: str | None = None,
    on_progress: Callable[[Progress], None] | None = None,
    stop: int | None = None,
) -> Checkpoint:
    """Train for `cfg.steps` total steps, checkpointing into `out`; returns the final checkpoint.

    With `resume`, continues bitwise-exactly from the newest good checkpoint in `out`; otherwise `out` must
    hold no checkpoints, unless `overwrite` (which deletes them). `init_params` warm-starts (e.g. from a
    promoted model grown to `vocab`). `stop` ends this call at that step (validated and checkpointed) while
    the schedule still spans `cfg.steps`: resuming it later is the same as never having stopped."""
    if model_cfg.vocab_size != len(vocab):
        raise ValueError(f"model vocab_size {model_cfg.vocab_size} != vocabulary size {len(vocab)}")
    out = Path(out)
    if not resume and checkpoint.step_dirs(out):
        if not overwrite:
            raise RunExists(
                f"{out} already holds the checkpoints of a run (newest {checkpoint.step_dirs(out)[0].name}); "
                "continue it with --resume, replace it with --overwrite, or choose another --out"
            )
        checkpoint.clear(out)
    streams = Streams(train_ids, cfg.batch, cfg.seq)
    rng = np.random.default_rng(cfg.seed)
    params = init_params if init_params is not None else net.init(model_cfg, rng)
    params = {k: np.array(v, dtype=model_cfg.dtype) for k, v in params.items()}
    opt = optim.make(cfg.optimizer, params, cfg.weight_decay)
    h = net.zeros_state(model_cfg, cfg.batch)  # (L, S, B, H), carried across chunks
    step, pos = 0, 0
    metrics: dict = {"train": [], "val": []}
    if resume and checkpoint.step_dirs(out):
        ck = checkpoint.load(out)
        step, pos, params, metrics, parent = restore(ck, model_cfg, cfg, vocab, fingerprint, opt, h)
        rng.bit_generator.state = ck.meta.rng
    end = min(stop or cfg.steps, cfg.steps)
    if step >= end:
        return checkpoint.load(out)

    limit = cfg.max_loss_factor * math.log(max(len(vocab), 2))
    drop_rng = rng if model_cfg.dropout > 0 else None
    t0, step0 = time.perf_counter(), step
    while step < end:
        x, y, nxt = streams.get(pos)
        loss, grads, h = net.grads(params, model_cfg, x, y, h, drop_rng)
        if not math.isfinite(loss) or loss > limit:
            raise TrainingDiverged(
                f"loss {loss:.3g} at step {step + 1} (limit {limit:.3g}); no checkpoint was written "
                f"for it. Lower the learning rate (--lr {cfg.lr / 3:.2g}) or the clip (--clip)"
            )
        norm = optim.clip_(grads, cfg.clip)
        if not math.isfinite(norm):
            raise TrainingDiverged(f"gradient norm {norm} at step {step + 1}; lower the learning rate")
        lr = optim.lr_at(step, cfg.lr, cfg.steps, min(cfg.warmup, cfg.steps // 10), cfg.final_lr)
        opt.step(params, grads, lr)
        step += 1
        if nxt == 0:
            h[...] = 0.0  # streams wrapped: start from a clean state
        pos = nxt
        val = None
        if step % (cfg.eval_every or cfg.checkpoint_every) == 0 or step == end:
            v_ids = val_ids[: cfg.eval_chars] if cfg.eval_chars else val_ids
            val = evaluate(params, model_cfg, v_ids)
            metrics["val"].append([step, round(val, 6)])
        if step % cfg.log_every == 0 or val is not None or step == end:
            metrics["train"].append([step, round(loss, 6)])
            if on_progress:
                rate = (step - step0) * cfg.batch * cfg.seq / max(time.perf_counter() - t0, 1e-9)
                eta = (end - step) * cfg.batch * cfg.seq / max(rate, 1e-9)
                on_progress(Progress(step, end, loss, lr, norm, rate, eta, val))
        if step % cfg.checkpoint_every == 0 or step == end:
            if not all(np.isfinite(v).all() for v in params.values()):
                raise TrainingDiverged(f"non-finite weights at step {step}; no checkpoint was written")
            vals = [v for _, v in metrics["val"]]
            metrics |= {
                "train_loss": loss,
                "val_loss": vals[-1] if vals else None,
                "best_val_loss": min(vals) if vals else None,
            }
            meta = Meta(
                format=checkpoint.FORMAT,
                vocab=list(vocab.chars),
                model=model_cfg,
                train=cfg.model_dump() | {"min_lr": cfg.final_lr},  # resolved: where the schedule ends
                step=step,
                rng=rng.bit_generator.state,
                data_pos=pos,
                metrics=metrics,
                fingerprint=fingerprint,
                parent=parent,
                created=datetime.now(UTC).isoformat(timespec="seconds"),
            )
            checkpoint.save(out, params, meta, opt.state_dict() | {"state": h}, keep=cfg.keep)
    return checkpoint.load(out)


def restore(
    ck: Checkpoint,
    model_cfg: ModelConfig,
    cfg: TrainConfig,
    vocab: Vocab,
    fingerprint: str | None,
    opt: optim.Optimizer,
    h: np.ndarray,
) -> tuple[int, int, Params, dict, str | None]:
    """Check that `ck` belongs to this run, load its optimizer state and the carried state `h`; step, pos,
    params..."""
    if ck.vocab != vocab:
        raise ValueError(
            f"{ck.path}: the vocabulary differs from this corpus's ({len(ck.vocab)} vs {len(vocab)} "
            "characters): the checkpoint was trained on other text; resume with the same corpus"
        )
    if ck.config != model_cfg:
        raise ValueError(f"{ck.path}: model config differs from this run's; resume with the same one")
    if fingerprint and ck.meta.fingerprint and fingerprint != ck.meta.fingerprint:
        raise ValueError(f"{ck.path}: trained on another corpus (fingerprint differs)")
    saved = dict(ck.meta.train)
    if saved.get("min_lr") is None:  # saved unresolved by older code, whose None meant lr / 10
        saved["min_lr"] = saved["lr"] / 10
    same = {k: v for k, v in saved.items() if k not in ("steps", "eval_every", "log_every")}
    differs = {k for k, v in same.items() if (cfg.final_lr if k == "min_lr" else getattr(cfg, k)) != v}
    if differs:
        raise ValueError(f"{ck.path}: training settings {sorted(differs)} differ from the checkpoint's")
    if not ck.optim:
        raise ValueError(f"{ck.path}: no optimizer state saved; cannot resume from it")
    if ck.optim.get("state", np.empty(0)).shape != h.shape:
        raise ValueError(f"{ck.path}: no carried state of shape {h.shape} saved; cannot resume from it")
    opt.load_state_dict(ck.optim)
    h[...] = ck.optim["state"]
    params = {k: v.copy() for k, v in ck.params.items()}
    return ck.meta.step, ck.meta.data_pos, params, ck.meta.metrics, ck.meta.parent
