"""The service's own Prometheus metrics, served on /metrics beside BentoML's `bentoml_service_*`:

  char_rnn_requests_total{route,status}   responses by route and status, the edge's refusals (401, 429...) too
  char_rnn_generated_chars_total{route}   characters generated for clients
  char_rnn_batch_rows                     histogram: rows computed per generation step (requests batched)
  char_rnn_queue_depth                    requests waiting for the generation thread
  char_rnn_live_rows                      rows in the running batch (continuous batching)
  char_rnn_rows_cancelled_total{reason}   rows that left unfinished: "disconnect" (client gone), "deadline"
  char_rnn_time_to_first_char_seconds     histogram: from a request's admission to its first character
  char_rnn_steps_after_disconnect         histogram: per request whose client left, the generation steps
                                          computed for it after the service saw it go (0: still queued)
  char_rnn_model_info{tag}                1 for the model a worker serves, 0 for the ones it served before

prometheus_client is imported by `start()`, in the worker, once BentoML has pointed it at its multiprocess
directory (imported earlier, it would keep values in process memory, invisible to /metrics). The generation
thread's reports (`steps`, `first_char`, `queued`, `live`, `cancelled`, `after_disconnect`) only touch plain
Python values, because a metric update in multiprocess mode (a locked write to a memory-mapped file) costs a
sizeable fraction of a small model's generation step. A flusher thread moves them into the metrics every
`FLUSH` seconds.

`char_rnn_batch_rows` counts every generation step, and a histogram takes one `observe` call per observation:
as many calls as steps. So it is kept as two counters instead, which a flush increments once per bucket:
steps per bucket of rows (`char_rnn_batch_steps_total{le}`, not cumulative) and rows computed. `histogram()`,
which the service's `__metrics__` (BentoML's hook for rewriting /metrics) applies to the exposition, shows
them as the histogram, summed over the workers as BentoML's multiprocess mode sums every counter. All of it
through prometheus_client's public API.
"""

from __future__ import annotations

import re
import threading
from collections import Counter
from typing import Any

FLUSH = 0.5  # seconds
ROWS = tuple(2**i for i in range(13))  # 1 .. 4096 (CHAR_RNN_MAX_BATCH's bound)
FIRST_CHAR = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30)
AFTER = (0, *(2**i for i in range(12)))  # steps after a disconnect: 0, 1, 2, 4, ..., 2048
BATCH_ROWS = ("char_rnn_batch_rows", "Rows computed per generation step")  # the histogram shown
STEPS, COMPUTED = "char_rnn_batch_steps", "char_rnn_batch_rows_computed"  # the counters kept


def bucket(rows: int) -> str:
    """The `le` label of the histogram bucket `rows` falls in (not cumulative: only the smallest)."""
    return next((f"{float(b)}" for b in ROWS if rows <= b), "+Inf")


class Fixed:
    """A collector of families made already (for rendering them with prometheus_client)."""

    def __init__(self, families: list[Any]) -> None:
        self.families = families

    def collect(self) -> list[Any]:
        return self.families


def histogram(exposition: str) -> str:
    """`exposition` (Prometheus' text format) with the counters STEPS and COMPUTED replaced by the histogram
    `char_rnn_batch_rows` they hold (cumulative buckets, count, sum)."""
    import prometheus_client as p
    from prometheus_client.core import HistogramMetricFamily
    from prometheus_client.parser import text_string_to_metric_families

    kept, per_bucket, total = [], Counter(), 0.0
    for block in re.split(r"(?m)^(?=# HELP )", exposition):  # one block per family
        if block.split(" ", 3)[2:3] not in ([f"{STEPS}_total"], [f"{COMPUTED}_total"]):
            kept.append(block)
            continue
        for sample in (s for family in text_string_to_metric_families(block) for s in family.samples):
            if sample.name == f"{STEPS}_total":
                per_bucket[sample.labels["le"]] += sample.value
            elif sample.name == f"{COMPUTED}_total":
                total += sample.value
    running, buckets = 0.0, []
    for le in [f"{float(b)}" for b in ROWS] + ["+Inf"]:
        running += per_bucket[le]
        buckets.append((le, running))
    family = HistogramMetricFamily(*BATCH_ROWS, buckets=buckets, sum_value=total)
    shown = p.CollectorRegistry(auto_describe=False)
    shown.register(Fixed([family]))
    return "".join(kept) + p.generate_latest(shown).decode()


class Metrics:
    """One per worker process. Every report is a no-op until `start()`. `registry` is prometheus_client's
    (None: its default one, which BentoML's /metrics reads in multiprocess mode)."""

    def __init__(self, registry: Any = None) -> None:
        self.registry = registry
        self.lock = threading.Lock()
        self.counts: Counter[int] = Counter()  # rows -> generation steps, since the last flush
        self.waits: list[float] = []  # seconds to first character, since the last flush
        self.depth: int | None = None
        self.rows_live: int | None = None
        self.gone: Counter[str] = Counter()  # reason -> rows cancelled, since the last flush
        self.afters: list[int] = []  # steps after a disconnect, per request, since the last flush
        self.tag: str | None = None
        self.started = False
        self.stopping = threading.Event()

    def start(self) -> None:
        """Create the metrics (once per process) and the flusher thread."""
        if self.started:
            return
        import prometheus_client as p  # see the module's docstring for why it is imported here

        at = {} if self.registry is None else {"registry": self.registry}
        self.requests = p.Counter("char_rnn_requests", "Requests answered", ["route", "status"], **at)
        self.chars = p.Counter(
            "char_rnn_generated_chars", "Characters generated for clients", ["route"], **at
        )
        self.steps_by_rows = p.Counter(
            STEPS, "Generation steps by bucket of rows (see char_rnn_batch_rows)", ["le"], **at
        )
        self.rows_computed = p.Counter(
            COMPUTED, "Rows computed by generation steps (see char_rnn_batch_rows)", **at
        )
        self.queue = p.Gauge(
            "char_rnn_queue_depth",
            "Requests waiting for the generation thread",
            multiprocess_mode="livesum",
            **at,
        )
        self.first = p.Histogram(
            "char_rnn_time_to_first_char_seconds",
            "Seconds from a request's admission to its first generated character",
            buckets=FIRST_CHAR,
            **at,
        )
        self.live_rows = p.Gauge(
            "char_rnn_live_rows", "Rows in the running batch", multiprocess_mode="livesum", **at
        )
        self.cancelled_rows = p.Counter(
            "char_rnn_rows_cancelled", "Rows that left the batch unfinished", ["reason"], **at
        )
        self.after = p.Histogram(
            "char_rnn_steps_after_disconnect",
            "Generation steps computed for a request after its client left (0: it was still queued)",
            buckets=AFTER,
            **at,
        )
        self.info = p.Gauge(
            "char_rnn_model_info", "1 for the served model's tag", ["tag"], multiprocess_mode="livemax", **at
        )
        self.started = True
        threading.Thread(target=self.flusher, name="char-rnn-metrics", daemon=True).start()

    def stop(self) -> None:
        self.stopping.set()
        self.flush()

    # Reports from the HTTP side (the event loop): a few per request, written at once.
    def request(self, route: str, status: int) -> None:
        if self.started:
            self.requests.labels(route, str(status)).inc()

    def generated(self, route: str, chars: int) -> None:
        if self.started and chars:
            self.chars.labels(route).inc(chars)

    def serving(self, tag: str) -> None:
        if not self.started:
            return
        if self.tag is not None and self.tag != tag:
            self.info.labels(self.tag).set(0)
        self.info.labels(tag).set(1)
        self.tag = tag

    # Reports from the generation thread (serving.batcher's Observer): kept until the next flush.
    def queued(self, depth: int) -> None:
        self.depth = depth

    def live(self, rows: int) -> None:
        self.rows_live = rows

    def cancelled(self, reason: str, rows: int) -> None:
        with self.lock:
            self.gone[reason] += rows

    def steps(self, rows: int, n: int) -> None:
        with self.lock:
            self.counts[rows] += n

    def step(self, rows: int) -> None:
        self.steps(rows, 1)

    def after_disconnect(self, steps: int) -> None:
        with self.lock:
            self.afters.append(steps)

    def first_char(self, seconds: float) -> None:
        with self.lock:
            self.waits.append(seconds)

    def flush(self) -> None:
        if not self.started:
            return
        with self.lock:
            steps, self.counts = self.counts, Counter()
            waits, self.waits = self.waits, []
            depth, self.depth = self.depth, None
            live, self.rows_live = self.rows_live, None
            gone, self.gone = self.gone, Counter()
            afters, self.afters = self.afters, []
        by_bucket: Counter[str] = Counter()
        for rows, n in steps.items():
            by_bucket[bucket(rows)] += n
        for le, n in by_bucket.items():
            self.steps_by_rows.labels(le).inc(n)
        if steps:
            self.rows_computed.inc(sum(rows * n for rows, n in steps.items()))
        for s in waits:
            self.first.observe(s)
        if depth is not None:
            self.queue.set(depth)
        if live is not None:
            self.live_rows.set(live)
        for reason, n in gone.items():
            self.cancelled_rows.labels(reason).inc(n)
        for n in afters:
            self.after.observe(n)

    def flusher(self) -> None:
        while not self.stopping.wait(FLUSH):
            self.flush()
