"""A sweep's rules: its search space and configurations, its rungs, who survives a rung, how each trial
ended. Plain data and functions; the Dask fan-out is the flow's (flows/sweep.py).

The space maps a setting to a list of values or to a range. Its keys are fields of ModelConfig or TrainConfig
(a field added there, such as the cell, can be searched as soon as it exists), and every value is checked
against that field's type and bounds before any work. Configurations are drawn with a seed: from a space of
lists only, distinct grid points; with a range in it, independent random draws.
"""

from __future__ import annotations

import hashlib
import json
import math
from pathlib import Path
from typing import Annotated, Any

import numpy as np
from pydantic import AfterValidator, BaseModel, ConfigDict, TypeAdapter, ValidationError

from model import checkpoint
from model.config import ModelConfig, TrainConfig, like
from stages.records import Rung, Trial, TrialOutcome

# set by the sweep itself (the budget, the seed, the checkpoints), or not a choice (the corpus's vocabulary)
FIXED = {"vocab_size", "steps", "seed", "checkpoint_every", "eval_every", "eval_chars", "keep", "log_every"}
CONFIGS: dict[str, type[BaseModel]] = {
    name: cls for cls in (ModelConfig, TrainConfig) for name in cls.model_fields if name not in FIXED
}


class Range(BaseModel):
    """Values drawn uniformly from [low, high] (log-uniformly with `log`); whole-number settings rounded."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)

    low: float
    high: float
    log: bool = False


Values = list[int | float | str] | Range


def field_adapter(name: str) -> TypeAdapter:
    return TypeAdapter(like(CONFIGS[name], name))


def check(space: dict[str, Values]) -> dict[str, Values]:
    """`space` with every value checked against its setting's type and bounds; one line naming each fault."""
    errors = []
    for name, values in space.items():
        if name not in CONFIGS:
            errors.append(f"{name!r} is not a setting a sweep can vary (choose among {', '.join(CONFIGS)})")
            continue
        bounds = [values.low, values.high] if isinstance(values, Range) else values
        if not bounds:
            errors.append(f"{name}: give at least one value")
        for v in bounds:
            try:
                field_adapter(name).validate_python(v, strict=isinstance(v, str))
            except ValidationError as e:
                errors.append(f"{name}={v!r}: {e.errors()[0]['msg']}")
        if isinstance(values, Range):
            kind = CONFIGS[name].model_fields[name].annotation
            if kind not in (int, float):
                errors.append(f"{name}: a range needs a numeric setting; list its values instead")
            elif values.low > values.high or (values.log and values.low <= 0):
                errors.append(f"{name}: a range needs low <= high (and low > 0 with log)")
    if errors:
        raise ValueError("; ".join(errors))
    return space


Space = Annotated[dict[str, Values], AfterValidator(check)]

# the sweep's own defaults (the flow's parameters and `char-rnn sweep`'s flags)
DEFAULTS = {"trials": 8, "seed": 0, "steps": 1600, "checkpoint_every": 100, "halving": True, "promote": True}

DEFAULT_SPACE: dict[str, Any] = {
    "cell": ["rnn", "gru", "lstm"],
    "hidden": [64, 128, 256],
    "layers": [1, 2],
    "dropout": [0.0, 0.1],
    "lr": {"low": 1e-3, "high": 1e-2, "log": True},
    "batch": [16, 32],
    "seq": [32, 64],
}


def grid_size(space: dict[str, Values]) -> int | None:
    """How many distinct configurations a space of lists holds (None when it has a range)."""
    if any(isinstance(v, Range) for v in space.values()):
        return None
    return math.prod(len(set(map(repr, v))) for v in space.values())


def draw(space: dict[str, Values], trials: int, seed: int) -> list[dict[str, Any]]:
    """`trials` distinct configurations (setting -> value), the same for the same seed."""
    names = sorted(space)
    size = grid_size(space)
    if size is not None and trials > size:
        raise ValueError(f"the space holds {size} configuration(s); ask for at most that many trials")
    rng = np.random.default_rng(seed)
    drawn: list[dict[str, Any]] = []
    seen: set[str] = set()
    for _ in range(100 * trials):
        if len(drawn) == trials:
            break
        pick = {n: value(n, space[n], rng) for n in names}
        if repr(pick) not in seen:
            seen.add(repr(pick))
            drawn.append(pick)
    if len(drawn) < trials:
        raise ValueError(f"drew only {len(drawn)} distinct configurations; widen the space or ask for fewer")
    return drawn


def value(name: str, values: Values, rng: np.random.Generator) -> Any:
    """One value of `name`, checked (a whole-number range gives an int)."""
    if isinstance(values, Range):
        lo, hi = (math.log(values.low), math.log(values.high)) if values.log else (values.low, values.high)
        v = float(rng.uniform(lo, hi))
        v = math.exp(v) if values.log else v
        if CONFIGS[name].model_fields[name].annotation is int:
            v = round(v)
        else:
            v = float(f"{v:.4g}")  # readable in tables and reports
    else:
        v = values[int(rng.integers(len(values)))]
    return field_adapter(name).validate_python(v)


def configs(drawn: dict[str, Any], vocab_size: int, **train: Any) -> tuple[ModelConfig, TrainConfig]:
    """The model and training configurations of one drawn point (`train`: the sweep's fixed settings)."""
    model = {k: v for k, v in drawn.items() if CONFIGS[k] is ModelConfig}
    return (
        ModelConfig(vocab_size=vocab_size, **model),
        TrainConfig(**{k: v for k, v in drawn.items() if k not in model} | train),
    )


def rungs(trials: int, steps: int, halving: bool = True) -> list[int]:
    """The step each rung trains its trials to: one rung per halving of `trials` until one is left, each
    twice the one before, the last at `steps`. Without halving, one rung: every trial trains `steps`."""
    count = 1 + (max(trials, 1).bit_length() - 1 if halving else 0)  # 8 -> 4 rungs (8, 4, 2, 1 trials)
    if steps < 2 ** (count - 1):
        raise ValueError(
            f"steps={steps} is too few for {trials} trials halved {count - 1} times (each rung doubles "
            f"the one before); use steps >= {2 ** (count - 1)}"
        )
    return [round(steps / 2 ** (count - 1 - k)) for k in range(count)]


def design(space: dict | None, trials: int, seed: int, steps: int, halving: bool) -> tuple[list, list[int]]:
    """The drawn configurations and the rungs' steps; a ValueError (one line) when they cannot be made."""
    checked = TypeAdapter(Space).validate_python(space or DEFAULT_SPACE)
    return draw(checked, trials, seed), rungs(trials, steps, halving)


def digest(*parts: Any) -> str:
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:8]


def trials(
    drawn: list[dict[str, Any]], plan: list[int], vocab_size: int, fingerprint: str, root: Path, **fixed: Any
) -> list[Trial]:
    """The sweep's trials, each in a folder named by its configuration (a re-run of the same sweep finds its
    checkpoints), under `root/sweep-<fingerprint>-<digest of the trials and rungs>/`."""
    points = [configs(d, vocab_size, **fixed) for d in drawn]
    names = [
        f"trial-{i:02d}-{digest(m.model_dump(), c.model_dump(), fingerprint)}"
        for i, (m, c) in enumerate(points)
    ]
    folder = Path(root) / f"sweep-{fingerprint[:12]}-{digest(names, plan)}"
    return [
        Trial(index=i, dir=folder / n, drawn=d, model=m, config=c)
        for i, (n, d, (m, c)) in enumerate(zip(names, drawn, points, strict=True))
    ]


def in_time(done: list[Rung], stop: int, minutes: float) -> bool:
    """Whether a trial would train to `stop` within `minutes` in all, at the speed of its rungs so far."""
    return sum(r.seconds for r in done) * stop / done[-1].step <= minutes * 60


def survivors(
    alive: list[Trial], results: dict[int, list[Rung]], stop: int, minutes: float | None
) -> tuple[list[Trial], set[int]]:
    """Who trains on to the next rung (at step `stop`): the better half by validation loss of those that did
    not fail, then only those the time budget allows; and the trials the budget stopped."""
    ok = sorted(
        (t for t in alive if results[t.index][-1].failed is None), key=lambda t: results[t.index][-1].val
    )
    best = ok[: max(1, len(alive) // 2)]
    if minutes is None:
        return best, set()
    fits = [t for t in best if in_time(results[t.index], stop, minutes)]
    return fits, {t.index for t in best if t not in fits}


def progress(t: Trial, r: Rung, rungs: int) -> str:
    """The line said when a trial finishes a rung."""
    head = f"trial {t.index} rung {r.rung + 1}/{rungs}"
    if r.failed:
        return f"{head}: failed at step {r.step}: {r.failed}"
    resumed = f", resumed at step {r.resumed_from}" if r.resumed_from else ""
    return (
        f"{head} (step {r.step}): val {r.val:.4f} nats/char ({r.val / math.log(2):.3f} bits/char), "
        f"{r.seconds:.1f} s, {r.chars_per_s:,.0f} chars/s on {r.worker}{resumed}"
    )


def winner(group: list[Trial], results: dict[int, list[Rung]]) -> int | None:
    """The best validation loss among the trials that went furthest without failing."""
    finished = [t for t in group if results[t.index] and results[t.index][-1].failed is None]
    depth = max((results[t.index][-1].rung for t in finished), default=-1)
    deepest = [t for t in finished if results[t.index][-1].rung == depth]
    best = min(deepest, key=lambda t: results[t.index][-1].val, default=None)
    return None if best is None else best.index


def fate(last: Rung, won: bool, out_of_time: bool, rungs: int) -> str:
    """How a trial ended, in words."""
    if last.failed:
        return f"failed in rung {last.rung}: {last.failed.split(';')[0]}"
    if won:
        return "winner"
    if out_of_time:
        return f"out of time after rung {last.rung}"
    if last.rung == rungs - 1:
        return "finished, not the best"
    return f"stopped after rung {last.rung}"


def history(trial: Trial) -> list[list[float]]:
    """The trial's validation curve, from its newest checkpoint."""
    newest = checkpoint.read_pointer(trial.dir / "checkpoints", "latest")
    return checkpoint.read_meta(newest).metrics.get("val", []) if newest else []


def outcomes(
    group: list[Trial], results: dict[int, list[Rung]], out_of_time: set[int], rungs: int
) -> tuple[int | None, list[TrialOutcome]]:
    """The winner's index and every trial's outcome."""
    won = winner(group, results)
    return won, [
        TrialOutcome(
            index=t.index,
            name=t.dir.name,
            drawn=t.drawn,
            rungs=results[t.index],
            status=fate(results[t.index][-1], t.index == won, t.index in out_of_time, rungs),
            history=history(t),
        )
        for t in group
    ]
