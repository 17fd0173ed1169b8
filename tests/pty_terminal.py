"""A command in a pseudo-terminal, for the tests of what people see: its output as bytes, and as the lines a
terminal would show (colours dropped, each carriage return back to the line's start)."""

import os
import pty
import re
import subprocess
import termios
import threading
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def visible(output: str) -> list[str]:
    """The lines a terminal shows for `output`: colours dropped, each `\\r` back to the line's start."""
    lines = []
    for raw in re.sub(r"\x1b\[[0-9;?]*[A-Za-z]", "", output).split("\n"):
        cells: list[str] = []
        col = 0
        for ch in raw:
            if ch == "\r":
                col = 0
                continue
            cells[col : col + 1] = [ch]
            col += 1
        lines.append("".join(cells).rstrip())
    return lines


class Terminal:
    """`cmd` run in a pseudo-terminal of its own session (its controlling terminal), `rows` x `cols`, with
    SIGINT at its default as a terminal's shell leaves it (a test run started in the background would pass it
    on ignored, and a script cannot trap a signal ignored on entry)."""

    def __init__(self, cmd: list[str], env: dict[str, str], rows: int = 24, cols: int = 100):
        self.master, slave = pty.openpty()
        termios.tcsetwinsize(slave, (rows, cols))
        self.proc = subprocess.Popen(
            ["setsid", "--ctty", "env", "--default-signal=INT", *cmd],
            cwd=ROOT,
            env=env,
            stdin=slave,
            stdout=slave,
            stderr=slave,
        )
        os.close(slave)
        self.output = b""
        self.reader = threading.Thread(target=self.read, daemon=True)
        self.reader.start()

    def read(self) -> None:
        while True:
            try:
                chunk = os.read(self.master, 65536)
            except OSError:  # the other side closed
                return
            if not chunk:
                return
            self.output += chunk

    @property
    def text(self) -> str:
        return self.output.decode(errors="replace")

    def screen(self) -> list[str]:
        return visible(self.text)
