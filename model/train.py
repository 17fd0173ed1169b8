"""The training loop: parallel streams, truncated BPTT, clipping, schedule, validation, checkpoints."""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path

import numpy as np

from model import checkpoint, net, optim, twin
from model.checkpoint import Checkpoint, Meta
from model.config import ModelConfig, TrainConfig
from model.net import Params
from model.runtime import halves, side_by_side
from model.vocab import Vocab


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
        self.length = self.check(len(ids), batch, seq)  # characters per stream
        self.ids, self.seq = ids, seq
        self.index = np.arange(batch)[:, None] * self.length + np.arange(seq)[None, :]  # (B, T)

    @staticmethod
    def check(n: int, batch: int, seq: int) -> int:
        """Characters per stream of `n` ids in `batch` streams; a ValueError when they are too few for
        `seq`."""
        length = (n - 1) // batch
        if length < seq + 1:
            raise ValueError(
                f"the training text has {n} characters, too few for batch {batch} x seq {seq} "
                f"(needs at least {batch * (seq + 1) + 1}); lower --batch or --seq, or add text"
            )
        return length

    def get(self, pos: int) -> tuple[np.ndarray, np.ndarray, int]:
        """Inputs and targets (B, T) at `pos`, and the next position (0 when the streams wrap)."""
        idx = self.index + pos
        nxt = pos + self.seq
        # as native ints: ids may be stored narrower (uint8 on disk), and every use below indexes with them
        x, y = self.ids[idx].astype(np.intp), self.ids[idx + 1].astype(np.intp)
        return x, y, (0 if nxt + self.seq + 1 > self.length else nxt)


def evaluate(p: Params, cfg: ModelConfig, ids: np.ndarray, batch: int = 64, seq: int = 128) -> float:
    """Mean cross-entropy of `ids` in nats/char: `batch` streams over consecutive stretches of them, each from
    a zero state."""
    if len(ids) < 2:
        raise ValueError("validation needs at least 2 characters")
    b = min(batch, len(ids) - 1)
    n = (len(ids) - 1) // b
    return loss_sum(p, cfg, ids, np.arange(b) * n, n, seq) / (b * n)


def loss_sum(
    p: Params, cfg: ModelConfig, ids: np.ndarray, starts: np.ndarray, n: int, seq: int = 128
) -> float:
    """The summed cross-entropy (nats) of predicting the `n` ids after each start, one stream per start, each
    from a zero state, `seq` steps at a time (the batch's halves side by side where that helps)."""

    def streams(r: slice) -> float:
        h = net.zeros_state(cfg, len(starts[r]))
        total = 0.0
        for s in range(0, n, seq):
            idx = starts[r, None] + np.arange(s, min(s + seq, n))[None, :]  # (b, t)
            loss, _, h = net.forward(p, cfg, ids[idx], ids[idx + 1], h)
            total += loss * idx.size
        return total

    return sum(side_by_side(streams, halves(len(starts), cfg.hidden)))


def bits(nats: float) -> float:
    return nats / math.log(2)


@dataclass
class Run:
    """What a training run carries from step to step; a checkpoint saves all of it, so a resumed run continues
    bitwise as if it had never stopped."""

    params: Params
    opt: optim.Optimizer
    h: np.ndarray  # (L, S, B, H): the streams' hidden state, carried across chunks
    rng: np.random.Generator  # dropout masks; its state is saved with every checkpoint
    avg: optim.Average | None = None  # the weights' moving average (cfg.average), the model when kept
    step: int = 0
    pos: int = 0  # where the streams read next
    metrics: dict = field(default_factory=lambda: {"train": [], "val": []})
    parent: str | None = None


def start(model_cfg: ModelConfig, cfg: TrainConfig, init_params: Params | None, parent: str | None) -> Run:
    """A fresh run: parameters from `init_params` (a warm start) or initialised with the seed."""
    rng = np.random.default_rng(cfg.seed)
    params = init_params if init_params is not None else net.init(model_cfg, rng)
    params = {k: np.array(v, dtype=model_cfg.dtype) for k, v in params.items()}
    opt = optim.make(cfg.optimizer, params, cfg.weight_decay)
    avg = optim.Average(params, cfg.average) if cfg.average else None
    return Run(params, opt, net.zeros_state(model_cfg, cfg.batch), rng, avg, parent=parent)


def weights(run: Run) -> Params:
    """The weights the run stands for: their moving average when it keeps one, else the optimizer's own."""
    return run.avg.params if run.avg else run.params


def train(
    train_ids: np.ndarray,
    val_ids: np.ndarray,
    vocab: Vocab,
    model_cfg: ModelConfig,
    cfg: TrainConfig,
    out: Path,
    *,
    resume: bool = False,
    init_params: Params | None = None,
    parent: str | None = None,
    fingerprint: str | None = None,
    on_progress: Callable[[Progress], None] | None = None,
    stop: int | None = None,
) -> Checkpoint:
    """Train for `cfg.steps` total steps, checkpointing into `out`; returns the final checkpoint.

    With `resume`, continues bitwise-exactly from the newest good checkpoint in `out`; otherwise `out` must
    hold no checkpoints (the caller owns the folder and clears it to start over). `init_params` warm-starts
    (e.g. from a promoted model grown to `vocab`). `stop` ends this call at that step (validated and
    checkpointed) while the
    schedule still spans `cfg.steps`: resuming it later is the same as never having stopped."""
    if model_cfg.vocab_size != len(vocab):
        raise ValueError(f"model vocab_size {model_cfg.vocab_size} != vocabulary size {len(vocab)}")
    out = Path(out)
    if not resume and checkpoint.step_dirs(out):
        raise RunExists(
            f"{out} already holds the checkpoints of a run (newest {checkpoint.step_dirs(out)[0].name}); "
            "continue it with --resume, replace it with --overwrite, or choose another --out"
        )
    streams = Streams(train_ids, cfg.batch, cfg.seq)
    run = start(model_cfg, cfg, init_params, parent)
    if resume and checkpoint.step_dirs(out):
        restore(checkpoint.load(out), run, model_cfg, cfg, vocab, fingerprint)
    end = min(stop or cfg.steps, cfg.steps)
    limit = cfg.max_loss_factor * math.log(max(len(vocab), 2))
    held_out = val_ids[: cfg.eval_chars] if cfg.eval_chars else val_ids
    t0, step0 = time.perf_counter(), run.step
    with twin.start(model_cfg, cfg.batch, cfg.seq) or nullcontext() as tw:
        while run.step < end:
            loss, norm, lr = step(run, streams, model_cfg, cfg, limit, tw)
            val = None
            if run.step % (cfg.eval_every or cfg.checkpoint_every) == 0 or run.step == end:
                val = evaluate(weights(run), model_cfg, held_out)
                run.metrics["val"].append([run.step, round(val, 6)])
            if run.step % cfg.log_every == 0 or val is not None or run.step == end:
                run.metrics["train"].append([run.step, round(loss, 6)])
                if on_progress:
                    rate = (run.step - step0) * cfg.batch * cfg.seq / max(time.perf_counter() - t0, 1e-9)
                    eta = (end - run.step) * cfg.batch * cfg.seq / max(rate, 1e-9)
                    on_progress(Progress(run.step, end, loss, lr, norm, rate, eta, val))
            if run.step % cfg.checkpoint_every == 0 or run.step == end:
                save(out, run, loss, vocab, model_cfg, cfg, fingerprint)
    return checkpoint.load(out)


def step(
    run: Run,
    streams: Streams,
    model_cfg: ModelConfig,
    cfg: TrainConfig,
    limit: float,
    tw: twin.Twin | None = None,
) -> tuple:
    """One optimizer step on the next batch (the second half in `tw`'s process when given one): its loss,
    the gradient norm before clipping, the learning rate."""
    x, y, nxt = streams.get(run.pos)
    drop_rng = run.rng if model_cfg.dropout > 0 else None
    loss, grads, run.h = net.grads(run.params, model_cfg, x, y, run.h, drop_rng, tw)
    if not math.isfinite(loss) or loss > limit:
        raise TrainingDiverged(
            f"loss {loss:.3g} at step {run.step + 1} (limit {limit:.3g}); no checkpoint was written "
            f"for it. Lower the learning rate (--lr {cfg.lr / 3:.2g}) or the clip (--clip)"
        )
    norm = optim.clip_(grads, cfg.clip)
    if not math.isfinite(norm):
        raise TrainingDiverged(f"gradient norm {norm} at step {run.step + 1}; lower the learning rate")
    lr = optim.lr_at(run.step, cfg.lr, cfg.steps, min(cfg.warmup, cfg.steps // 10), cfg.final_lr)
    run.opt.step(run.params, grads, lr)
    run.step += 1
    if run.avg:
        run.avg.update(run.params, run.step)
    if nxt == 0:
        run.h[...] = 0.0  # streams wrapped: start from a clean state
    run.pos = nxt
    return loss, norm, lr


def save(
    out: Path,
    run: Run,
    loss: float,
    vocab: Vocab,
    model_cfg: ModelConfig,
    cfg: TrainConfig,
    fingerprint: str | None,
) -> None:
    """Checkpoint the run at its current step (refused when a weight is not finite). The checkpoint's weights
    are the model (the moving average when kept); the optimizer's own weights go with its state then."""
    kept = [run.params, run.avg.params] if run.avg else [run.params]
    if not all(np.isfinite(v).all() for ps in kept for v in ps.values()):
        raise TrainingDiverged(f"non-finite weights at step {run.step}; no checkpoint was written")
    vals = [v for _, v in run.metrics["val"]]
    run.metrics |= {
        "train_loss": loss,
        "val_loss": vals[-1] if vals else None,
        "best_val_loss": min(vals) if vals else None,
    }
    meta = Meta(
        format=checkpoint.FORMAT,
        vocab=list(vocab.chars),
        model=model_cfg,
        train=cfg.resolved(),  # where the schedule ends, spelled out
        step=run.step,
        rng=run.rng.bit_generator.state,
        data_pos=run.pos,
        metrics=run.metrics,
        fingerprint=fingerprint,
        parent=run.parent,
        created=datetime.now(UTC).isoformat(timespec="seconds"),
    )
    raw = {f"raw.{k}": v for k, v in run.params.items()} if run.avg else {}
    checkpoint.save(out, weights(run), meta, run.opt.state_dict() | raw | {"state": run.h}, keep=cfg.keep)


def restore(
    ck: Checkpoint,
    run: Run,
    model_cfg: ModelConfig,
    cfg: TrainConfig,
    vocab: Vocab,
    fingerprint: str | None,
) -> None:
    """Continue `run` from `ck`, after checking that `ck` belongs to this run: same vocabulary, model, corpus
    and training settings (all but the length and the logging/validation cadence)."""
    if ck.vocab != vocab:
        raise ValueError(
            f"{ck.path}: the vocabulary differs from this corpus's ({len(ck.vocab)} vs {len(vocab)} "
            "characters): the checkpoint was trained on other text; resume with the same corpus"
        )
    if ck.config != model_cfg:
        raise ValueError(f"{ck.path}: model config differs from this run's; resume with the same one")
    if fingerprint and ck.meta.fingerprint and fingerprint != ck.meta.fingerprint:
        raise ValueError(f"{ck.path}: trained on another corpus (fingerprint differs)")
    free = {"steps", "eval_every", "log_every"}
    saved, mine = ck.meta.train.model_dump(exclude=free), cfg.resolved().model_dump(exclude=free)
    if differs := sorted(k for k in saved if saved[k] != mine[k]):
        raise ValueError(f"{ck.path}: training settings {differs} differ from the checkpoint's")
    if not ck.optim:
        raise ValueError(f"{ck.path}: no optimizer state saved; cannot resume from it")
    if ck.optim.get("state", np.empty(0)).shape != run.h.shape:
        raise ValueError(f"{ck.path}: no carried state of shape {run.h.shape} saved; cannot resume from it")
    run.opt.load_state_dict(ck.optim)
    run.h[...] = ck.optim["state"]
    run.params = {k: v.copy() for k, v in ck.params.items()}
    if run.avg:  # the checkpoint's weights are the average; the optimizer's are saved beside its state
        if missing := [k for k in run.params if f"raw.{k}" not in ck.optim]:
            raise ValueError(f"{ck.path}: the optimizer's own weights ({missing[0]}, ...) are not saved")
        run.avg.params, run.params = run.params, {k: ck.optim[f"raw.{k}"].copy() for k in run.params}
    run.rng.bit_generator.state = ck.meta.rng
    run.step, run.pos, run.metrics = ck.meta.step, ck.meta.data_pos, ck.meta.metrics
    run.parent = ck.meta.parent
