"""The BentoML service: POST /generate, /generate_stream and /model_info over the promoted char-rnn model.

A thin HTTP face over model/. Requests are validated strictly, then queued to one generation thread that
runs the rows of concurrent requests together, one matrix product per step (`sample.generate_ids`, with
per-row settings and seeds, so a seeded request reads the same batched or not). Each request holds the
immutable model snapshot it grabbed at its start; a watcher swaps in newly promoted models.

Settings (environment, read at start): CHAR_RNN_RELOAD_INTERVAL seconds between registry checks (2),
CHAR_RNN_MAX_PROMPT characters (2000), CHAR_RNN_TIMEOUT seconds per request (30), CHAR_RNN_MAX_BATCH rows
per step (64; 1 turns batching across requests off), CHAR_RNN_WORKERS processes (1),
CHAR_RNN_BLAS_THREADS (1).
"""

from __future__ import annotations

import asyncio
import logging
import os
import queue
import sys
import threading
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from model import paths

BENTOML_HOME_GIVEN = "BENTOML_HOME" in os.environ
paths.configure_env()
# BentoML samples no traces unless configured to, yet its OpenTelemetry spans cost ~30% of the HTTP overhead
# per request; set OTEL_SDK_DISABLED=false when tracing is configured.
os.environ.setdefault("OTEL_SDK_DISABLED", "true")

import bentoml  # noqa: E402
import numpy as np  # noqa: E402
from bentoml._internal.configuration.containers import BentoMLContainer  # noqa: E402
from bentoml._internal.models import ModelStore  # noqa: E402
from pydantic import BaseModel, ConfigDict, Field, field_validator  # noqa: E402
from starlette.datastructures import Headers  # noqa: E402
from starlette.responses import JSONResponse, StreamingResponse  # noqa: E402
from threadpoolctl import threadpool_limits  # noqa: E402

from flows import registry  # noqa: E402
from model import checkpoint, corpus, sample  # noqa: E402
from model.checkpoint import Checkpoint  # noqa: E402
from model.rnn import ModelConfig, Params  # noqa: E402
from model.vocab import UnknownCharsError, Vocab  # noqa: E402

RELOAD_INTERVAL = float(os.environ.get("CHAR_RNN_RELOAD_INTERVAL", "2"))
MAX_PROMPT = int(os.environ.get("CHAR_RNN_MAX_PROMPT", "2000"))
TIMEOUT = float(os.environ.get("CHAR_RNN_TIMEOUT", "30"))
MAX_BATCH = int(os.environ.get("CHAR_RNN_MAX_BATCH", "64"))
WORKERS = int(os.environ.get("CHAR_RNN_WORKERS", "1"))
GATHER_GAP, GATHER_MAX = 0.002, 0.01  # seconds: how long the batcher waits for stragglers
MAX_BODY = 12 * MAX_PROMPT + 4096  # a prompt of \uXXXX escapes, plus the other fields
GENERATE_ROUTES = ("/generate", "/generate_stream")

threadpool_limits(int(os.environ.get("CHAR_RNN_BLAS_THREADS", "1")))
# The generation thread holds the GIL between NumPy calls; hand it to the HTTP loop within 0.2 ms, not 5.
sys.setswitchinterval(0.0002)
log = logging.getLogger("bentoml.char_rnn")


class GenerateRequest(BaseModel):
    """Continue `prompt` by `max_new_chars` characters, `num_samples` times."""

    model_config = ConfigDict(extra="forbid", strict=True, allow_inf_nan=False)

    prompt: str = Field("\n", max_length=MAX_PROMPT, description="text to continue (NFC-normalised)")
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
    val_loss: float | None
    fingerprint: str | None
    trained_at: str | None
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

    @classmethod
    def of(cls, tag: str, ck: Checkpoint) -> Snapshot:
        for a in ck.params.values():
            a.setflags(write=False)
        m = ck.meta
        info = ModelInfo(
            model=tag,
            vocab=m.vocab,
            config=m.model,
            train=m.train,
            val_loss=m.metrics.get("val_loss"),
            fingerprint=m.fingerprint,
            trained_at=m.created,
            step=m.step,
            parent=m.parent,
        )
        return cls(tag, ck.params, ck.vocab, ck.config, info)


@dataclass(eq=False)
class Job:
    """One request's rows, queued to the generation thread; results come back on the request's loop."""

    snap: Snapshot
    prompts: list[np.ndarray]
    rows: list[sample.Settings]
    length: int
    loop: asyncio.AbstractEventLoop
    done: asyncio.Future[np.ndarray]
    stream: asyncio.Queue[np.ndarray | None] | None = None
    deadline: float = field(default_factory=lambda: time.monotonic() + TIMEOUT)
    cancelled: bool = False

    def emit(self, ids: np.ndarray) -> None:
        if self.stream is not None:
            self.loop.call_soon_threadsafe(self.stream.put_nowait, ids)

    def settle(self, result: np.ndarray | BaseException) -> None:
        self.loop.call_soon_threadsafe(_settle, self.done, result)
        if self.stream is not None:
            self.loop.call_soon_threadsafe(self.stream.put_nowait, None)


def _settle(fut: asyncio.Future[np.ndarray], result: np.ndarray | BaseException) -> None:
    if fut.done():
        return
    if isinstance(result, BaseException):
        fut.set_exception(result)
    else:
        fut.set_result(result)


class Batcher:
    """One generation thread. Jobs waiting together for the same model run as one batch."""

    def __init__(self, max_rows: int):
        self.max_rows = max_rows
        self.jobs: queue.SimpleQueue[Job | None] = queue.SimpleQueue()
        self.stopping = False
        self.thread = threading.Thread(target=self.run, name="char-rnn-generate", daemon=True)
        self.thread.start()

    def submit(self, job: Job) -> None:
        self.jobs.put(job)

    def stop(self) -> None:
        self.stopping = True
        self.jobs.put(None)  # wakes the thread
        self.thread.join(timeout=10)

    def run(self) -> None:
        carry: Job | None = None
        last_rows = 0
        while not self.stopping:
            first = carry or self.jobs.get()
            if first is None:
                continue
            batch, rows, carry = [first], len(first.rows), None
            # After a batch of several requests, more are likely on their way: wait for them while they
            # keep arriving (each within GATHER_GAP), up to GATHER_MAX. A lone client never waits.
            until = time.monotonic() + GATHER_MAX if last_rows > rows else 0.0
            while rows < self.max_rows:
                try:
                    wait = min(GATHER_GAP, until - time.monotonic())
                    job = self.jobs.get(timeout=wait) if wait > 0 else self.jobs.get_nowait()
                except queue.Empty:
                    break
                if job is None:
                    break
                if job.snap is not first.snap or rows + len(job.rows) > self.max_rows:
                    carry = job  # starts the next batch
                    break
                batch.append(job)
                rows += len(job.rows)
            last_rows = rows
            self.run_batch(batch)

    def run_batch(self, batch: list[Job]) -> None:
        snap = batch[0].snap
        live: list[tuple[Job, slice]] = []
        start = 0
        for job in batch:
            live.append((job, slice(start, start + len(job.rows))))
            start += len(job.rows)
        prompts = [q for job in batch for q in job.prompts]
        rows = [r for job in batch for r in job.rows]
        length = max(job.length for job in batch)
        cols: list[np.ndarray] = []
        try:
            steps = sample.generate_ids(snap.params, snap.config, prompts, length, rows)
            for t, ids in enumerate(steps, 1):
                cols.append(ids)
                now, out, still = time.monotonic(), None, []
                for job, rs in live:
                    if job.cancelled:
                        continue
                    job.emit(ids[rs])
                    if t == job.length:
                        out = np.stack(cols, axis=1) if out is None else out
                        job.settle(out[rs])
                    elif now > job.deadline:
                        job.settle(TimeoutError(f"generation took longer than {TIMEOUT:g} s"))
                    else:
                        still.append((job, rs))
                live = still
                if not live:
                    return
        except Exception as e:  # keep the thread alive; the requests get the error
            log.exception("generation failed")
            for job, _ in live:
                job.settle(e)


def error(status: int, message: str, detail: list[dict[str, Any]] | None = None) -> JSONResponse:
    """A JSON error body like BentoML's validation errors: {"error": ..., "detail": [{loc, msg, type}]}."""
    return JSONResponse({"error": message} | ({"detail": detail} if detail else {}), status_code=status)


class BodyGuard:
    """ASGI middleware before BentoML parses a POST: JSON only (415), bounded size (413), not empty (400)."""

    def __init__(self, app: Any, max_body: int):
        self.app, self.max_body = app, max_body

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http" or scope["method"] != "POST":
            return await self.app(scope, receive, send)
        headers = Headers(scope=scope)
        ctype = headers.get("content-type", "application/json").split(";")[0].strip().lower()
        if ctype != "application/json":
            msg = f"send the body as JSON with 'Content-Type: application/json' (got {ctype!r})"
            return await error(415, msg)(scope, receive, send)
        too_big = error(413, f"request body larger than {self.max_body} bytes")
        if not headers.get("content-length", "0").isdigit() or int(headers.get("content-length", "0")) > (
            self.max_body
        ):
            return await too_big(scope, receive, send)
        body, more = b"", True
        while more:
            message = await receive()
            if message["type"] == "http.disconnect":
                return
            body += message.get("body", b"")
            more = message.get("more_body", False)
            if len(body) > self.max_body:
                return await too_big(scope, receive, send)
        if not body.strip() and scope["path"].endswith(GENERATE_ROUTES):
            msg = 'empty request body: send a JSON object, e.g. {"prompt": "ROMEO:"} ({} for all defaults)'
            return await error(400, msg)(scope, receive, send)
        replayed = False

        async def replay() -> dict:
            nonlocal replayed
            if replayed:
                return await receive()
            replayed = True
            return {"type": "http.request", "body": body, "more_body": False}

        await self.app(scope, replay, send)


def bundled_tags() -> list[str]:
    """The char-rnn models inside the Bento this service was loaded from, newest first ([] outside one)."""
    if CharRNN.bento is None:
        return []
    models = [m for m in CharRNN.bento.info.all_models if m.tag.name == registry.NAME]
    return [str(m.tag) for m in sorted(models, key=lambda m: m.creation_time, reverse=True)]


def no_model_message() -> str:
    return (
        f"no model has been promoted yet under CHAR_RNN_HOME={paths.home()}; train and promote one with "
        "`char-rnn pipeline` (or `make run`) from the repository root, then retry: this service picks it "
        f"up within {RELOAD_INTERVAL:g} s, no restart needed"
    )


def follow_project_home() -> None:
    """`bentoml serve` and `build` resolve BentoML's model store before importing this module: when
    BENTOML_HOME was not set, move it to the project's (CHAR_RNN_HOME/bentoml), where models are promoted."""
    if BENTOML_HOME_GIVEN:
        return
    home = Path(os.environ["BENTOML_HOME"])
    (home / "models").mkdir(parents=True, exist_ok=True)
    BentoMLContainer.bentoml_home.set(str(home))
    BentoMLContainer.model_store.set(ModelStore(str(home / "models")))


def promoted_tag() -> str | None:
    """The model that a start would serve (the newest promoted one that passes its checks), if any."""
    found = registry.load_promoted()
    return None if found is None else found[0]


follow_project_home()
PROMOTED = promoted_tag()  # declared by the service below, so that `bentoml build` bundles it


@bentoml.service(
    name="char_rnn",
    traffic={"timeout": TIMEOUT + 10, "max_concurrency": 512},
    workers=WORKERS,
)
class CharRNN:
    """Character-level RNN text generation, served from the newest promoted model."""

    if PROMOTED is not None:
        promoted_model = bentoml.models.BentoModel(PROMOTED)

    def __init__(self) -> None:
        self.snapshot: Snapshot | None = None
        self.seen: str | None = None  # the pointer's last tag that was acted on
        self.stopping = threading.Event()
        self.batcher = Batcher(MAX_BATCH)
        if bundled := bundled_tags():  # a Bento serves the model it was built with
            tag = bundled[0]
            ck = checkpoint.load_dir(Path(bentoml.models.get(tag).path), with_optim=False)
            self.snapshot = Snapshot.of(tag, ck)
            log.info("serving bundled model %s", tag)
            return
        self.refresh()
        if self.snapshot is None:
            log.warning(no_model_message())
        threading.Thread(target=self.watch, name="char-rnn-reload", daemon=True).start()

    def refresh(self) -> None:
        """Load the newest promoted model if the registry pointer moved since the last look."""
        tag = registry.current_tag()
        if tag == self.seen:
            return
        found = registry.load_promoted()
        self.seen = tag
        if found is not None and (self.snapshot is None or found[0] != self.snapshot.tag):
            self.snapshot = Snapshot.of(*found)
            log.info("now serving %s", found[0])

    def watch(self) -> None:
        while not self.stopping.wait(RELOAD_INTERVAL):
            try:
                self.refresh()
            except Exception:  # a bad read must not stop the watcher; the current model keeps serving
                log.exception("checking the registry failed")

    @bentoml.on_shutdown
    def shutdown(self) -> None:
        self.stopping.set()
        self.batcher.stop()

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
        skipped = snap.vocab.unknown(prompt) if req.unknown_chars == "skip" else []
        try:
            ids = snap.vocab.encode(prompt, req.unknown_chars)
        except UnknownCharsError as e:
            rule = {"type": "unknown_chars", "loc": ["prompt"], "msg": str(e), "chars": e.chars}
            return error(400, f"prompt: {e}", [rule])
        loop, rows = asyncio.get_running_loop(), req.settings()
        job = Job(snap, [ids] * len(rows), rows, req.max_new_chars, loop, loop.create_future())
        if stream:
            job.stream = asyncio.Queue()
        self.batcher.submit(job)
        return snap, job, skipped

    @bentoml.api(route="/generate")
    async def generate(self, req: GenerateRequest, /) -> GenerateResponse:
        """Generate `num_samples` continuations of `prompt`; the response names the model that wrote them."""
        t0 = time.perf_counter()
        started = self.start(req, stream=False)
        if isinstance(started, JSONResponse):
            return started
        snap, job, skipped = started
        try:
            ids = await job.done
        except TimeoutError as e:
            return error(504, str(e))
        finally:
            job.cancelled = True
        return GenerateResponse(
            completions=[snap.vocab.decode(r) for r in ids.tolist()],
            model=snap.tag,
            skipped_chars=skipped,
            elapsed_ms=round((time.perf_counter() - t0) * 1000, 3),
        )

    @bentoml.api(route="/generate_stream")
    async def generate_stream(self, req: GenerateRequest, /) -> AsyncIterator[str]:
        """Stream one continuation as plain text while it is generated; header X-Model-Tag names the model."""
        started = self.start(req, stream=True)
        if isinstance(started, JSONResponse):
            return started
        snap, job, _ = started
        assert job.stream is not None

        async def chars() -> AsyncIterator[str]:
            try:
                done = False
                while not done:  # send what has been generated since the last chunk; None ends
                    got = [await job.stream.get()]
                    while not job.stream.empty():
                        got.append(job.stream.get_nowait())
                    done = got[-1] is None
                    if text := snap.vocab.decode(int(i[0]) for i in got if i is not None):
                        yield text
            finally:
                job.cancelled = True

        headers = {"X-Model-Tag": snap.tag}
        return StreamingResponse(chars(), media_type="text/plain; charset=utf-8", headers=headers)

    @bentoml.api(route="/model_info")
    async def model_info(self) -> ModelInfo:
        """The served model: tag, vocabulary, config, validation loss, corpus fingerprint, training time."""
        snap = self.snapshot
        return error(503, no_model_message()) if snap is None else snap.info


ERRORS = {
    "400": "a field breaks its rule, unknown prompt characters, or an empty or malformed body",
    "413": "the body is larger than the limit",
    "415": "the body is not JSON",
    "503": "no model has been promoted yet",
    "504": "generation took longer than CHAR_RNN_TIMEOUT",
}


def openapi() -> dict[str, Any]:
    """BentoML's OpenAPI document, corrected to what the service does: request bodies are required,
    top_p excludes 0, optional fields may be null, every error status is documented, and an error's
    `detail` may be a list."""
    spec = CharRNN.openapi_spec.asdict()
    schemas = spec["components"]["schemas"]
    detail = {"anyOf": [{"type": "string"}, {"type": "array", "items": {"type": "object"}}]}
    for name in ("InvalidArgument", "NotFound", "InternalServerError"):
        schemas[name]["properties"]["detail"] = detail
    schemas["Error"] = {"type": "object", "required": ["error"], "properties": {"error": {"type": "string"}}}
    schemas["Error"]["properties"]["detail"] = detail
    for route in (*GENERATE_ROUTES, "/model_info"):
        op = spec["paths"][route]["post"]
        if route in GENERATE_ROUTES:
            op["requestBody"]["required"] = True
            fields = op["requestBody"]["content"]["application/json"]["schema"]["properties"]
            fields["top_p"] |= {"minimum": 0, "exclusiveMinimum": True}  # (0, 1]: OpenAPI 3.0's form
            for name in ("top_k", "top_p", "seed"):  # optional: null means "off" / "random"
                fields[name]["nullable"] = True
        for status, why in ERRORS.items():
            ref = "InvalidArgument" if status == "400" else "Error"
            body = {"application/json": {"schema": {"$ref": f"#/components/schemas/{ref}"}}}
            op["responses"][status] = {"description": why, "content": body}
    return spec


class OpenAPIDoc:
    """ASGI middleware that serves the corrected OpenAPI document at /docs.json."""

    def __init__(self, app: Any):
        self.app = app
        self.spec: dict[str, Any] | None = None

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] == "http" and scope["method"] == "GET" and scope["path"] == "/docs.json":
            self.spec = self.spec or openapi()
            return await JSONResponse(self.spec)(scope, receive, send)
        await self.app(scope, receive, send)


CharRNN.add_asgi_middleware(BodyGuard, max_body=MAX_BODY)
CharRNN.add_asgi_middleware(OpenAPIDoc)
