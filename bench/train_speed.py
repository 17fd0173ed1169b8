"""Training throughput (characters/s: forward + backward + clipping + optimizer update) of every cell on tiny
shakespeare, against PyTorch's same cell, with the measurement's noise stated and a row per CPU kernel family.

Contenders, alternated round by round in one process, at each (B, T, H):
  numpy <cell>  model.net with the cell (rnn, gru, lstm), one layer, no dropout (as torch's), float32,
                Adam and global-norm clipping, as `char-rnn train` runs it (`net.grads`; at 2 threads the
                batch's halves may run side by side, model.runtime.halves: JSON numpy.halves, the second
                in a process of its own, model/twin.py, as model.train runs them)
  torch <cell>  PyTorch CPU nn.Embedding + nn.RNN(tanh) / nn.GRU / nn.LSTM + nn.Linear, Adam,
                clip_grad_norm_
  seed loop     the original notebook's RNN (seed_rnn.py): batch 1, float64; the baseline the project
                grew from
Each runs at 1 and at 2 threads (numpy's BLAS threads, torch.set_num_threads) and counts at its better one, by
median over the rounds.

The noise, stated: every round gives both contenders of a cell the same machine, so each round has its own
ratio numpy / torch. The ratio reported is the ratio of the medians, with a 95% bootstrap interval (rounds
resampled in pairs) and the band of the per-round ratios. A target is "met" when the whole interval is at or
above it and "not met" when all of it is below; while a ratio is neither, its cell runs more rounds, up to a
cap, after which it stays "undecided". "Moved most" names the contender whose per-round rates spread more
(half their range, in % of their median): the one that made the ratio noisy.

Kernel families: the run measures the kernels this machine picks, then re-runs itself in a subprocess per
`--cores` family it forces: OpenBLAS's core type (OPENBLAS_CORETYPE) for numpy and, for an AVX2 family,
torch's ATen, MKL and oneDNN held to AVX2 as well; so each claim says which CPUs it holds on (the caches and
clock stay this machine's).

Targets (numpy / torch, each at its better thread count): rnn >= 2.0, gru >= 1.3, lstm >= 1.0, at both sizes.

torch is optional and never a project dependency: run with its CPU wheel beside the project's environment,
  uv run --no-sync --with /opt/wheels/torch-2.13.0+cpu-cp311-cp311-manylinux_2_28_x86_64.whl \\
      python bench/train_speed.py [--quick] [--cells rnn,gru,lstm] [--cores Haswell] [--no-record]
Without torch, the numpy and seed-loop rates alone. The run writes its section of docs/benchmarks.md (unless
--no-record); the last line printed is one JSON object.
"""

from __future__ import annotations

import argparse
import atexit
import json
import os
import subprocess
import sys
from collections.abc import Callable

import common
import numpy as np
from seed_rnn import seed_step

from model import net, optim, runtime, twin
from model.config import ModelConfig
from model.train import Streams

CONFIGS = [(32, 64, 256), (64, 128, 512)]  # (B, T, H)
TARGETS = {"rnn": 2.0, "gru": 1.3, "lstm": 1.0}  # numpy / torch
THREADS = (1, 2)  # every contender runs at each, the better counts
# OpenBLAS core types this bench can force, and the instruction set torch is held to beside each
FAMILIES = {"haswell": "AVX2", "zen": "AVX2", "skylakex": "AVX512", "cooperlake": "AVX512"}
TORCH_AVX2 = {"ATEN_CPU_CAPABILITY": "avx2", "MKL_ENABLE_INSTRUCTIONS": "AVX2", "ONEDNN_MAX_CPU_ISA": "AVX2"}
FORCED = {"OPENBLAS_CORETYPE", *TORCH_AVX2}
RESAMPLES = 2000  # bootstrap resamples of the rounds


def numpy_step(
    ids: np.ndarray, V: int, B: int, T: int, H: int, kind: str, processes: bool = True
) -> Callable[[], int]:
    """One training step of model.net per call, over consecutive batches of the corpus; with `processes`,
    the halves (when they run side by side) in two processes as model.train runs them (model/twin.py, its
    child stopped at exit), else on two threads."""
    cfg = ModelConfig(vocab_size=V, cell=kind, hidden=H, layers=1, dropout=0.0)  # as torch: one layer
    tw = twin.start(cfg, B, T) if processes else None
    if tw:
        atexit.register(tw.close)
    p = net.init(cfg, np.random.default_rng(0))
    opt = optim.make("adam", p)
    streams = Streams(ids, B, T)
    state = {"s": net.zeros_state(cfg, B), "pos": 0}

    def step() -> int:
        x, y, state["pos"] = streams.get(state["pos"])
        _, grads, state["s"] = net.grads(p, cfg, x, y, state["s"], twin=tw)
        optim.clip_(grads, 1.0)
        opt.step(p, grads, 1e-3)
        return B * T

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
    """`step` run on `n` threads: torch's when `torch` is given, else numpy's BLAS threads (set with the
    model's own cheap call, so that setting them is not charged to numpy's step)."""

    def run() -> int:
        if torch is not None:
            torch.set_num_threads(n)
            return step()
        with runtime.blas_limit(n):
            return step()

    return run


def contenders(ids: np.ndarray, V: int, size: tuple, kinds: list[str], torch) -> dict[str, Callable]:
    """Every contender at one (B, T, H), named "<who> [<cell>] <threads>", each run once (allocations, first
    calls)."""
    B, T, H = size
    steps = {}
    for n in THREADS:
        steps[f"seed {n}"] = on_threads(seed_step(ids, V, T, H), n)
        for k in kinds:
            steps[f"numpy {k} {n}"] = on_threads(numpy_step(ids, V, B, T, H, k), n)
            if torch is not None:
                steps[f"torch {k} {n}"] = on_threads(torch_step(torch, ids, V, B, T, H, k), n, torch)
    for s in steps.values():
        s()
    return steps


def best(rates: dict[str, list[float]], who: str) -> dict:
    """A contender at its better thread count (by median): its rate, threads, rates at each, and spread."""
    at = {n: common.median(rates[f"{who} {n}"]) for n in THREADS}
    n = max(at, key=at.__getitem__)
    xs = rates[f"{who} {n}"]
    spread = 50 * (max(xs) - min(xs)) / at[n]
    return {
        "rate": round(at[n]),
        "threads": n,
        "at": {str(k): round(v) for k, v in at.items()},
        "spread_pct": round(spread, 1),
    }


def compare(rates: dict[str, list[float]], kind: str) -> dict:
    """numpy / torch for one cell: the ratio of medians, its bootstrap interval, the per-round band, the
    verdict against the target and which contender moved most."""
    mine, theirs = best(rates, f"numpy {kind}"), best(rates, f"torch {kind}")
    a = np.array(rates[f"numpy {kind} {mine['threads']}"])
    b = np.array(rates[f"torch {kind} {theirs['threads']}"])
    idx = np.random.default_rng(0).integers(0, len(a), (RESAMPLES, len(a)))
    lo, hi = np.percentile(np.median(a[idx], axis=1) / np.median(b[idx], axis=1), [2.5, 97.5])
    target = TARGETS[kind]
    verdict = "met" if lo >= target else "not met" if hi < target else "undecided"
    moved = "numpy" if mine["spread_pct"] > theirs["spread_pct"] else "torch"
    return {
        "vs_torch": round(mine["rate"] / theirs["rate"], 2),
        "interval": [round(float(lo), 2), round(float(hi), 2)],
        "band": [round(float(min(a / b)), 2), round(float(max(a / b)), 2)],
        "rounds": len(a),
        "target": target,
        "verdict": verdict,
        "moved": moved,
    }


def more_rounds(steps: dict, rates: dict, kinds: list[str], timing: tuple) -> None:
    """More alternated rounds of the cells whose verdict is undecided, until each is decided or at the cap."""
    rounds, seconds, cap = timing
    while True:
        todo = {k for k in kinds if compare(rates, k)["verdict"] == "undecided"}
        todo = {k for k in todo if len(rates[f"numpy {k} 1"]) < cap}
        if not todo:
            return
        names = [name for name in steps if name.split()[1] in todo and name.split()[0] != "seed"]
        add = max(2, rounds // 2)
        print(
            f"  after {len(rates[names[0]])} rounds {', '.join(sorted(todo))} undecided: {add} more",
            flush=True,
        )
        more = common.alternate({n: steps[n] for n in names}, add, seconds)
        for name, xs in more.items():
            rates[name] += xs


def measure(ids: np.ndarray, V: int, size: tuple, kinds: list[str], torch, timing: tuple) -> dict:
    """One size: every contender alternated, more rounds while a verdict is open; rates and ratios."""
    B, T, H = size
    print(f"  (B, T, H) = {size}: {timing[0]} rounds of {timing[1]:g} s per contender", flush=True)
    steps = contenders(ids, V, size, kinds, torch)
    rates = common.alternate(steps, *timing[:2])
    if torch is not None:
        more_rounds(steps, rates, kinds, timing)
    row: dict = {"B": B, "T": T, "H": H, "seed_loop": best(rates, "seed")}
    for k in kinds:
        row[k] = {"numpy": best(rates, f"numpy {k}")}
        with runtime.blas_limit(row[k]["numpy"]["threads"]):  # at 2: did the batch's halves run side by side?
            row[k]["numpy"]["halves"] = len(runtime.halves(B, H)) == 2
        if torch is not None:
            row[k] |= {"torch": best(rates, f"torch {k}")} | compare(rates, k)
    if "rnn" in kinds:
        row["rnn_vs_seed"] = round(row["rnn"]["numpy"]["rate"] / row["seed_loop"]["rate"], 1)
    return row


def family(ids: np.ndarray, V: int, kinds: list[str], torch, timing: tuple, forced: bool) -> dict:
    """Every size on the kernels this process runs: OpenBLAS's core type, torch's instruction set."""
    kernels = common.blas_name()
    print(f"kernels: numpy {kernels}, torch {torch and torch.backends.cpu.get_cpu_capability()}", flush=True)
    return {
        "kernels": kernels,
        "forced": forced,
        "torch_isa": torch and torch.backends.cpu.get_cpu_capability(),
        "configs": [measure(ids, V, size, kinds, torch, timing) for size in CONFIGS],
    }


def forced(core: str, args: argparse.Namespace) -> dict | None:
    """The same measurement in a subprocess forced onto OpenBLAS's `core` kernels (torch's instruction set
    held to match); its output passed through, its JSON returned (None if it failed)."""
    env = os.environ | {"OPENBLAS_CORETYPE": core} | (TORCH_AVX2 if FAMILIES[core.lower()] == "AVX2" else {})
    cmd = [sys.executable, __file__, "--child", "--cells", args.cells] + ["--quick"] * args.quick
    print(f"\nre-running on {core} kernels: {' '.join(f'{k}={v}' for k, v in env.items() if k in FORCED)}")
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, text=True)
    last = ""
    for line in proc.stdout:
        if last:
            print(f"  [{core}] {last}", end="", flush=True)
        last = line
    if proc.wait() != 0:
        print(f"the {core} run failed (status {proc.returncode}): its rows are missing")
        return None
    return json.loads(last)


def cores(spec: str) -> list[str]:
    """The --cores names, checked: known families this CPU can run, not the one it runs already."""
    names = [c.strip() for c in spec.split(",") if c.strip()]
    for c in names:
        if c.lower() not in FAMILIES:
            known = ", ".join(sorted(FAMILIES))
            raise SystemExit(f"--cores {c}: not a kernel family this bench can force (choose from {known})")
    avx512 = "AVX-512" in common.machine()["cpu"]
    detected = common.blas_name().lower()
    return [
        c for c in names if (FAMILIES[c.lower()] == "AVX2" or avx512) and f"({c.lower()})" not in detected
    ]


def thr(c: dict) -> str:
    return f"{c['rate']:,} ({c['threads']})"


def tables(families: list[dict], kinds: list[str]) -> str:
    """The run as markdown: numpy against torch per kernel family, size and cell; then the seed loop."""
    head = [
        "kernels",
        "B, T, H",
        "cell",
        "numpy chars/s (threads)",
        "torch chars/s (threads)",
        "numpy / torch",
    ]
    head += ["95% interval", "per-round band", "rounds", "target", "verdict", "moved most (± % of median)"]
    rows, seed = [], []
    for f in families:
        name = f["kernels"].split("(")[-1].rstrip(")") + (" (forced)" if f["forced"] else " (detected)")
        for r in f["configs"]:
            size = f"{r['B']}, {r['T']}, {r['H']}"
            for k in kinds:
                c, cells = r[k], [name, size, k, thr(r[k]["numpy"])]
                if "torch" not in c:
                    rows.append(cells + ["no torch"] + [""] * 7)
                    continue
                spread = {who: c[who]["spread_pct"] for who in ("numpy", "torch")}
                moved = f"{c['moved']} ±{spread[c['moved']]:.0f}% (other ±{min(spread.values()):.0f}%)"
                cells += [thr(c["torch"]), f"**{c['vs_torch']:.2f}**", "{:.2f}–{:.2f}".format(*c["interval"])]
                cells += [
                    "{:.2f}–{:.2f}".format(*c["band"]),
                    c["rounds"],
                    f"{c['target']:g}",
                    c["verdict"],
                    moved,
                ]
                rows.append(cells)
            at = r["seed_loop"]["at"]
            seed.append([name, size, f"{at['1']:,}", f"{at['2']:,}", r.get("rnn_vs_seed", "")])
    seed_head = ["kernels", "B, T, H", "seed loop chars/s, 1 thread", "2 threads", "numpy rnn / seed loop"]
    return f"{common.markdown_table(head, rows)}\n\n{common.markdown_table(seed_head, seed)}\n"


NOTES = """A ratio is the ratio of the medians over the alternated rounds, each contender at its better thread
count; its interval is a 95% bootstrap over the rounds (resampled in pairs, both contenders of a round
together), the band the lowest and highest ratio of a single round. Verdict: "met" when the whole interval is
at or above the target, "not met" when all of it is below, "undecided" when the cap on rounds came first.
"Moved most": the contender whose per-round rates spread more. Forced rows ran in a subprocess with
OPENBLAS_CORETYPE set, and for AVX2 families torch held to AVX2 (ATEN_CPU_CAPABILITY, MKL_ENABLE_INSTRUCTIONS,
ONEDNN_MAX_CPU_ISA), on this machine's cores."""


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="shorter rounds, fewer of them (a few minutes)")
    ap.add_argument("--cells", default="rnn,gru,lstm", help="comma-separated cells to measure")
    ap.add_argument(
        "--cores", default="Haswell", help="kernel families to force too, comma-separated ('' none)"
    )
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)  # one family, JSON only
    common.add_record_flag(ap)
    args = ap.parse_args()
    run = common.begin("train_speed", "Training throughput against PyTorch (`bench/train_speed.py`)", args)
    timing = (5, 0.3, 15) if args.quick else (9, 1.0, 27)  # rounds, seconds per contender and round, cap
    kinds = [k for k in args.cells.split(",") if k]
    if unknown := set(kinds) - set(TARGETS):
        raise SystemExit(f"--cells: unknown cell(s) {', '.join(sorted(unknown))}; choose from rnn, gru, lstm")
    forcing = [] if args.child else cores(args.cores)
    try:
        import torch
    except ImportError:
        torch = None
        print("torch is not installed: numpy and the seed loop only (see this script's docstring to add it)")
    ids, vocab = common.load_ids()
    results = [family(ids, len(vocab), kinds, torch, timing, forced="OPENBLAS_CORETYPE" in os.environ)]
    if args.child:
        print(json.dumps(results[0]))
        return
    results += [r for r in (forced(c, args) for c in forcing) if r is not None]
    load_after = os.getloadavg()
    body = tables(results, kinds)
    print("\n" + body)
    run.facts["torch"] = (
        f"{torch.__version__} ({torch.backends.cpu.get_cpu_capability()})" if torch else "none"
    )
    run.facts["rounds"] = (
        "{} alternated rounds of {:g} s per contender, up to {} while a verdict is open".format(*timing)
    )
    common.record(run, body + "\n" + NOTES, load_after)
    summary = {"families": results, "rounds": timing[0], "seconds_per_round": timing[1], "cap": timing[2]}
    summary |= {"torch_version": torch and torch.__version__, "quick": args.quick, "targets": TARGETS}
    loads = [[round(x, 2) for x in xs] for xs in (run.load_before, load_after)]
    summary |= {"load_avg_before": loads[0], "load_avg_after": loads[1]}
    print(f"load average (1, 5, 15 min): {loads[0]} before, {loads[1]} after")
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
