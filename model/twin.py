"""The batch's second half in a process of its own: training's two halves without one GIL between them.

`net.grads` runs a batch's two halves side by side (`runtime.halves`). On two threads, each half's loop takes
Python's GIL back after every small NumPy call, and often waits for it while the other half holds it: for a
small vanilla RNN that is about a fifth of the step (bench/halves_gil.py). A Twin is a child Python (this
module run with -m) that computes the second half's forward and backward while this process computes the
first. The two share one block of memory (a memfd: never a file on disk), laid out once per run (`Slab`):

    params                       written here before each step (the optimizer updates this process's copy)
    ids, targets, s0, masks      the second half's inputs, written here (a mask as soon as it is drawn)
    grads, state, loss           the second half's results, written by the child

and talk through the child's stdin and stdout, a byte at a time (no pickles):

    to the child:    g  a step's inputs are in place    m  the next layer's mask is    x  give the step up
    from the child:  r  ready (once)    d  done    e + 4-byte length + text  failed, and why

The child does the very arithmetic a thread would (the same code, BLAS on one thread), so the gradients are
the threads' bit for bit. It leaves when its stdin closes: it never outlives this process.
"""

from __future__ import annotations

import mmap
import os
import signal
import subprocess
import sys
import warnings
from collections.abc import Callable, Sequence
from concurrent.futures import Future, wait
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np

from model import net, runtime
from model.config import ModelConfig
from model.runtime import LINE, blas_limit, pool

ROOT = Path(__file__).resolve().parent.parent  # the folder that holds the `model` package
THREADS_ENV = ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS")


class TwinFailed(RuntimeError):
    """The child process failed a step or ended."""


def available() -> bool:
    """Whether this platform can share anonymous memory with a child (Linux's memfd)."""
    return hasattr(os, "memfd_create")


def wanted(cfg: ModelConfig, B: int) -> bool:
    """Whether a training run of `cfg` with batch `B` runs its halves in two processes: whenever it would run
    them on two threads (`runtime.halves`) and the platform allows it."""
    return available() and len(runtime.halves(B, cfg.hidden)) == 2


def start(cfg: ModelConfig, B: int, T: int) -> Twin | None:
    """A twin for a training run of `cfg` on batches of B x T when it is `wanted`, else None; None too, with a
    warning, when the child cannot start (the halves then run on threads, with the same numbers)."""
    if not wanted(cfg, B):
        return None
    try:
        return Twin(cfg, B, T)
    except (OSError, TwinFailed) as e:
        warnings.warn(f"the batch's halves run on threads: no process for the second ({e})", stacklevel=2)
        return None


class Slab:
    """Named arrays at fixed offsets in one buffer, each on a cache line (`runtime.LINE`); both processes
    build the same layout from (cfg, rows, T)."""

    def __init__(self, cfg: ModelConfig, rows: int, T: int):
        f, L, S, H = cfg.dtype, cfg.layers, net.CELLS[cfg.cell].states, cfg.hidden
        shapes = net.shapes(cfg)
        self.fields: dict[str, tuple[tuple[int, ...], str]] = {f"p.{k}": (s, f) for k, s in shapes.items()}
        self.fields |= {f"g.{k}": (s, f) for k, s in shapes.items()}
        self.fields |= {
            "ids": ((rows, T), "intp"),
            "targets": ((rows, T), "intp"),
            "s0": ((L, S, rows, H), f),
            "sT": ((L, S, rows, H), f),
            "loss": ((1,), "float64"),
        }
        if cfg.dropout > 0:
            self.fields["masks"] = ((L, T, rows, H), f)
        self.offsets, size = {}, 0
        for name, (shape, dtype) in self.fields.items():
            self.offsets[name] = size
            size += -(-int(np.prod(shape)) * np.dtype(dtype).itemsize // LINE) * LINE
        self.size = max(size, LINE)

    def views(self, buf: mmap.mmap) -> dict[str, np.ndarray]:
        return {
            name: np.ndarray(shape, dtype, buf, self.offsets[name])
            for name, (shape, dtype) in self.fields.items()
        }


class Twin:
    """A child process for the second half of every batch of (B, T) in one training run; a context manager
    (closing stops the child). `pair` runs one step's halves."""

    def __init__(self, cfg: ModelConfig, B: int, T: int):
        self.cfg, self.B, self.T = cfg, B, T
        rows = B - B // 2  # the second half's, as runtime.halves splits a batch
        self.slab = Slab(cfg, rows, T)
        fd = os.memfd_create("char-rnn-twin")
        try:
            os.ftruncate(fd, self.slab.size)
            self.buf = mmap.mmap(fd, self.slab.size)
            env = os.environ | {k: "1" for k in THREADS_ENV}
            # ROOT as the working folder: -m puts it first on sys.path, so no `model` folder where this
            # process runs can stand in for ours; and on PYTHONPATH, for when -m does not (PYTHONSAFEPATH)
            env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
            args = [str(fd), cfg.model_dump_json(), str(rows), str(T)]
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "model.twin", *args],
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                pass_fds=(fd,),
                env=env,
                cwd=ROOT,
            )
        finally:
            os.close(fd)  # the mapping and the child keep the memory
        self.a = self.slab.views(self.buf)
        self.reply()  # ready

    def __enter__(self) -> Twin:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        """Stop the child (it leaves when its stdin closes; killed if it has not within a few seconds)."""
        try:
            self.proc.stdin.close()
        except OSError:  # it had gone already
            pass
        try:
            self.proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        self.proc.stdout.close()

    def send(self, code: bytes) -> None:
        try:
            self.proc.stdin.write(code)
            self.proc.stdin.flush()
        except OSError as e:
            raise TwinFailed(f"the second half's process ended (exit code {self.proc.poll()})") from e

    def reply(self) -> None:
        """The child's answer to the last request: returns on ready or done, raises TwinFailed else."""
        code = self.proc.stdout.read(1)
        if code in (b"r", b"d"):
            return
        if code == b"e":
            n = int.from_bytes(self.proc.stdout.read(4), "little")
            raise TwinFailed(f"the second half failed: {self.proc.stdout.read(n).decode(errors='replace')}")
        self.proc.wait()
        raise TwinFailed(f"the second half's process ended (exit code {self.proc.returncode})")

    def pair(
        self,
        run: Callable[[slice], Any],
        halves: list[slice],
        p: net.Params,
        ids: np.ndarray,
        targets: np.ndarray,
        s0: np.ndarray,
        drops: net.Drops | None,
    ) -> list[Any]:
        """run(the first of `halves`) here and the same for the second in the child: [this half's (loss,
        grads, state), the child's]; the child's arrays are views of the shared memory, valid until the next
        step. The dropout masks are drawn here, each layer's sent as soon as it is drawn, while the halves
        run."""
        (r1, r2), a = halves, self.a
        for k, v in p.items():
            a[f"p.{k}"][...] = v
        a["ids"][...], a["targets"][...], a["s0"][...] = ids[r2], targets[r2], s0[:, :, r2]
        self.send(b"g")
        sent = 0

        def mask(l: int, m: np.ndarray) -> None:
            nonlocal sent
            a["masks"][l] = m[:, r2]
            self.send(b"m")
            sent += 1

        try:
            with blas_limit(1):
                if drops is None:
                    mine = run(r1)
                else:
                    own: Future = pool().submit(run, r1)
                    try:
                        drops.draw(mask)
                    except BaseException:
                        wait([own])  # never leave while it runs; the drawing's error is the one to tell
                        raise
                    mine = own.result()
        except BaseException:
            self.give_up(drops is not None and sent < self.cfg.layers)
            raise
        self.reply()
        grads = {k: a[f"g.{k}"] for k in p}
        return [mine, (float(a["loss"][0]), grads, a["sT"])]

    def give_up(self, waits: bool) -> None:
        """After this half failed: tell the child when it `waits` for a mask that will not come, and read its
        answer, whatever it is (the error to tell is this half's)."""
        try:
            if waits:
                self.send(b"x")
            self.reply()
        except TwinFailed:
            pass


class Arrived(Sequence):
    """In the child: the masks of its rows, layer by layer, each once the parent says it is in place."""

    def __init__(self, masks: np.ndarray, stdin: BinaryIO):
        self.masks, self.stdin, self.got = masks, stdin, 0

    def __len__(self) -> int:
        return len(self.masks)

    def __getitem__(self, l):  # type: ignore[override]
        while self.got <= l:
            if self.stdin.read(1) != b"m":
                self.got = -1  # given up: no more bytes come for this step
                raise TwinFailed("the parent gave the step up")
            self.got += 1
        return self.masks[l]

    def drain(self, layers: int) -> bool:
        """Read the mask notices of this step not read yet (a step that failed early), so that the next byte
        is the next request's; False when stdin closed."""
        while 0 <= self.got < layers:
            code = self.stdin.read(1)
            if code == b"x":
                return True
            if code != b"m":
                return False
            self.got += 1
        return True


def child(fd: int, cfg: ModelConfig, rows: int, T: int) -> None:
    """The child's loop: a step per `g`, until stdin closes."""
    stdin, stdout = sys.stdin.buffer, os.fdopen(os.dup(1), "wb", buffering=0)
    os.dup2(2, 1)  # anything printed goes to stderr: stdout carries the replies only
    slab = Slab(cfg, rows, T)
    a = slab.views(mmap.mmap(fd, slab.size))
    names = list(net.shapes(cfg))
    p = {k: a[f"p.{k}"] for k in names}
    stdout.write(b"r")
    while stdin.read(1) == b"g":
        masks = Arrived(a["masks"], stdin) if cfg.dropout > 0 else None
        try:
            loss, cache, sT = net.forward(p, cfg, a["ids"], a["targets"], a["s0"], masks=masks)
            g = net.backward(p, cfg, cache)
            for k in names:
                a[f"g.{k}"][...] = g[k]
            a["sT"][...], a["loss"][0] = sT, loss
            reply = b"d"
        except Exception as e:  # told to the parent, which raises it; the child stays for the next step
            text = f"{type(e).__name__}: {e}".encode()
            reply = b"e" + len(text).to_bytes(4, "little") + text
        if masks is not None and not masks.drain(cfg.layers):
            return
        stdout.write(reply)


if __name__ == "__main__":
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the parent's to handle; stdin closing ends us
    net.keep_freed_memory()
    child(int(sys.argv[1]), ModelConfig.model_validate_json(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4]))
