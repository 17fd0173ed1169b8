"""The `char-rnn` command line: argument parsing only, over model/ (and flows/, registry, service)."""

from __future__ import annotations

import argparse
import importlib.util
import json
import logging
import math
import os
import sys
import typing
from datetime import datetime
from pathlib import Path

from pydantic import BaseModel, ValidationError

import settings
from model import checkpoint, corpus, net, sample, train
from model.checkpoint import CheckpointError
from model.corpus import CorpusError
from model.vocab import UnknownCharsError, Vocab

if typing.TYPE_CHECKING:
    from registry import Registry

ERRORS = (CheckpointError, CorpusError, UnknownCharsError, train.TrainingDiverged, ValueError, OSError)

MODEL_FLAGS = {
    "cell": "recurrent cell: rnn, gru or lstm",
    "hidden": "hidden size",
    "layers": "stacked layers",
    "dropout": "dropout between layers",
}
TRAIN_FLAGS = {
    "steps": "total optimizer steps (a resumed run continues up to this total)",
    "seed": "random seed",
    "batch": "parallel sequences per step (B)",
    "seq": "truncated BPTT length (T)",
    "lr": "peak learning rate",
    "clip": "global gradient-norm clip (0 = off)",
    "optimizer": "adam, adagrad or sgd",
    "checkpoint_every": "steps between checkpoints",
    "eval_every": "steps between validation passes",
}
PIPELINE_FLAGS = (
    "steps",
    "cell",
    "hidden",
    "layers",
    "dropout",
    "batch",
    "seq",
    "lr",
    "checkpoint_every",
    "seed",
)

SWEEP_FLAGS = {  # the flow's parameters besides data_dir and space; defaults are the flow's
    "trials": (int, "configurations drawn from the space"),
    "seed": (int, "draws the configurations; every trial's seed"),
    "steps": (int, "the budget per trial: the steps the winner trains (each earlier rung half the next)"),
    "minutes": (float, "wall minutes a trial may train in all"),
    "checkpoint_every": (int, "steps between a trial's checkpoints"),
    "dask_address": (str, "a running Dask scheduler, e.g. tcp://10.0.0.5:8786; else a local cluster"),
    "local_workers": (int, "worker processes of the local cluster; else one per core"),
    "halving": (bool, "train every trial for --steps (a plain random or grid search)"),
    "promote": (bool, "leave the winner unpromoted"),
}


def bar(fraction: float, width: int = 30) -> str:
    done = int(width * min(max(fraction, 0.0), 1.0))
    return f"[{'#' * done}{'.' * (width - done)}]"


class Bar:
    """A one-line terminal progress bar on stderr (silent when stderr is not a terminal)."""

    def __init__(self, enabled: bool):
        self.enabled = enabled
        self.last_val: float | None = None

    def __call__(self, p: train.Progress) -> None:
        if p.val_loss is not None:
            self.last_val = p.val_loss
        if not self.enabled:
            return
        sys.stderr.write(f"\r{bar(p.step / p.steps)} {p.summary(self.last_val)}")
        if p.step == p.steps:
            sys.stderr.write("\n")
        sys.stderr.flush()


class Parser(argparse.ArgumentParser):
    """argparse that states a malformed command line in one line (`--help` shows the usage)."""

    def error(self, message: str) -> typing.NoReturn:
        self.exit(2, f"{self.prog}: error: {message}\n")


def checkpoint_path(arg: str) -> Path:
    """A checkpoint directory or folder; a file inside one means its directory."""
    p = Path(arg)
    return p.parent if p.is_file() else p


def cmd_train(a: argparse.Namespace) -> None:
    c = corpus.read(a.data)
    for name, why in c.skipped.items():
        print(f"char-rnn: warning: skipped {name}: {why}", file=sys.stderr)
    vocab = Vocab.from_text(c.text)
    tr_text, va_text = c.split()
    tr, va = vocab.encode(tr_text), vocab.encode(va_text)
    if len(va) < 2:
        raise ValueError(f"{a.data}: too little text for a validation split ({len(c.text)} characters)")
    model_kw: dict = {"vocab_size": len(vocab)}
    train_kw: dict = {}
    if a.resume and checkpoint.step_dirs(a.out):  # unspecified settings come from the run being resumed
        meta = checkpoint.load(a.out, with_optim=False).meta
        model_kw = meta.model.model_dump() | model_kw
        train_kw = dict(meta.train)
    model_kw |= {k: getattr(a, k) for k in MODEL_FLAGS if getattr(a, k) is not None}
    train_kw |= {k: getattr(a, k) for k in TRAIN_FLAGS if getattr(a, k) is not None}
    mcfg, tcfg = net.ModelConfig(**model_kw), train.TrainConfig(**train_kw)
    print(
        f"training on {len(tr):,} chars ({len(vocab)} symbols), validating on {len(va):,}: "
        f"H={mcfg.hidden} L={mcfg.layers} B={tcfg.batch} T={tcfg.seq} steps={tcfg.steps}",
        file=sys.stderr,
    )
    ck = train.train(
        tr,
        va,
        vocab,
        mcfg,
        tcfg,
        Path(a.out),
        resume=a.resume,
        overwrite=a.overwrite,
        fingerprint=c.fingerprint,
        on_progress=Bar(sys.stderr.isatty()),
    )
    val = ck.meta.metrics.get("val_loss")
    print(f"step {ck.meta.step}: val {val:.4f} nats/char ({train.bits(val):.4f} bits/char) -> {ck.path}")


def cmd_sample(a: argparse.Namespace) -> None:
    ck = checkpoint.load(checkpoint_path(a.checkpoint), with_optim=False)
    rows = sample.Settings(a.temperature, a.top_k, a.top_p, a.seed)
    prompt = a.prompt.replace("\\n", "\n")
    (text,) = sample.sample(ck.params, ck.config, ck.vocab, [prompt], a.length, rows, a.unknown)
    sys.stdout.write(text + "\n")


def cmd_evaluate(a: argparse.Namespace) -> None:
    ck = checkpoint.load(checkpoint_path(a.checkpoint), with_optim=False)
    _, text = corpus.read(a.data).split()
    va = ck.vocab.encode(text, a.unknown)
    nats = train.evaluate(ck.params, ck.config, va)
    print(
        f"{ck.path}: validation ({len(va):,} chars) {nats:.4f} nats/char, {train.bits(nats):.4f} bits/char, "
        f"perplexity {math.exp(nats):.3f}"
    )


class Lines(logging.Handler):
    """This project's log messages as plain lines on stderr, without tracebacks and without Prefect's own
    engine messages; errors are left to main(), which says them once, in one line."""

    def emit(self, record: logging.LogRecord) -> None:
        if record.levelno < logging.ERROR and not record.pathname.startswith(PREFECT_DIR):
            level = "warning: " if record.levelno >= logging.WARNING else ""
            print(f"char-rnn: {level}{record.getMessage()}", file=sys.stderr)


PREFECT_DIR = str(Path(importlib.util.find_spec("prefect").origin).parent)
WARNINGS = Lines(logging.WARNING)  # refused checkpoints, damaged registry files


def cmd_pipeline(a: argparse.Namespace) -> None:
    os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "120")  # a busy box is slow
    os.environ.setdefault("PREFECT_LOGGING_HANDLERS_CONSOLE_LEVEL", "CRITICAL")  # Lines says what matters
    # the folder given on this command line may be read: the user who runs it chose it
    os.environ.update(
        settings.configure(allowed_roots=[*settings.load().allowed_roots, Path(a.data).absolute()])
    )
    from flows.params import checked  # Prefect reads its home when imported: only after configure
    from flows.pipeline import pipeline

    params = {"data_dir": a.data} | {k: getattr(a, k) for k in PIPELINE_FLAGS if getattr(a, k) is not None}
    params = checked(pipeline, params)  # before Prefect's temporary server starts
    corpus.read(params["data_dir"] or settings.current().data)  # unusable text: say so now, in one line
    lines = Lines(logging.INFO)
    loggers = [logging.getLogger(n) for n in ("prefect.flow_runs", "prefect.task_runs")]
    for lg in loggers:
        lg.addHandler(lines)
    try:
        d = pipeline(**params)
    finally:
        for lg in loggers:
            lg.removeHandler(lines)
    print(
        f"{'promoted' if d.promoted else 'kept'} {d.tag}: {d.reason}"
        + (f"\nrun: {d.run_dir}" if d.run_dir else "")
    )


def cmd_sweep(a: argparse.Namespace) -> None:
    """The char-rnn-sweep flow in-process (Prefect's temporary server); a line per trial as it finishes."""
    os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "120")
    os.environ.setdefault("PREFECT_LOGGING_HANDLERS_CONSOLE_LEVEL", "CRITICAL")
    roots = [*settings.load().allowed_roots, Path(a.data).absolute()]
    os.environ.update(settings.configure(allowed_roots=roots))
    given = {k: getattr(a, k) for k in SWEEP_FLAGS if getattr(a, k) is not None}
    if a.space is not None:
        try:
            given["space"] = json.loads(a.space)
        except json.JSONDecodeError as e:
            raise ValueError(f"--space is not JSON ({e}); e.g. --space '{{\"hidden\": [64, 128]}}'") from None
    from flows.params import checked  # Prefect reads its home when imported: only after configure
    from flows.sweep import design, reachable, sweep

    p = checked(sweep, {"data_dir": a.data} | given)
    design(p["space"], p["trials"], p["seed"], p["steps"], p["halving"])  # before Prefect starts
    if p["dask_address"]:
        reachable(p["dask_address"])
    from prefect.logging.handlers import APILogHandler
    from prefect.server.api.server import SubprocessASGIServer
    from prefect.settings import PREFECT_API_URL, get_current_settings, temporary_settings

    # Dask workers report to Prefect by address: without PREFECT_API_URL each would start its own server
    server = None if get_current_settings().api.url else SubprocessASGIServer()
    lines, flow_log = Lines(logging.INFO), logging.getLogger("prefect.flow_runs")
    flow_log.addHandler(lines)
    try:
        if server:
            server.start(timeout=120)
        with temporary_settings({PREFECT_API_URL: server.api_url} if server else {}):
            o = sweep(**p)
    finally:
        flow_log.removeHandler(lines)
        if server:
            APILogHandler().flush()  # the run's queued logs, while the server is still there
            server.stop()
    d = o.decision
    print(f"{'promoted' if d.promoted else 'kept'} {d.tag or 'no model'}: {d.reason}\nsweep: {o.dir}")


def cmd_serve(a: argparse.Namespace) -> None:
    """`bentoml serve` for service.py with this project's homes and settings (it replaces this process)."""
    cmd = [sys.executable, "-m", "bentoml", "serve", "service:CharRNN", "--working-dir", str(settings.ROOT)]
    os.execve(sys.executable, cmd + a.bentoml_args, os.environ.copy())


def local_time(iso: str) -> str:
    """An ISO time from the registry in this machine's time zone, to the second."""
    try:
        return datetime.fromisoformat(iso).astimezone().strftime("%Y-%m-%d %H:%M:%S")
    except ValueError:
        return iso or "?"


def registry() -> Registry:
    from registry import Registry  # imports BentoML: only after configure()

    return Registry(settings.current().bentoml_dir)


def full_tag(tag: str) -> str:
    """`char-rnn:VERSION`, given the tag or only its version."""
    return tag if ":" in tag else f"char-rnn:{tag}"


def cmd_models_list(a: argparse.Namespace) -> None:
    reg = registry()
    listed, cur = reg.models(), reg.current()
    if not listed:
        print(f"no promoted model under {reg.home} yet: `make run` or `char-rnn pipeline` trains one")
        return
    rows = [("", "TAG", "PROMOTED AT", "VAL LOSS", "PARENT", "FINGERPRINT")]
    for m in listed:
        val = m.labels.get("val_loss")
        rows.append(
            (
                "*" if cur and m.tag == cur.tag else "",
                m.tag,
                local_time(m.labels.get("promoted_at", m.entries[0].at)),
                f"{float(val):.4f}" if val else "?",
                m.labels.get("parent") or "-",
                m.labels.get("fingerprint", "")[:12] if m.labels else "(not in the store)",
            )
        )
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    for r in rows:
        print("  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip())
    serving = f"* serves (a running service switches within {settings.current().reload_interval:g} s)"
    print(serving if cur else "no model passes its checks: nothing serves")
    last = reg.history()[-1]
    if last.action == "rollback":
        print(f"rolled back to {last.tag} at {local_time(last.at)}: {last.reason}")


def cmd_models_show(a: argparse.Namespace) -> None:
    reg, tag = registry(), full_tag(a.tag)
    found = {m.tag: m for m in reg.models()}
    if tag not in found:
        raise ValueError(f"{tag} was never promoted; `char-rnn models list` shows the ones that were")
    ck, cur = reg.load(tag), reg.current()
    m, meta, labels = found[tag], ck.meta, found[tag].labels
    val = float(labels.get("val_loss") or meta.metrics.get("val_loss"))
    model = ", ".join(f"{k} {v}" for k, v in meta.model.model_dump().items())
    lines = {
        "serves": "yes (the current model)" if cur and cur.tag == tag else "no",
        "promoted at": local_time(labels.get("promoted_at", m.entries[0].at)),
        "val loss": f"{val:.4f} nats/char ({train.bits(val):.4f} bits/char) on the whole validation text",
        "parent": labels.get("parent") or "- (trained from scratch)",
        "fingerprint": labels.get("fingerprint", "?"),
        "corpus": f"{int(labels.get('corpus_chars', 0)):,} characters",
        "model": f"{model}; trained {meta.step} steps",
        "run": str(settings.current().runs_dir / labels.get("run_id", "?")),
        "files": str(ck.path),
    }
    print(tag)
    for k, v in lines.items():
        print(f"  {k:<12} {v}")
    print("  history")
    for e in m.entries:
        print(f"    {local_time(e.at)}  {e.action:<8}  {e.reason}")


def cmd_models_rollback(a: argparse.Namespace) -> None:
    reg = registry()
    before = reg.current()
    e = reg.rollback(full_tag(a.tag) if a.tag else None, a.reason)
    print(f"{e.tag} is the current model again{f' (instead of {before.tag})' if before else ''}: {e.reason}")
    print(
        f"A running service switches to it within {settings.current().reload_interval:g} s; the scheduled "
        "retrain compares new text against it (and does not retrain on the text the replaced model learnt)."
    )


def number(kind: type, lo: float, hi: float) -> typing.Callable[[str], float]:
    """An argparse type: a finite `kind` in [lo, hi]."""

    def parse(text: str) -> float:
        try:
            v = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a {kind.__name__} number, got {text!r}") from None
        if not math.isfinite(v):
            raise argparse.ArgumentTypeError(f"must be a finite number, got {text!r}")
        if not lo <= v <= hi:
            raise argparse.ArgumentTypeError(f"must be in [{lo:g}, {hi:g}], got {text!r}")
        return v

    return parse


def flag_type(model: type[BaseModel], name: str) -> dict:
    """argparse type (or choices) for the field `name` of `model`; pydantic checks the bounds later."""
    kind = model.model_fields[name].annotation
    if typing.get_origin(kind) is typing.Literal:
        return {"choices": typing.get_args(kind)}
    return {"type": kind if kind in (int, float) else str}


def parser() -> argparse.ArgumentParser:
    ap = Parser(prog="char-rnn", description="A character-level RNN in NumPy.")
    sub = ap.add_subparsers(dest="cmd", required=True, parser_class=Parser)
    configs = {k: net.ModelConfig for k in MODEL_FLAGS} | {k: train.TrainConfig for k in TRAIN_FLAGS}

    t = sub.add_parser("train", help="train a model on a text file or a folder of .txt files")
    t.add_argument("--data", required=True, help="a .txt file or a folder of .txt files")
    t.add_argument("--out", required=True, help="folder for the checkpoints")
    t.add_argument("--resume", action="store_true", help="continue from the newest good checkpoint in --out")
    t.add_argument("--overwrite", action="store_true", help="replace the checkpoints already in --out")
    for name, help_ in (MODEL_FLAGS | TRAIN_FLAGS).items():
        t.add_argument(f"--{name.replace('_', '-')}", help=help_, **flag_type(configs[name], name))
    t.set_defaults(fn=cmd_train)

    s = sub.add_parser("sample", help="generate text from a checkpoint")
    s.add_argument("--checkpoint", required=True, help="a checkpoint directory, or a folder of them")
    s.add_argument("--prompt", default="\n", help="text that primes the model (may be empty; \\n = newline)")
    s.add_argument("--length", type=number(int, 0, 10**7), default=300, help="characters to generate")
    s.add_argument("--temperature", type=number(float, 1e-3, 1e3), default=0.8)
    s.add_argument("--top-k", type=number(int, 0, 10**7), default=0, help="sample among the k most likely")
    s.add_argument("--top-p", type=number(float, 1e-9, 1), default=1.0, help="sample within this mass")
    s.add_argument("--seed", type=number(int, 0, 2**63 - 1), default=None, help="for reproducible output")
    s.add_argument("--unknown", choices=["error", "skip"], default="error", help="prompt chars not in vocab")
    s.set_defaults(fn=cmd_sample)

    e = sub.add_parser("evaluate", help="validation loss of a checkpoint on the last 10%% of each file")
    e.add_argument("--checkpoint", required=True)
    e.add_argument("--data", required=True)
    e.add_argument("--unknown", choices=["error", "skip"], default="error", help="chars not in vocab")
    e.set_defaults(fn=cmd_evaluate)

    p = sub.add_parser("pipeline", help="run the Prefect pipeline once, in-process (no server needed)")
    p.add_argument("--data", default="data", help="corpus folder (may be outside the allowed roots)")
    for name in PIPELINE_FLAGS:
        model = net.ModelConfig if name in MODEL_FLAGS else train.TrainConfig
        p.add_argument(f"--{name.replace('_', '-')}", help="(default: the flow's)", **flag_type(model, name))
    p.set_defaults(fn=cmd_pipeline)

    w = sub.add_parser("sweep", help="search settings on Dask (successive halving) and promote the best")
    w.add_argument("--data", default="data", help="corpus folder (may be outside the allowed roots)")
    w.add_argument(
        "--space", help='JSON: setting -> [values] or {"low", "high", "log"} (default: the flow\'s)'
    )
    for name, (kind, help_) in SWEEP_FLAGS.items():
        if kind is bool:
            w.add_argument(f"--no-{name}", dest=name, action="store_false", default=None, help=help_)
        else:
            w.add_argument(f"--{name.replace('_', '-')}", type=kind, help=help_)
    w.set_defaults(fn=cmd_sweep)

    v = sub.add_parser(
        "serve",
        help="serve the promoted model over HTTP (bentoml serve, this project's homes)",
        epilog="Other options (e.g. --port 3001) are passed to `bentoml serve`.",
    )
    v.set_defaults(fn=cmd_serve)

    m = sub.add_parser("models", help="the promoted models: list, show, roll back")
    msub = m.add_subparsers(dest="models_cmd", required=True, parser_class=Parser)
    ml = msub.add_parser("list", help="every promoted model, and which one serves")
    ml.set_defaults(fn=cmd_models_list)
    ms = msub.add_parser("show", help="one promoted model in full, with its history")
    ms.add_argument("tag", help="char-rnn:VERSION, or VERSION")
    ms.set_defaults(fn=cmd_models_show)
    mr = msub.add_parser("rollback", help="make an earlier promoted model current again")
    mr.add_argument("tag", nargs="?", help="the model to make current (default: the one promoted before it)")
    mr.add_argument("--reason", default="", help="recorded in the history (e.g. what was wrong)")
    mr.set_defaults(fn=cmd_models_rollback)
    return ap


def one_line(e: Exception) -> str:
    if isinstance(e, ValidationError):
        flag = lambda loc: "--" + ".".join(map(str, loc)).replace("_", "-")  # noqa: E731
        return "; ".join(f"{flag(x['loc'])}: {x['msg']}" for x in e.errors())
    return str(e)


def main(argv: list[str] | None = None) -> int:
    ap = parser()
    args, rest = ap.parse_known_args(argv)
    if rest and args.cmd != "serve":
        ap.error(f"unrecognized arguments: {' '.join(rest)}")
    args.bentoml_args = rest
    logging.getLogger("char_rnn").addHandler(WARNINGS)  # once: a logger holds a handler at most once
    try:
        os.environ.update(settings.configure())
        args.fn(args)
    except ERRORS as e:
        print(f"char-rnn: error: {one_line(e)}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("\nchar-rnn: interrupted; resume with --resume", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
