"""What Prefect adds: the pipeline flow's wall time against the same model/ functions called directly.

  uv run python bench/flow_overhead.py [--repeat 3] [--quick] [--no-record]

Runs against the server at PREFECT_API_URL, or starts one with `prefect server start` (temporary
PREFECT_HOME, free port) and stops it afterwards. Each contender runs in a fresh CHAR_RNN_HOME (no promoted
model, no cache), one BLAS thread, alternating, best of --repeat. Target: overhead <= max(10%, 5 s). The run
writes its section of docs/benchmarks.md (unless --no-record); the last line printed is JSON.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import time
from collections.abc import Callable
from pathlib import Path

import scratch

from settings import ROOT, isolated_env

# a home of its own, before Prefect is imported (it reads PREFECT_HOME then)
os.environ.update(isolated_env(scratch.home("flow-overhead-")) | {"OPENBLAS_NUM_THREADS": "1"})
os.environ.pop("CHAR_RNN_RUNS", None)

import common
from common import server
from prefect.logging.handlers import APILogHandler
from prefect.settings import PREFECT_API_URL, temporary_settings

from flows.pipeline import pipeline
from model import corpus, train
from model.config import ModelConfig, TrainConfig
from model.sample import sample
from model.vocab import Vocab
from stages.scoring import PROMPTS, SAMPLE_CHARS, SAMPLING

WORK = Path(os.environ["CHAR_RNN_HOME"])

CASES = {  # corpus, then flow parameters
    "smoke": (ROOT / "data" / "smoke" / "seed.txt", {"steps": 200, "hidden": 32, "batch": 2, "seq": 8}),
    "tinyshakespeare": (ROOT / "data" / "tinyshakespeare.txt", {"steps": 600, "hidden": 128}),
}
COMMON = {"lr": 3e-3, "checkpoint_every": 100, "seed": 0, "batch": 32, "seq": 64, "layers": 1}


def direct(data: Path, out: Path, p: dict) -> None:
    """The pipeline's model work without Prefect: read, encode, split, train, evaluate, sample."""
    c = corpus.read(data)
    vocab = Vocab.from_text(c.text)
    train_text, val_text = c.split()
    train_ids, val_ids = vocab.encode(train_text), vocab.encode(val_text)
    keys = ("steps", "batch", "seq", "lr", "checkpoint_every", "seed")
    cfg = TrainConfig(**{k: p[k] for k in keys})
    model = ModelConfig(vocab_size=len(vocab), hidden=p["hidden"], layers=p["layers"])
    ck = train.train(train_ids, val_ids, vocab, model, cfg, out / "checkpoints", fingerprint=c.fingerprint)
    train.evaluate(ck.params, ck.config, val_ids)
    sample(ck.params, ck.config, vocab, PROMPTS, SAMPLE_CHARS, SAMPLING, unknown="skip")


def through_prefect(data: Path, out: Path, p: dict) -> None:
    assert pipeline(data_dir=data, artifacts_root=out, **p).promoted


def timed(fn: Callable[[Path, Path, dict], None], data: Path, p: dict, n: int) -> float:
    """Wall seconds of `fn` in a fresh home (no promoted model, nothing cached)."""
    home = WORK / f"run-{n}"
    os.environ["CHAR_RNN_HOME"], os.environ["BENTOML_HOME"] = str(home), str(home / "bentoml")
    t0 = time.perf_counter()
    fn(data, home / "runs", p)
    return time.perf_counter() - t0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeat", type=int, default=3, help="runs of each contender; the best counts")
    parser.add_argument("--quick", action="store_true", help="each contender once (--repeat 1)")
    common.add_record_flag(parser)
    args = parser.parse_args()
    args.repeat = 1 if args.quick else args.repeat
    run = common.begin("flow_overhead", "What Prefect adds (`bench/flow_overhead.py`)", args)
    with server() as url, temporary_settings({PREFECT_API_URL: url}):
        data, params = CASES["smoke"]
        through_prefect(data, WORK / "warmup", COMMON | params)  # lazy imports, the API client
        results, n = {}, 0
        for name, (data, params) in CASES.items():
            p = COMMON | params
            best = {"direct": float("inf"), "prefect": float("inf")}
            for _ in range(args.repeat):
                for who, fn in (("direct", direct), ("prefect", through_prefect)):
                    n += 1
                    best[who] = min(best[who], timed(fn, data, p, n))
            extra = best["prefect"] - best["direct"]
            limit = max(0.10 * best["direct"], 5.0)
            results[name] = best | {"overhead_s": extra, "overhead_pct": 100 * extra / best["direct"]}
            results[name] |= {"limit_s": limit, "ok": extra <= limit}
        APILogHandler().flush()  # send the runs' queued logs before the server stops
    head = ["corpus", "direct s", "through Prefect s", "overhead", "limit: max(10%, 5 s)", "verdict"]
    rows = [
        [
            name,
            f"{r['direct']:.2f}",
            f"{r['prefect']:.2f}",
            f"{r['overhead_s']:+.2f} s ({r['overhead_pct']:+.0f}%)",
        ]
        + [f"{r['limit_s']:.2f} s", "met" if r["ok"] else "not met"]
        for name, r in results.items()
    ]
    body = common.markdown_table(head, rows)
    print(body)
    run.facts["setup"] = f"one BLAS thread, best of {args.repeat}, each run in a fresh CHAR_RNN_HOME"
    common.record(run, body)
    print(json.dumps({"cases": results, "ok": all(r["ok"] for r in results.values())}))


if __name__ == "__main__":
    main()
    shutil.rmtree(WORK, ignore_errors=True)  # kept when a run fails, for the server logs
