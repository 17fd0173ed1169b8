"""Training throughput (characters/s: forward + backward + clipping + optimizer update) of every cell, on tiny
shakespeare, against PyTorch's same cell.

Contenders, alternated round by round in one process (medians reported), at each (B, T, H):
  numpy <cell>  model.net with the cell (rnn, gru, lstm), one layer, no dropout (as torch's), float32, plus
                model.optim Adam and global-norm clipping, as `char-rnn train` runs it (`net.grads`); at 1
                and at 2 BLAS threads, the better reported (at 2, when the per-step products are small, the
                two halves of the batch run side by side, one thread each: model.cell.halves; JSON:
                numpy.halves)
  torch <cell>  PyTorch CPU nn.Embedding + nn.RNN(tanh) / nn.GRU / nn.LSTM + nn.Linear, Adam,
                clip_grad_norm_ (float32); run at 1 and at 2 threads (torch.set_num_threads), the better
                reported
  seed loop     the original notebook's RNN: one-hot column vectors, a Python loop per character, plain SGD
                (no clipping, as in the notebook), float64, batch 1, same hidden size and sequence length; run
                at 1 and at 2 BLAS threads, the better reported (it is slower on 2 here)
Every contender runs at 1 and at 2 threads and counts with its better one (JSON: threads, and the rate at
each). Targets: numpy / torch >= 2.0 for rnn and >= 1.0 for gru and lstm, at both sizes. The machine's load
average is printed before and after: other jobs on the cores skew every number (multi-threaded BLAS and
torch most), so compare ratios from quiet runs.

torch is optional and never a project dependency. On this machine its CPU wheel lies in /opt/wheels:
  uv run --with /opt/wheels/torch-2.13.0+cpu-cp311-cp311-manylinux_2_28_x86_64.whl \
      python bench/train_speed.py
(or `uv pip install <that wheel>` into .venv; note that `uv sync` removes it again).
Without torch the torch columns are null.

  uv run python bench/train_speed.py [--quick] [--cells rnn,gru,lstm]
The last line is one JSON object.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
from collections.abc import Callable

import common
import numpy as np

from model import cell, net, optim
from model.train import Streams

CONFIGS = [(32, 64, 256), (64, 128, 512)]  # (B, T, H)
TARGETS = {"rnn": 2.0, "gru": 1.0, "lstm": 1.0}  # numpy / torch
THREADS = (1, 2)  # every contender runs at each, the better counts


def numpy_step(ids: np.ndarray, V: int, B: int, T: int, H: int, kind: str) -> Callable[[], int]:
    """One training step of model.net per call, over consecutive batches of the corpus."""
    cfg = net.ModelConfig(vocab_size=V, cell=kind, hidden=H, layers=1, dropout=0.0)  # as torch: one layer
    p = net.init(cfg, np.random.default_rng(0))
    opt = optim.make("adam", p)
    streams = Streams(ids, B, T)
    state = {"s": net.zeros_state(cfg, B), "pos": 0}

    def step() -> int:
        x, y, state["pos"] = streams.get(state["pos"])
        _, grads, state["s"] = net.grads(p, cfg, x, y, state["s"])
        optim.clip_(grads, 1.0)
        opt.step(p, grads, 1e-3)
        return B * T

    return step


class SeedRNN:
    """The seed notebook's RNN, verbatim in substance: column vectors, dicts of per-step arrays."""

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
    """One notebook 'epoch' over the next T characters per call (batch 1)."""
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


def torch_step(torch, ids: np.ndarray, V: int, B: int, T: int, H: int, kind: str) -> Callable[[], int]:
    """One PyTorch training step of the same cell per call, on the same batches as numpy_step."""
    torch.manual_seed(0)
    layer = {"rnn": torch.nn.RNN, "gru": torch.nn.GRU, "lstm": torch.nn.LSTM}[kind](H, H)
    emb, out = torch.nn.Embedding(V, H), torch.nn.Linear(H, V)
    params = [*emb.parameters(), *layer.parameters(), *out.parameters()]
    opt = torch.optim.Adam(params, lr=1e-3)
    streams = Streams(ids, B, T)
    h0 = torch.zeros(1, B, H)
    state = {"s": (h0, h0.clone()) if kind == "lstm" else h0, "pos": 0}

    def step() -> int:
        x, y, state["pos"] = streams.get(state["pos"])
        x, y = torch.from_numpy(x.T.astype(np.int64)), torch.from_numpy(y.T.astype(np.int64))  # (T, B)
        hs, sT = layer(emb(x), state["s"])  # (T, B, H)
        loss = torch.nn.functional.cross_entropy(out(hs).reshape(-1, V), y.reshape(-1))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        state["s"] = tuple(s.detach() for s in sT) if kind == "lstm" else sT.detach()
        return B * T

    return step


def on_threads(step: Callable[[], int], n: int, torch=None) -> Callable[[], int]:
    """`step` run on `n` threads: torch's when `torch` is given, else numpy's BLAS threads."""

    def run() -> int:
        if torch is not None:
            torch.set_num_threads(n)
            return step()
        with cell.blas_limit(n):  # threadpoolctl's own limit costs ~0.2 ms a call: not the step's time
            return step()

    return run


def measure(ids: np.ndarray, V: int, size: tuple[int, int, int], kinds: list[str], torch, timing) -> dict:
    """One row: every contender at one (B, T, H), alternated; medians, threads, ratios."""
    B, T, H = size
    steps = {}
    for n in THREADS:
        steps[f"seed {n}"] = on_threads(seed_step(ids, V, T, H), n)
        for k in kinds:
            steps[f"numpy {k} {n}"] = on_threads(numpy_step(ids, V, B, T, H, k), n)
            if torch is not None:
                steps[f"torch {k} {n}"] = on_threads(torch_step(torch, ids, V, B, T, H, k), n, torch)
    for s in steps.values():  # warm-up: allocations, first-call overheads
        s()
    rates = common.alternate(steps, *timing)
    med = {k: common.median(v) for k, v in rates.items()}

    def best(name: str) -> dict:
        at = {n: round(med[f"{name} {n}"]) for n in THREADS}
        n = max(at, key=at.__getitem__)
        return {"rate": at[n], "threads": n, "at": at}

    row: dict = {"B": B, "T": T, "H": H, "seed_loop": best("seed")}
    for k in kinds:
        r: dict = {"numpy": best(f"numpy {k}")}
        with cell.blas_limit(r["numpy"]["threads"]):  # at 2: did the halves of the batch run side by side?
            r["numpy"]["halves"] = len(cell.halves(B, H)) == 2
        if torch is not None:
            r["torch"] = best(f"torch {k}")
            r["vs_torch"] = round(r["numpy"]["rate"] / r["torch"]["rate"], 2)
            r["target"] = TARGETS[k]
            r["met"] = r["vs_torch"] >= TARGETS[k]
        row[k] = r
    if "rnn" in kinds:
        row["rnn_vs_seed"] = round(row["rnn"]["numpy"]["rate"] / row["seed_loop"]["rate"], 1)
    row["spread"] = {k: [round(min(v)), round(max(v))] for k, v in rates.items()}
    return row


def table(rows: list[dict], kinds: list[str]) -> None:
    """Rates in characters/s with the thread count each contender ran best at."""
    head = f"{'B':>4} {'T':>4} {'H':>4} {'cell':>5}"
    print(f"\n{head} | {'numpy':>9} {'thr':>3} {'torch':>9} {'thr':>3} | vs torch")
    for r in rows:
        for k in kinds:
            c, size = r[k], f"{r['B']:>4} {r['T']:>4} {r['H']:>4} {k:>5}"
            line = f"{size} | {c['numpy']['rate']:>9,} {c['numpy']['threads']:>3} "
            if "torch" in c:
                met = "met" if c["met"] else "NOT MET"
                line += f"{c['torch']['rate']:>9,} {c['torch']['threads']:>3} | {c['vs_torch']:>8.2f}"
                line += f" (target {c['target']:g}: {met})"
            print(line)
        seed = r["seed_loop"]
        at = ", ".join(f"{v:,} on {n}" for n, v in seed["at"].items())
        vs = f"; numpy rnn / seed loop = {r['rnn_vs_seed']}" if "rnn_vs_seed" in r else ""
        print(f"{'':>14}   seed loop (chars/s on BLAS threads): {at}{vs}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="a short run (a few minutes)")
    ap.add_argument("--cells", default="rnn,gru,lstm", help="comma-separated cells to measure")
    args = ap.parse_args()
    timing = (5, 0.3) if args.quick else (9, 1.0)  # rounds, seconds per contender per round
    kinds = args.cells.split(",")
    load_before = os.getloadavg()
    try:
        import torch
    except ImportError:
        torch = None
        print("torch is not installed: its columns are null (see this script's docstring to add it)")
    ids, vocab = common.load_ids()
    machine = f"{platform.machine()}, {os.cpu_count()} cpus"
    print(f"tiny shakespeare: {len(ids):,} chars, vocab {len(vocab)}; {machine}")
    print(f"numpy BLAS {common.blas_name()}, {common.blas_threads()} threads by default")
    print(f"torch {torch.__version__ if torch else None}")
    print(f"{timing[0]} alternated rounds of {timing[1]:g} s per contender and size; medians in characters/s")
    print(f"load average before: {' '.join(f'{x:.2f}' for x in load_before)}", flush=True)
    rows = [measure(ids, len(vocab), size, kinds, torch, timing) for size in CONFIGS]
    load_after = os.getloadavg()
    table(rows, kinds)
    print(f"load average after: {' '.join(f'{x:.2f}' for x in load_after)}")
    result = {
        "configs": rows,
        "numpy_blas_threads": common.blas_threads(),
        "blas": common.blas_name(),
        "torch_version": torch and torch.__version__,
        "rounds": timing[0],
        "seconds_per_round": timing[1],
        "quick": args.quick,
        "load_avg_before": [round(x, 2) for x in load_before],
        "load_avg_after": [round(x, 2) for x in load_after],
        "machine": machine,
    }
    print(json.dumps(result))


if __name__ == "__main__":
    main()
