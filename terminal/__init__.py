"""What the entry points show in a terminal: a parser that states a malformed command line in one line, the
training's progress, and the screen `python -m flows.follow` draws while a run goes on.

A utility: it imports no project module (only the standard library and rich), so every layer may use it. On
a terminal, bars are rich's and redrawn in place; anywhere else (a log file, `| tee`, a pipe) the output is
plain lines, one per event worth keeping.
"""

from __future__ import annotations

import argparse
import json
import time
from typing import IO, Any, NoReturn, Protocol

from rich.console import Console
from rich.progress import BarColumn, Progress, TaskID, TextColumn
from rich.progress_bar import ProgressBar
from rich.text import Text

WIDTH = 30  # characters of a bar


class Parser(argparse.ArgumentParser):
    """argparse that states a malformed command line in one line (`--help` shows the usage)."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {message}\n")


def param(text: str) -> tuple[str, Any]:
    """An argparse type for `--param KEY=VALUE`: VALUE read as JSON when it is JSON (300, 3e-3, true, [1, 2]),
    else as a string."""
    key, sep, value = text.partition("=")
    if not sep or not key:
        raise argparse.ArgumentTypeError(f"{text!r}: expected KEY=VALUE, for example steps=500")
    try:
        return key, json.loads(value)
    except json.JSONDecodeError:
        return key, value


def bar(fraction: float, width: int = WIDTH) -> str:
    """A bar in plain characters, for output that is not a terminal: `[#####.....]`."""
    done = int(width * min(max(fraction, 0.0), 1.0))
    return f"[{'#' * done}{'.' * (width - done)}]"


class Step(Protocol):
    """What the training reports at a step (`model.train.Progress`)."""

    step: int
    steps: int
    val_loss: float | None

    def summary(self, last_val: float | None = None) -> str: ...


class TrainingBar:
    """The training's progress on stderr, one call per step: on a terminal a rich bar with the step, the
    loss, the latest validation loss, characters/s and the time left, redrawn in place; elsewhere a plain line
    at each validation and at the last step. A context manager, so that an interrupted training leaves the
    terminal as it found it (cursor shown, the bar's last state on a line of its own)."""

    def __init__(self, console: Console | None = None):
        self.console = console or Console(stderr=True, highlight=False)
        self.last_val: float | None = None
        self.bar = Progress(
            BarColumn(bar_width=WIDTH),
            TextColumn("{task.description}", markup=False),
            console=self.console,
            refresh_per_second=4,
        )
        self.task: TaskID | None = None

    def __enter__(self) -> TrainingBar:
        if self.console.is_terminal:
            self.bar.start()
        return self

    def __exit__(self, *exc: object) -> None:
        if self.bar.live.is_started:
            self.bar.stop()

    def __call__(self, p: Step) -> None:
        if p.val_loss is not None:
            self.last_val = p.val_loss
        line = p.summary(self.last_val)
        if not self.console.is_terminal:
            if p.val_loss is not None or p.step == p.steps:
                self.console.print(line, markup=False)
            return
        if self.task is None:
            self.task = self.bar.add_task(line, total=p.steps, completed=p.step)
        self.bar.update(self.task, completed=p.step, total=p.steps, description=line)


class Screen:
    """Lines, and below them one status line (text, or a bar and its text) redrawn in place on a terminal.
    Elsewhere the status is printed as a line of its own every `every` s, and once more when kept."""

    def __init__(self, out: IO[str] | None = None, every: float = 15.0, tty: bool | None = None):
        self.console = Console(file=out, force_terminal=tty, highlight=False, soft_wrap=True)
        self.tty, self.every = self.console.is_terminal, every
        self.status: tuple[str, float | None] | None = None
        self.printed: tuple[str, float | None] | None = None
        self.at = time.monotonic()

    def render(self, status: tuple[str, float | None]) -> Text:
        text, fraction = status
        if fraction is None:
            return Text(f"  {text}")
        if not self.tty:
            return Text(f"  {bar(fraction)} {text}")
        pb = ProgressBar(total=1.0, completed=min(max(fraction, 0.0), 1.0), width=WIDTH)
        drawn = self.console.render(pb, self.console.options.update_width(WIDTH))
        return Text.assemble("  [", *((s.text, s.style) for s in drawn), f"] {text}")

    def draw(self, text: Text) -> None:
        """Overwrite the terminal's current line with `text` (cut to its width)."""
        text.truncate(self.console.width - 1, pad=True)  # the last column would wrap on some terminals
        self.console.file.write("\r")
        self.console.print(text, end="")
        if not text.plain.strip():
            self.console.file.write("\r")
            self.console.file.flush()

    def write(self, text: Text) -> None:
        self.console.print(text)
        self.at = time.monotonic()

    def line(self, text: str) -> None:
        """A line above the status line."""
        if self.tty and self.status:
            self.draw(Text())
        self.write(Text(f"  {text}"))
        if self.tty and self.status:
            self.draw(self.render(self.status))

    def show(self, text: str, fraction: float | None = None, passing: bool = False) -> None:
        """The status: `text`, after a bar `fraction` full if given. Elsewhere than on a terminal it is
        printed now and then, unless it is `passing` (a wait, not worth a line)."""
        status = (text, fraction)
        if status == self.status:
            return
        self.status = None if passing and not self.tty else status
        if self.tty:
            self.draw(self.render(status))
        elif not passing and time.monotonic() - self.at >= self.every:
            self.write(self.render(status))
            self.printed = status

    def keep(self) -> None:
        """Leave the status where it is, as a line of its own (a finished training's last state)."""
        if self.tty and self.status:
            self.console.print()
        elif self.status and self.status != self.printed:
            self.write(self.render(self.status))
        self.status = self.printed = None

    def clear(self) -> None:
        """Take the status away."""
        if self.tty and self.status:
            self.draw(Text())
        self.status = None
