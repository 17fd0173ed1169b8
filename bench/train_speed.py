"""Training throughput (characters/s: forward + backward + clipping + optimizer update) on tiny shakespeare.

Contenders, alternated round by round in one process (medians reported):
  numpy      model.rnn (batched, time-major) + model.optim Adam + global-norm clipping; its T sequential
             (B, H) x (H, H) products run on one BLAS thread when small (cell.one_thread: B=32, H=256),
             everything else on all (JSON: numpy_step_threads)
  seed_loop  the original notebook's RNN: one-hot column vectors, a Python loop per character, plain SGD
             (no clipping, as in the notebook), float64, batch 1; same hidden size and sequence length
  torch      PyTorch CPU nn.Embedding + nn.RNN(tanh) + nn.Linear, Adam, clip_grad_norm_ (float32)

torch is optional and never a project dependency. On this machine its CPU wheel lies in /opt/wheels:
  uv run --with /opt/wheels/torch-2.13.0+cpu-cp311-cp311-manylinux_2_28_x86_64.whl \
      python bench/train_speed.py
(or `uv pip install <that wheel>` into .venv; note that `uv sync` removes it again).
Without torch the torch column is null.

  uv run python bench/train_speed.py [--quick] [--threads N]
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


def numpy_step(ids: np.ndarray, V: int, B: int, T: int, H: int) -> Callable[[], int]:
    """One training step of model.rnn per call, over consecutive batches of the corpus."""
    cfg = net.ModelConfig(vocab_size=V, hidden=H, layers=1, dropout=0.0)  # as torch: one layer
    p = net.init(cfg, np.random.default_rng(0))
    opt = optim.make("adam", p)
    streams = Streams(ids, B, T)
    state = {"h": net.zeros_state(cfg, B), "pos": 0}

    def step() -> int:
        x, y, state["pos"] = streams.get(state["pos"])
        _, cache, state["h"] = net.forward(p, cfg, x, y, state["h"])
        grads = net.backward(p, cfg, cache)
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
    net = SeedRNN(V, H, V)
    text = ids.tolist()
    state = {"h": np.zeros((H, 1)), "pos": 0}

    def step() -> int:
        pos = state["pos"]
        chunk = text[pos : pos + T + 1]
        inputs = [one_hot_encode(i, V) for i in chunk[:-1]]
        targets = chunk[1:]
        with np.errstate(all="ignore"):  # its plain SGD at lr 0.1 can overflow, as in the notebook
            *_, dU, dW, dV, db, dc, state["h"] = net.loss_and_gradients(inputs, targets, state["h"])
            net.update((dU, dW, dV, db, dc), learning_rate=0.1)
        state["pos"] = pos + T if pos + 2 * T + 1 < len(text) else 0
        return T

    return step


def torch_step(torch, ids: np.ndarray, V: int, B: int, T: int, H: int) -> Callable[[], int]:
    """One PyTorch nn.RNN training step per call, on the same batches as numpy_step."""
    torch.manual_seed(0)
    emb, net, out = torch.nn.Embedding(V, H), torch.nn.RNN(H, H), torch.nn.Linear(H, V)
    params = [*emb.parameters(), *net.parameters(), *out.parameters()]
    opt = torch.optim.Adam(params, lr=1e-3)
    streams = Streams(ids, B, T)
    state = {"h": torch.zeros(1, B, H), "pos": 0}

    def step() -> int:
        x, y, state["pos"] = streams.get(state["pos"])
        x, y = torch.from_numpy(x.T.astype(np.int64)), torch.from_numpy(y.T.astype(np.int64))  # (T, B)
        hs, hT = net(emb(x), state["h"])  # (T, B, H)
        loss = torch.nn.functional.cross_entropy(out(hs).reshape(-1, V), y.reshape(-1))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        state["h"] = hT.detach()
        return B * T

    return step


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="a short run (well under a minute)")
    ap.add_argument("--threads", type=int, default=0, help="BLAS (and torch) threads; 0 = leave as is")
    args = ap.parse_args()
    rounds, seconds = (5, 0.25) if args.quick else (9, 1.0)

    limiter = None
    if args.threads:
        from threadpoolctl import threadpool_limits

        limiter = threadpool_limits(args.threads, user_api="blas")
    threads = common.blas_threads()
    try:
        import torch

        torch.set_num_threads(threads)
        torch_info = {"version": torch.__version__, "threads": torch.get_num_threads()}
    except ImportError:
        torch = None
        torch_info = None
        print("torch is not installed: its column is null (see this script's docstring to add it)")

    ids, vocab = common.load_ids()
    V = len(vocab)
    print(f"tiny shakespeare: {len(ids):,} chars, vocab {V}")
    print(f"numpy BLAS {common.blas_name()}, {threads} threads")
    if torch_info:
        print(f"torch {torch_info['version']}, {torch_info['threads']} threads")
    print(f"{rounds} alternated rounds of {seconds:g} s per contender and config; medians in characters/s")
    rows = []
    for B, T, H in CONFIGS:
        steps = {"numpy": numpy_step(ids, V, B, T, H), "seed_loop": seed_step(ids, V, T, H)}
        if torch is not None:
            steps["torch"] = torch_step(torch, ids, V, B, T, H)
        for s in steps.values():  # warm-up: allocations, first-call overheads
            s()
        rates = common.alternate(steps, rounds, seconds)
        med = {k: common.median(v) for k, v in rates.items()}
        row = {"B": B, "T": T, "H": H, "numpy": round(med["numpy"]), "seed_loop": round(med["seed_loop"])}
        row["torch"] = round(med["torch"]) if "torch" in med else None
        row["vs_seed"] = round(med["numpy"] / med["seed_loop"], 2)
        row["vs_torch"] = round(med["numpy"] / med["torch"], 2) if "torch" in med else None
        row["numpy_step_threads"] = 1 if 2 * B * H * H < cell.SMALL_FLOPS else threads
        row["spread"] = {k: [round(min(v)), round(max(v))] for k, v in rates.items()}
        rows.append(row)

    head = f"{'numpy':>9} {'seed_loop':>9} {'torch':>9} | {'vs_seed':>7} {'vs_torch':>8}"
    print(f"\n{'B':>4} {'T':>4} {'H':>4} | {head}")
    for r in rows:
        tch = f"{r['torch']:>9,}" if r["torch"] is not None else f"{'null':>9}"
        vt = f"{r['vs_torch']:>8.2f}" if r["vs_torch"] is not None else f"{'null':>8}"
        print(
            f"{r['B']:>4} {r['T']:>4} {r['H']:>4} | {r['numpy']:>9,} {r['seed_loop']:>9,} {tch} | "
            f"{r['vs_seed']:>7.1f} {vt}"
        )
    result = {
        "configs": rows,
        "blas_threads": threads,
        "threads": {
            "numpy": threads,
            "seed_loop": threads,
            "torch": torch_info["threads"] if torch_info else None,
        },
        "blas": common.blas_name(),
        "torch_version": torch_info["version"] if torch_info else None,
        "rounds": rounds,
        "seconds_per_round": seconds,
        "quick": args.quick,
        "machine": f"{platform.machine()}, {os.cpu_count()} cpus",
    }
    if limiter is not None:
        limiter.restore_original_limits()
    print(json.dumps(result))


if __name__ == "__main__":
    main()
