"""The HTTP floor under `/generate`: a BentoML service with the same route, the same strict request fields and
a response of the same shape and size, which generates nothing. What a request costs it (latency, server CPU)
is what BentoML's HTTP path costs before any of char-rnn's own work; `serve_latency.py` measures it beside
the real service, so that its targets can be read against what the framework alone allows.

    bentoml serve --working-dir bench floor_service:Floor --port 3001
"""

from __future__ import annotations

import os

os.environ.setdefault("OTEL_SDK_DISABLED", "true")  # as service.py: no tracing unless configured

import bentoml  # noqa: E402
from pydantic import ConfigDict, Field  # noqa: E402

TEXT = "x" * 200  # the size of the benchmark's completions


class Request(bentoml.IODescriptor):
    model_config = ConfigDict(extra="forbid", strict=True, allow_inf_nan=False)

    prompt: str = Field("\n", max_length=4096)
    max_new_chars: int = Field(200, ge=1, le=2000)
    seed: int | None = Field(None, ge=0, le=2**32 - 1)


@bentoml.service(name="floor", workers=1, tracing={"excluded_urls": ".*"})
class Floor:
    @bentoml.api(route="/generate", input_spec=Request)
    async def generate(self, **fields: object) -> dict:
        return {"completions": [TEXT], "model": "none", "skipped_chars": [], "elapsed_ms": 0.0}
