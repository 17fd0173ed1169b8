"""The HTTP edge, in front of BentoML's request handling: who may call, what a body must be, how long it may
take to arrive, how many requests run at once, how errors look and how they are logged.

`Gate` is ASGI middleware. It checks the key a route needs (401: the API key for the API's routes, the metrics
key for GET /metrics), then for a POST the content type (415) and size (413),
reads the body within `body_timeout` (408), validates request bodies itself (400 with a clean JSON body
and one WARNING line, instead of BentoML's ERROR with a traceback), and only then takes one of
`max_concurrency` slots (429 when none is free): a client that stalls mid-body holds no slot, so stalled
sockets cannot lock others out. It answers GET for its `pages` itself, and reports every response's status
to `count` (route, status): the API's routes and pages by path, anything else as "other".
"""

from __future__ import annotations

import asyncio
import hmac
import json
import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from pydantic import BaseModel, ConfigDict, ValidationError
from starlette.datastructures import Headers
from starlette.requests import Request
from starlette.responses import JSONResponse

log = logging.getLogger("char_rnn.http")


class NoFields(BaseModel):
    """The body of a route that takes no input: empty, or a JSON object with nothing in it."""

    model_config = ConfigDict(extra="forbid")


def error(
    status: int, message: str, detail: list[dict[str, Any]] | None = None, **headers: str
) -> JSONResponse:
    """A JSON error body: {"error": ..., "detail": [{"loc": [...], "msg": ..., "type": ...}]}."""
    body = {"error": message} | ({"detail": detail} if detail else {})
    return JSONResponse(body, status_code=status, headers=headers or None)


def problems(e: ValidationError) -> list[dict[str, Any]]:
    """Pydantic's errors as the API states them: the field, the rule, the message; no URLs, no class names."""
    return [{"loc": list(x["loc"]), "type": x["type"], "msg": x["msg"]} for x in e.errors(include_url=False)]


def summary(detail: list[dict[str, Any]]) -> str:
    return "; ".join(f"{'.'.join(map(str, d['loc'])) or 'body'}: {d['msg']}" for d in detail)


@dataclass(frozen=True)
class Key:
    """What a route needs: `Authorization: Bearer <secret>`; `name` says which key in the 401's message."""

    secret: str
    name: str

    def admits(self, headers: Headers) -> bool:
        scheme, _, given = headers.get("authorization", "").partition(" ")
        return scheme.lower() == "bearer" and hmac.compare_digest(
            given.strip().encode(), self.secret.encode()
        )


class Gate:
    """ASGI middleware: authentication, body rules and timeout, request validation, admission, pages."""

    def __init__(
        self,
        app: Any,
        *,
        keys: dict[str, Key | None],
        schemas: dict[str, type[BaseModel]],
        max_body: int,
        body_timeout: float,
        max_concurrency: int,
        pages: dict[str, Any],
        count: Callable[[str, int], None],
    ):
        self.app, self.keys, self.schemas = app, keys, schemas  # keys: path -> the key it needs (None: open)
        self.max_body, self.body_timeout, self.max_concurrency = max_body, body_timeout, max_concurrency
        self.pages = pages  # GET path -> a function returning the response
        self.count = count
        self.routes = set(keys) | set(schemas) | set(pages)  # counted by path; anything else as "other"
        self.running = 0

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        route = scope["path"] if scope["path"] in self.routes else "other"
        await self.handle(scope, receive, observed(scope, send, lambda status: self.count(route, status)))

    async def handle(self, scope: dict, receive: Any, send: Any) -> None:
        path, headers = scope["path"], Headers(scope=scope)
        if scope["method"] == "GET" and path in self.pages:
            return await self.pages[path]()(scope, receive, send)
        key = self.keys.get(path)
        if key is not None and not key.admits(headers):
            msg = f"missing or wrong {key.name}: send 'Authorization: Bearer <key>'"
            return await error(401, msg, **{"WWW-Authenticate": "Bearer"})(scope, receive, send)
        if scope["method"] != "POST":
            return await self.app(scope, receive, send)
        body = await self.body(scope, receive, send, headers)
        if body is None:
            return
        if path in self.schemas:
            try:
                self.schemas[path].model_validate_json(body or b"{}")
            except ValidationError as e:
                detail = problems(e)
                return await error(400, summary(detail), detail)(scope, receive, send)
        if self.running >= self.max_concurrency:
            msg = f"{self.running} requests in progress, the limit (CHAR_RNN_MAX_CONCURRENCY); retry shortly"
            return await error(429, msg, **{"Retry-After": "1"})(scope, receive, send)
        self.running += 1
        replayed = False

        async def replay() -> dict:
            nonlocal replayed
            if replayed:
                return await receive()
            replayed = True
            return {"type": "http.request", "body": body, "more_body": False}

        try:
            await self.app(scope, replay, send)
        finally:
            self.running -= 1

    async def body(self, scope: dict, receive: Any, send: Any, headers: Headers) -> bytes | None:
        """The whole body, or None after answering 415, 413 or 408 (or when the client left)."""
        ctype = headers.get("content-type", "application/json").split(";")[0].strip().lower()
        if ctype != "application/json":
            msg = f"send the body as JSON with 'Content-Type: application/json' (got {ctype!r})"
            return await error(415, msg)(scope, receive, send)

        def too_big() -> JSONResponse:  # made only when sent: a response costs a request that needs none
            return error(413, f"request body larger than {self.max_body} bytes")

        length = headers.get("content-length", "0")
        if not length.isdigit() or int(length) > self.max_body:
            return await too_big()(scope, receive, send)
        body, more = b"", True
        try:
            async with asyncio.timeout(self.body_timeout):
                while more:
                    message = await receive()
                    if message["type"] == "http.disconnect":
                        return None
                    body += message.get("body", b"")
                    more = message.get("more_body", False)
                    if len(body) > self.max_body:
                        return await too_big()(scope, receive, send)
        except TimeoutError:
            msg = f"the request body did not arrive within {self.body_timeout:g} s (CHAR_RNN_BODY_TIMEOUT)"
            return await error(408, msg, Connection="close")(scope, receive, send)
        if not body.strip() and self.schemas.get(scope["path"], NoFields).model_fields:
            msg = 'empty request body: send a JSON object, e.g. {"prompt": "ROMEO:"} ({} for all defaults)'
            return await error(400, msg)(scope, receive, send)
        return body


def observed(scope: dict, send: Any, count: Callable[[int], None]) -> Any:
    """`send`, counting every response by status and logging a client error (4xx) as one WARNING line:
    route, status and the body's `error`."""
    status, body = 0, b""

    async def wrapped(message: dict) -> None:
        nonlocal status, body
        if message["type"] == "http.response.start":
            status = message["status"]
            count(status)
        elif message["type"] == "http.response.body" and 400 <= status < 500 and len(body) < 4096:
            body += message.get("body", b"")
            if not message.get("more_body"):
                log.warning("%s %s -> %d: %s", scope["method"], scope["path"], status, reason(body))
        await send(message)

    return wrapped


def reason(body: bytes) -> str:
    try:
        return str(json.loads(body).get("error", ""))[:300]
    except (ValueError, AttributeError):
        return body[:300].decode("utf-8", "replace")


class QuietClientErrors(logging.Filter):
    """BentoML logs a client's bad request as an ERROR with a traceback (which can quote the body); `Gate`
    logs every client error as one WARNING line already, so drop BentoML's. Server errors keep theirs."""

    def filter(self, record: logging.LogRecord) -> bool:
        exc = record.exc_info[1] if record.exc_info else None
        status = getattr(getattr(exc, "error_code", None), "value", 500)
        return not (isinstance(exc, ValidationError) or (exc is not None and 400 <= status < 500))


async def disconnected(request: Request) -> None:
    """Return once the client of `request`, whose body has been read, has closed its connection."""
    while (await request.receive())["type"] != "http.disconnect":
        await asyncio.sleep(0.01)  # not expected once the body is read; never spin


def unknown_chars_error(chars: list[str]) -> JSONResponse:
    shown = ", ".join(repr(c) for c in chars[:20]) + (
        f" (+{len(chars) - 20} more)" if len(chars) > 20 else ""
    )
    msg = (
        f"prompt: {len(chars)} character(s) not in the model's vocabulary: {shown}; "
        'send "unknown_chars": "skip" to drop them'
    )
    return error(400, msg, [{"type": "unknown_chars", "loc": ["prompt"], "msg": msg, "chars": chars}])
