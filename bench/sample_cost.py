"""The cost per generated character of `sample.generate_ids` against a minimal NumPy loop with the same
products (one (B, H) x (H, kH) per layer per step, one (B, H) x (H, V) for the logits) and a plain inverse-CDF
draw, alternated in one run on one BLAS thread. Target: generate_ids within 1.2x of the minimal loop at
batch 1. A third contender, generate_ids with its per-step products held to one plain call each, says what
the products in blocks (runtime.Product) gain. Used by serve_latency.py; runs alone too, and then writes its
section of docs/benchmarks.md (unless --no-record); the last line printed is JSON:

    uv run python bench/sample_cost.py [--quick] [--cell gru] [--hidden 256] [--layers 1] [--no-record]
"""

from __future__ import annotations

import argparse
import json

import common
import numpy as np

from model import net, runtime, sample
from model.cell import Params
from model.config import ModelConfig

CHARS, TEMPERATURE = 200, 0.8
BATCHES = (1, 14, 16, 32)  # 14: the rows past the last whole block of 8 go as a block of their own


def sigmoid(x: np.ndarray) -> np.ndarray:
    return 0.5 + 0.5 * np.tanh(0.5 * x)


def plain_layer(cell: str, a: np.ndarray, h: np.ndarray, c: np.ndarray, W: np.ndarray, bh: np.ndarray | None):
    """One step of one layer written plainly: (h, c) from a = x U + b (B, kH) and the state h, c (B, H)."""
    H, R = h.shape[1], h @ W  # (B, kH): the layer's one recurrent product
    if cell == "rnn":
        return np.tanh(a + R), c
    if cell == "gru":
        r, z = sigmoid(a[:, :H] + R[:, :H]), sigmoid(a[:, H : 2 * H] + R[:, H : 2 * H])
        n = np.tanh(a[:, 2 * H :] + r * (R[:, 2 * H :] + bh))
        return n + z * (h - n), c
    gates = a + R
    o, i, f = (sigmoid(gates[:, j * H : (j + 1) * H]) for j in range(3))
    c = f * c + i * np.tanh(gates[:, 3 * H :])
    return o * np.tanh(c), c


def minimal(p: Params, cfg: ModelConfig, batch: int, rng: np.random.Generator) -> int:
    """CHARS characters for `batch` rows from id 0; the characters generated."""
    L, H = cfg.layers, cfg.hidden
    h, c = np.zeros((L, batch, H), cfg.dtype), np.zeros((L, batch, H), cfg.dtype)
    ids, u = np.zeros(batch, np.intp), rng.random((CHARS, batch))
    for t in range(CHARS):
        x = p["U0"][ids] + p["b0"]
        for l in range(L):
            a = x if l == 0 else x @ p[f"U{l}"] + p[f"b{l}"]
            h[l], c[l] = plain_layer(cfg.cell, a, h[l], c[l], p[f"W{l}"], p.get(f"bh{l}"))
            x = h[l]
        e = np.exp((x @ p["V"] + p["c"]) / TEMPERATURE)  # a plain inverse-CDF draw
        cdf = np.cumsum(e, axis=1)
        ids = (cdf < u[t, :, None] * cdf[:, -1:]).sum(axis=1)
    return CHARS * batch


def generated(p: Params, cfg: ModelConfig, batch: int, seed: int, blocks: bool = True) -> int:
    """CHARS characters for `batch` rows through `generate_ids`; `blocks=False` holds its per-step products
    to one plain call each (runtime.Product as on a BLAS without the small-matrix kernel), for comparison."""
    rows = [sample.Settings(TEMPERATURE, seed=seed + i) for i in range(batch)]
    kernel = runtime.small_kernel
    runtime.small_kernel = kernel if blocks else lambda: False  # read when generate_ids makes its Products
    try:
        for _ in sample.generate_ids(p, cfg, [np.zeros(1, np.int32)] * batch, CHARS, rows):
            pass
    finally:
        runtime.small_kernel = kernel
    return CHARS * batch


def cost(cell: str, hidden: int, layers: int, rounds: int = 5, seconds: float = 0.6) -> list[dict]:
    """Microseconds per character of each contender at each of BATCHES (median over rounds), and the ratio
    (16: what each of two workers steps while 32 clients share them)."""
    cfg = ModelConfig(vocab_size=65, cell=cell, hidden=hidden, layers=layers)
    p, rng, out = net.init(cfg, np.random.default_rng(0)), np.random.default_rng(1), []
    with runtime.blas_limit(1):
        for batch in BATCHES:
            rates = common.alternate(
                {
                    "generate_ids": lambda b=batch: generated(p, cfg, b, int(rng.integers(1 << 30))),
                    "plain": lambda b=batch: generated(p, cfg, b, int(rng.integers(1 << 30)), False),
                    "minimal": lambda b=batch: minimal(p, cfg, b, rng),
                },
                rounds,
                seconds,
            )
            us = {k: round(1e6 / common.median(v), 2) for k, v in rates.items()}  # per character
            row = {"batch": batch, "generate_ids_us": us["generate_ids"], "minimal_us": us["minimal"]}
            gain = round(us["plain"] / us["generate_ids"], 2)
            row |= {"plain_products_us": us["plain"], "blocks_gain": gain}
            out.append(row | {"ratio": round(us["generate_ids"] / us["minimal"], 2)})
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="3 rounds of 0.3 s instead of 5 of 0.6")
    ap.add_argument(
        "--cell", choices=["rnn", "gru", "lstm"], default=ModelConfig.model_fields["cell"].default
    )
    ap.add_argument("--hidden", type=int, default=256)
    ap.add_argument("--layers", type=int, default=1)
    common.add_record_flag(ap)
    a = ap.parse_args()
    run = common.begin("sample_cost", "Sampling cost per character (`bench/sample_cost.py`)", a)
    rounds, seconds = (3, 0.3) if a.quick else (5, 0.6)
    rows = cost(a.cell, a.hidden, a.layers, rounds, seconds)
    head = ["batch", "generate_ids µs/char", "minimal loop µs/char", "ratio", "target"]
    head += ["generate_ids, plain products µs/char", "products in blocks: speed-up"]
    table = [[r["batch"], r["generate_ids_us"], r["minimal_us"], f"**{r['ratio']}**"] for r in rows]
    table = [t + (["≤ 1.2"] if t[0] == 1 else [""]) for t in table]
    table = [t + [r["plain_products_us"], f"{r['blocks_gain']}x"] for t, r in zip(table, rows, strict=True)]
    body = common.markdown_table(head, table)
    print(body)
    run.facts["model"] = f"{a.cell}, hidden {a.hidden} x {a.layers} layer(s), {CHARS} characters a row"
    run.facts["setup"] = f"one BLAS thread; {rounds} alternated rounds of {seconds:g} s, medians"
    common.record(run, body)
    print(json.dumps({"cell": a.cell, "hidden": a.hidden, "layers": a.layers, "cost": rows}))


if __name__ == "__main__":
    main()
