"""What the sweep gains on 2 Dask workers, and what Prefect + Dask cost per trial.

  uv run python bench/sweep_scaling.py [--steps 800] [--repeat 2] [--quick] [--no-record]

The same 4 trials (one shape, four learning rates, `--steps` each, one BLAS thread) run one after another
in-process (read, encode, train x 4, evaluate and sample the best: what the flow does), and through the
`char-rnn-sweep` flow without halving on 2 worker processes: a LocalCluster the flow starts, and a cluster
that is already running (the multi-machine shape). Contenders alternate, each run in a fresh CHAR_RNN_HOME;
the best of --repeat counts. Overhead per trial = (sweep - in-process / 2) / 4: what the flow adds beyond a
perfect split of the same work over 2 workers. Beside it: what they add over two plain `char-rnn train`
processes sharing the trials (what the machine's 2 cores give without Prefect or Dask). Targets: ratio >= 1.8,
overhead <= 2 s per trial. Runs against the server at PREFECT_API_URL, or starts one. The run writes its
section of docs/benchmarks.md (unless --no-record); the last line printed is JSON.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import shutil
import subprocess
import sys
import time
from pathlib import Path

import scratch

from settings import isolated_env

# a home of its own, before Prefect is imported (it reads PREFECT_HOME then)
os.environ.update(isolated_env(scratch.home("sweep-scaling-")) | {"OPENBLAS_NUM_THREADS": "1"})
os.environ.pop("CHAR_RNN_RUNS", None)

import common
import dask
from common import DATA, server
from distributed import LocalCluster
from prefect.logging.handlers import APILogHandler
from prefect.settings import PREFECT_API_URL, temporary_settings
from threadpoolctl import threadpool_limits

from flows.sweep import sweep
from model import corpus, train
from model.config import ModelConfig, TrainConfig
from model.sample import sample
from model.vocab import Vocab
from stages.scoring import PROMPTS, SAMPLE_CHARS, SAMPLING

WORK = Path(os.environ["CHAR_RNN_HOME"])
SHAPE = {"hidden": [128], "layers": [1], "dropout": [0.0], "batch": [32], "seq": [64]}
LRS = [1e-3, 2e-3, 3e-3, 5e-3]
# the command beside this interpreter (its venv's), whether or not the venv is on PATH
CHAR_RNN = shutil.which("char-rnn", path=str(Path(sys.executable).parent)) or "char-rnn"


def in_process(steps: int, home: Path) -> None:
    """The 4 trials one after another, with the flow's model work around them."""
    c = corpus.read(DATA)
    vocab = Vocab.from_text(c.text)
    tr, va = (vocab.encode(t) for t in c.split())
    model = ModelConfig(
        vocab_size=len(vocab), **{k: v[0] for k, v in SHAPE.items() if k in ModelConfig.model_fields}
    )
    fixed = {k: v[0] for k, v in SHAPE.items() if k in TrainConfig.model_fields}
    best = None
    with threadpool_limits(1):
        for lr in LRS:
            cfg = TrainConfig(steps=steps, seed=0, checkpoint_every=100, lr=lr, **fixed)
            ck = train.train(tr, va, vocab, model, cfg, home / f"lr-{lr}", fingerprint=c.fingerprint)
            if best is None or ck.meta.metrics["val_loss"] < best.meta.metrics["val_loss"]:
                best = ck
        train.evaluate(best.params, best.config, va)
        sample(best.params, best.config, vocab, PROMPTS, SAMPLE_CHARS, SAMPLING, unknown="skip")


def two_shells(steps: int, home: Path) -> None:
    """The machine's own parallelism, without Prefect or Dask: two `char-rnn train` processes at once, each
    training 2 of the trials one after another."""
    flags = [f"--{k}={v[0]}" for k, v in SHAPE.items()] + [f"--steps={steps}", "--checkpoint-every=100"]
    lanes = []
    for pair in (LRS[:2], LRS[2:]):
        runs = [
            [CHAR_RNN, "train", "--data", str(DATA), "--out", str(home / f"lr-{lr}"), f"--lr={lr}", *flags]
            for lr in pair
        ]
        script = " && ".join(map(shlex.join, runs))
        lanes.append(subprocess.Popen(["sh", "-c", script], stdout=subprocess.DEVNULL))
    assert [lane.wait() for lane in lanes] == [0, 0]


def through_sweep(steps: int, address: str | None) -> None:
    o = sweep(
        data_dir=DATA,
        space=SHAPE | {"lr": LRS},
        trials=4,
        steps=steps,
        checkpoint_every=100,
        halving=False,
        dask_address=address,
        local_workers=2,
        promote=False,
    )
    assert [t.last.step for t in o.trials] == [steps] * 4


def fresh(n: int) -> Path:
    """A new CHAR_RNN_HOME for the next run (nothing cached, nothing to resume)."""
    home = WORK / f"run-{n}"
    os.environ["CHAR_RNN_HOME"], os.environ["BENTOML_HOME"] = str(home), str(home / "bentoml")
    return home


def measure(steps: int, repeat: int) -> tuple[dict[str, float], list[float]]:
    """Best wall seconds of each contender, alternated; the 1-minute load average after each run."""
    load = [os.getloadavg()[0]]
    spill = {"temporary-directory": str(WORK / "dask")}
    with server() as url, temporary_settings({PREFECT_API_URL: url}), dask.config.set(spill):
        with LocalCluster(n_workers=2, threads_per_worker=1, local_directory=str(WORK / "dask")) as running:
            os.environ["CHAR_RNN_DASK_SCHEDULERS"] = running.scheduler_address  # ours: the flow may use it
            contenders = {
                "in-process": lambda home: in_process(steps, home),
                "2 processes": lambda home: two_shells(steps, home),
                "sweep, local cluster": lambda home: through_sweep(steps, None),
                "sweep, running cluster": lambda home: through_sweep(steps, running.scheduler_address),
            }
            through_sweep(100, running.scheduler_address)  # warm: imports in the workers, the API client
            best = dict.fromkeys(contenders, float("inf"))
            n, names = 0, list(contenders)
            for r in range(repeat):
                for name in names[r % len(names) :] + names[: r % len(names)]:
                    n += 1
                    t0 = time.perf_counter()
                    contenders[name](fresh(n))
                    best[name] = min(best[name], time.perf_counter() - t0)
                    load.append(os.getloadavg()[0])
        APILogHandler().flush()  # send the runs' queued logs before the server stops
    return best, load


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=800, help="steps per trial")
    parser.add_argument("--repeat", type=int, default=2, help="runs of each contender; the best counts")
    parser.add_argument("--quick", action="store_true", help="200 steps a trial, each contender once")
    common.add_record_flag(parser)
    args = parser.parse_args()
    if args.quick:
        args.steps, args.repeat = 200, 1
    run = common.begin("sweep_scaling", "The sweep on 2 Dask workers (`bench/sweep_scaling.py`)", args)
    best, load = measure(args.steps, args.repeat)
    base, raw = best.pop("in-process"), best.pop("2 processes")
    results = {}
    rows = [["in-process, one trial after another", f"{base:.1f}", "1.00", "", ""]]
    rows.append(
        ["2 `char-rnn train` processes at once (no Prefect, no Dask)", f"{raw:.1f}", f"{base / raw:.2f}"]
    )
    rows[-1] += ["", ""]
    for name, t in best.items():
        ratio, overhead, added = base / t, (t - base / 2) / 4, (t - raw) / 4
        ok = ratio >= 1.8 and overhead <= 2.0
        results[name] = {"seconds": t, "ratio": ratio, "overhead_per_trial_s": overhead, "ok": ok}
        results[name]["added_per_trial_over_2_processes_s"] = added
        rows.append(
            [
                name,
                f"{t:.1f}",
                f"**{ratio:.2f}**",
                f"{overhead:+.2f} ({added:+.2f})",
                "met" if ok else "not met",
            ]
        )
    head = [
        "contender",
        "seconds (best)",
        "in-process / it",
        "overhead s/trial (over 2 processes)",
        "verdict",
    ]
    body = common.markdown_table(head, rows)
    body += (
        f"\n\n4 trials of {args.steps} steps (H=128, B=32, T=64), one BLAS thread each. Overhead per trial ="
        " (contender - in-process / 2) / 4; in brackets, against the 2 plain processes. Targets: ratio ≥ 1.8,"
        f" overhead ≤ 2 s per trial. Load average (1 min) during the runs: {min(load):.2f}-{max(load):.2f}.\n"
    )
    print(body)
    run.facts["setup"] = f"best of {args.repeat}, contenders alternated, each in a fresh CHAR_RNN_HOME"
    common.record(run, body)
    summary = {"in_process_s": base, "two_processes_s": raw, "steps": args.steps, "load": load}
    print(json.dumps(summary | {"contenders": results}))


if __name__ == "__main__":
    main()
    shutil.rmtree(WORK, ignore_errors=True)  # kept when a run fails, for the server logs
