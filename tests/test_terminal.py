"""terminal.py: the parser's one-line errors, the training's progress and the follow screen, on a terminal
and off."""

import argparse
import io
import subprocess
import sys

import pytest
from conftest import ROOT
from pty_terminal import visible
from rich.console import Console

import terminal
from model.train import Progress


def steps(n: int, every: int) -> list[Progress]:
    """A training's reports: a validation loss every `every` steps."""
    return [
        Progress(s, n, 3.0 / s, 1e-3, 0.5, 9000.0, float(n - s), 2.0 / s if s % every == 0 else None)
        for s in range(1, n + 1)
    ]


def test_a_malformed_command_line_is_one_line_with_status_2(capsys):
    parser = terminal.Parser(prog="char-rnn train")
    parser.add_argument("--steps", type=int, required=True)
    with pytest.raises(SystemExit) as exit:
        parser.parse_args(["--steps", "many"])
    assert exit.value.code == 2
    assert capsys.readouterr().err == "char-rnn train: error: argument --steps: invalid int value: 'many'\n"


def test_param_reads_json_else_a_string():
    assert terminal.param("steps=300") == ("steps", 300)
    assert terminal.param('lines=["a", "b=c"]') == ("lines", ["a", "b=c"])
    assert terminal.param("data_dir=/srv/texts") == ("data_dir", "/srv/texts")
    with pytest.raises(argparse.ArgumentTypeError, match="expected KEY=VALUE"):
        terminal.param("steps")


def test_training_off_a_terminal_prints_a_plain_line_per_validation_and_the_last():
    out = io.StringIO()
    with terminal.TrainingBar(Console(file=out, highlight=False)) as show:
        for p in steps(10, every=4):
            show(p)
    assert out.getvalue().splitlines() == [
        "4/10 loss 0.750 val 0.500 | 9k char/s | eta 00:06",
        "8/10 loss 0.375 val 0.250 | 9k char/s | eta 00:02",
        "10/10 loss 0.300 val 0.250 | 9k char/s | eta 00:00",
    ]


def test_training_on_a_terminal_is_a_rich_bar_redrawn_in_place_and_leaves_the_cursor_shown():
    out = io.StringIO()
    console = Console(file=out, force_terminal=True, width=100)
    with pytest.raises(KeyboardInterrupt), terminal.TrainingBar(console) as show:
        for p in steps(10, every=4)[:6]:
            show(p)
        raise KeyboardInterrupt  # Ctrl-C halfway
    shown = [line for line in visible(out.getvalue()) if line]
    last = "━" * 18 + "╺" + "━" * 11 + " 6/10 loss 0.500 val 0.500 | 9k char/s | eta 00:04"
    assert shown == [last], out.getvalue()
    assert out.getvalue().endswith("\x1b[?25h"), "the cursor stays hidden"


def test_the_screen_on_a_terminal_keeps_lines_above_a_status_redrawn_in_place():
    out = io.StringIO()
    screen = terminal.Screen(out, tty=True)
    screen.show("waiting", passing=True)
    screen.line("Corpus of 9 characters")
    screen.show("1/4 loss 3.000", fraction=0.25)
    screen.line("Training from scratch")  # arrives late: still above the status line
    screen.show("4/4 loss 1.000", fraction=1.0)
    screen.keep()
    screen.line("Candidate: 1.9 nats/char")
    screen.show("Completed...", passing=True)
    screen.clear()
    assert visible(out.getvalue()) == [
        "  Corpus of 9 characters",
        "  Training from scratch",
        "  [" + "━" * 30 + "] 4/4 loss 1.000",
        "  Candidate: 1.9 nats/char",
        "",
    ]
    status = out.getvalue().split("\n")[2]
    assert status.count("\r  [") == 2 and "\x1b[" in status, "not redrawn in place, or not rich's bar"


def test_the_screen_off_a_terminal_prints_plain_lines_and_the_status_now_and_then():
    out = io.StringIO()
    screen = terminal.Screen(out, every=3600)
    screen.show("waiting", passing=True)
    screen.line("Corpus of 9 characters")
    screen.show("1/4 loss 3.000", fraction=0.25)  # not yet: less than `every` since the last line
    screen.keep()  # ... but kept, it gets its line
    screen.every = 0
    screen.show("waiting", passing=True)
    screen.show("Running", fraction=None)
    screen.clear()
    assert out.getvalue().splitlines() == [
        "  Corpus of 9 characters",
        "  [#######.......................] 1/4 loss 3.000",
        "  Running",
    ]


def test_terminal_imports_no_project_module():
    code = "import sys, terminal; print(' '.join(sorted(sys.modules)))"
    loaded = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True
    )
    ours = {p.stem for p in ROOT.glob("*.py")} | {p.parent.name for p in ROOT.glob("*/__init__.py")}
    assert set(loaded.stdout.split()) & (ours - {"terminal"}) == set()
