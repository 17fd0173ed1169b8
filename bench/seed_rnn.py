"""The seed notebook's RNN, kept as the baseline the project grew from: one-hot column vectors, a Python loop
per character, dicts of per-step arrays, plain SGD without clipping, float64, batch 1. bench/train_speed.py
times one notebook 'epoch' of T characters per call (`seed_step`) beside the NumPy cells."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np


class SeedRNN:
    """The notebook's RNN, verbatim in substance."""

    def __init__(self, input_size: int, hidden_size: int, output_size: int):
        self.hidden_size = hidden_size
        self.U = np.random.randn(hidden_size, input_size) * 0.01
        self.W = np.random.randn(hidden_size, hidden_size) * 0.01
        self.V = np.random.randn(output_size, hidden_size) * 0.01
        self.b = np.zeros((hidden_size, 1))
        self.c = np.zeros((output_size, 1))

    def forward(self, inputs: list, h_prev: np.ndarray) -> tuple:
        xs, hs, os, ps = {}, {}, {}, {}
        hs[-1] = np.copy(h_prev)
        for t in range(len(inputs)):
            xs[t] = inputs[t]
            hs[t] = np.tanh(np.dot(self.U, xs[t]) + np.dot(self.W, hs[t - 1]) + self.b)
            os[t] = np.dot(self.V, hs[t]) + self.c
            ps[t] = softmax(os[t])
        return xs, hs, os, ps

    def loss_and_gradients(self, inputs: list, targets: list, h_prev: np.ndarray) -> tuple:
        xs, hs, os, ps = self.forward(inputs, h_prev)
        loss = 0
        dU, dW, dV = np.zeros_like(self.U), np.zeros_like(self.W), np.zeros_like(self.V)
        db, dc = np.zeros_like(self.b), np.zeros_like(self.c)
        dh_next = np.zeros_like(hs[0])
        for t in range(len(inputs)):
            loss += -np.log(ps[t][targets[t], 0])
        for t in reversed(range(len(inputs))):
            dy = np.copy(ps[t])
            dy[targets[t]] -= 1
            dV += np.dot(dy, hs[t].T)
            dc += dy
            dh = np.dot(self.V.T, dy) + dh_next
            dh_raw = (1 - hs[t] ** 2) * dh
            db += dh_raw
            dU += np.dot(dh_raw, xs[t].T)
            dW += np.dot(dh_raw, hs[t - 1].T)
            dh_next = np.dot(self.W.T, dh_raw)
        return loss, dU, dW, dV, db, dc, hs[len(inputs) - 1]

    def update(self, grads: tuple, learning_rate: float = 0.1) -> None:
        for param, dparam in zip([self.U, self.W, self.V, self.b, self.c], grads, strict=True):
            param -= learning_rate * dparam


def softmax(x: np.ndarray) -> np.ndarray:
    e_x = np.exp(x - np.max(x))
    return e_x / np.sum(e_x, axis=0)


def one_hot_encode(idx: int, V: int) -> np.ndarray:
    vec = np.zeros((V, 1))
    vec[idx] = 1
    return vec


def seed_step(ids: np.ndarray, V: int, T: int, H: int) -> Callable[[], int]:
    """One notebook 'epoch' over the next T characters per call (batch 1); the characters processed."""
    np.random.seed(0)
    model = SeedRNN(V, H, V)
    text = ids.tolist()
    state = {"h": np.zeros((H, 1)), "pos": 0}

    def step() -> int:
        pos = state["pos"]
        chunk = text[pos : pos + T + 1]
        inputs = [one_hot_encode(i, V) for i in chunk[:-1]]
        targets = chunk[1:]
        with np.errstate(all="ignore"):  # its plain SGD at lr 0.1 can overflow, as in the notebook
            *_, dU, dW, dV, db, dc, state["h"] = model.loss_and_gradients(inputs, targets, state["h"])
            model.update((dU, dW, dV, db, dc), learning_rate=0.1)
        state["pos"] = pos + T if pos + 2 * T + 1 < len(text) else 0
        return T

    return step
