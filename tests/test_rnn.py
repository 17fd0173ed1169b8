"""Forward/backward against central finite differences in float64, for every parameter."""

import numpy as np
import pytest

from model import rnn


def numeric_grad(p, cfg, x, y, h0, seed, name, eps=1e-5):
    """Central differences of the loss w.r.t. every entry of p[name] (an independent reference)."""
    g = np.zeros_like(p[name])
    it = np.nditer(p[name], flags=["multi_index"])
    for _ in it:
        i = it.multi_index
        old = p[name][i]
        p[name][i] = old + eps
        lp = rnn.forward(p, cfg, x, y, h0, rng(seed))[0]
        p[name][i] = old - eps
        lm = rnn.forward(p, cfg, x, y, h0, rng(seed))[0]
        p[name][i] = old
        g[i] = (lp - lm) / (2 * eps)
    return g


def rng(seed):
    return None if seed is None else np.random.default_rng(seed)


@pytest.mark.parametrize("layers,dropout", [(1, 0.0), (2, 0.0), (2, 0.3)])
def test_gradients_match_finite_differences(layers, dropout):
    V, H, B, T = 7, 5, 3, 4
    cfg = rnn.ModelConfig(vocab_size=V, hidden=H, layers=layers, dropout=dropout, dtype="float64")
    r = np.random.default_rng(0)
    p = rnn.init(cfg, r)
    for k in p:  # non-zero biases and a livelier recurrence exercise every term
        p[k] += 0.3 * r.standard_normal(p[k].shape)
    x, y = r.integers(0, V, (B, T)), r.integers(0, V, (B, T))
    h0 = 0.5 * r.standard_normal((layers, B, H))
    seed = 123 if dropout else None
    _, cache, _ = rnn.forward(p, cfg, x, y, h0, rng(seed))
    grads = rnn.backward(p, cfg, cache)
    assert set(grads) == set(p)
    for name in p:
        num = numeric_grad(p, cfg, x, y, h0, seed, name)
        err = np.abs(grads[name] - num).max() / max(1e-8, np.abs(num).max())
        assert err < 1e-6, (name, err)


def test_float32_matches_float64():
    cfg64 = rnn.ModelConfig(vocab_size=11, hidden=16, layers=2, dtype="float64")
    cfg32 = cfg64.model_copy(update={"dtype": "float32"})
    r = np.random.default_rng(1)
    p64 = rnn.init(cfg64, r)
    p32 = {k: v.astype(np.float32) for k, v in p64.items()}
    x, y = r.integers(0, 11, (4, 9)), r.integers(0, 11, (4, 9))
    l64, c64, h64 = rnn.forward(p64, cfg64, x, y, rnn.zeros_hidden(cfg64, 4))
    l32, c32, h32 = rnn.forward(p32, cfg32, x, y, rnn.zeros_hidden(cfg32, 4))
    assert abs(l64 - l32) < 1e-5 and h32.dtype == np.float32
    g64, g32 = rnn.backward(p64, cfg64, c64), rnn.backward(p32, cfg32, c32)
    for k in g64:
        assert g32[k].dtype == np.float32
        np.testing.assert_allclose(g32[k], g64[k], atol=1e-5)


def test_step_matches_forward():
    """The one-character step used for sampling equals the training forward pass."""
    cfg = rnn.ModelConfig(vocab_size=9, hidden=8, layers=2, dtype="float64")
    r = np.random.default_rng(2)
    p = rnn.init(cfg, r)
    x = r.integers(0, 9, (3, 6))
    _, _, hT = rnn.forward(p, cfg, x, x, rnn.zeros_hidden(cfg, 3))
    h = rnn.zeros_hidden(cfg, 3)
    for t in range(6):
        h = rnn.step(p, cfg, x[:, t], h)
    np.testing.assert_allclose(h, hT, atol=1e-12)


def test_grow_keeps_old_rows():
    cfg = rnn.ModelConfig(vocab_size=5, hidden=4)
    p = rnn.init(cfg, np.random.default_rng(0))
    g = rnn.grow(p, cfg, 8, np.random.default_rng(1))
    assert g["U0"].shape == (8, 4) and g["V"].shape == (4, 8) and g["c"].shape == (8,)
    np.testing.assert_array_equal(g["U0"][:5], p["U0"])
    np.testing.assert_array_equal(g["V"][:, :5], p["V"])
    np.testing.assert_array_equal(g["W0"], p["W0"])
    with pytest.raises(ValueError):
        rnn.grow(p, cfg, 4, np.random.default_rng(1))


def test_gradients_large_vocab():
    """More classes than characters in the chunk: the embedding gradient takes its scatter-add path."""
    V, H, B, T = 23, 4, 2, 3
    cfg = rnn.ModelConfig(vocab_size=V, hidden=H, layers=1, dropout=0.0, dtype="float64")
    r = np.random.default_rng(3)
    p = rnn.init(cfg, r)
    x, y = r.integers(0, V, (B, T)), r.integers(0, V, (B, T))
    x[0, :2] = 5  # a repeated id must accumulate
    h0 = 0.5 * r.standard_normal((1, B, H))
    grads = rnn.backward(p, cfg, rnn.forward(p, cfg, x, y, h0)[1])
    for name in p:
        num = numeric_grad(p, cfg, x, y, h0, None, name)
        err = np.abs(grads[name] - num).max() / max(1e-8, np.abs(num).max())
        assert err < 1e-6, (name, err)


def test_embed_grad_paths_agree():
    r = np.random.default_rng(4)
    ids, d = r.integers(0, 6, 50), r.standard_normal((50, 3))
    ref = np.zeros((6, 3))
    for i, row in zip(ids, d, strict=True):
        ref[i] += row
    np.testing.assert_allclose(rnn.embed_grad(ids, d, 6), ref, atol=1e-12)  # one-hot product
    np.testing.assert_allclose(rnn.embed_grad(ids, d, 60)[:6], ref, atol=1e-12)  # scatter-add (V > N)
