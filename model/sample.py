"""Batched generation: read prompts, then sample with temperature, top-k and top-p; rows may join and leave
the batch between steps (`Rows`, continuous batching)."""

from __future__ import annotations

from collections.abc import Container, Hashable, Iterator, Sequence
from dataclasses import dataclass

import numpy as np

from model import net
from model.config import ModelConfig
from model.net import Params
from model.vocab import Unknown, Vocab

CHUNK = 64  # steps of noise drawn ahead per row: a generator's stream, whatever the chunks


@dataclass(frozen=True)
class Settings:
    """How one row samples: temperature > 0, top_k 0 = off, top_p 1.0 = off, seed None = random."""

    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    seed: int | None = None

    def __post_init__(self) -> None:
        if not self.temperature > 0:
            raise ValueError("temperature must be > 0")
        if self.top_k < 0:
            raise ValueError("top_k must be >= 0 (0 = off)")
        if not 0 < self.top_p <= 1:
            raise ValueError("top_p must be in (0, 1]")


def prime(
    p: Params, cfg: ModelConfig, prompts: Sequence[np.ndarray], step: net.Stepper | None = None
) -> np.ndarray:
    """The state (L, S, B, H) after reading each prompt's ids; rows of different lengths advance masked."""
    step = step or net.Stepper(p, cfg)
    lens = np.array([len(q) for q in prompts], np.intp)  # (B,)
    ids = np.zeros((int(lens.max(initial=0)), len(prompts)), np.intp)  # (T, B) time-major, 0-padded
    for i, q in enumerate(prompts):
        ids[: len(q), i] = q
    h = net.zeros_state(cfg, len(prompts))
    spare = np.empty_like(h)
    for t in range(len(ids)):
        step(ids[t], h, spare)
        if t >= lens.min():  # some rows have ended: they keep their state
            np.copyto(spare, h, where=(lens <= t)[:, None])  # (B, 1) against (..., B, H)
        h, spare = spare, h
    return h


class Filter:
    """The top-k and top-p of the rows that set them, as arrays, built when the live rows change."""

    def __init__(self, rows: Sequence[Settings], vocab_size: int):
        self.k = np.array([r.top_k or vocab_size for r in rows])[:, None]  # (B', 1)
        self.top_p = np.array([r.top_p for r in rows])[:, None]
        self.inv_temp = np.array([1.0 / r.temperature for r in rows])[:, None]

    def keep(self, logits: np.ndarray) -> np.ndarray:
        """Which ids (B', V) lie in each row's top-k and top-p of softmax(logits / temperature)."""
        z = logits * self.inv_temp  # float64
        probs = np.exp(z - z.max(axis=1, keepdims=True))
        probs /= probs.sum(axis=1, keepdims=True)
        order = np.argsort(-probs, axis=1, kind="stable")  # (B', V) most likely first
        sorted_p = np.take_along_axis(probs, order, axis=1)
        rank = np.arange(probs.shape[1])[None, :]
        before = np.cumsum(sorted_p, axis=1) - sorted_p  # mass strictly ahead of each entry
        keep_sorted = (rank < self.k) & ((before < self.top_p) | (rank == 0))
        keep = np.zeros_like(keep_sorted)
        np.put_along_axis(keep, order, keep_sorted, axis=1)
        return keep


def noise(rng: np.random.Generator, steps: int, settings: Settings, c: np.ndarray) -> np.ndarray:
    """A row's next `steps` draws (steps, V): temperature x Gumbel noise + the output bias c, so that
    argmax(h V + noise[t]) samples softmax((h V + c) / temperature) (the Gumbel-max trick)."""
    g = rng.standard_exponential((steps, len(c)))  # float64: never 0, so the log is finite
    np.log(g, out=g)
    g *= -settings.temperature  # -log(E) with E ~ Exp(1) is Gumbel(0, 1)
    g += c
    return g.astype(c.dtype)


class Rows:
    """Continuous batching: the live rows of one model. Rows join (primed on their prompt at once, `add`, or
    reading it one id per step within the batch, `join`) and leave between steps; a step samples the next id
    of every live row with one matrix product per layer. Each row draws from its own generator, so its text
    depends on its prompt, settings and seed only: not on when it joined, nor on its neighbours. Temperature,
    top-k and top-p cost only the rows that set them.

    The state and the noise, the per-row arrays, live in buffers with room for more rows than are live, so
    that rows join and leave without copying the others: the state's live rows first, in order (a row that
    leaves moves only the rows after it), and each row's noise in a slot of its own, which never moves."""

    def __init__(self, p: Params, cfg: ModelConfig):
        self.p, self.cfg, self.next_state = p, cfg, net.Stepper(p, cfg)
        self.owners: list[Hashable] = []  # per row, whoever added it
        self.settings: list[Settings] = []
        self.rngs: list[np.random.Generator] = []
        self.pending = np.empty(0, np.intp)  # (B,) the ids to read into the state next; -1: none
        self.holding = False  # whether pending may hold a -1 (rows appended since the last flush)
        self.reading: dict[Hashable, tuple[np.ndarray, int]] = {}  # owner -> its prompt, the next id to read
        self.cap = 0  # rows the buffers hold
        self.slots = np.empty(0, np.intp)  # (B,) each row's slot in noise
        self.free: list[int] = []  # the slots no row has
        self.grow(8)
        self.resize(np.empty(0, np.intp))

    def grow(self, rows: int) -> None:
        """Buffers for at least `rows` rows (twice the room at least, each time), the live rows copied over:
        `states`, two (L, S, cap, H), the state and the next one in turn (`cur` is the state's); `noise`
        (cap, CHUNK, V), each slot's next draws."""
        if rows <= self.cap:
            return
        cap, B = max(rows, 2 * self.cap), len(self)
        states = [net.zeros_state(self.cfg, cap) for _ in range(2)]
        noise = np.empty((cap, CHUNK, self.cfg.vocab_size), self.cfg.dtype)
        if self.cap:
            states[0][:, :, :B] = self.state
            noise[: self.cap] = self.noise
        self.free += range(self.cap, cap)
        self.states, self.cur, self.noise, self.cap = states, 0, noise, cap

    def __len__(self) -> int:
        return len(self.owners)

    def add(self, owner: Hashable, prompts: Sequence[np.ndarray], rows: Sequence[Settings]) -> None:
        """Rows primed on `prompts` (ids) now, one per Settings, after the live ones; they sample from the
        next step."""
        if len(rows) != len(prompts):
            raise ValueError("one Settings per prompt")
        self.append(owner, prime(self.p, self.cfg, prompts, self.next_state), rows, np.full(len(rows), -1))

    def join(self, owner: Hashable, prompt: np.ndarray, rows: Sequence[Settings]) -> None:
        """Rows that read `prompt` (ids) within the batch, one id per step, then sample: their first id comes
        from the step max(len(prompt), 1) after joining (`step` gives -1 for them until then)."""
        first = np.full(len(rows), prompt[0] if len(prompt) else -1)
        self.append(owner, net.zeros_state(self.cfg, len(rows)), rows, first)
        if len(prompt) > 1:
            self.reading[owner] = (prompt, 1)

    def append(
        self, owner: Hashable, state: np.ndarray, rows: Sequence[Settings], pending: np.ndarray
    ) -> None:
        B, n = len(self), len(rows)
        used = np.concatenate([self.used(), np.zeros(n, np.intp)])
        rngs = [np.random.default_rng(r.seed) for r in rows]
        self.grow(B + n)
        self.states[self.cur][:, :, B : B + n] = state
        slots = [self.free.pop() for _ in range(n)]
        for slot, g, r in zip(slots, rngs, rows, strict=True):
            self.noise[slot] = noise(g, CHUNK, r, self.p["c"])
        self.slots = np.concatenate([self.slots, np.array(slots, np.intp)])
        self.owners += [owner] * n
        self.settings += rows
        self.rngs += rngs
        self.pending = np.concatenate([self.pending, pending])
        self.holding = True
        self.resize(used)

    def remove(self, owners: Container[Hashable]) -> None:
        """Drop the rows of `owners` (their order is kept)."""
        keep = np.array([o not in owners for o in self.owners], bool)
        if keep.all():
            return
        idx = np.flatnonzero(keep)
        first = int(np.argmin(keep))  # the first row that leaves: those before it stay where they are
        moved = idx[first:]
        self.states[self.cur][:, :, first : len(idx)] = self.state[:, :, moved]
        self.free += self.slots[~keep].tolist()
        self.owners = [self.owners[i] for i in idx]
        self.settings = [self.settings[i] for i in idx]
        self.rngs = [self.rngs[i] for i in idx]
        self.reading = {o: r for o, r in self.reading.items() if o not in owners}
        self.pending, used = self.pending[idx], self.used()[idx]
        self.slots = self.slots[idx]
        self.resize(used)

    def used(self) -> np.ndarray:
        """How many of its steps of noise each row has used (B,)."""
        return self.at - self.base

    def resize(self, used: np.ndarray) -> None:
        """Buffers and per-row settings sized to the live rows, which have `used` steps of noise each."""
        B, V = len(self), self.cfg.vocab_size
        self.state = self.states[self.cur][:, :, :B]  # (L, S, B, H)
        self.spare = self.states[1 - self.cur][:, :, :B]
        self.logits, self.drawn = np.empty((B, V), self.cfg.dtype), np.empty((B, V), self.cfg.dtype)
        self.base = self.slots * CHUNK  # (B,) where each row's noise starts in noise's (cap * CHUNK) steps
        self.at = self.base + used  # (B,) each row's next step of noise, an index into those steps
        self.filtered = np.flatnonzero([0 < r.top_k < V or r.top_p < 1 for r in self.settings])
        self.filter = Filter([self.settings[i] for i in self.filtered], V)
        self.left = CHUNK - int(used.max(initial=0))  # steps until a row needs fresh noise
        self.spans: dict[Hashable, slice] = {}  # owner -> its rows (added together, so contiguous)
        for i, o in enumerate(self.owners):
            self.spans[o] = slice(self.spans[o].start if o in self.spans else i, i + 1)

    def flush(self) -> None:
        """Read the pending ids into the state; rows without one keep theirs."""
        ids = self.pending
        hold = ids < 0 if self.holding else None
        self.holding = False  # a step leaves an id to read in every row
        if hold is not None and hold.all():
            return
        if hold is not None and hold.any():
            self.next_state(np.maximum(ids, 0), self.state, self.spare)
            np.copyto(self.spare, self.state, where=hold[:, None])  # (B, 1) against (..., B, H)
        else:
            self.next_state(ids, self.state, self.spare)
        self.state, self.spare, self.cur = self.spare, self.state, 1 - self.cur

    def step(self) -> np.ndarray:
        """The next id of every live row (B,), rows in the order they were added; -1 for a row still reading
        its prompt."""
        self.flush()
        logits = np.matmul(self.state[-1, 0], self.p["V"], self.logits)  # (B, V) without c: in the noise
        if len(self.filtered):
            f = self.filtered
            logits[f] = np.where(self.filter.keep(logits[f] + self.p["c"]), logits[f], -np.inf)
        # each row's draws for this step; "clip" (`at` is in range by construction): "raise" buffers `out`
        self.noise.reshape(-1, self.cfg.vocab_size).take(self.at, axis=0, out=self.drawn, mode="clip")
        logits += self.drawn
        ids = logits.argmax(axis=1)
        self.pending = ids
        if self.reading:
            self.pending = ids.copy()
            for owner, (prompt, k) in list(self.reading.items()):
                rs = self.spans[owner]
                self.pending[rs], ids[rs] = prompt[k], -1
                self.at[rs] -= 1  # no noise used
                if k + 1 < len(prompt):
                    self.reading[owner] = (prompt, k + 1)
                else:
                    del self.reading[owner]
        self.at += 1
        self.left -= 1
        if self.left == 0:
            for i in np.flatnonzero(self.used() == CHUNK):
                self.noise[self.slots[i]] = noise(self.rngs[i], CHUNK, self.settings[i], self.p["c"])
                self.at[i] = self.base[i]
            self.left = CHUNK - int(self.used().max(initial=0))
        return ids


def generate_ids(
    p: Params,
    cfg: ModelConfig,
    prompts: Sequence[np.ndarray],
    length: int,
    rows: Sequence[Settings],
) -> Iterator[np.ndarray]:
    """Yield the next id of every row (B,), `length` times: `Rows` that nobody joins or leaves."""
    batch = Rows(p, cfg)
    batch.add(None, prompts, rows)
    for _ in range(length):
        yield batch.step()


def sample(
    p: Params,
    cfg: ModelConfig,
    vocab: Vocab,
    prompts: Sequence[str],
    length: int,
    rows: Sequence[Settings] | Settings = Settings(),
    unknown: Unknown = "error",
) -> list[str]:
    """Continue every prompt by `length` characters (prompt excluded)."""
    if isinstance(rows, Settings):
        rows = [rows] * len(prompts)
    encoded = [vocab.encode(q, unknown) for q in prompts]
    cols = list(generate_ids(p, cfg, encoded, length, rows))
    if not cols:
        return [""] * len(prompts)
    out = np.stack(cols, axis=1)  # (B, length)
    return [vocab.decode(r) for r in out]
