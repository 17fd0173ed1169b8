"""The code's shape rules, checked: short functions and modules, and comments that explain rules and reasons
rather than record one machine's timings or a date (those belong in a benchmark's output, docs/benchmarks.md).

Complexity (ruff's C901) and the import layers (`lint-imports`, pyproject.toml) are checked by `make test`
itself."""

import ast
import io
import re
import tokenize
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("model", "stages", "flows", "serving", "cli", "settings", "registry", "terminal")
SHIPPED = sorted({*ROOT.glob("*.py"), *(p for d in PACKAGES for p in (ROOT / d).rglob("*.py"))})
MAX_FUNCTION, MAX_MODULE = 60, 400
# a figure with a unit of time or speed, a speed-up, or a calendar date
MEASURED = re.compile(
    r"\b\d+(\.\d+)?\s?(ms|us|µs|ns|s|sec|seconds|GFLOP/s|chars/s|x faster)\b"  # a time or a speed
    r"|\b\d+(\.\d+)?x\b"  # a speed-up
    r"|\b20\d\d-\d\d-\d\d\b"  # a date
)


def functions(tree: ast.AST):
    for node in ast.walk(tree):
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
            yield node


def prose(source: str) -> list[tuple[int, str]]:
    """Every comment and docstring line of a module, with its line number."""
    found = []
    for tok in tokenize.generate_tokens(io.StringIO(source).readline):
        if tok.type == tokenize.COMMENT:
            found.append((tok.start[0], tok.string))
    for node in ast.walk(ast.parse(source)):
        body = getattr(node, "body", None)
        if isinstance(body, list) and body and isinstance(body[0], ast.Expr):
            value = body[0].value
            if isinstance(value, ast.Constant) and isinstance(value.value, str):
                found += [(value.lineno + i, line) for i, line in enumerate(value.value.splitlines())]
    return found


def test_there_is_shipped_code_to_check():
    names = {p.relative_to(ROOT).as_posix() for p in SHIPPED}
    assert {"service.py", "cli/__init__.py", "model/train.py", "stages/data.py", "flows/pipeline.py"} <= names


@pytest.mark.parametrize("path", SHIPPED, ids=lambda p: p.relative_to(ROOT).as_posix())
def test_modules_and_functions_are_short(path):
    source = path.read_text()
    assert source.count("\n") <= MAX_MODULE, f"{path.name}: over {MAX_MODULE} lines; split it by concept"
    long = [
        f"{f.name} ({f.end_lineno - f.lineno + 1} lines)"
        for f in functions(ast.parse(source))
        if f.end_lineno - f.lineno + 1 > MAX_FUNCTION
    ]
    assert not long, f"{path.name}: functions over {MAX_FUNCTION} lines: {', '.join(long)}"


@pytest.mark.parametrize("path", SHIPPED, ids=lambda p: p.relative_to(ROOT).as_posix())
def test_comments_hold_no_measurements_or_dates(path):
    found = [
        f"{path.name}:{n}: {text.strip()}" for n, text in prose(path.read_text()) if MEASURED.search(text)
    ]
    assert not found, (
        "measured figures or dates in comments (move them to a benchmark's output):\n" + "\n".join(found)
    )


def test_the_measurement_pattern_catches_what_it_should():
    for text in ("# 29 us per call", "costs ~0.3 ms a request", "1.33x", "(2026-11-28)", "at 95 GFLOP/s"):
        assert MEASURED.search(text), text
    for text in ("# (B, T, H)", "at most 2 rows", "M·N·K <= 10^6", "256 MB", "one BLAS thread"):
        assert not MEASURED.search(text), text
