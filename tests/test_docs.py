"""README.md and docs/*.md against the code: flags of `char-rnn`, `python -m flows.serve` and `flows.follow`
in code exist in the real parsers, `--param KEY=...` keys in their flows, links and paths in the checkout;
docs/architecture.md names every module; tables render; README.md stays short. Tables headed `flag`,
`parameter` or `variable` document what their heading names in code (## `char-rnn train`, a flow) or the
settings: their second cell states the default as its leading `code`, in words ("none: ...", "required",
"off") only where the code has none.
"""

from __future__ import annotations

import argparse
import importlib
import inspect
import json
import re
import shlex
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parent.parent
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
README_LINES = 150
SHELL = {"", "bash", "sh", "shell", "console"}  # fenced blocks whose lines are commands
SEPARATORS = {"|", "||", "&&", ";", "&", ">", ">>", "2>", "<"}
STARTS = SEPARATORS | {"run", "exec", "time", "nohup"}  # words after which a command starts (`uv run`)
MODULES = ("flows.serve", "flows.follow")
CODE = re.compile(r"`([^`]+)`")
FENCE = re.compile(r"\s*(```+|~~~+)\s*([\w+-]*)")
LINK = re.compile(r"!?\[[^\]]*\]\(([^)\s]+)\)")
VARIABLE = re.compile(r"\bCHAR_RNN_[A-Z0-9_]*[A-Z0-9]\b")
DEPLOYMENT = re.compile(r"\b(char-rnn-[a-z]+)/([a-z][a-z-]*[a-z])\b")
DELIMITER = re.compile(r"^:?-+:?$")
FILE = re.compile(r"[a-z0-9_-][a-z0-9_.-]*/[a-z0-9_.-]+(/[a-z0-9_.-]*)*")  # a path such as `flows/events.py`
NO_VALUE = (None, [], {})  # a default the docs state in words
LAYERED = ("model", "stages", "flows", "serving")  # packages whose every module docs/architecture.md names
KINDS = ("flag", "parameter", "variable")  # tables whose second column is the code's default


@dataclass
class Table:
    page: str  # its path in the checkout
    line: int  # of the header row
    heading: str  # the nearest heading above it
    kind: str  # the header's first cell, in lower case
    rows: list[list[str]] = field(default_factory=list)  # header, delimiter, body


@dataclass
class Page:
    path: Path
    lines: list[str]
    headings: list[str] = field(default_factory=list)
    tables: list[Table] = field(default_factory=list)
    commands: list[tuple[int, list[str]]] = field(default_factory=list)  # (line, tokens)
    prose: str = ""  # the text outside fenced blocks


def cells(row: str) -> list[str]:
    """A table row's cells, split at unescaped pipes (GitHub splits inside code spans too)."""
    body = row.strip().removeprefix("|")
    body = body if body.endswith("\\|") else body.removesuffix("|")
    return [c.strip() for c in re.split(r"(?<!\\)\|", body)]


def tokens(text: str) -> list[str]:
    """Shell words of `text`, comments dropped; split on spaces when its quotes do not pair."""
    try:
        return shlex.split(text, comments=True)
    except ValueError:
        return text.split()


def fenced(lines: list[str]) -> Iterator[tuple[int, str, str | None]]:
    """(line number, line, language of the fenced block it is in, or None outside); fences left out."""
    fence, lang = None, None
    for n, line in enumerate(lines, 1):
        m = FENCE.match(line)
        if m and (fence is None or (m.group(1)[0] == fence[0] and len(m.group(1)) >= len(fence))):
            fence, lang = (m.group(1), m.group(2)) if fence is None else (None, None)
            continue
        yield n, line, lang if fence else None


def read(path: Path) -> Page:
    page = Page(path, path.read_text(encoding="utf-8").splitlines())
    prose, joined, heading = [], "", ""
    for n, line, lang in fenced(page.lines):
        prose.append(line if lang is None else "")
        if lang in SHELL:  # a command, continued over lines ending in a backslash
            joined += line.rstrip().removesuffix("\\") + " "
            if not line.rstrip().endswith("\\"):
                page.commands.append((n, tokens(joined)))
                joined = ""
        elif lang is None and (m := re.match(r"#{1,6}\s+(.*)", line)):
            heading = m.group(1)
            page.headings.append(heading)
        elif lang is None and line.lstrip().startswith("|"):
            last = page.tables[-1] if page.tables else None
            if not last or last.line + len(last.rows) != n:
                kind = cells(line)[0].lower()
                page.tables.append(last := Table(str(path.relative_to(ROOT)), n, heading, kind))
            last.rows.append(cells(line))
    page.prose = "\n".join(prose)
    for m in CODE.finditer(page.prose):
        page.commands.append((page.prose.count("\n", 0, m.start()) + 1, tokens(m.group(1))))
    return page


def invocations(words: list[str]) -> Iterator[tuple[str, list[str]]]:
    """(program, its words up to a shell separator) for each command of ours in `words`."""
    for i, w in enumerate(words):
        rest, first = words[i + 1 :], i == 0 or words[i - 1] in STARTS or re.match(r"\w+=", words[i - 1])
        if first and (w == "char-rnn" or w.endswith("/char-rnn")):
            program = "char-rnn"
        elif w == "-m" and rest and rest[0] in MODULES:
            program, rest = rest[0], rest[1:]
        elif w == "prefect" and rest[:2] == ["deployment", "run"]:
            program, rest = "prefect deployment run", rest[2:]
        else:
            continue
        end = next((k for k, x in enumerate(rest) if x in SEPARATORS), len(rest))
        yield program, rest[:end]


def subcommands(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    found = [a.choices for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    return found[0] if found else {}


def walk(parser: argparse.ArgumentParser, path: tuple[str, ...] = ()) -> Iterator[tuple]:
    """(path, parser, whether it takes no subcommand) of a command and of each of its subcommands."""
    subs = subcommands(parser)
    yield path, parser, not subs
    for name, sub in subs.items():
        yield from walk(sub, (*path, name))


def action(parser: argparse.ArgumentParser, name: str) -> argparse.Action | None:
    """The flag `--name`, or the positional argument shown as NAME."""
    if name.startswith("-"):
        return parser._option_string_actions.get(name)
    return next((a for a in parser._actions if not a.option_strings and a.dest == name.lower()), None)


def built(main: Callable[[list[str]], Any]) -> argparse.ArgumentParser:
    """The parser `main` builds, caught at its parse_args, before main does anything with it."""

    def grab(self: argparse.ArgumentParser, *_: Any) -> None:
        raise LookupError(self)

    with pytest.MonkeyPatch.context() as m, pytest.raises(LookupError) as caught:
        m.setattr(argparse.ArgumentParser, "parse_args", grab)
        main([])
    return caught.value.args[0]


class Code:
    """The parsers, flows and settings the pages describe, as the code has them now."""

    def __init__(self) -> None:
        import cli
        import settings
        from flows.pipeline import pipeline
        from flows.sweep import sweep
        from model.config import ModelConfig, TrainConfig

        self.settings = settings
        self.parsers: dict[str, argparse.ArgumentParser] = {"char-rnn": cli.parser()}
        for name in MODULES:
            module = importlib.import_module(name)
            self.parsers[name] = module.parser() if hasattr(module, "parser") else built(module.main)
        found = [
            (" ".join((g, *at)), p, leaf) for g, top in self.parsers.items() for at, p, leaf in walk(top)
        ]
        self.commands, self.leaves = {c: p for c, p, _ in found}, [c for c, _, leaf in found if leaf]
        self.flows = {f.name: f for f in (pipeline, sweep)}
        self.variables = {settings.variable((f,)): f for f in settings.Settings.model_fields}
        configs = ModelConfig.model_fields | TrainConfig.model_fields
        pipeline_params, sweep_params = self.params("char-rnn-pipeline"), self.params("char-rnn-sweep")
        self.fallbacks = {  # where a flag's default comes from when its parser's default is None
            "char-rnn train": lambda dest: getattr(configs.get(dest), "default", None),
            "char-rnn pipeline": lambda dest: getattr(pipeline_params.get(dest), "default", None),
            "char-rnn sweep": lambda dest: getattr(sweep_params.get(dest), "default", None),
        }

    def params(self, flow: str) -> dict[str, inspect.Parameter]:
        return dict(inspect.signature(self.flows[flow].fn).parameters)

    def setting_default(self, name: str) -> Any:
        """A field's default; for the folders that default under the home, `$CHAR_RNN_HOME/...`."""
        s = self.settings.Settings.model_construct(home=Path("/HOME"))  # no environment read
        derived = {"runs": s.runs_dir, "prefect_home": s.prefect_dir, "bentoml_home": s.bentoml_dir}
        if name in derived:
            return "$CHAR_RNN_HOME/" + derived[name].relative_to("/HOME").as_posix()
        value = self.settings.Settings.model_fields[name].default
        return value.relative_to(ROOT).as_posix() if isinstance(value, Path) else value

    def command(self, program: str, words: list[str]) -> tuple[argparse.ArgumentParser, tuple, list] | None:
        """The parser of the (sub)command `words` name, its path and the words after it (None: any)."""
        parser, path = self.parsers[program], ()
        while (subs := subcommands(parser)) and words and not words[0].startswith("-"):
            if words[0].startswith("<"):  # a placeholder: any subcommand
                return None
            if words[0] not in subs:
                raise ValueError(f"{program} {' '.join(path)} has no subcommand {words[0]!r}")
            parser, path, words = subs[words[0]], (*path, words[0]), words[1:]
        return parser, path, words

    def subject(self, t: Table) -> str:
        """What a table documents: a command (`char-rnn train`, `flows.serve`), a flow, or the settings."""
        if t.kind == "variable":
            return "settings"
        for span in CODE.findall(t.heading):
            if t.kind == "parameter" and span in self.flows:
                return span
            for program, words in invocations(tokens(span)) if t.kind == "flag" else ():
                return " ".join((program, *self.command(program, words)[1]))
        raise AssertionError(
            f"{t.page}:{t.line}: a table of {t.kind}s under a heading naming none: {t.heading!r}"
        )

    def default(self, kind: str, subject: str, name: str) -> tuple[Any, bool, bool] | None:
        """The code's default for `name` in what a table documents, whether it is required, whether it is a
        switch; None when there is no such thing."""
        if kind == "variable":
            f = self.variables.get(name)
            return None if f is None else (self.setting_default(f), False, False)
        if kind == "parameter":
            p = self.params(subject).get(name)
            return None if p is None else (p.default, p.default is p.empty, False)
        a = action(self.commands[subject], name)
        if a is None:
            return None
        value = a.default
        if value is None and subject in self.fallbacks:
            value = self.fallbacks[subject](a.dest)
        return value, a.required or (not a.option_strings and a.nargs is None), a.nargs == 0

    def documentable(self) -> Iterator[tuple[str, str, str]]:
        """(kind, subject, name) of every flag, flow parameter and setting."""
        for subject, parser in self.commands.items():
            for a in parser._actions:
                if "--help" not in a.option_strings and a.nargs != argparse.PARSER:
                    yield "flag", subject, (a.option_strings or [a.dest.upper()])[-1]
        yield from (("parameter", flow, n) for flow in self.flows for n in self.params(flow))
        yield from (("variable", "settings", v) for v in self.variables)


@pytest.fixture(scope="module")
def pages() -> list[Page]:
    return [read(p) for p in PAGES]


@pytest.fixture(scope="module")
def code() -> Code:
    return Code()


def literal(text: str) -> Any:
    """A value as the docs write it in code: JSON (300, 5e-3, true, "\\n"), else the word itself."""
    try:
        return json.loads(text)
    except ValueError:
        return text.rstrip("/")


def same(doc: Any, value: Any) -> bool:
    if isinstance(value, bool) or isinstance(doc, bool):
        return doc is value
    if isinstance(value, int | float) and isinstance(doc, int | float):
        return float(doc) == float(value)
    return str(doc) == str(value)


def default_problem(cell: str, value: Any, required: bool = False, switch: bool = False) -> str | None:
    """What is wrong with a table's default `cell` for a code default `value`, if anything."""
    m = re.match(r"`([^`]*)`", cell)
    if switch or required:
        want = "off" if switch else "required"
        return None if cell == want else f"say {want!r}, not {cell!r}"
    if cell == "required":
        return "says required; the code has a default"
    if m is None:
        return None if value in NO_VALUE else f"state the default {value!r} as the cell's leading `code`"
    if value in NO_VALUE:
        return f"states {m.group(1)!r}, the code has no default of its own ({value!r})"
    return None if same(literal(m.group(1)), value) else f"says {m.group(1)!r}, the code {value!r}"


def table_rows(pages: list[Page], code: Code) -> Iterator[tuple[str, str, str, str, str]]:
    """(kind, where, subject, name, default cell) of each row of a flag, parameter or variable table."""
    for t in (t for p in pages for t in p.tables if t.kind in KINDS):
        subject = code.subject(t)
        for k, row in enumerate(t.rows[2:], 2):
            m = CODE.fullmatch(row[0])
            yield t.kind, f"{t.page}:{t.line + k}", subject, (m.group(1) if m else row[0]), row[1]


def test_readme_is_short():
    n = len((ROOT / "README.md").read_text(encoding="utf-8").splitlines())
    assert n <= README_LINES, f"README.md has {n} lines; move detail to docs/ (at most {README_LINES})"


def test_tables_render(pages):
    bad = []
    for page, t in ((p, t) for p in pages for t in p.tables):
        where, widths = f"{t.page}:{t.line}", [len(r) for r in t.rows]
        if t.line > 1 and page.lines[t.line - 2].strip():
            bad.append(f"{where}: no blank line before the table")
        if len(t.rows) < 2 or not all(DELIMITER.match(c) for c in t.rows[1]):
            bad.append(f"{where}: the second row is not a delimiter row (|---|---|)")
        elif len(set(widths)) != 1:
            bad.append(f"{where}: rows of {widths} cells (header, delimiter, body must agree)")
    assert not bad, "\n".join(bad)


def test_links_and_files_named_exist(pages):
    bad = []
    for p in pages:
        where = p.path.relative_to(ROOT)
        for m in LINK.finditer(CODE.sub("", p.prose)):
            target = m.group(1).split("#")[0]
            if target and not re.match(r"[a-z]+:", target) and not (p.path.parent / target).exists():
                bad.append(f"{where}: the link {m.group(1)} leads nowhere")
        for name in CODE.findall(p.prose):
            if FILE.fullmatch(name) and not DEPLOYMENT.fullmatch(name) and not (ROOT / name).exists():
                bad.append(f"{where}: `{name}` is no file or folder of the checkout")
    assert not bad, "\n".join(bad)


def flag_problems(code: Code, program: str, words: list[str]) -> list[str]:
    """Flags in `program words` that its parser does not have."""
    try:
        parser, path, rest = code.command(program, words) or (None, ("serve",), [])
    except ValueError as e:
        return [str(e)]
    if path == ("serve",):  # a placeholder; or `char-rnn serve`, which passes its options to `bentoml serve`
        return []
    used = [w.split("=")[0] for w in rest if w.startswith("-")]
    return [
        f"{program} {' '.join(path)} has no flag {f}" for f in used if f not in parser._option_string_actions
    ]


def param_problems(code: Code, program: str, words: list[str]) -> list[str]:
    """`--param KEY=...` whose KEY the flow of the named deployment (flows.serve: the pipeline) lacks."""
    keys = [words[i + 1].partition("=")[0] for i, w in enumerate(words[:-1]) if w == "--param"]
    deployments = [m.group(1) for w in words if (m := DEPLOYMENT.fullmatch(w))]
    flow = "char-rnn-pipeline" if program == "flows.serve" else (deployments or [None])[0]
    if not keys or flow not in code.flows:
        return []
    return [f"{flow} has no parameter {k!r}" for k in keys if k not in code.params(flow)]


def test_commands_use_real_flags_and_parameters(pages, code):
    bad = []
    for p in pages:
        for line, words in p.commands:
            for program, args in invocations(words):
                check = [param_problems] + ([flag_problems] if program in code.parsers else [])
                found = [x for f in check for x in f(code, program, args)]
                bad += [f"{p.path.relative_to(ROOT)}:{line}: {x}" for x in found]
    assert not bad, "\n".join(bad)


def test_table_defaults_match_the_code(pages, code):
    bad = []
    for kind, where, subject, name, cell in table_rows(pages, code):
        found = code.default(kind, subject, name)
        if why := f"{subject} has no {kind} {name}" if found is None else default_problem(cell, *found):
            bad.append(f"{where}: {name}: {why}")
    assert not bad, "\n".join(bad)


def test_every_command_flag_parameter_and_setting_is_documented(pages, code):
    documented = {(kind, subject, name) for kind, _, subject, name, _ in table_rows(pages, code)}
    missing = [
        f"{k} {n} of {s}, in a table" for k, s, n in code.documentable() if (k, s, n) not in documented
    ]
    headings = {h for p in pages if p.path.name == "cli.md" for h in p.headings}
    commands = [c for c in code.leaves if c.startswith("char-rnn")]
    missing += [f"a heading `{c}` in docs/cli.md" for c in commands if f"`{c}`" not in headings]
    assert not missing, "not documented:\n" + "\n".join(missing)


def test_every_variable_named_is_a_setting(pages, code):
    named = {(p.path.name, v) for p in pages for v in VARIABLE.findall("\n".join(p.lines))}
    unknown = sorted(f"{page}: {v}" for page, v in named if v not in code.variables)
    assert not unknown, "not fields of settings.Settings:\n" + "\n".join(unknown)


def test_architecture_names_every_module(pages):
    named = {n for p in pages if p.path.name == "architecture.md" for n in CODE.findall(p.prose)}
    found = {f.relative_to(ROOT).as_posix() for d in LAYERED for f in (ROOT / d).glob("[!_]*.py")}
    assert found <= named, f"modules docs/architecture.md does not name: {sorted(found - named)}"
