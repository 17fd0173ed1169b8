"""The vanilla tanh RNN cell (Elman's; the seed notebook's, batched):

    h_t = tanh(a_t + h_{t-1} W)        a_t = x_t U + b

W starts orthogonal with gain 0.6: a contracting start, so tanh stays out of saturation and Adam grows what it
needs (gain 1 learnt markedly slower here).
"""

from __future__ import annotations

import numpy as np

from model.cell import Cell, Params
from model.runtime import Product, Recur, one_thread


class RNN(Cell):
    name, gates, states, recur_gain = "rnn", 1, 1, 0.6

    def forward(self, a: np.ndarray, q: Params, s0: np.ndarray) -> tuple[np.ndarray, tuple, np.ndarray]:
        h = a[0]  # in place: a[0, t] becomes h_t
        T, B, H = h.shape
        h0 = s0[0].copy()  # (B, H)
        tmp = np.empty_like(h0)
        with one_thread(T, B, H):
            recur = Recur(q["W"], B)
            W, out, hs = recur.W, recur.cols(tmp), list(h)
            xs = [recur.rows(h0), *recur.rows(h)]  # h_{t-1}, as the product takes it
            for t in range(T):  # three calls a step: the product, the sum, the tanh
                np.matmul(xs[t], W, out)  # outputs positional: a keyword costs more
                np.add(hs[t], tmp, hs[t])
                np.tanh(hs[t], hs[t])
        return h, (h, h0), h[-1:]

    def step(self, a: np.ndarray, q: Params, s: np.ndarray, out: np.ndarray, mul: Product) -> None:
        np.add(mul(s[0]), a[0], out=out[0])
        np.tanh(out[0], out=out[0])

    def backward(self, dh: np.ndarray, cache: tuple, q: Params) -> tuple[np.ndarray, Params]:
        h, h0 = cache
        T, B, H = h.shape
        d = dh  # in place: from the gradient w.r.t. h_t to the one w.r.t. a_t, through time
        dtanh = np.multiply(h, h)  # (T, B, H)
        np.subtract(1.0, dtanh, out=dtanh)
        tmp = np.empty_like(d[0])  # (B, H)
        d[-1] *= dtanh[-1]
        with one_thread(T, B, H):
            recur = Recur(q["W"].T, B)  # W^T (Recur copies it)
            W, out, xs, ds, dts = recur.W, recur.cols(tmp), list(recur.rows(d)), list(d), list(dtanh)
            for t in range(T - 1, 0, -1):
                np.matmul(xs[t], W, out)
                np.add(ds[t - 1], tmp, ds[t - 1])
                np.multiply(ds[t - 1], dts[t - 1], ds[t - 1])
        dW = h[:-1].reshape(-1, H).T @ d[1:].reshape(-1, H)
        dW += h0.T @ d[0]
        return d[None], {"W": dW}
