"""The GRU cell (Cho et al.; PyTorch's nn.GRU and cuDNN's form, the reset gate applied after the product):

    r = σ(a_r + h_{t-1} W_r)    z = σ(a_z + h_{t-1} W_z)    n = tanh(a_n + r ⊙ (h_{t-1} W_n + d))
    h_t = (1 - z) ⊙ n + z ⊙ h_{t-1}                          a_t = x_t U + b

d (`bh`) is the recurrent bias of n, which r scales (the other recurrent biases fold into b). The gate blocks
lie in the order (r, z, n): the two sigmoids are one slab. W's blocks start orthogonal with gain 1, biases
at 0.
"""

from __future__ import annotations

import numpy as np

from model.cell import Cell, Params, back_through_time, blocks, halved, recur_grad
from model.runtime import Product, Recur, one_thread


class GRU(Cell):
    name, gates, states, recur_gain = "gru", 3, 1, 1.0

    def shapes(self, H: int) -> dict[str, tuple[int, ...]]:
        return super().shapes(H) | {"bh": (H,)}

    def forward(self, a: np.ndarray, q: Params, s0: np.ndarray) -> tuple[np.ndarray, tuple, np.ndarray]:
        _, T, B, H = a.shape
        bh = q["bh"]  # (H,)
        r, z, n = a  # (T, B, H) each: pre-activations, then the gates
        h = np.empty((T + 1, B, H), a.dtype)
        h[0] = s0[0]
        R = np.empty_like(a)  # (3, T, B, H): h_{t-1} W (its r, z blocks halved), its n block + d
        tmp = np.empty((B, H), a.dtype)
        a[:2] *= 0.5  # the sigmoids' halving, for all steps (cell.halved)
        with one_thread(T, B, H):
            recur = Recur(halved(q["W"], 3, 2), B)
            W, xs, outs = recur.W, recur.rows(h), list(recur.cols(R).swapaxes(0, 1))
            # the steps' views, made once (a list hands them out faster than slicing); outputs positional
            S, RS, R2 = list(a[:2].swapaxes(0, 1)), list(R[:2].swapaxes(0, 1)), list(R[2])
            rs, zs, ns, hs = list(r), list(z), list(n), list(h)
            for t in range(T):
                np.matmul(xs[t], W, outs[t])
                s = S[t]  # r, z
                np.add(s, RS[t], s)
                np.tanh(s, s)
                np.multiply(s, 0.5, s)
                np.add(s, 0.5, s)
                np.add(R2[t], bh, R2[t])
                np.multiply(rs[t], R2[t], tmp)
                np.add(ns[t], tmp, ns[t])
                np.tanh(ns[t], ns[t])
                np.subtract(hs[t], ns[t], hs[t + 1])
                np.multiply(hs[t + 1], zs[t], hs[t + 1])
                np.add(hs[t + 1], ns[t], hs[t + 1])
        return h[1:], (a, h, R), h[-1:]

    def step(self, a: np.ndarray, q: Params, s: np.ndarray, out: np.ndarray, mul: Product) -> None:
        h, (r, z, n) = s[0], a  # (B, H) each
        R = blocks(mul(h), 3)  # (B, 3H) seen as (3, B, H): one product, its blocks row-strided
        g = a[:2]  # r, z: contiguous, as is out; R is read once, the rest works on contiguous arrays
        g += R[:2]
        g *= 0.5
        np.tanh(g, out=g)
        g *= 0.5
        g += 0.5
        hn = np.add(R[2], q["bh"], out=out[0])  # h W_n + d, in out until h_t replaces it
        hn *= r
        n += hn
        np.tanh(n, out=n)
        np.subtract(h, n, out=out[0])
        out[0] *= z
        out[0] += n

    def backward(self, dh: np.ndarray, cache: tuple, q: Params) -> tuple[np.ndarray, Params]:
        x, h, R = cache
        T, B, H = dh.shape
        r, z, n = x
        # dR_t = dh_t ⊙ (Cr, Cz, Cn r), the gradient w.r.t. h_{t-1} W + (0, 0, d); da_t = (dR_r, dR_z,
        # dh_t ⊙ Cn); dh_{t-1} += dh_t ⊙ z_t + dR_t Wᵀ. The coefficients are computed for all steps at
        # once, in R.
        Cn = np.multiply(n, n)  # (T, B, H)
        np.subtract(1.0, Cn, out=Cn)
        omz = np.subtract(1.0, z)
        Cn *= omz  # (1 - z)(1 - n²)
        cr, cz, cn = R
        tmp = np.subtract(1.0, r)
        tmp *= r
        tmp *= cn  # r(1 - r)(h W_n + d)
        np.multiply(tmp, Cn, out=cr)
        np.multiply(omz, z, out=tmp)
        np.subtract(h[:-1], n, out=cz)
        cz *= tmp  # (h_{t-1} - n) z(1 - z)
        np.multiply(Cn, r, out=cn)
        tmp = np.empty((B, H), dh.dtype)
        zs, dhs, Rs = list(z), list(dh), list(R.swapaxes(0, 1))
        for t, d in back_through_time(dh, R, q["W"]):  # d (B, H): the gradient w.r.t. h_t
            if t < T - 1:
                np.multiply(dhs[t + 1], zs[t + 1], tmp)
                np.add(d, tmp, d)
            np.multiply(Rs[t], d, Rs[t])
        g = {"W": recur_grad(h, R), "bh": R[2].sum(axis=(0, 1))}
        np.multiply(dh, Cn, out=cn)  # R becomes da
        return R, g
