"""Optimizers (Adam, Adagrad, SGD), global-norm gradient clipping and the learning-rate schedule."""

from __future__ import annotations

import math

import numpy as np

from model.cell import Params
from model.config import OptimName
from model.runtime import shares, side_by_side


def clip_(grads: Params, max_norm: float) -> float:
    """Scale `grads` in place so their global L2 norm is at most `max_norm` (0 = off); the norm before."""
    norm = math.sqrt(sum(float(np.vdot(g, g)) for g in grads.values()))
    if max_norm > 0 and norm > max_norm:
        scale = max_norm / (norm + 1e-6)
        for g in grads.values():
            g *= scale
    return norm


def lr_at(step: int, lr: float, steps: int, warmup: int, min_lr: float) -> float:
    """Linear warmup for `warmup` steps, then cosine decay to `min_lr` at `steps`."""
    if step < warmup:
        return lr * (step + 1) / warmup
    if steps <= warmup:
        return lr
    frac = min(1.0, (step - warmup) / (steps - warmup))
    return min_lr + 0.5 * (lr - min_lr) * (1.0 + math.cos(math.pi * frac))


def decays(name: str) -> bool:
    """Weight decay applies to matrices, not to biases."""
    return name not in ("c",) and not name.startswith("b")


class Optimizer:
    """Base: holds named state arrays so a checkpoint can save and restore them exactly."""

    slots: tuple[str, ...] = ()

    def __init__(self, params: Params, weight_decay: float = 0.0):
        self.wd = weight_decay
        self.t = 0
        self.state = {f"{s}.{k}": np.zeros_like(v) for s in self.slots for k, v in params.items()}

    def step(self, params: Params, grads: Params, lr: float) -> None:
        """Update `params` in place, each on its own (on two threads when they are large: runtime.shares)."""
        self.t += 1

        def update(names: list[str]) -> None:
            for k in names:
                p = params[k]
                if self.wd and decays(k):
                    p *= 1.0 - lr * self.wd
                self.update(k, p, grads[k], lr)

        side_by_side(update, shares(params))

    def update(self, k: str, p: np.ndarray, g: np.ndarray, lr: float) -> None:
        raise NotImplementedError

    def state_dict(self) -> dict[str, np.ndarray]:
        return {**self.state, "t": np.array(self.t, np.int64)}

    def load_state_dict(self, state: dict[str, np.ndarray]) -> None:
        missing = set(self.state) - set(state)
        if missing:
            raise ValueError(f"optimizer state lacks {sorted(missing)[:5]}")
        for k in self.state:
            if state[k].shape != self.state[k].shape:
                raise ValueError(f"optimizer state {k} has shape {state[k].shape}")
            self.state[k][...] = state[k]
        self.t = int(state["t"])


class SGD(Optimizer):
    slots = ("m",)

    def __init__(self, params: Params, momentum: float = 0.0, weight_decay: float = 0.0):
        super().__init__(params, weight_decay)
        self.momentum = momentum

    def update(self, k: str, p: np.ndarray, g: np.ndarray, lr: float) -> None:
        m = self.state[f"m.{k}"]
        m *= self.momentum
        m += g
        p -= lr * m


class Adagrad(Optimizer):
    slots = ("v",)
    eps = 1e-8

    def update(self, k: str, p: np.ndarray, g: np.ndarray, lr: float) -> None:
        v = self.state[f"v.{k}"]
        v += g * g
        p -= lr * g / (np.sqrt(v) + self.eps)


class Adam(Optimizer):
    slots = ("m", "v")

    def __init__(
        self,
        params: Params,
        betas: tuple[float, float] = (0.9, 0.99),
        eps: float = 1e-8,
        weight_decay: float = 0.0,
    ):
        super().__init__(params, weight_decay)
        self.b1, self.b2 = betas
        self.eps = eps
        self.tmp = {k: np.empty_like(v) for k, v in params.items()}  # scratch: no temporaries per step

    def update(self, k: str, p: np.ndarray, g: np.ndarray, lr: float) -> None:
        """m = b1 m + (1 - b1) g,  v = b2 v + (1 - b2) g²,  p -= lr m̂ / (sqrt(v̂) + eps), in place; m̂ and v̂
        are m / (1 - b1^t) and v / (1 - b2^t) (bias correction)."""
        m, v, tmp = self.state[f"m.{k}"], self.state[f"v.{k}"], self.tmp[k]
        m *= self.b1
        np.multiply(g, 1.0 - self.b1, out=tmp)
        m += tmp
        v *= self.b2
        np.multiply(g, g, out=tmp)
        tmp *= 1.0 - self.b2
        v += tmp
        np.divide(v, 1.0 - self.b2**self.t, out=tmp)
        np.sqrt(tmp, out=tmp)
        tmp += self.eps
        np.divide(m, tmp, out=tmp)
        tmp *= lr / (1.0 - self.b1**self.t)
        p -= tmp


class Average:
    """A moving average of the weights (Polyak averaging), for validation and the saved model:

        m_t = d_t m_{t-1} + (1 - d_t) p_t,    d_t = min(decay, (1 + t) / (10 + t))

    Late in a run the weights jitter about a minimum with the gradients' noise; their average sits nearer its
    centre and validates lower than the weights of any one step. d_t starts small so that the random initial
    weights fade from the average within the first steps rather than over 1 / (1 - decay) of them."""

    def __init__(self, params: Params, decay: float):
        if not 0.0 < decay < 1.0:
            raise ValueError(f"the average's decay must be in (0, 1), got {decay}")
        self.decay = decay
        self.params = {k: v.copy() for k, v in params.items()}
        self.tmp = {k: np.empty_like(v) for k, v in params.items()}

    def update(self, params: Params, t: int) -> None:
        """Fold in the weights after step `t` (1 for the first), in place (on two threads when large)."""
        w = 1.0 - min(self.decay, (1 + t) / (10 + t))

        def fold(names: list[str]) -> None:
            for k in names:
                m, tmp = self.params[k], self.tmp[k]
                np.subtract(params[k], m, out=tmp)
                tmp *= w
                m += tmp

        side_by_side(fold, shares(params))


def make(name: OptimName, params: Params, weight_decay: float = 0.0) -> Optimizer:
    """The optimizer called `name`."""
    if name == "adam":
        return Adam(params, weight_decay=weight_decay)
    if name == "adagrad":
        return Adagrad(params, weight_decay=weight_decay)
    if name == "sgd":
        return SGD(params, momentum=0.9, weight_decay=weight_decay)
    raise ValueError(f"unknown optimizer {name!r}: choose adam, adagrad or sgd")
