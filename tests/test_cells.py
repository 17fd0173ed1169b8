"""Every cell against independent references: its equations written plainly, and central finite differences
in float64 for every parameter's gradient."""

import os

import numpy as np
import pytest

from model import net
from model.runtime import Product

CELLS = ["rnn", "gru", "lstm"]


def rng(seed):
    return None if seed is None else np.random.default_rng(seed)


def numeric_grad(p, cfg, x, y, s0, seed, name, eps=1e-5):
    """Central differences of the loss w.r.t. every entry of p[name]."""
    g = np.zeros_like(p[name])
    it = np.nditer(p[name], flags=["multi_index"])
    for _ in it:
        i = it.multi_index
        old = p[name][i]
        p[name][i] = old + eps
        lp = net.forward(p, cfg, x, y, s0, rng(seed))[0]
        p[name][i] = old - eps
        lm = net.forward(p, cfg, x, y, s0, rng(seed))[0]
        p[name][i] = old
        g[i] = (lp - lm) / (2 * eps)
    return g


def lively(cfg, seed, B):
    """Parameters with non-zero biases and a livelier recurrence, and a non-zero state (LSTM c included)."""
    r = np.random.default_rng(seed)
    p = net.init(cfg, r)
    for k in p:
        p[k] += 0.3 * r.standard_normal(p[k].shape)
    return p, 0.5 * r.standard_normal(net.zeros_state(cfg, B).shape), r


@pytest.mark.parametrize("cell", CELLS)
@pytest.mark.parametrize("layers,dropout", [(1, 0.0), (2, 0.0), (2, 0.3)])
def test_gradients_match_finite_differences(cell, layers, dropout):
    V, H, B, T = 7, 5, 3, 4
    cfg = net.ModelConfig(vocab_size=V, cell=cell, hidden=H, layers=layers, dropout=dropout, dtype="float64")
    p, s0, r = lively(cfg, 0, B)
    x, y = r.integers(0, V, (B, T)), r.integers(0, V, (B, T))
    seed = 123 if dropout else None
    _, cache, _ = net.forward(p, cfg, x, y, s0, rng(seed))
    grads = net.backward(p, cfg, cache)
    assert set(grads) == set(p) == set(net.shapes(cfg))
    for name in p:
        num = numeric_grad(p, cfg, x, y, s0, seed, name)
        err = np.abs(grads[name] - num).max() / max(1e-8, np.abs(num).max())
        assert err < 1e-6, (name, err)


def sigmoid(x):
    return 1 / (1 + np.exp(-x))


def reference_step(cell, a, W, s, q):
    """One step of the cell as its docstring states it; a = x U + b (B, kH), s the state (S, B, H)."""
    h = s[0]
    if cell == "rnn":
        return np.tanh(a + h @ W)[None]
    if cell == "gru":
        ar, az, an = np.split(a, 3, axis=1)
        Wr, Wz, Wn = np.split(W, 3, axis=1)
        r, z = sigmoid(ar + h @ Wr), sigmoid(az + h @ Wz)
        n = np.tanh(an + r * (h @ Wn + q["bh"]))
        return ((1 - z) * n + z * h)[None]
    o, i, f, g = np.split(a + h @ W, 4, axis=1)
    c = sigmoid(f) * s[1] + sigmoid(i) * np.tanh(g)
    return np.stack([sigmoid(o) * np.tanh(c), c])


@pytest.mark.parametrize("cell", CELLS)
def test_forward_follows_the_equations(cell):
    """Two layers, T steps, the state carried: the loss and the last state equal a plain per-step
    implementation of the docstrings' equations."""
    V, H, B, T = 6, 4, 3, 5
    cfg = net.ModelConfig(vocab_size=V, cell=cell, hidden=H, layers=2, dtype="float64")
    p, s0, r = lively(cfg, 1, B)
    x, y = r.integers(0, V, (B, T)), r.integers(0, V, (B, T))
    loss, _, sT = net.forward(p, cfg, x, y, s0)
    s, nll = s0.copy(), 0.0
    for t in range(T):
        inp = np.eye(V)[x[:, t]]  # one-hot rows: layer 0's input product is an embedding lookup
        for l in range(2):
            q = net.layer(p, cfg, l)
            s[l] = reference_step(cell, inp @ p[f"U{l}"] + q["b"], q["W"], s[l], q)
            inp = s[l, 0]
        z = inp @ p["V"] + p["c"]
        nll -= (z[np.arange(B), y[:, t]] - np.log(np.exp(z).sum(axis=1))).sum()
    np.testing.assert_allclose(sT, s, atol=1e-12)
    assert loss == pytest.approx(nll / (B * T), abs=1e-12)


@pytest.mark.parametrize("cell", CELLS)
def test_float32_matches_float64(cell):
    cfg64 = net.ModelConfig(vocab_size=11, cell=cell, hidden=16, layers=2, dtype="float64")
    cfg32 = cfg64.model_copy(update={"dtype": "float32"})
    r = np.random.default_rng(1)
    p64 = net.init(cfg64, r)
    p32 = {k: v.astype(np.float32) for k, v in p64.items()}
    x, y = r.integers(0, 11, (4, 9)), r.integers(0, 11, (4, 9))
    s64 = 0.5 * r.standard_normal(net.zeros_state(cfg64, 4).shape)
    l64, c64, h64 = net.forward(p64, cfg64, x, y, s64)
    l32, c32, h32 = net.forward(p32, cfg32, x, y, s64.astype(np.float32))
    assert abs(l64 - l32) < 1e-5 and h32.dtype == np.float32
    np.testing.assert_allclose(h32, h64, atol=1e-5)
    g64, g32 = net.backward(p64, cfg64, c64), net.backward(p32, cfg32, c32)
    for k in g64:
        assert g32[k].dtype == np.float32
        np.testing.assert_allclose(g32[k], g64[k], atol=1e-5)


@pytest.mark.parametrize("cell", CELLS)
def test_step_matches_forward(cell):
    """The one-character step used for sampling equals the training forward pass."""
    cfg = net.ModelConfig(vocab_size=9, cell=cell, hidden=8, layers=2, dtype="float64")
    p, s0, r = lively(cfg, 2, 3)
    x = r.integers(0, 9, (3, 6))
    _, _, sT = net.forward(p, cfg, x, x, s0)
    s, step = s0, net.Stepper(p, cfg)
    for t in range(6):
        s = step(x[:, t], s)
    np.testing.assert_allclose(s, sT, atol=1e-12)


@pytest.mark.parametrize("cell", CELLS)
def test_cheap_step_equals_the_training_forward_bitwise(cell):
    """Cell.step (no caches, for sampling) computes what one step of Cell.forward does, in float32 too."""
    cfg = net.ModelConfig(vocab_size=9, cell=cell, hidden=8, layers=1, dtype="float32")
    p, s0, r = lively(cfg, 3, 5)
    p, s0 = {k: v.astype(np.float32) for k, v in p.items()}, s0.astype(np.float32)[0]  # (S, B, H)
    c, q = net.CELLS[cell], net.layer(p, cfg, 0)
    a = r.standard_normal((c.gates, 1, 5, 8)).astype(np.float32)  # (k, T=1, B, H)
    _, _, ref = c.forward(a.copy(), q, s0)
    out = np.empty_like(s0)
    c.step(a[:, 0].copy(), q, s0, out, Product(q["W"]))
    np.testing.assert_array_equal(out, ref)


@pytest.mark.parametrize("cell", CELLS)
def test_grow_keeps_old_rows(cell):
    cfg = net.ModelConfig(vocab_size=5, cell=cell, hidden=4)
    p = net.init(cfg, np.random.default_rng(0))
    g = net.grow(p, cfg, 8, np.random.default_rng(1))
    assert {k: v.shape for k, v in g.items()} == net.shapes(cfg.model_copy(update={"vocab_size": 8}))
    np.testing.assert_array_equal(g["U0"][:5], p["U0"])
    np.testing.assert_array_equal(g["V"][:, :5], p["V"])
    np.testing.assert_array_equal(g["W0"], p["W0"])
    with pytest.raises(ValueError):
        net.grow(p, cfg, 4, np.random.default_rng(1))


def test_init():
    """The vanilla cell starts as it always has; the LSTM's forget bias starts at 1, every other bias at 0."""
    cfg = net.ModelConfig(vocab_size=5, cell="rnn", hidden=4, layers=2, dtype="float64")
    p = net.init(cfg, np.random.default_rng(0))
    np.testing.assert_allclose(p["W1"] @ p["W1"].T, 0.36 * np.eye(4), atol=1e-12)  # orthogonal, gain 0.6
    lstm = net.init(cfg.model_copy(update={"cell": "lstm"}), np.random.default_rng(0))
    assert lstm["b0"].tolist() == [0.0] * 8 + [1.0] * 4 + [0.0] * 4  # blocks o, i, f, g
    gru = net.init(cfg.model_copy(update={"cell": "gru"}), np.random.default_rng(0))
    assert not gru["b1"].any() and not gru["bh1"].any()


def test_gradients_large_vocab():
    """More classes than characters in the chunk: the embedding gradient takes its scatter-add path."""
    V, H, B, T = 23, 4, 2, 3
    cfg = net.ModelConfig(vocab_size=V, cell="lstm", hidden=H, layers=1, dropout=0.0, dtype="float64")
    p, s0, r = lively(cfg, 3, B)
    x, y = r.integers(0, V, (B, T)), r.integers(0, V, (B, T))
    x[0, :2] = 5  # a repeated id must accumulate
    grads = net.backward(p, cfg, net.forward(p, cfg, x, y, s0)[1])
    for name in ("U0", "b0"):
        num = numeric_grad(p, cfg, x, y, s0, None, name)
        err = np.abs(grads[name] - num).max() / max(1e-8, np.abs(num).max())
        assert err < 1e-6, (name, err)


def test_embed_grad_paths_agree():
    r = np.random.default_rng(4)
    ids, d = r.integers(0, 6, 50), r.standard_normal((2, 50, 3))  # two gate blocks of width 3
    ref = np.zeros((6, 6))
    for n, i in enumerate(ids):
        ref[i] += np.concatenate([d[0, n], d[1, n]])
    np.testing.assert_allclose(net.embed_grad(ids, d, 6), ref, atol=1e-12)  # one-hot product
    np.testing.assert_allclose(net.embed_grad(ids, d, 60)[:6], ref, atol=1e-12)  # scatter-add (V > N)


@pytest.mark.parametrize("cell", CELLS)
def test_batch_halves_side_by_side_equal_one_pass(cell, monkeypatch):
    """With 2 BLAS threads allowed (B >= 16, H <= 768), a training step runs the two halves of the batch on
    two threads (`net.grads`): loss, last state and gradients equal one pass over all rows (1 BLAS thread,
    the same dropout masks), the rows weighted by halves of unequal size too, the halves' gradients summed on
    two threads."""
    from threadpoolctl import threadpool_limits

    from model import runtime
    from model.runtime import halves

    monkeypatch.setattr(runtime, "SHARE_MIN", 0)  # these small gradients combined on two threads too

    V, H, T = 7, 5, 4
    cfg = net.ModelConfig(vocab_size=V, cell=cell, hidden=H, layers=2, dropout=0.3, dtype="float64")
    for B in (16, 17):
        p, s0, r = lively(cfg, B, B)
        x, y = r.integers(0, V, (B, T)), r.integers(0, V, (B, T))
        with threadpool_limits(1, user_api="blas"):
            assert len(halves(B, H)) == 1
            l1, g1, s1 = net.grads(p, cfg, x, y, s0, rng(5))
            l0, c0, _ = net.forward(p, cfg, x, y, s0, rng(5))
            g0 = net.backward(p, cfg, c0)  # one pass is forward then backward, exactly
            assert l0 == l1 and all((g0[k] == g1[k]).all() for k in p)
        with threadpool_limits(2, user_api="blas"):
            assert len(halves(B, H)) == 2 and len(halves(B, 1024)) == len(halves(8, H)) == 1
            l2, g2, s2 = net.grads(p, cfg, x, y, s0, rng(5))
        assert l2 == pytest.approx(l1, rel=1e-12)
        np.testing.assert_allclose(s2, s1, rtol=1e-12, atol=1e-14)
        for name in p:
            np.testing.assert_allclose(g2[name], g1[name], rtol=1e-9, atol=1e-13, err_msg=name)


def test_evaluate_by_halves_equals_one_pass():
    """`train.evaluate` splits its streams the same way: the validation loss is the one-pass loss, and equals
    the plain definition (each stream from a zero state, every character's loss averaged)."""
    from threadpoolctl import threadpool_limits

    from model import train
    from model.runtime import halves

    cfg = net.ModelConfig(vocab_size=7, cell="gru", hidden=5, layers=2, dropout=0.3, dtype="float64")
    p, _, r = lively(cfg, 3, 1)
    ids = r.integers(0, 7, 64 * 9 + 1)  # 64 streams of 9 characters, in chunks of 4
    with threadpool_limits(1, user_api="blas"):
        one = train.evaluate(p, cfg, ids, batch=64, seq=4)
        streams = ids[:-1].reshape(64, 9), ids[1:].reshape(64, 9)
        plain = net.forward(p, cfg, *streams, net.zeros_state(cfg, 64))[0]
    with threadpool_limits(2, user_api="blas"):
        assert len(halves(64, 5)) == 2
        both = train.evaluate(p, cfg, ids, batch=64, seq=4)
    assert one == pytest.approx(plain, rel=1e-12)
    assert both == pytest.approx(one, rel=1e-12)


def test_split_keeps_each_call_under_the_small_kernel_limit():
    """Rows from 4 to 8 dividing B and columns dividing N, m·n·K within the limit; one call when the product
    fits whole or cannot be split so."""
    from model.runtime import SMALL_MNK, split

    assert split(16, 256, 256) == (8, 256)  # rows only
    assert split(32, 512, 512) == (8, 128)  # rows and columns
    assert split(12, 384, 384) == (6, 384)
    assert split(32, 128, 128) == (32, 128)  # fits whole
    assert split(17, 256, 256) == (17, 256)  # no divisor of 17 from 4 to 8
    assert split(8, 512, 512) == (8, 512)  # rows already 8: columns alone are no faster
    assert split(16, 8192, 8192) == (16, 8192)  # columns would be fewer than 32
    for B, K, N in [(16, 256, 768), (64, 768, 768), (30, 300, 300), (24, 1000, 1000)]:
        m, n = split(B, K, N)
        assert B % m == 0 and N % n == 0 and m * n * K <= SMALL_MNK, (B, K, N, m, n)


@pytest.mark.parametrize("lead", [(), (3,)])
def test_recur_in_blocks_equals_one_product(lead, monkeypatch):
    """Recur's blocked call writes x W into `out` (a strided slice of a larger buffer, as the cells give it):
    the vanilla cell's (B, H) x (H, H), the gated cells' h against k blocks and their backward's k x k."""
    from threadpoolctl import threadpool_limits

    from model import runtime
    from model.runtime import Recur

    monkeypatch.setattr(runtime, "small_kernel", lambda: True)  # blocks whatever this machine's BLAS

    r = np.random.default_rng(0)
    B, H = 16, 512
    W = r.standard_normal((*lead, H, H))
    buf = np.zeros((*lead, 3, B, H))
    for x in (r.standard_normal((B, H)), r.standard_normal((*lead, B, H))):
        with threadpool_limits(1, user_api="blas"):
            recur = Recur(W, B)
            assert not recur.plain
            recur(x, buf[..., 1, :, :])
        np.testing.assert_allclose(buf[..., 1, :, :], np.matmul(x, W), rtol=1e-12, atol=1e-10)
        assert not buf[..., [0, 2], :, :].any()


@pytest.mark.parametrize("gates", [1, 3])
def test_sampling_product_in_blocks_equals_one_product(gates, monkeypatch):
    """Product's blocks of 8 rows, and the rows past the last whole block (in a block of their own, or
    against W's column blocks as they are), and its plain call for few rows, give x W, for row counts that
    change from call to call as rows join and leave (the padded block's idle rows holding an earlier call's
    rows); its buffer grows when the rows outgrow it."""
    from threadpoolctl import threadpool_limits

    from model import runtime

    monkeypatch.setattr(runtime, "small_kernel", lambda: True)  # blocks whatever this machine's BLAS
    r = np.random.default_rng(0)
    H = 512
    W = r.standard_normal((H, gates * H))
    with threadpool_limits(1, user_api="blas"):
        mul = Product(W)
    assert mul.cols is not None
    for B in (1, 16, 3, 8, 13, 17, 40, 8, 33, 15, 6, 23, 7, 14, 2, 4, 5, 10, 12):
        x = r.standard_normal((B, H))
        np.testing.assert_allclose(mul(x), x @ W, rtol=1e-12, atol=1e-10)
    assert len(mul.buf) >= 40
    with threadpool_limits(2, user_api="blas"):
        assert Product(W).cols is None  # more BLAS threads: one plain call, BLAS shares it


@pytest.mark.parametrize("cell", CELLS)
def test_gradients_equal_with_the_products_in_blocks(cell, monkeypatch):
    """A training step with the per-step products split into blocks (the limit lowered so that H 64 splits
    into 8 rows x 32 columns) gives the loss, state and gradients of plain products."""
    from threadpoolctl import threadpool_limits

    from model import runtime

    V, H, B, T = 7, 64, 16, 5
    cfg = net.ModelConfig(vocab_size=V, cell=cell, hidden=H, layers=2, dropout=0.3, dtype="float64")
    p, s0, r = lively(cfg, 4, B)
    x, y = r.integers(0, V, (B, T)), r.integers(0, V, (B, T))

    def step():
        loss, c, sT = net.forward(p, cfg, x, y, s0, rng(5))
        return loss, sT, net.backward(p, cfg, c)

    with threadpool_limits(1, user_api="blas"):
        monkeypatch.setattr(runtime, "small_kernel", lambda: False)
        l0, s_0, g0 = step()
        monkeypatch.setattr(runtime, "SMALL_MNK", 8 * 32 * H)
        monkeypatch.setattr(runtime, "small_kernel", lambda: True)
        assert runtime.split(B, H, H) == (8, 32)
        l1, s_1, g1 = step()
    assert l1 == pytest.approx(l0, rel=1e-12)
    np.testing.assert_allclose(s_1, s_0, rtol=1e-12, atol=1e-14)
    for name in p:
        np.testing.assert_allclose(g1[name], g0[name], rtol=1e-10, atol=1e-13, err_msg=name)


def test_no_blocks_where_openblas_has_no_small_kernel():
    """OpenBLAS's Haswell kernels (Zen's too) have no small-matrix kernel: there the products stay whole, on
    one thread too."""
    import subprocess
    import sys

    code = (
        "import numpy as np; from threadpoolctl import threadpool_limits; from model import runtime\n"
        "with threadpool_limits(1, user_api='blas'):\n"
        "    print(runtime.small_kernel(), runtime.Recur(np.zeros((256, 256), np.float32), 16).plain)"
    )
    env = {**os.environ, "OPENBLAS_CORETYPE": "Haswell"}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    assert out.stdout.split() == ["False", "True"]


def plain_gated_forward(cell, a, W, bh, s0, recur):
    """The gated cells' forward as their docstrings write it, halving each sigmoid's input where it is used
    (the order of the old code), through the same blocked products: h (T, B, H) and the last state."""
    k, T = a.shape[:2]
    W = np.stack([W[:, j * W.shape[0] : (j + 1) * W.shape[0]] for j in range(k)])  # (k, H, H)
    rec = recur(W)
    s = s0.copy()
    hs = []
    for t in range(T):
        R = np.empty((k, *s.shape[1:]), a.dtype)
        rec(s[0], R)
        z = a[:, t].copy()
        if cell == "gru":
            z[:2] += R[:2]
            z[:2] *= 0.5
            z[:2] = np.tanh(z[:2]) * 0.5 + 0.5
            n = np.tanh(z[2] + z[0] * (R[2] + bh))
            s[0] = (s[0] - n) * z[1] + n
        else:
            z += R
            z[:3] *= 0.5
            z = np.tanh(z)
            z[:3] = z[:3] * 0.5 + 0.5
            s[1] = z[2] * s[1] + z[1] * z[3]
            s[0] = z[0] * np.tanh(s[1])
        hs.append(s[0].copy())
    return np.stack(hs), s


@pytest.mark.parametrize("cell", ["gru", "lstm"])
def test_halving_folded_into_a_and_W_is_exact(cell, monkeypatch):
    """The forward pass halves the sigmoids' inputs once, on a's sigmoid blocks and on W's copy
    (`cell.halved`), not at every step: in float32, with the per-step products in blocks, it gives bitwise
    the numbers of halving each step's sum, the exactness the cells' docstring claims."""
    from threadpoolctl import threadpool_limits

    from model import runtime

    monkeypatch.setattr(runtime, "small_kernel", lambda: True)
    monkeypatch.setattr(runtime, "SMALL_MNK", 8 * 32 * 64)
    H, B, T = 64, 16, 6
    c = net.CELLS[cell]
    r = np.random.default_rng(7)
    q = {n: (0.5 * r.standard_normal(s)).astype(np.float32) for n, s in c.shapes(H).items()}
    a = r.standard_normal((c.gates, T, B, H)).astype(np.float32)
    s0 = (0.5 * r.standard_normal((c.states, B, H))).astype(np.float32)
    with threadpool_limits(1, user_api="blas"):
        assert runtime.split(B, H, H) == (8, 32)
        h, _, sT = c.forward(a.copy(), q, s0)
        ref_h, ref_s = plain_gated_forward(cell, a, q["W"], q.get("bh"), s0, lambda W: runtime.Recur(W, B))
    np.testing.assert_array_equal(h, ref_h)
    np.testing.assert_array_equal(sT, ref_s)


def test_recur_views_for_a_whole_pass(monkeypatch):
    """`Recur.rows` and `cols` of whole buffers (a step axis in front, gate blocks too) give per-step views
    whose product lands in the buffer: what the cells' loops call once per step."""
    from threadpoolctl import threadpool_limits

    from model import runtime

    monkeypatch.setattr(runtime, "small_kernel", lambda: True)  # blocks whatever this machine's BLAS
    r = np.random.default_rng(1)
    B, H, T = 16, 512, 3
    W = r.standard_normal((3, H, H))
    h = r.standard_normal((T, B, H))
    R = np.zeros((3, T, B, H))
    with threadpool_limits(1, user_api="blas"):
        recur = runtime.Recur(W, B)
        xs, outs = recur.rows(h), recur.cols(R)
        for t in range(T):
            np.matmul(xs[t], recur.W, outs[:, t])
    assert not recur.plain and recur.W.flags.c_contiguous
    for t in range(T):
        np.testing.assert_allclose(R[:, t], np.matmul(h[t], W), rtol=1e-12, atol=1e-10)


def test_a_failed_mask_draw_stops_the_step_without_a_hang():
    """The halves wait for the masks the calling thread draws (`net.Drops`): should drawing fail, both halves
    stop with an error and the step raises the drawing's error, instead of waiting for ever."""
    import threading

    from threadpoolctl import threadpool_limits

    class Broken:
        def random(self, *args, **kwargs):
            raise MemoryError("no room for a mask")

    cfg = net.ModelConfig(vocab_size=7, cell="gru", hidden=5, layers=2, dropout=0.3, dtype="float64")
    p, s0, r = lively(cfg, 0, 16)
    x = r.integers(0, 7, (16, 4))
    seen = []

    def step():
        with threadpool_limits(2, user_api="blas"), pytest.raises(MemoryError, match="no room") as e:
            net.grads(p, cfg, x, x, s0, Broken())
        seen.append(e.value)

    t = threading.Thread(target=step)
    t.start()
    t.join(timeout=60)  # a bound only: the step ends at once, or never
    assert not t.is_alive() and len(seen) == 1


def test_per_step_weights_start_on_a_cache_line():
    """The copies of W that the per-step products read in place (Recur's column blocks, Product's W for its
    plain calls) start on a LINE-byte boundary, whatever the allocator gave (NumPy guarantees 16 bytes), and
    hold W's values; `aligned` copies any shape and dtype."""
    from model import runtime

    r = np.random.default_rng(0)
    for n in range(1, 40):  # sizes that leave malloc's next block at every offset
        a = r.standard_normal((n, 3 * n + 1)).astype(np.float32 if n % 2 else np.float64)
        b = runtime.aligned(a[:, 1:])  # a strided view in
        assert b.ctypes.data % runtime.LINE == 0 and b.flags.c_contiguous
        np.testing.assert_array_equal(b, a[:, 1:])
    for H in (64, 96, 256):
        W = r.standard_normal((H, 3 * H)).astype(np.float32)
        mul, recur = Product(W), runtime.Recur(W, 16)
        assert mul.W.ctypes.data % runtime.LINE == 0 and recur.W.ctypes.data % runtime.LINE == 0
        np.testing.assert_array_equal(mul.W, W)
