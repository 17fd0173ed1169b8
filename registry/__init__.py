"""The registry of promoted models: BentoML's model store `char-rnn` plus a history file beside it.

BentoML copies a model into its store in place, so readers never trust the store alone: the history
`<BENTOML_HOME>/char-rnn-promoted.json` (written atomically, after the model is fully in the store) lists
every promotion and rollback, oldest first; the last entry names the current model. Every load verifies the
checkpoint's checksums and falls back to the previous entry when one fails. A damaged history file is reported
once and the history is rebuilt from the store itself (each promoted model carries a `promoted_at` label).
Used by the flows (promotion) and the service (hot reload); imports BentoML, never Prefect.
"""

from __future__ import annotations

import json
import logging
import shutil
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Literal

import bentoml
from pydantic import BaseModel, ValidationError

from model import checkpoint
from model.checkpoint import Checkpoint, CheckpointError
from model.files import locked, write_atomic

NAME = "char-rnn"
log = logging.getLogger("char_rnn.registry")


class Entry(BaseModel):
    """One change of the current model."""

    tag: str
    at: str  # ISO time
    action: Literal["promote", "rollback", "rebuilt"] = "promote"
    reason: str = ""


class History(BaseModel):
    format: Literal[2] = 2
    entries: list[Entry] = []


@dataclass
class Current:
    """The model to serve: the newest entry that passes its checks, and the ones refused on the way."""

    tag: str
    checkpoint: Checkpoint
    labels: dict[str, str] = field(default_factory=dict)  # val_loss (full validation), promoted_at, ...
    refused: list[str] = field(default_factory=list)  # "tag: why"


@dataclass
class Listing:
    """A model of the history: its store labels (empty when it is gone from the store) and its entries."""

    tag: str
    labels: dict[str, str]
    entries: list[Entry]


@dataclass
class Verdict:
    """A judge's answer: does the candidate replace the current model, and why."""

    wins: bool
    reason: str


@dataclass
class Promotion:
    promoted: bool
    tag: str  # the current model afterwards
    reason: str
    lost_to: str | None = None  # the model that stayed current, when the candidate lost


def now() -> str:
    return datetime.now(UTC).isoformat(timespec="microseconds")


class Registry:
    """Promoted models under the BentoML home `home` (the one this process's `bentoml` uses)."""

    def __init__(self, home: Path, report: bool = True):
        self.home = Path(home)
        self.pointer = self.home / f"{NAME}-promoted.json"
        self.report = report  # log what is refused or damaged (once per message)
        self._said: set[str] = set()

    def warn_once(self, msg: str) -> None:
        if self.report and msg not in self._said:
            self._said.add(msg)
            log.warning(msg)

    @contextmanager
    def lock(self) -> Iterator[None]:
        """Exclusive across processes: promotions and rollbacks never interleave."""
        with locked(self.home / f".{NAME}.lock", "waiting for another promotion to finish"):
            yield

    def version(self) -> tuple[int, int] | None:
        """A cheap token that changes when the history file does (for the service's watcher)."""
        try:
            st = self.pointer.stat()
        except FileNotFoundError:
            return None
        return st.st_mtime_ns, st.st_size

    def history(self) -> list[Entry]:
        """Every promotion and rollback, oldest first; rebuilt from the store when the file is damaged."""
        try:
            raw = self.pointer.read_bytes()
        except FileNotFoundError:
            return []
        try:
            data = json.loads(raw)
            if isinstance(data, dict) and isinstance(data.get("promoted"), list):  # format 1: a list of tags
                data = {"entries": [{"tag": t, "at": "", "reason": "(format 1)"} for t in data["promoted"]]}
            return History.model_validate(data).entries
        except (ValueError, ValidationError) as e:
            first = str(e).splitlines()[0]
            self.warn_once(
                f"{self.pointer} is damaged ({first}); using the promoted models found in the store instead. "
                "The next promotion or rollback rewrites it"
            )
            return self.rebuilt()

    def rebuilt(self) -> list[Entry]:
        """The history as the store's labels tell it: models with a `promoted_at` label, oldest first."""
        found = []
        for m in bentoml.models.list(NAME):
            at = m.info.labels.get("promoted_at")
            if at:
                found.append(Entry(tag=str(m.tag), at=at, action="rebuilt", reason="from the store's labels"))
        return sorted(found, key=lambda e: e.at)  # ISO times with microseconds: in promotion order

    def get(self, tag: str) -> bentoml.Model:
        try:
            return bentoml.models.get(tag)
        except (bentoml.exceptions.BentoMLException, ValueError) as e:
            raise CheckpointError(f"{tag} is not in the model store under {self.home} ({e})") from e

    def load(self, tag: str) -> Checkpoint:
        """The promoted model `tag`, checked; CheckpointError when it is missing or damaged."""
        return checkpoint.load_dir(Path(self.get(tag).path), with_optim=False)

    def current(self) -> Current | None:
        """The newest model in the history that passes its checks; when none does, the newest good one the
        store's labels say was promoted (None when there is none)."""
        entries = self.history()
        found = self.first_good(entries, f"listed in {self.pointer}")
        if found is None and entries and entries[0].action != "rebuilt":
            found = self.first_good(self.rebuilt(), "found in the store")
        return found

    def first_good(self, entries: list[Entry], where: str) -> Current | None:
        refused: list[str] = []
        for tag in dict.fromkeys(e.tag for e in reversed(entries)):  # newest first, each once
            try:
                ck = self.load(tag)
            except CheckpointError as err:
                refused.append(f"{tag}: {err}")
                continue
            if refused:
                self.warn_once(
                    f"refused promoted model(s) {where}: {'; '.join(refused)}; serving {tag} instead"
                )
            return Current(tag, ck, dict(self.get(tag).info.labels), refused)
        if refused:
            self.warn_once(f"no promoted model {where} passes its checks: {'; '.join(refused)}")
        return None

    def models(self) -> list[Listing]:
        """Every model the history names, in the order each was first promoted."""
        found: dict[str, list[Entry]] = {}
        for e in self.history():
            found.setdefault(e.tag, []).append(e)
        listed = []
        for tag, entries in found.items():
            try:
                labels = dict(self.get(tag).info.labels)
            except CheckpointError:
                labels = {}
            listed.append(Listing(tag, labels, entries))
        return listed

    def rolled_back_from(self, tag: str) -> list[str]:
        """The models that rollbacks to `tag` replaced (each the model current before its rollback)."""
        entries = self.history()
        pairs = zip(entries, entries[1:], strict=False)  # (before, entry)
        return [before.tag for before, e in pairs if e.action == "rollback" and e.tag == tag]

    def record(self, entry: Entry) -> None:
        """Append `entry` to the history (call under `lock()`)."""
        entries = [*self.history(), entry]
        write_atomic(self.pointer, History(entries=entries).model_dump_json(indent=1).encode())

    def register(self, ck_dir: Path, labels: dict[str, str], metadata: dict) -> str:
        """Copy checkpoint `ck_dir` (weights + meta) into the store, verified before and after; its tag."""
        ck = checkpoint.load_dir(ck_dir, with_optim=False)
        with bentoml.models.create(NAME, labels=labels, metadata=metadata) as m:
            for name in ("weights.npz", "meta.json"):
                shutil.copy2(ck.path / name, Path(m.path) / name)
            tag = str(m.tag)
        self.load(tag)  # the copy in the store verifies too
        return tag

    def promote(
        self,
        ck_dir: Path,
        labels: dict[str, str],
        metadata: dict | None = None,
        judge: Callable[[Current], Verdict] | None = None,
    ) -> Promotion:
        """Make checkpoint `ck_dir` the current model, unless `judge` says the current one stays.

        The judge runs under the lock with the model that is current at that moment, so two runs that
        finish together are each compared with what the other promoted."""
        with self.lock():
            cur = self.current()
            verdict = judge(cur) if (judge and cur) else Verdict(True, "there was no promoted model yet")
            if not verdict.wins:
                return Promotion(False, cur.tag, verdict.reason, lost_to=cur.tag)
            at = now()
            tag = self.register(ck_dir, labels | {"promoted_at": at}, metadata or {})
            self.record(Entry(tag=tag, at=at, reason=verdict.reason))
        return Promotion(True, tag, verdict.reason)

    def rollback(self, tag: str | None = None, reason: str = "") -> Entry:
        """Make promoted model `tag` current again (default: the one promoted before the current one); the
        history's new entry."""
        with self.lock():
            order = list(dict.fromkeys(e.tag for e in self.history()))  # in the order first promoted
            cur = self.current()
            if tag is None:
                if cur is None or cur.tag not in order[1:]:
                    raise ValueError("there is no model promoted before the current one to roll back to")
                tag = order[order.index(cur.tag) - 1]
            if tag not in order:
                raise ValueError(f"{tag} was never promoted; `char-rnn models list` shows the ones that were")
            if cur is not None and tag == cur.tag:
                raise ValueError(f"{tag} is the current model already; `char-rnn models list` shows others")
            self.load(tag)  # refuse a damaged target before making it current
            entry = Entry(tag=tag, at=now(), action="rollback", reason=reason or "rolled back")
            self.record(entry)
        return entry
