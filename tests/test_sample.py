"""Sampling: reproducible, batch-independent, and the filters do what they say."""

import numpy as np
import pytest

from model import net, sample
from model.sample import Settings
from model.vocab import UnknownCharsError, Vocab

VOCAB = Vocab.from_text("abcdefgh \n")
CFG = net.ModelConfig(vocab_size=len(VOCAB), cell="rnn", hidden=16, layers=2)
P = {k: v * 3 for k, v in net.init(CFG, np.random.default_rng(0)).items()}  # a peaky model
CELLS = ["rnn", "gru", "lstm"]


def model(cell: str):
    """A peaky model with the `cell`."""
    cfg = CFG.model_copy(update={"cell": cell})
    return {k: v * 3 for k, v in net.init(cfg, np.random.default_rng(0)).items()}, cfg


SEEDED = Settings(seed=1)


def gen(prompts, n=40, rows=SEEDED):
    return sample.sample(P, CFG, VOCAB, prompts, n, rows)


@pytest.mark.parametrize("cell", CELLS)
def test_seed_reproducible_and_independent_of_the_batch(cell):
    """Each row's text equals the same prompt and seed sampled alone (batched steps equal unbatched)."""
    p, cfg = model(cell)
    prompts, rows = ["hhh", "abc", "", "a"], [Settings(seed=s) for s in (3, 7, 9, 7)]
    mixed = sample.sample(p, cfg, VOCAB, prompts, 40, rows)
    for q, r, text in zip(prompts, rows, mixed, strict=True):
        assert sample.sample(p, cfg, VOCAB, [q], 40, r) == [text]
    assert len(mixed[1]) == 40 and set(mixed[1]) <= set(VOCAB.chars) and mixed[1] != mixed[3]
    assert sample.sample(p, cfg, VOCAB, ["abc"], 40, Settings(seed=8))[0] != mixed[1]


@pytest.mark.parametrize("cell", CELLS)
def test_prime_matches_feeding_one_by_one(cell):
    p, cfg = model(cell)
    prompts = [VOCAB.encode("abcd"), VOCAB.encode("h"), VOCAB.encode(""), VOCAB.encode("hgfedcba")]
    s = sample.prime(p, cfg, prompts)  # (L, S, B, H)
    step = net.Stepper(p, cfg)
    for i, q in enumerate(prompts):
        ref = net.zeros_state(cfg, 1)
        for c in q:
            ref = step(np.array([c]), ref)
        np.testing.assert_allclose(s[:, :, i : i + 1], ref, atol=1e-6)


def greedy(prompt: str, n: int) -> str:
    h, step = sample.prime(P, CFG, [VOCAB.encode(prompt)]), net.Stepper(P, CFG)
    out = []
    for _ in range(n):
        i = int(np.argmax(net.logits(P, h)[0]))
        out.append(i)
        h = step(np.array([i]), h)
    return VOCAB.decode(out)


@pytest.mark.parametrize(
    "rows", [Settings(top_k=1, seed=5), Settings(top_p=1e-6, seed=5), Settings(0.01, seed=5)]
)
def test_degenerate_filters_are_greedy(rows):
    assert gen(["ab"], n=30, rows=rows)[0] == greedy("ab", 30)


def filter_probs(logits, rows):
    probs = np.exp(logits) * sample.Filter(rows, logits.shape[1]).keep(logits)
    return probs / probs.sum(axis=1, keepdims=True)


def test_filter():
    logits = np.log(np.array([[0.5, 0.3, 0.15, 0.05]] * 3))
    rows = [Settings(top_k=2), Settings(top_p=0.7), Settings(top_k=3, top_p=0.99)]
    want = [[0.625, 0.375, 0, 0], [0.625, 0.375, 0, 0], np.array([0.5, 0.3, 0.15, 0]) / 0.95]
    np.testing.assert_allclose(filter_probs(logits, rows), want)
    hot = [Settings(0.5, top_p=0.6)]  # top-p of the tempered probabilities (0.68, 0.25, ...), not 0.5, 0.3
    np.testing.assert_allclose(filter_probs(logits[:1], hot), [[1, 0, 0, 0]])


def alone(p, cfg, prompt, n, row):
    return sample.sample(p, cfg, VOCAB, [prompt], n, row)[0]


@pytest.mark.parametrize("cell", CELLS)
def test_rows_join_mid_way_and_leave_without_changing_anyones_text(cell):
    """Continuous batching: rows that join a running batch mid-way (primed at once, or reading their prompt
    within the batch, one id per step), or whose neighbour leaves (cancelled), read what they read alone;
    filtered and unfiltered rows side by side; past the uniforms' first chunk."""
    p, cfg = model(cell)
    n = sample.CHUNK * 2 + 10
    a, b = Settings(0.7, seed=3), Settings(top_k=3, top_p=0.9, seed=4)
    c, d, e = Settings(seed=5), Settings(1.3, top_p=0.8, seed=6), Settings(0.5, seed=7)
    rows = sample.Rows(p, cfg)
    rows.add("A", [VOCAB.encode("abc")], [a])
    rows.add("B", [VOCAB.encode("h"), VOCAB.encode("")], [b, c])
    got: dict[str, list[int]] = {"A": [], "B0": [], "B1": [], "D0": [], "D1": [], "E": []}
    for t in range(n + 40):
        if t == 30:
            rows.join("D", VOCAB.encode("hgfe"), [d, c])  # reads its prompt in the batch's steps
        if t == 40:
            rows.join("E", VOCAB.encode(""), [e])
        if t == 50:
            rows.remove({"B"})  # cancelled: both its rows leave
        ids = rows.step()
        keys = [o + str(rows.owners[:i].count(o)) if o in "BD" else o for i, o in enumerate(rows.owners)]
        assert len(ids) == len(rows) == len(keys)
        for key, i in zip(keys, ids.tolist(), strict=True):
            if t >= 33 or key[0] != "D":
                got[key].append(i)
            else:
                assert i == -1  # still reading "hgfe": its first id comes from its 4th step
        for key in ("D0", "E"):
            if len(got[key]) == n:
                rows.remove({key[0]})
        if t == n - 1:
            rows.remove({"A"})
    assert len(rows) == 0
    assert VOCAB.decode(got["A"]) == alone(p, cfg, "abc", n, a)
    assert VOCAB.decode(got["D0"]) == alone(p, cfg, "hgfe", n, d)
    assert VOCAB.decode(got["D1"]) == alone(p, cfg, "hgfe", n, c)
    assert VOCAB.decode(got["E"]) == alone(p, cfg, "", n, e)
    assert VOCAB.decode(got["B0"]) == alone(p, cfg, "h", 50, b)
    assert VOCAB.decode(got["B1"]) == alone(p, cfg, "", 50, c)


@pytest.mark.parametrize("temperature", [1.0, 0.6])
def test_generate_ids_draws_each_rows_noise_from_its_seed(temperature):
    """A row's draws come from np.random.default_rng(seed) alone, in order, batched or not: id t is the
    argmax of logits / temperature + Gumbel noise, whose row t is -log of that generator's t-th row of
    Exp(1) draws (read in chunks of CHUNK steps)."""
    rows = [Settings(temperature, seed=11), Settings(temperature, seed=12)]
    prompts = [VOCAB.encode("ab"), VOCAB.encode("c")]
    n = sample.CHUNK + 36  # past the first chunk
    ids = np.stack(list(sample.generate_ids(P, CFG, prompts, n, rows)), axis=1)  # (2, n)
    step = net.Stepper(P, CFG)
    for r, q, got in zip(rows, prompts, ids, strict=True):
        rng, h = np.random.default_rng(r.seed), sample.prime(P, CFG, [q])
        g = np.concatenate([-np.log(rng.standard_exponential((sample.CHUNK, len(VOCAB)))) for _ in range(2)])
        for t in range(n):
            z = net.logits(P, h)[0].astype(np.float64) / temperature + g[t]
            assert got[t] == int(np.argmax(z))
            h = step(got[t : t + 1], h)


@pytest.mark.parametrize("temperature, top_k", [(1.0, 0), (0.5, 0), (1.5, 3)])
def test_empirical_distribution_follows_the_model(temperature, top_k):
    """Many seeded single draws from an empty prompt follow softmax(c / temperature) over its top k."""
    n = 4000
    rows = [Settings(temperature, top_k, seed=s) for s in range(n)]
    first = next(sample.generate_ids(P, CFG, [np.zeros(0, np.int32)] * n, 1, rows))
    z = P["c"].astype(np.float64) / temperature
    if top_k:
        z[np.argsort(-z)[top_k:]] = -np.inf
    p = np.exp(z - z.max())
    p /= p.sum()
    freq = np.bincount(first, minlength=len(VOCAB)) / n
    assert np.abs(freq - p).max() < 0.03


def test_settings_and_unknown_chars():
    with pytest.raises(ValueError):
        Settings(temperature=0)
    with pytest.raises(ValueError):
        Settings(top_p=0)
    with pytest.raises(UnknownCharsError):
        gen(["xyz"])
    assert len(sample.sample(P, CFG, VOCAB, ["axz"], 5, Settings(seed=1), unknown="skip")[0]) == 5
    assert gen(["a"], n=0) == [""]


def test_rows_past_the_buffers_room_and_leaving_from_the_middle_read_what_they_read_alone():
    """Rows join one by one, past the room the buffers start with (they grow, the live rows kept), and leave
    from the front, the middle and the end while the others go on: every row reads what it reads alone."""
    p, cfg = model("gru")
    n, got, rows = 40, {}, sample.Rows(p, cfg)
    for t in range(n + 30):
        if t < 20:
            rows.join(t, VOCAB.encode("ab"[: t % 3]), [Settings(0.8, seed=t)])
            got[t] = []
        if not len(rows):
            break
        for i, o in zip(rows.step().tolist(), rows.owners, strict=True):
            if i >= 0:
                got[o].append(i)
        done = {o for o in rows.owners if len(got[o]) == n or (o % 5 == 3 and len(got[o]) == 7)}
        rows.remove(done)
    assert len(rows) == 0 and rows.cap >= 20
    for o, ids in got.items():
        length = 7 if o % 5 == 3 else n
        assert VOCAB.decode(ids) == alone(p, cfg, "ab"[: o % 3], length, Settings(0.8, seed=o)), o
