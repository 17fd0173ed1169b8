"""The LSTM cell (Hochreiter & Schmidhuber, with Gers's forget gate; PyTorch's nn.LSTM):

    o = σ(a_o + h_{t-1} W_o)     i = σ(a_i + h_{t-1} W_i)     f = σ(a_f + h_{t-1} W_f)
    g = tanh(a_g + h_{t-1} W_g)  c_t = f ⊙ c_{t-1} + i ⊙ g    h_t = o ⊙ tanh(c_t)       a_t = x_t U + b

The state is (h, c). The gate blocks lie in the order (o, i, f, g): the three sigmoids are one slab forward
(and one tanh call covers all four blocks), and the three blocks whose gradient is a multiple of c's are one
slab backward. The forget bias b_f starts at 1 (remember by default); W's blocks start
orthogonal with gain 1.
"""

from __future__ import annotations

import numpy as np

from model.cell import Cell, Params, back_through_time, blocks, halved, recur_grad
from model.runtime import Product, Recur, one_thread


class LSTM(Cell):
    name, gates, states, recur_gain = "lstm", 4, 2, 1.0

    def init(self, fan_in: int, H: int, rng: np.random.Generator, embed: bool) -> Params:
        q = super().init(fan_in, H, rng, embed)
        q["b"][2 * H : 3 * H] = 1.0  # f
        return q

    def forward(self, a: np.ndarray, q: Params, s0: np.ndarray) -> tuple[np.ndarray, tuple, np.ndarray]:
        _, T, B, H = a.shape
        o, i, f, g = a  # (T, B, H) each: pre-activations, then the gates
        h = np.empty((T + 1, B, H), a.dtype)
        c = np.empty((T + 1, B, H), a.dtype)
        h[0], c[0] = s0
        tc = np.empty((T, B, H), a.dtype)  # tanh(c_t)
        tmp = np.empty((4, B, H), a.dtype)
        ig = np.empty((B, H), a.dtype)
        a[:3] *= 0.5  # the sigmoids' halving, for all steps (cell.halved)
        with one_thread(T, B, H):
            recur = Recur(halved(q["W"], 4, 3), B)
            W, xs, out = recur.W, recur.rows(h), recur.cols(tmp)
            # the steps' views, made once (a list hands them out faster than slicing); outputs positional
            zs, ss = list(a.swapaxes(0, 1)), list(a[:3].swapaxes(0, 1))  # (4, B, H), (3, B, H): o, i, f
            os_, is_, fs, gs, cs, tcs, hs = (list(v) for v in (o, i, f, g, c, tc, h))
            for t in range(T):
                z, s = zs[t], ss[t]
                np.matmul(xs[t], W, out)
                np.add(z, tmp, z)
                np.tanh(z, z)
                np.multiply(s, 0.5, s)
                np.add(s, 0.5, s)
                np.multiply(fs[t], cs[t], cs[t + 1])
                np.multiply(is_[t], gs[t], ig)
                np.add(cs[t + 1], ig, cs[t + 1])
                np.tanh(cs[t + 1], tcs[t])
                np.multiply(os_[t], tcs[t], hs[t + 1])
        return h[1:], (a, h, c, tc), np.stack([h[-1], c[-1]])

    def step(self, a: np.ndarray, q: Params, s: np.ndarray, out: np.ndarray, mul: Product) -> None:
        o, i, f, g = a  # (B, H) each
        a += blocks(mul(s[0]), 4)  # (B, 4H) seen as (4, B, H): one product, read once (its blocks are
        a[:3] *= 0.5  # row-strided; a and out are contiguous)
        np.tanh(a, out=a)
        a[:3] *= 0.5
        a[:3] += 0.5
        np.multiply(f, s[1], out=out[1])
        np.multiply(i, g, out=out[0])  # out[0] holds i g until h_t replaces it
        out[1] += out[0]
        np.tanh(out[1], out=out[0])
        out[0] *= o

    def backward(self, dh: np.ndarray, cache: tuple, q: Params) -> tuple[np.ndarray, Params]:
        z, h, c, tc = cache
        T, B, H = dh.shape
        o, i, f, g = z
        # da = (dh ⊙ Co, dc ⊙ Ci, dc ⊙ Cf, dc ⊙ Cg) with dc_t = dh_t ⊙ Q_t + dc_{t+1} ⊙ f_{t+1}; the
        # coefficients C (in da's buffer) and Q are computed for all steps at once
        da = np.empty_like(z)  # (4, T, B, H)
        co, ci, cf, cg = da
        np.subtract(1.0, o, out=co)
        co *= o  # o(1 - o)
        Q = np.multiply(tc, tc)
        np.subtract(1.0, Q, out=Q)
        Q *= o  # o(1 - tanh²c)
        co *= tc
        np.subtract(1.0, i, out=ci)
        ci *= i
        ci *= g  # g i(1 - i)
        np.subtract(1.0, f, out=cf)
        cf *= f
        cf *= c[:-1]  # c_{t-1} f(1 - f)
        np.multiply(g, g, out=cg)
        np.subtract(1.0, cg, out=cg)
        cg *= i  # i(1 - g²)
        tmp = np.empty((B, H), dh.dtype)
        dc = np.zeros((B, H), dh.dtype)
        fs, Qs, cos, das = list(f), list(Q), list(co), list(da[1:].swapaxes(0, 1))
        for t, d in back_through_time(dh, da, q["W"]):  # d (B, H): the gradient w.r.t. h_t
            if t < T - 1:
                np.multiply(dc, fs[t + 1], dc)
            np.multiply(d, Qs[t], tmp)
            np.add(dc, tmp, dc)
            np.multiply(cos[t], d, cos[t])
            np.multiply(das[t], dc, das[t])
        return da, {"W": recur_grad(h, da)}
