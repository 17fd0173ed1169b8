"""The pages the service answers GET with (through `serving.http.Gate`): the playground at "/", its script and
style, and the API docs at "/docs". Files from `static/`, shipped in the repository and bundled in the Bento;
the playground loads nothing from any other host, and its Content-Security-Policy says so to the browser."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from starlette.responses import Response

STATIC = Path(__file__).resolve().parent / "static"
TYPES = {".html": "text/html", ".js": "text/javascript", ".css": "text/css"}
OWN_ORIGIN_ONLY = "default-src 'self'; img-src 'self' data:; frame-ancestors 'none'; base-uri 'none'"


def static(name: str, csp: str | None = OWN_ORIGIN_ONLY) -> Callable[[], Response]:
    """A page: `static/<name>`, read on each request (it is small), never cached stale by the browser."""
    path = STATIC / name
    headers = {"Cache-Control": "no-cache", "X-Content-Type-Options": "nosniff"}
    if csp:
        headers["Content-Security-Policy"] = csp

    def page() -> Response:
        body = path.read_bytes()
        return Response(body, media_type=f"{TYPES[path.suffix]}; charset=utf-8", headers=headers)

    return page


def all_pages() -> dict[str, Callable[[], Response]]:
    """GET path -> page. The docs page is Swagger UI from BentoML's local assets (its script is inline)."""
    return {
        "/": static("playground.html"),
        "/playground.js": static("playground.js"),
        "/playground.css": static("playground.css"),
        "/docs": static("docs.html", csp=None),
    }
