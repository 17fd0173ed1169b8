"""BentoML's OpenAPI document, corrected to what the service does."""

from __future__ import annotations

from typing import Any

ERRORS = {
    "400": "a field breaks its rule, unknown prompt characters, or an empty or malformed body",
    "401": "CHAR_RNN_API_KEY is set and the request has no 'Authorization: Bearer <key>' with it",
    "408": "the request body did not arrive within CHAR_RNN_BODY_TIMEOUT",
    "413": "the body is larger than the limit",
    "415": "the body is not JSON",
    "429": "CHAR_RNN_MAX_CONCURRENCY requests are in progress; retry shortly",
    "503": "no model has been promoted yet",
    "504": "generation took longer than CHAR_RNN_TIMEOUT",
}


def corrected(spec: dict[str, Any], generate: tuple[str, ...], stream: str, others: tuple[str, ...]) -> dict:
    """`spec` with request bodies required, top_p excluding 0, optional fields nullable, every error status
    documented, an error's `detail` allowed to be a list, and the stream's media type (server-sent events)."""
    schemas = spec["components"]["schemas"]
    detail = {"anyOf": [{"type": "string"}, {"type": "array", "items": {"type": "object"}}]}
    for name in ("InvalidArgument", "NotFound", "InternalServerError"):
        schemas[name]["properties"]["detail"] = detail
    schemas["Error"] = {"type": "object", "required": ["error"], "properties": {"error": {"type": "string"}}}
    schemas["Error"]["properties"]["detail"] = detail
    for route in (*generate, *others):
        op = spec["paths"][route]["post"]
        if route in generate:
            op["requestBody"]["required"] = True
            fields = op["requestBody"]["content"]["application/json"]["schema"]["properties"]
            fields["top_p"] |= {"minimum": 0, "exclusiveMinimum": True}  # (0, 1]: OpenAPI 3.0's form
            for name in ("top_k", "top_p", "seed"):  # optional: null means "off" / "random"
                fields[name]["nullable"] = True
        for status, why in ERRORS.items():
            ref = "InvalidArgument" if status == "400" else "Error"
            body = {"application/json": {"schema": {"$ref": f"#/components/schemas/{ref}"}}}
            op["responses"][status] = {"description": why, "content": body}
    events = {"text/event-stream": {"schema": {"type": "string", "description": "server-sent events"}}}
    ok = spec["paths"][stream]["post"]["responses"].setdefault("200", {"description": "Successful Response"})
    ok["content"] = events
    return spec
