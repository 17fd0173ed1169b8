"""The GRU cell (Cho et al.; PyTorch's nn.GRU and cuDNN's form, the reset gate applied after the product):

    r = σ(a_r + h_{t-1} W_r)    z = σ(a_z + h_{t-1} W_z)    n = tanh(a_n + r ⊙ (h_{t-1} W_n + d))
    h_t = (1 - z) ⊙ n + z ⊙ h_{t-1}                          a_t = x_t U + b

d (`bh`) is the recurrent bias of n, which r scales (the other recurrent biases fold into b). The gate blocks
lie in the order (r, z, n): the two sigmoids are one slab (σ(x) = (1 + tanh(x/2)) / 2). W's blocks start
orthogonal with gain 1, biases at 0.
"""

from __future__ import annotations

import numpy as np

from model.cell import Cell, Params, one_thread


class GRU(Cell):
    name, gates, states, recur_gain = "gru", 3, 1, 1.0

    def shapes(self, H: int) -> dict[str, tuple[int, ...]]:
        return super().shapes(H) | {"bh": (H,)}

    def forward(self, a: np.ndarray, q: Params, s0: np.ndarray) -> tuple[np.ndarray, tuple, np.ndarray]:
        T, B, H = a.shape[0], a.shape[1], s0.shape[-1]
        W = q["W"].copy()
        W[:, : 2 * H] *= 0.5  # the sigmoid blocks see x/2 (one pass here, not one per step)
        a[:, :, : 2 * H] *= 0.5
        bh = q["bh"]
        h = np.empty((T + 1, B, H), a.dtype)
        h[0] = s0[0]
        R = np.empty_like(a)  # (T, B, 3H): h_{t-1} W, its n block + d
        tmp = np.empty((B, H), a.dtype)
        with one_thread(B, H, 3 * H):
            for t in range(T):
                x, hw = a[t], R[t]  # (B, 3H): pre-activations, then the gates r, z, n
                np.matmul(h[t], W, out=hw)
                s = x[:, : 2 * H]
                s += hw[:, : 2 * H]
                np.tanh(s, out=s)
                s *= 0.5
                s += 0.5
                hn, n = hw[:, 2 * H :], x[:, 2 * H :]
                hn += bh
                np.multiply(x[:, :H], hn, out=tmp)
                n += tmp
                np.tanh(n, out=n)
                np.subtract(h[t], n, out=h[t + 1])
                h[t + 1] *= x[:, H : 2 * H]
                h[t + 1] += n
        return h[1:], (a, h, R), h[-1:]

    def backward(self, dh: np.ndarray, cache: tuple, q: Params) -> tuple[np.ndarray, Params]:
        x, h, R = cache
        T, B, H = dh.shape
        r, z, n = (x[:, :, j * H : (j + 1) * H] for j in range(3))
        # dR_t = dh_t ⊙ (Cr, Cz, Cn r), the gradient w.r.t. h_{t-1} W + (0, 0, d); da_t = (dR_r, dR_z,
        # dh_t ⊙ Cn); dh_{t-1} += dh_t ⊙ z_t + dR_t Wᵀ. The coefficients are computed for all steps at
        # once, in R.
        Cn = np.multiply(n, n)  # (T, B, H)
        np.subtract(1.0, Cn, out=Cn)
        tmp = np.subtract(1.0, z)
        Cn *= tmp  # (1 - z)(1 - n²)
        cr, cz, cn = (R[:, :, j * H : (j + 1) * H] for j in range(3))
        np.subtract(1.0, r, out=tmp)
        tmp *= r
        tmp *= cn  # r(1 - r)(h W_n + d)
        np.multiply(tmp, Cn, out=cr)
        np.subtract(1.0, z, out=tmp)
        tmp *= z
        np.subtract(h[:-1], n, out=cz)
        cz *= tmp  # (h_{t-1} - n) z(1 - z)
        np.multiply(Cn, r, out=cn)
        WT = q["W"].T
        tmp = np.empty((B, H), dh.dtype)
        with one_thread(B, 3 * H, H):
            for t in range(T - 1, -1, -1):
                d = dh[t]  # (B, H): the gradient w.r.t. h_t, once the future's part is added
                if t < T - 1:
                    np.matmul(R[t + 1], WT, out=tmp)
                    d += tmp
                    np.multiply(dh[t + 1], z[t + 1], out=tmp)
                    d += tmp
                R[t].reshape(B, 3, H)[...] *= d[:, None, :]
        dR = R.reshape(-1, 3 * H)
        g = {"W": h[:-1].reshape(-1, H).T @ dR, "bh": dR[:, 2 * H :].sum(axis=0)}
        np.multiply(dh, Cn, out=cn)  # R becomes da
        return R, g
