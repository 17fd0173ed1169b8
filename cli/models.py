"""`char-rnn models list | show | rollback`: the promoted models, as a table for people or JSON for
scripts."""

from __future__ import annotations

import argparse
import json
from datetime import datetime
from typing import TYPE_CHECKING, Any

import settings
from model import train

if TYPE_CHECKING:
    from registry import Listing, Registry


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


def record(m: Listing, serving: bool) -> dict[str, Any]:
    """One promoted model for scripts: its tag, whether it serves, its labels and its history."""
    val = m.labels.get("val_loss")
    return {
        "tag": m.tag,
        "serving": serving,
        "in_store": bool(m.labels),
        "promoted_at": m.labels.get("promoted_at", m.entries[0].at),
        "val_loss": float(val) if val else None,
        "parent": m.labels.get("parent") or None,
        "fingerprint": m.labels.get("fingerprint"),
        "labels": m.labels,
        "history": [e.model_dump() for e in m.entries],
    }


def table(rows: list[tuple[str, ...]]) -> None:
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    for r in rows:
        print("  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip())


def cmd_list(a: argparse.Namespace) -> None:
    reg = registry()
    listed, cur = reg.models(), reg.current()
    if a.json:
        current = cur.tag if cur else None
        print(
            json.dumps(
                {"current": current, "models": [record(m, m.tag == current) for m in listed]}, indent=1
            )
        )
        return
    if not listed:
        print(f"no promoted model under {reg.home} yet: `make run` or `char-rnn pipeline` trains one")
        return
    rows = [("", "TAG", "PROMOTED AT", "VAL LOSS", "PARENT", "FINGERPRINT")]
    for m in listed:
        r = record(m, bool(cur and m.tag == cur.tag))
        fingerprint = (r["fingerprint"] or "")[:12] if r["in_store"] else "(not in the store)"
        val = f"{r['val_loss']:.4f}" if r["val_loss"] is not None else "?"
        rows.append(
            (
                "*" if r["serving"] else "",
                m.tag,
                local_time(r["promoted_at"]),
                val,
                r["parent"] or "-",
                fingerprint,
            )
        )
    table(rows)
    serving = f"* serves (a running service switches within {settings.current().reload_interval:g} s)"
    print(serving if cur else "no model passes its checks: nothing serves")
    last = reg.history()[-1]
    if last.action == "rollback":
        print(f"rolled back to {last.tag} at {local_time(last.at)}: {last.reason}")


def cmd_show(a: argparse.Namespace) -> None:
    reg, tag = registry(), full_tag(a.tag)
    found = {m.tag: m for m in reg.models()}
    if tag not in found:
        raise ValueError(f"{tag} was never promoted; `char-rnn models list` shows the ones that were")
    ck, cur = reg.load(tag), reg.current()
    m, meta, labels = found[tag], ck.meta, found[tag].labels
    if a.json:
        extra = {
            "model": meta.model.model_dump(),
            "train": meta.train.model_dump(),
            "step": meta.step,
            "files": str(ck.path),
        }
        print(json.dumps(record(m, bool(cur and cur.tag == tag)) | extra, indent=1))
        return
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


def cmd_rollback(a: argparse.Namespace) -> None:
    reg = registry()
    before = reg.current()
    e = reg.rollback(full_tag(a.tag) if a.tag else None, a.reason)
    print(f"{e.tag} is the current model again{f' (instead of {before.tag})' if before else ''}: {e.reason}")
    print(
        f"A running service switches to it within {settings.current().reload_interval:g} s; the scheduled "
        "retrain compares new text against it (and does not retrain on the text the replaced model learnt)."
    )
