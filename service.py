"""The BentoML service: POST /generate, /generate_stream, /model_info and /models over the promoted char-rnn
model; the playground page at GET /, the API docs at /docs, Prometheus metrics at /metrics.

A thin HTTP face over model/. `serving.http.Gate` checks every request before BentoML sees it; valid requests
are queued to `serving.batcher`, whose thread runs the rows of concurrent requests together. Each request
holds the immutable model snapshot it grabbed at its start; a watcher swaps in newly promoted models.
`serving.metrics` counts what happens, `serving.pages` holds the pages, `serving.history` the models view.

Settings (CHAR_RNN_*, see settings.py): HOST (127.0.0.1) and PORT (3000), API_KEY, RELOAD_INTERVAL,
MAX_PROMPT, TIMEOUT, BODY_TIMEOUT, MAX_BATCH, MAX_CONCURRENCY, WORKERS, BLAS_THREADS.
"""

from __future__ import annotations

import os

import settings

os.environ.update(
    settings.configure()
)  # before BentoML picks its home (under `bentoml serve`: refuses if it has)
# BentoML samples no traces unless configured to, yet its OpenTelemetry spans cost ~30% of the HTTP overhead
# per request; set OTEL_SDK_DISABLED=false when tracing is configured.
os.environ.setdefault("OTEL_SDK_DISABLED", "true")

import asyncio
import gc
import json
import logging
import sys
import threading
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import bentoml
from pydantic import BaseModel, ConfigDict, Field, field_validator
from starlette.responses import JSONResponse, StreamingResponse
from threadpoolctl import threadpool_limits

from model import checkpoint, corpus, sample
from model.checkpoint import Checkpoint
from model.net import ModelConfig, Params
from model.vocab import Vocab
from registry import NAME, Current, Registry
from serving import history, openapi, pages, workers
from serving.batcher import Batcher, Job
from serving.http import Gate, NoFields, QuietClientErrors, disconnected, error
from serving.metrics import Metrics

S = settings.current()
GENERATE, STREAM, INFO, MODELS = "/generate", "/generate_stream", "/model_info", "/models"
MAX_BODY = 12 * S.max_prompt + 4096  # a prompt of \uXXXX escapes, plus the other fields
REGISTRY = Registry(S.bentoml_dir)
METRICS = Metrics()

threadpool_limits(S.blas_threads)
# The generation thread holds the GIL between NumPy calls; hand it to the HTTP loop within 0.2 ms, not 5.
sys.setswitchinterval(0.0002)
log = logging.getLogger("bentoml.char_rnn")


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


class ModelInfo(BaseModel):
    model: str
    vocab: list[str]
    config: ModelConfig
    train: dict[str, Any]
    val_loss: float | None = Field(description="nats/char on the whole validation text, when it was promoted")
    fingerprint: str | None
    trained_at: str | None
    promoted_at: str | None
    step: int
    parent: str | None


@dataclass(frozen=True)
class Snapshot:
    """One loaded model, never mutated: a request that holds it is served wholly by it."""

    tag: str
    params: Params
    vocab: Vocab
    config: ModelConfig
    info: ModelInfo
    curve: history.Curve

    @classmethod
    def of(cls, tag: str, ck: Checkpoint, labels: dict[str, str]) -> Snapshot:
        for a in ck.params.values():
            a.setflags(write=False)
        m = ck.meta
        val = labels.get("val_loss") or m.metrics.get("val_loss")
        info = ModelInfo(
            model=tag,
            vocab=m.vocab,
            config=m.model,
            train=m.train,
            val_loss=None if val is None else float(val),
            fingerprint=m.fingerprint,
            trained_at=m.created,
            promoted_at=labels.get("promoted_at"),
            step=m.step,
            parent=m.parent,
        )
        curve = history.Curve(train=m.metrics.get("train", []), val=m.metrics.get("val", []))
        return cls(tag, ck.params, ck.vocab, ck.config, info, curve)


def bundled_tags() -> list[str]:
    """The char-rnn models inside the Bento this service was loaded from, newest first ([] outside one)."""
    if CharRNN.bento is None:
        return []
    models = [m for m in CharRNN.bento.info.all_models if m.tag.name == NAME]
    return [str(m.tag) for m in sorted(models, key=lambda m: m.creation_time, reverse=True)]


def no_model_message() -> str:
    return (
        f"no model has been promoted yet under CHAR_RNN_HOME={S.home}; train and promote one with "
        "`char-rnn pipeline` (or `make run`) from the repository root, then retry: this service picks it "
        f"up within {S.reload_interval:g} s, no restart needed"
    )


def unknown_chars_error(chars: list[str]) -> JSONResponse:
    shown = ", ".join(repr(c) for c in chars[:20]) + (
        f" (+{len(chars) - 20} more)" if len(chars) > 20 else ""
    )
    msg = (
        f"prompt: {len(chars)} character(s) not in the model's vocabulary: {shown}; "
        'send "unknown_chars": "skip" to drop them'
    )
    return error(400, msg, [{"type": "unknown_chars", "loc": ["prompt"], "msg": msg, "chars": chars}])


def with_status(ctx: bentoml.Context, response: JSONResponse) -> JSONResponse:
    """`response`, its status kept: BentoML gives an API that takes `ctx` the status set on `ctx.response`."""
    ctx.response.status_code = response.status_code
    return response


def sse(event: str | None, data: dict) -> str:
    """One server-sent event."""
    return (f"event: {event}\n" if event else "") + f"data: {json.dumps(data, ensure_ascii=False)}\n\n"


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


found = Registry(S.bentoml_dir, report=False).current()  # the workers' REGISTRY reports what it refuses
PROMOTED = None if found is None else found.tag  # declared below, so that `bentoml build` bundles it
# Spans leave the process only when a BentoML configuration names an exporter; without one, the tracing
# middleware's no-op spans cost ~0.3 ms a request: it skips every route then.
UNTRACED = {} if {"BENTOML_CONFIG", "BENTOML_CONFIG_OPTIONS"} & set(os.environ) else {"excluded_urls": ".*"}


@bentoml.service(
    name="char_rnn",
    traffic={"timeout": S.timeout + S.body_timeout + 10},  # admission is Gate's (after the body arrived)
    workers=S.workers,
    http={"host": str(S.host), "port": S.port},
    tracing=UNTRACED,
)
class CharRNN:
    """Character-level RNN text generation, served from the newest promoted model."""

    if PROMOTED is not None:
        promoted_model = bentoml.models.BentoModel(PROMOTED)

    def __init__(self) -> None:
        share_logs()
        if died := workers.replaced(S.home / "serving", bentoml.server_context.worker_index or 0):
            log.warning(died)
        self.snapshot: Snapshot | None = None
        self.seen: tuple[int, int] | None | bool = False  # the registry version last acted on
        self.stopping = threading.Event()
        METRICS.start()
        self.batcher = Batcher(S.max_batch, METRICS)
        if bundled := bundled_tags():  # a Bento serves the model it was built with
            tag = bundled[0]
            model = bentoml.models.get(tag)
            ck = checkpoint.load_dir(Path(model.path), with_optim=False)
            self.snapshot = Snapshot.of(tag, ck, dict(model.info.labels))
            METRICS.serving(tag)
            log.info("serving bundled model %s", tag)
        else:
            self.refresh()
            if self.snapshot is None:
                log.warning(no_model_message())
            threading.Thread(target=self.watch, name="char-rnn-reload", daemon=True).start()
        # What start-up made (modules, BentoML's and pydantic's objects) lives as long as the worker, and each
        # full collection walked all of it: 40-90 ms with every thread stopped, the tail of the latencies.
        # Frozen, it is left out of collections; they look only at what serving makes.
        gc.collect()
        gc.freeze()

    def refresh(self) -> None:
        """Load the current promoted model if the registry changed since the last look."""
        version = REGISTRY.version()
        if version == self.seen:
            return
        self.seen = version
        cur: Current | None = REGISTRY.current()
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
    async def generate_stream(self, **fields: Any) -> AsyncIterator[str]:
        """Stream one continuation as server-sent events: `data: {"text": ...}` while it is generated, then
        `event: done` (model, chars) or, if generation fails or times out, `event: error` (error, status)."""
        started = self.start(GenerateRequest.model_construct(**fields), stream=True)  # validated: see above
        if isinstance(started, JSONResponse):
            return started
        snap, job, _ = started
        assert job.stream is not None

        async def events() -> AsyncIterator[str]:
            sent = 0
            try:
                done = False
                while not done:  # send what has been generated since the last chunk; None ends
                    got = [await job.stream.get()]
                    while not job.stream.empty():
                        got.append(job.stream.get_nowait())
                    done = got[-1] is None
                    if text := snap.vocab.decode(int(i[0]) for i in got if i is not None):
                        sent += len(text)
                        yield sse(None, {"text": text})
                try:
                    job.done.result()
                except TimeoutError as e:
                    yield sse("error", {"error": str(e), "status": 504, "chars": sent})
                    return
                except Exception as e:
                    yield sse("error", {"error": f"generation failed: {e}", "status": 500, "chars": sent})
                    return
                yield sse("done", {"model": snap.tag, "chars": sent})
            finally:
                if not job.done.done():  # the client left mid-stream
                    self.batcher.cancel(job)
                METRICS.generated(STREAM, sent)

        headers = {"X-Model-Tag": snap.tag, "Cache-Control": "no-cache"}
        return StreamingResponse(events(), media_type="text/event-stream; charset=utf-8", headers=headers)

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
        return await asyncio.to_thread(history.view, REGISTRY, tag, curve)


# generate_stream returns a StreamingResponse, so that an error before the first event is a JSON body with its
# detail; BentoML only recognises async generator functions as streams. Say it streams, so that its clients
# (bentoml.SyncHTTPClient / AsyncHTTPClient) yield the events as they arrive, not the whole body at the end.
CharRNN.apis["generate_stream"].is_stream = True
CharRNN.apis["generate_stream"].output_spec.media_type = "text/event-stream"


class Spec:
    """The corrected OpenAPI document, built on first request."""

    doc: dict[str, Any] | None = None

    @classmethod
    def response(cls) -> JSONResponse:
        if cls.doc is None:
            cls.doc = openapi.corrected(
                CharRNN.openapi_spec.asdict(), (GENERATE, STREAM), STREAM, (INFO, MODELS)
            )
        return JSONResponse(cls.doc)


CharRNN.add_asgi_middleware(
    Gate,
    api_key=S.api_key.get_secret_value() if S.api_key else None,
    protected=(GENERATE, STREAM, INFO, MODELS),
    schemas={GENERATE: GenerateRequest, STREAM: GenerateRequest, INFO: NoFields, MODELS: NoFields},
    max_body=MAX_BODY,
    body_timeout=S.body_timeout,
    max_concurrency=S.max_concurrency,
    pages=pages.all_pages() | {"/docs.json": Spec.response},
    count=METRICS.request,
)
