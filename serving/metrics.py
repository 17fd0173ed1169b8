"""The service's own Prometheus metrics, served on /metrics beside BentoML's `bentoml_service_*`:

  char_rnn_requests_total{route,status}   responses by route and status, the edge's refusals (401, 429...) too
  char_rnn_generated_chars_total{route}   characters generated for clients
  char_rnn_batch_rows                     histogram: rows computed per generation step (requests batched)
  char_rnn_queue_depth                    requests waiting for the generation thread
  char_rnn_live_rows                      rows in the running batch (continuous batching)
  char_rnn_rows_cancelled_total{reason}   rows that left unfinished: "disconnect" (client gone), "deadline"
  char_rnn_time_to_first_char_seconds     histogram: from a request's admission to its first character
  char_rnn_model_info{tag}                1 for the model a worker serves, 0 for the ones it served before

prometheus_client is imported by `start()`, in the worker, once BentoML has pointed it at its multiprocess
directory (imported earlier, it would keep values in process memory, invisible to /metrics). The generation
thread's reports (`step`, `first_char`, `queued`, `live`, `cancelled`) only touch plain Python values: a
histogram observation in multiprocess mode costs ~5 us, a generation step ~30 us. A flusher thread moves them
into the metrics every `FLUSH` seconds.
"""

from __future__ import annotations

import bisect
import threading
from collections import Counter
from typing import Any

FLUSH = 0.5  # seconds
ROWS = tuple(2**i for i in range(13))  # 1 .. 4096 (CHAR_RNN_MAX_BATCH's bound)
FIRST_CHAR = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30)


def observe_many(histogram: Any, value: float, n: int) -> None:
    """`histogram.observe(value)` n times, in two writes. prometheus_client has no public call for this; its
    Histogram keeps one non-cumulative count per bucket and a sum (so since 0.4; tests scrape the result)."""
    histogram._sum.inc(value * n)
    histogram._buckets[bisect.bisect_left(histogram._upper_bounds, value)].inc(n)


class Metrics:
    """One per worker process. Every report is a no-op until `start()`."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.steps: Counter[int] = Counter()  # rows -> generation steps, since the last flush
        self.waits: list[float] = []  # seconds to first character, since the last flush
        self.depth: int | None = None
        self.rows_live: int | None = None
        self.gone: Counter[str] = Counter()  # reason -> rows cancelled, since the last flush
        self.tag: str | None = None
        self.started = False
        self.stopping = threading.Event()

    def start(self) -> None:
        """Create the metrics (once per process) and the flusher thread."""
        if self.started:
            return
        import prometheus_client as p  # see the module's docstring for why it is imported here

        self.requests = p.Counter("char_rnn_requests", "Requests answered", ["route", "status"])
        self.chars = p.Counter("char_rnn_generated_chars", "Characters generated for clients", ["route"])
        self.rows = p.Histogram("char_rnn_batch_rows", "Rows computed per generation step", buckets=ROWS)
        self.queue = p.Gauge(
            "char_rnn_queue_depth", "Requests waiting for the generation thread", multiprocess_mode="livesum"
        )
        self.first = p.Histogram(
            "char_rnn_time_to_first_char_seconds",
            "Seconds from a request's admission to its first generated character",
            buckets=FIRST_CHAR,
        )
        self.live_rows = p.Gauge(
            "char_rnn_live_rows", "Rows in the running batch", multiprocess_mode="livesum"
        )
        self.cancelled_rows = p.Counter(
            "char_rnn_rows_cancelled", "Rows that left the batch unfinished", ["reason"]
        )
        self.info = p.Gauge(
            "char_rnn_model_info", "1 for the served model's tag", ["tag"], multiprocess_mode="livemax"
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

    def step(self, rows: int) -> None:
        with self.lock:
            self.steps[rows] += 1

    def first_char(self, seconds: float) -> None:
        with self.lock:
            self.waits.append(seconds)

    def flush(self) -> None:
        if not self.started:
            return
        with self.lock:
            steps, self.steps = self.steps, Counter()
            waits, self.waits = self.waits, []
            depth, self.depth = self.depth, None
            live, self.rows_live = self.rows_live, None
            gone, self.gone = self.gone, Counter()
        for rows, n in steps.items():
            observe_many(self.rows, rows, n)
        for s in waits:
            self.first.observe(s)
        if depth is not None:
            self.queue.set(depth)
        if live is not None:
            self.live_rows.set(live)
        for reason, n in gone.items():
            self.cancelled_rows.labels(reason).inc(n)

    def flusher(self) -> None:
        while not self.stopping.wait(FLUSH):
            self.flush()
