"""The BentoML service: POST /generate, /generate_stream, /model_info and /models over the promoted char-rnn
model, POST /training (the newest pipeline run's live progress); the playground page at GET /, the API docs at
/docs, Prometheus metrics at /metrics.

A thin HTTP face over model/. `serving.http.Gate` checks every request before BentoML sees it; valid requests
are queued to `serving.batcher`, whose thread runs the rows of concurrent requests together. Each request
holds the immutable model snapshot it grabbed at its start; a watcher swaps in newly promoted models.
`serving.metrics` counts what happens, `serving.pages` holds the pages, `serving.history` the models view,
`serving.progress` the training view, `serving.bento` the Bento's image.

Importing this module only declares the service (what BentoML needs to find, serve and build it); each worker
process loads the model and starts its threads in `CharRNN.__init__`. A Bento serves the model named by its
`model` argument (`stages.bento.build`), a service started from the source the newest promoted one.

Settings (CHAR_RNN_*, see settings/): HOST (127.0.0.1) and PORT (3000), API_KEY, METRICS_KEY,
RELOAD_INTERVAL, MAX_PROMPT, TIMEOUT, BODY_TIMEOUT, MAX_BATCH, MAX_CONCURRENCY, WORKERS, BLAS_THREADS.
"""

from __future__ import annotations

import os
import sys

import settings

if "bentoml_cli" in sys.modules and "BENTOML_HOME" not in os.environ:
    # `bentoml serve` with no BENTOML_HOME: BentoML's command chose its default home for itself before
    # importing this module. The workers it starts next inherit this environment, so they serve from the
    # project's home, where the pipeline promotes. (`bentoml build` reads the model in this very process: it
    # needs BENTOML_HOME exported.)
    os.environ["BENTOML_HOME"] = str(settings.load().bentoml_dir)
os.environ.update(settings.configure())  # before BentoML picks its home (refuses if it has, outside its CLI)
# BentoML samples no traces unless configured to, yet its OpenTelemetry spans cost a large share of the HTTP
# overhead per request; set OTEL_SDK_DISABLED=false when tracing is configured.
os.environ.setdefault("OTEL_SDK_DISABLED", "true")

import asyncio
import gc
import logging
import threading
import time
from collections.abc import AsyncGenerator
from pathlib import Path
from typing import Any, Literal

import bentoml
from pydantic import BaseModel, ConfigDict, Field, field_validator
from starlette.responses import JSONResponse
from threadpoolctl import threadpool_limits

from model import checkpoint, corpus, sample
from registry import Current, Registry
from serving import bento, events, history, openapi, pages, progress, workers
from serving.batcher import Batcher, Job
from serving.http import Gate, Key, NoFields, QuietClientErrors, disconnected, error, unknown_chars_error
from serving.metrics import Metrics, histogram
from serving.snapshot import ModelInfo, Snapshot
from serving.spread import Spread

S = settings.current()
GENERATE, STREAM, INFO, MODELS, TRAINING, METRICS_ROUTE = (
    "/generate",
    "/generate_stream",
    "/model_info",
    "/models",
    "/training",
    "/metrics",
)
NO_INPUT = (INFO, MODELS, TRAINING)  # the routes that take no fields
MAX_BODY = 12 * S.max_prompt + 4096  # a prompt of \uXXXX escapes, plus the other fields
METRICS = Metrics()  # reports nothing until a worker's __init__ starts it
# The generation thread holds the GIL between NumPy calls; a worker makes it hand the GIL to the HTTP loop
# this often (seconds), far more often than Python's default, so that requests are not kept waiting.
SWITCH_INTERVAL = 0.0002
log = logging.getLogger("bentoml.char_rnn")


class BentoArgs(BaseModel):
    """BentoML's template arguments (`--arg model=...` of `bentoml build` / `bentoml serve`)."""

    model: str | None = Field(None, description="serve this promoted model (char-rnn:VERSION), no hot reload")


ARGS = bentoml.use_arguments(BentoArgs)


class GenerateRequest(bentoml.IODescriptor):
    """Continue `prompt` by `max_new_chars` characters, `num_samples` times.

    The generation APIs take its fields as keyword arguments (`input_spec`), so that BentoML's clients call
    `client.generate(prompt="ROMEO:", max_new_chars=40)`; it stays the one strict model of a request, for
    BentoML's parsing and for the Gate, which validates bodies with it first."""

    model_config = ConfigDict(extra="forbid", strict=True, allow_inf_nan=False)

    prompt: str = Field("\n", max_length=S.max_prompt, description="text to continue (NFC-normalised)")
    max_new_chars: int = Field(200, ge=1, le=2000)
    temperature: float = Field(0.8, ge=0.05, le=5)
    top_k: int | None = Field(None, ge=1, le=1_000_000, description="keep the k most likely characters")
    top_p: float | None = Field(None, le=1, description="keep the smallest set with this mass, in (0, 1]")
    seed: int | None = Field(None, ge=0, le=2**32 - 1, description="for reproducible output")
    num_samples: int = Field(1, ge=1, le=16)
    unknown_chars: Literal["error", "skip"] = Field("error", description="prompt characters not in vocab")

    @field_validator("top_p")
    @classmethod
    def _top_p_positive(cls, v: float | None) -> float | None:
        if v is not None and not v > 0:
            raise ValueError("top_p must be greater than 0 (it is a probability mass in (0, 1])")
        return v

    def settings(self) -> list[sample.Settings]:
        """One row per sample; row i of seed s draws from seed s + i * 2**32, the same batched or not."""
        seeds = [None if self.seed is None else self.seed + i * 2**32 for i in range(self.num_samples)]
        return [sample.Settings(self.temperature, self.top_k or 0, self.top_p or 1.0, s) for s in seeds]


class GenerateResponse(BaseModel):
    completions: list[str] = Field(description="one continuation per sample, prompt excluded")
    model: str = Field(description="tag of the model that produced every completion")
    skipped_chars: list[str] = Field(description="prompt characters dropped as unknown (unknown_chars=skip)")
    elapsed_ms: float


def no_model_message() -> str:
    return (
        f"no model has been promoted yet under CHAR_RNN_HOME={S.home}; train and promote one with "
        "`char-rnn pipeline` (or `make run`) from the repository root, then retry: this service picks it "
        f"up within {S.reload_interval:g} s, no restart needed"
    )


def with_status(ctx: bentoml.Context, response: JSONResponse) -> JSONResponse:
    """`response`, its status kept: BentoML gives an API that takes `ctx` the status set on `ctx.response`."""
    ctx.response.status_code = response.status_code
    return response


def refused(ctx: bentoml.Context, response: JSONResponse) -> bytes:
    """The body of `response`, its status and content type set on `ctx.response`: BentoML waits for a stream's
    first chunk before it sends the headers, and gives them those of `ctx.response`."""
    ctx.response.status_code = response.status_code
    ctx.response.headers["content-type"] = "application/json"
    return bytes(response.body)


def share_logs() -> None:
    """The project's loggers (registry, HTTP edge) write where BentoML's do, at INFO; BentoML's own record of
    a client's bad request becomes one WARNING line."""
    ours = logging.getLogger("char_rnn")
    ours.setLevel(logging.INFO)
    ours.propagate = False
    for h in logging.getLogger("bentoml").handlers:
        if h not in ours.handlers:
            ours.addHandler(h)
    logging.getLogger("bentoml._internal.server.http_app").addFilter(QuietClientErrors())


def open_registry() -> Registry:
    """The registry a worker serves from (tests give the service one of their own through this)."""
    return Registry(S.bentoml_dir)


# Spans leave the process only when a BentoML configuration names an exporter; without one, the tracing
# middleware's no-op spans are pure cost: it skips every route then.
UNTRACED = {} if {"BENTOML_CONFIG", "BENTOML_CONFIG_OPTIONS"} & set(os.environ) else {"excluded_urls": ".*"}


@bentoml.service(
    name="char_rnn",
    image=bento.image(),
    traffic={"timeout": S.timeout + S.body_timeout + 10},  # admission is Gate's (after the body arrived)
    workers=S.workers,
    http={"host": str(S.host), "port": S.port},
    tracing=UNTRACED,
)
class CharRNN:
    """Character-level RNN text generation, served from the newest promoted model (or from the Bento's)."""

    if ARGS.model:  # declared, so that BentoML copies it into a Bento built with this argument
        bundled = bentoml.models.BentoModel(ARGS.model)

    def __init__(self) -> None:
        threadpool_limits(S.blas_threads)
        sys.setswitchinterval(SWITCH_INTERVAL)
        share_logs()
        if died := workers.replaced(S.home / "serving", bentoml.server_context.worker_index or 0):
            log.warning(died)
        self.registry = open_registry()
        self.snapshot: Snapshot | None = None
        self.seen: tuple[int, int] | None | bool = False  # the registry version last acted on
        self.stopping = threading.Event()
        METRICS.start()
        self.batcher = Batcher(S.max_batch, METRICS)
        if ARGS.model:  # a Bento serves the model it was built with
            self.serve(self.bundled)
        else:
            self.refresh()
            if self.snapshot is None:
                log.warning(no_model_message())
            threading.Thread(target=self.watch, name="char-rnn-reload", daemon=True).start()
        # What start-up made (modules, BentoML's and pydantic's objects) lives as long as the worker, and each
        # full collection would walk all of it with every thread stopped, the tail of the latencies. Frozen,
        # it is left out of collections; they look only at what serving makes.
        gc.collect()
        gc.freeze()

    def serve(self, model: bentoml.Model) -> None:
        """Serve `model` from the model store, checked, and never another."""
        ck = checkpoint.load_dir(Path(model.path), with_optim=False)
        self.snapshot = Snapshot.of(str(model.tag), ck, dict(model.info.labels))
        METRICS.serving(self.snapshot.tag)
        log.info("serving the model this service was built with, %s", self.snapshot.tag)

    def refresh(self) -> None:
        """Load the current promoted model if the registry changed since the last look."""
        version = self.registry.version()
        if version == self.seen:
            return
        self.seen = version
        cur: Current | None = self.registry.current()
        if cur is not None and (self.snapshot is None or cur.tag != self.snapshot.tag):
            self.snapshot = Snapshot.of(cur.tag, cur.checkpoint, cur.labels)
            METRICS.serving(cur.tag)
            log.info("now serving %s", cur.tag)

    def watch(self) -> None:
        while not self.stopping.wait(S.reload_interval):
            try:
                self.refresh()
            except Exception:  # a bad read must not stop the watcher; the current model keeps serving
                log.exception("checking the registry failed")

    @bentoml.on_shutdown
    def shutdown(self) -> None:
        self.stopping.set()
        self.batcher.stop()
        METRICS.stop()

    async def __is_ready__(self) -> bool:
        return self.snapshot is not None

    def __metrics__(self, exposition: str) -> str:
        """BentoML's hook for rewriting /metrics: the batch-rows counters shown as their histogram."""
        return histogram(exposition)

    def start(self, req: GenerateRequest, stream: bool) -> tuple[Snapshot, Job, list[str]] | JSONResponse:
        """Grab the current snapshot, encode the prompt and queue the job, or an error response."""
        snap = self.snapshot
        if snap is None:
            return error(503, no_model_message())
        if stream and req.num_samples != 1:
            rule = {"type": "stream_one_sample", "loc": ["num_samples"], "msg": "streams 1 sample"}
            return error(400, "num_samples must be 1 for /generate_stream", [rule])
        prompt = corpus.normalise(req.prompt)
        unknown = snap.vocab.unknown(prompt)
        if unknown and req.unknown_chars == "error":
            return unknown_chars_error(unknown)
        ids = snap.vocab.encode(prompt, "skip")
        loop, rows = asyncio.get_running_loop(), req.settings()
        job = Job(snap, ids, rows, req.max_new_chars, loop, loop.create_future(), S.timeout)
        if stream:
            job.stream = asyncio.Queue()
        self.batcher.submit(job)
        return snap, job, unknown

    @bentoml.api(route=GENERATE, input_spec=GenerateRequest)
    async def generate(self, ctx: bentoml.Context, **fields: Any) -> GenerateResponse:
        """Generate `num_samples` continuations of `prompt`; the response names the model that wrote them."""
        t0 = time.perf_counter()
        req = GenerateRequest.model_construct(**fields)  # validated by BentoML with GenerateRequest
        started = self.start(req, stream=False)
        if isinstance(started, JSONResponse):
            return with_status(ctx, started)
        snap, job, skipped = started
        left = asyncio.ensure_future(disconnected(ctx.request))
        try:  # a client that leaves takes its rows out of the batch at the next step
            await asyncio.wait((job.done, left), return_when=asyncio.FIRST_COMPLETED)
            if not job.done.done():
                return with_status(ctx, error(499, "the client closed the connection"))
            ids = job.done.result()
        except TimeoutError as e:
            return with_status(ctx, error(504, str(e)))
        finally:
            if not job.done.done():  # the client left (or the handler was cancelled)
                self.batcher.cancel(job)
            left.cancel()
        METRICS.generated(GENERATE, ids.size)
        return GenerateResponse(
            completions=[snap.vocab.decode(r) for r in ids.tolist()],
            model=snap.tag,
            skipped_chars=skipped,
            elapsed_ms=round((time.perf_counter() - t0) * 1000, 3),
        )

    @bentoml.api(route=STREAM, input_spec=GenerateRequest)
    async def generate_stream(self, ctx: bentoml.Context, **fields: Any) -> AsyncGenerator[str, None]:
        """Stream one continuation as server-sent events: `data: {"text": ...}` while it is generated, then
        `event: done` (model, chars) or, if generation fails or times out, `event: error` (error, status).
        A request refused before the first event gets a JSON error body with its status instead."""
        started = self.start(GenerateRequest.model_construct(**fields), stream=True)  # validated: see above
        if isinstance(started, JSONResponse):
            yield refused(ctx, started)
            return
        snap, job, _ = started
        ctx.response.headers["X-Model-Tag"] = snap.tag
        ctx.response.headers["Cache-Control"] = "no-cache"
        # A client that leaves takes its row out of the batch at the next step, whenever this generator's
        # consumer notices (it may only drop it).
        left = asyncio.ensure_future(disconnected(ctx.request))
        left.add_done_callback(lambda f: None if f.cancelled() else self.batcher.cancel(job))
        sent = 0
        try:
            async for text in events.texts(job, snap.vocab):
                sent += len(text)
                yield events.sse(None, {"text": text})
            yield events.last(job, snap.tag, sent)
        finally:
            left.cancel()
            if not job.done.done():  # the client left mid-stream
                self.batcher.cancel(job)
            METRICS.generated(STREAM, sent)

    @bentoml.api(route=INFO)
    async def model_info(self) -> ModelInfo:
        """The served model: tag, vocabulary, config, validation loss, corpus fingerprint, training time."""
        snap = self.snapshot
        return error(503, no_model_message()) if snap is None else snap.info

    @bentoml.api(route=MODELS)
    async def models(self) -> history.Models:
        """The promoted history (oldest first) with each model's labels, which serves, and its loss curve."""
        snap = self.snapshot
        tag, curve = (snap.tag, snap.curve) if snap else (None, None)
        return await asyncio.to_thread(history.view, self.registry, tag, curve)

    @bentoml.api(route=TRAINING)
    async def training(self) -> progress.Training:
        """The newest pipeline run's training (state, step, losses, time left, curves, why that many steps)
        and the model this service serves: what the playground polls to show a run live and to switch."""
        snap = self.snapshot
        return await asyncio.to_thread(progress.view, S.runs_dir, snap.tag if snap else None)


REQUESTS = {GENERATE: GenerateRequest, STREAM: GenerateRequest} | dict.fromkeys(NO_INPUT, NoFields)


class Spec:
    """The corrected OpenAPI document, built on first request."""

    doc: dict[str, Any] | None = None

    @classmethod
    def response(cls) -> JSONResponse:
        if cls.doc is None:
            responses = {
                GENERATE: GenerateResponse,
                INFO: ModelInfo,
                MODELS: history.Models,
                TRAINING: progress.Training,
            }
            cls.doc = openapi.corrected(CharRNN.openapi_spec.asdict(), REQUESTS, responses, (STREAM,))
        return JSONResponse(cls.doc)


def keys() -> dict[str, Key | None]:
    """The key each guarded route needs. The API key guards the API's routes. /metrics needs the metrics key
    when one is set, else the API key when that is set (a service with a key tells nothing to anyone without
    one), else nothing."""
    api = Key(S.api_key.get_secret_value(), "API key (CHAR_RNN_API_KEY)") if S.api_key else None
    if S.metrics_key:
        metrics = Key(S.metrics_key.get_secret_value(), "metrics key (CHAR_RNN_METRICS_KEY)")
    else:
        metrics = api and Key(
            api.secret, "API key (CHAR_RNN_API_KEY; CHAR_RNN_METRICS_KEY gives /metrics its own)"
        )
    return dict.fromkeys((GENERATE, STREAM, *NO_INPUT), api) | {METRICS_ROUTE: metrics}


CharRNN.add_asgi_middleware(
    Gate,
    keys=keys(),
    schemas=REQUESTS,
    max_body=MAX_BODY,
    body_timeout=S.body_timeout,
    max_concurrency=S.max_concurrency,
    pages=pages.all_pages() | {"/docs.json": Spec.response},
    count=METRICS.request,
)
# a worker crowded with clients while another idles sends them to reconnect (BentoML's workers share a socket)
CharRNN.add_asgi_middleware(
    Spread, folder=S.home / "serving", worker_id=bentoml.server_context.worker_index or 1, workers=S.workers
)
