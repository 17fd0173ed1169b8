"""Corpora larger than memory: ingest + encode at growing sizes, training on a memory-mapped corpus, and (with
--big) the whole pipeline on several GB in several files.

Corpora are made from the bundled tiny shakespeare repeated to size (mostly ASCII), under a scratch folder.
Each ingest + encode runs in a fresh process, which reports its wall time and its peak resident memory
(VmHWM): this code's stages (streaming, memory-mapped output), and the main branch's before the streaming
(`--main REV`: its ingest and encode tasks called directly from a git worktree of REV) where it still fits in
memory. Training throughput compares the same model stepping over the memory-mapped 1 GB corpus and over tiny
shakespeare in memory, in alternated rounds. --big runs `pipeline(steps=200)` on 4 GB in four files, sampling
the resident memory of every process of it, then again with only_if_changed (the scheduled retrain's check).

Targets (issue 20): peak RSS <= 300 MB at 1 GB and 4 GB; >= 100 MB/s end to end at 1 GB; memory-mapped
training within 5% of in-memory; the 4 GB pipeline with no process over 1 GB, its unchanged check under 10 s.

  uv run python bench/corpus_scale.py [--sizes 10,100,1000] [--main 81eba92] [--big] [--no-record]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import common

from settings import ROOT, isolated_env

MB = 1 << 20
# One process's ingest + encode, printed as JSON: wall seconds and VmHWM (peak resident set) in bytes.
NEW = """
import json, sys, time
from pathlib import Path
from stages import data
t0 = time.perf_counter()
info = data.ingest(Path(sys.argv[1]), Path(sys.argv[2]) / "ingest")
encoded = data.encode(info, Path(sys.argv[2]))
seconds = time.perf_counter() - t0
hwm = next(int(l.split()[1]) * 1024 for l in open("/proc/self/status") if l.startswith("VmHWM"))
print(json.dumps({"seconds": seconds, "peak": hwm, "chars": info.chars, "dir": str(encoded.dir)}))
"""
MAIN = """
import json, os, sys, time
from pathlib import Path
import settings
os.environ.update(settings.configure())
from flows.tasks import encode, ingest
t0 = time.perf_counter()
info = ingest.fn(Path(sys.argv[1]))
encoded = encode.fn(Path(sys.argv[1]), info.fingerprint, Path(sys.argv[2]))
seconds = time.perf_counter() - t0
hwm = next(int(l.split()[1]) * 1024 for l in open("/proc/self/status") if l.startswith("VmHWM"))
print(json.dumps({"seconds": seconds, "peak": hwm, "chars": info.chars, "dir": str(encoded.dir)}))
"""


def make_corpus(folder: Path, megabytes: int, files: int = 1) -> Path:
    """`files` files of tiny shakespeare repeated to `megabytes` MB in all."""
    folder.mkdir(parents=True, exist_ok=True)
    text = common.DATA.read_bytes()
    each = megabytes * MB // files
    for i in range(files):
        with open(folder / f"part-{i:02d}.txt", "wb") as f:
            for _ in range(each // len(text)):
                f.write(text)
            f.write(text[: each % len(text)])
    return folder


def run_stage(code: str, cwd: Path, corpus: Path, out: Path, env: dict) -> dict:
    """One fresh process running `code` on `corpus`; its JSON report."""
    r = subprocess.run(
        [sys.executable, "-c", code, str(corpus), str(out)], cwd=cwd, env=env, capture_output=True, text=True
    )
    if r.returncode:
        raise RuntimeError(f"{cwd}: {r.stderr[-2000:]}")
    return json.loads(r.stdout.strip().splitlines()[-1])


def worktree(rev: str, scratch: Path) -> Path:
    """A checkout of `rev` (the code before the streaming) beside this one."""
    tree = scratch / f"main-{rev}"
    if not tree.exists():
        subprocess.run(
            ["git", "worktree", "add", "--detach", str(tree), rev], cwd=ROOT, check=True, capture_output=True
        )
    return tree


def ingest_encode(sizes: list[int], main: str | None, main_max: int, scratch: Path) -> list[list]:
    """Rows: size, which code, seconds, MB/s, peak RSS, bytes of RSS per character."""
    rows = []
    for size in sizes:
        corpus = make_corpus(scratch / f"corpus-{size}", size)
        runs = [("this code", ROOT, NEW)]
        if main and size <= main_max:
            runs.append((f"main {main}", worktree(main, scratch), MAIN))
        for name, cwd, code in runs:
            out = scratch / f"out-{size}-{name.split()[0]}"
            env = os.environ | isolated_env(scratch / f"home-{name.split()[0]}") | {"PYTHONPATH": str(cwd)}
            got = run_stage(code, cwd, corpus, out, env)
            shutil.rmtree(out, ignore_errors=True)
            mb = size * MB / 1e6
            rows.append(
                [
                    f"{size:,} MB",
                    name,
                    f"{got['seconds']:.1f}",
                    f"{mb / got['seconds']:.0f}",
                    f"{got['peak'] / MB:.0f} MB",
                    f"{got['peak'] / got['chars']:.2f}",
                ]
            )
            print(" | ".join(rows[-1]), flush=True)
        if size != max(sizes):
            shutil.rmtree(corpus)
    return rows


def training(corpus: Path, scratch: Path, rounds: int, seconds: float) -> list[list]:
    """The default model's training steps over the memory-mapped corpus and over tiny shakespeare in
    memory."""
    sys.path.insert(0, str(Path(__file__).parent))
    import train_speed

    from stages import data

    encoded = data.encode(data.ingest(corpus, scratch / "ingest"), scratch / "encoded")
    big = encoded.load("train")
    small, vocab = common.load_ids()
    assert list(vocab.chars) == encoded.vocab, "both corpora are tiny shakespeare's alphabet"
    contenders = {
        f"memory-mapped {big.nbytes / 1e9:.1f} GB (uint8)": train_speed.numpy_step(
            big, len(vocab), 32, 64, 256, "gru"
        ),
        "tiny shakespeare in memory (int32)": train_speed.numpy_step(small, len(vocab), 32, 64, 256, "gru"),
    }
    rates = common.alternate(contenders, rounds, seconds)
    base = common.median(rates["tiny shakespeare in memory (int32)"])
    return [[k, f"{common.median(v):,.0f}", f"{common.median(v) / base:.3f}"] for k, v in rates.items()]


def tree_rss(root: int) -> int:
    """The largest resident set among process `root` and its descendants now, in bytes."""
    parent, rss = {}, {}
    for pid in (int(p) for p in os.listdir("/proc") if p.isdigit()):
        try:
            parent[pid] = int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1])
            status = Path(f"/proc/{pid}/status").read_text().splitlines()
        except OSError:
            continue
        rss[pid] = next((int(x.split()[1]) * 1024 for x in status if x.startswith("VmRSS")), 0)
    tree, grew = {root}, True
    while grew:
        new = {p for p, pp in parent.items() if pp in tree} - tree
        tree, grew = tree | new, bool(new)
    return max((rss.get(p, 0) for p in tree), default=0)


PIPELINE = """
import os, sys, json, time
import settings
os.environ.update(settings.configure(allowed_roots=[sys.argv[1]]))
from flows.pipeline import pipeline
t0 = time.perf_counter()
d = pipeline(data_dir=sys.argv[1], steps=int(sys.argv[2]), only_if_changed=sys.argv[3] == "1")
print(json.dumps({"seconds": time.perf_counter() - t0, "promoted": d.promoted, "reason": d.reason}))
"""


def pipeline_runs(corpus: Path, scratch: Path, steps: int) -> list[list]:
    """The pipeline on `corpus`, then the scheduled retrain's check on the unchanged folder, against one
    Prefect server started for both (as flows.serve's runs have one): the process's and the flow's seconds,
    the largest resident set of any process of the run (sampled every 0.2 s), the decision."""
    env = os.environ | isolated_env(scratch / "home-pipeline") | {"OPENBLAS_NUM_THREADS": "1"}
    os.environ.update(env)  # this process starts the server: it keeps its state there too
    Path(env["PREFECT_HOME"]).mkdir(parents=True, exist_ok=True)  # where the server's database goes
    from flows.local import api_server

    with api_server() as url:
        return [*runs(corpus, steps, env | {"PREFECT_API_URL": url})]


def runs(corpus: Path, steps: int, env: dict) -> Iterator[list]:
    """The two runs, each in a process of its own."""
    rows = []
    for label, again in (("first run", "0"), ("unchanged check", "1")):
        t0 = time.perf_counter()
        p = subprocess.Popen(
            [sys.executable, "-c", PIPELINE, str(corpus), str(steps), again],
            cwd=ROOT,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        peak = 0
        while p.poll() is None:
            peak = max(peak, tree_rss(p.pid))
            time.sleep(0.2)
        out, err = p.communicate()
        if p.returncode:
            raise RuntimeError(err[-3000:])
        got = json.loads(out.strip().splitlines()[-1])
        wall, flow = f"{time.perf_counter() - t0:.1f}", f"{got['seconds']:.1f}"
        rows.append([label, wall, flow, f"{peak / MB:.0f} MB", got["reason"][:90]])
        print(" | ".join(rows[-1]), flush=True)
        yield rows[-1]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--sizes", default="10,100,1000", help="corpus sizes in MB for ingest + encode")
    ap.add_argument("--main", default="81eba92", help="the revision before the streaming ('' to skip)")
    ap.add_argument("--main-max", type=int, default=100, help="largest size (MB) to run main's code on")
    ap.add_argument("--big", action="store_true", help="also the pipeline on 4 GB in four files")
    ap.add_argument("--rounds", type=int, default=6, help="alternated training rounds")
    ap.add_argument("--scratch", type=Path, default=ROOT / ".char-rnn" / "bench-corpus")
    common.add_record_flag(ap)
    a = ap.parse_args()
    run = common.begin("corpus_scale", "Corpora larger than memory (`bench/corpus_scale.py`)", a)
    a.scratch.mkdir(parents=True, exist_ok=True)
    scratch = Path(tempfile.mkdtemp(dir=a.scratch))
    try:
        sizes = [int(s) for s in a.sizes.split(",")]
        rows = ingest_encode(sizes, a.main or None, a.main_max, scratch)
        body = "Ingest + encode, a fresh process each (peak RSS = VmHWM):\n\n" + common.markdown_table(
            ["corpus", "code", "seconds", "MB/s", "peak RSS", "RSS bytes per char"], rows
        )
        train_rows = training(scratch / f"corpus-{max(sizes)}", scratch, a.rounds, 1.0)
        body += (
            "\n\nTraining (GRU 1 x 256, B 32, T 64), alternated rounds, chars/s:\n\n"
            + common.markdown_table(["training ids", "chars/s (median)", "ratio"], train_rows)
        )
        if a.big:
            big = make_corpus(scratch / "corpus-4gb", 4096, files=4)
            body += "\n\nThe pipeline on 4 GB in four files (`steps=200`):\n\n" + common.markdown_table(
                ["run", "process seconds", "flow seconds", "largest process RSS", "decision"],
                pipeline_runs(big, scratch, 200),
            )
        print(body)
        common.record(run, body)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


if __name__ == "__main__":
    main()
