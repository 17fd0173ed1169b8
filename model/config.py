"""What a model is and how it trains: the two configurations, with their defaults and bounds defined once.

The CLI's flags, the flows' parameters, the sweep's search space and every checkpoint take their types, bounds
and defaults from here. The defaults come within a small margin of the best validation loss any setting
reached in a five-minute budget (`bench/train_quality.py`, its sections in docs/benchmarks.md): a third
layer with less dropout and a higher peak learning rate did better there, with steps long enough to slow the
first model `make run` trains; the same dropout and rate on two layers did no better than these."""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import AllowInfNan, BaseModel, ConfigDict, Field

OptimName = Literal["adam", "adagrad", "sgd"]


class ModelConfig(BaseModel):
    """The network's shape: the cell, its width and depth, the vocabulary, dropout between layers."""

    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)

    vocab_size: int = Field(ge=1, le=1_000_000)
    cell: Literal["rnn", "gru", "lstm"] = "gru"
    hidden: int = Field(256, ge=1, le=8192)
    layers: int = Field(2, ge=1, le=8)
    dropout: float = Field(0.1, ge=0.0, le=0.9)
    dtype: Literal["float32", "float64"] = "float32"


class TrainConfig(BaseModel):
    """One training run: its length, batch shape, optimizer, schedule, checkpoints and validation."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)

    steps: int = Field(3000, ge=1, le=10_000_000, description="total optimizer steps")
    batch: int = Field(32, ge=1, le=4096, description="parallel sequences (B)")
    seq: int = Field(64, ge=1, le=4096, description="truncated BPTT length (T)")
    lr: float = Field(5e-3, gt=0, le=10, description="peak learning rate")
    min_lr: float | None = Field(None, ge=0, le=10, description="learning rate at the end; None = lr / 100")
    warmup: int = Field(100, ge=0, description="warmup steps (at most a tenth of the run)")
    optimizer: OptimName = "adam"
    weight_decay: float = Field(0.1, ge=0, le=1, description="decoupled (AdamW), on matrices, not biases")
    clip: float = Field(1.0, ge=0, description="global gradient-norm limit; 0 turns it off")
    average: float = Field(
        0.0, ge=0, lt=1, description="decay of the weights' moving average (validated and saved); 0 = off"
    )
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

    def resolved(self) -> TrainConfig:
        """This config with `min_lr` spelled out, as checkpoints record it: where the schedule ends must not
        move when the default changes."""
        return self.model_copy(update={"min_lr": self.final_lr})


def like(model: type[BaseModel], name: str) -> Any:
    """The type and bounds of `model`'s field `name`, for a parameter, a flag or a search-space value of the
    same
    meaning (a float field also refuses inf and nan, as the configs do)."""
    f = model.model_fields[name]
    extra = [*f.metadata, *([AllowInfNan(False)] if f.annotation is float else [])]
    return Annotated[(f.annotation, *extra)] if extra else f.annotation


def default(model: type[BaseModel], name: str) -> Any:
    """The default of `model`'s field `name`."""
    return model.model_fields[name].default
