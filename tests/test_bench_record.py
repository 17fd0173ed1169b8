"""The benchmarks' recorder (bench/common.py): each bench rewrites its own section of docs/benchmarks.md in
place, keeps the rest of the page, and states when, where, at what load, at which commit and by which command
its figures were taken."""

import argparse
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "bench"))

import common  # noqa: E402  (bench/ is a folder of scripts, not a package)

FACTS = ("date", "cpu", "cores", "BLAS", "numpy", "load average (1, 5, 15 min)", "commit", "command")


def run(name: str, *argv: str) -> common.Run:
    parser = argparse.ArgumentParser()
    common.add_record_flag(parser)
    return common.begin(name, f"The {name} bench", parser.parse_args(list(argv)))


def between(page: str, name: str) -> str:
    start, end = page.index(f"<!-- bench:{name} -->"), page.index(f"<!-- /bench:{name} -->")
    return page[start:end]


def test_a_section_is_replaced_in_place_and_the_rest_kept(tmp_path):
    page = tmp_path / "benchmarks.md"
    common.record(run("first"), "| a |\n|---|\n| 1 |", path=page)
    assert page.read_text().startswith(common.HEADER)
    common.record(run("second"), "second's table", path=page)
    # a hand-written line between the sections, and a reader's edit of the header, survive the next runs
    edited = page.read_text().replace("# Benchmarks\n", "# Benchmarks (edited)\n")
    edited = edited.replace("<!-- bench:second -->", "Between the sections.\n\n<!-- bench:second -->")
    page.write_text(edited)
    second = between(edited, "second")

    common.record(run("first"), "| a |\n|---|\n| 2 |", path=page)

    text = page.read_text()
    assert text.startswith("# Benchmarks (edited)\n")
    assert "| 2 |" in between(text, "first") and "| 1 |" not in text
    assert text.count("<!-- bench:first -->") == 1 and text.count("<!-- /bench:first -->") == 1
    assert (
        text.index("<!-- bench:first -->") < text.index("Between the sections.") < text.index("bench:second")
    )
    assert between(text, "second") == second
    assert not [p for p in tmp_path.iterdir() if p.name != "benchmarks.md"]  # no temp file left behind


def test_the_section_states_when_where_what_load_which_commit_and_command(tmp_path, monkeypatch):
    page = tmp_path / "benchmarks.md"
    monkeypatch.setattr(sys, "argv", [str(ROOT / "bench" / "facts.py"), "--quick"])
    r = run("facts")
    r.facts["torch"] = "2.13.0"
    common.record(r, "the table", load_after=(1.5, 1.25, 1.0), path=page)
    section = between(page.read_text(), "facts")
    rows = dict(
        (cells[1].strip(), cells[2].strip())
        for cells in (line.split("|") for line in section.splitlines() if line.startswith("| "))
    )
    for key in (*FACTS, "torch"):
        assert rows.get(key), f"{key} missing from {section}"
    assert rows["load average (1, 5, 15 min)"].endswith("1.50 1.25 1.00 after")
    assert rows["command"] == "`python bench/facts.py --quick`"  # the checkout's path left out
    assert rows["BLAS"] == common.blas_name() and rows["numpy"].startswith(common.np.__version__)
    head = subprocess.run(
        ["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"], capture_output=True, text=True
    )
    assert rows["commit"].startswith(head.stdout.strip())
    assert "## The facts bench" in section and "the table" in section


def test_no_record_leaves_the_page_alone(tmp_path):
    page = tmp_path / "benchmarks.md"
    common.record(run("quiet", "--no-record"), "table", path=page)
    assert not page.exists()


@pytest.fixture
def repo(tmp_path) -> Path:
    git = ["git", "-C", str(tmp_path), "-c", "user.name=bench", "-c", "user.email=bench@example.com"]
    (tmp_path / "docs").mkdir()
    (tmp_path / "code.py").write_text("x = 1\n")
    (tmp_path / "docs" / "benchmarks.md").write_text("# Benchmarks\n")
    for args in (["init", "-q"], ["add", "."], ["commit", "-q", "-m", "first"]):
        subprocess.run([*git, *args], check=True, capture_output=True)
    return tmp_path


def test_the_commit_says_when_the_tree_has_uncommitted_changes(repo):
    page = repo / "docs" / "benchmarks.md"
    clean = common.commit(repo, page)
    assert clean and "uncommitted" not in clean
    page.write_text(
        "# Benchmarks\n\nA recorded run.\n"
    )  # the page itself changes with every run: not counted
    assert common.commit(repo, page) == clean
    (repo / "code.py").write_text("x = 2\n")
    assert common.commit(repo, page) == f"{clean} + uncommitted changes"
