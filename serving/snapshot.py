"""The model a worker serves: one loaded checkpoint with what the API says about it, never mutated, so that a
request that grabbed it is served wholly by it while a newer one is swapped in."""

from __future__ import annotations

from dataclasses import dataclass

from pydantic import BaseModel, Field

from model.checkpoint import Checkpoint
from model.config import ModelConfig, TrainConfig
from model.net import Params
from model.vocab import Vocab
from serving import history


class ModelInfo(BaseModel):
    model: str
    vocab: list[str]
    config: ModelConfig
    train: TrainConfig
    val_loss: float | None = Field(description="nats/char on the whole validation text, when it was promoted")
    fingerprint: str | None
    trained_at: str | None
    promoted_at: str | None
    step: int
    parent: str | None


@dataclass(frozen=True)
class Snapshot:
    """One loaded model (its arrays read-only) and its description."""

    tag: str
    params: Params
    vocab: Vocab
    config: ModelConfig
    info: ModelInfo
    curve: history.Curve

    @classmethod
    def of(cls, tag: str, ck: Checkpoint, labels: dict[str, str]) -> Snapshot:
        """Checkpoint `ck` of model `tag`, with the labels it was promoted with."""
        for a in ck.params.values():
            a.setflags(write=False)
        m = ck.meta
        val = labels.get("val_loss") or m.metrics.get("val_loss")
        info = ModelInfo(
            model=tag,
            vocab=m.vocab,
            config=m.model,
            train=m.train,
            val_loss=None if val is None else float(val),
            fingerprint=m.fingerprint,
            trained_at=m.created,
            promoted_at=labels.get("promoted_at"),
            step=m.step,
            parent=m.parent,
        )
        curve = history.Curve(train=m.metrics.get("train", []), val=m.metrics.get("val", []))
        return cls(tag, ck.params, ck.vocab, ck.config, info, curve)
