"""BentoML's OpenAPI document, corrected to what the service does."""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel

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
# One server-sent event, as OpenAPI before 3.2 describes an event stream: its `schema` is each event's.
EVENT = {
    "type": "object",
    "required": ["data"],
    "properties": {
        "event": {
            "type": "string",
            "enum": ["message", "done", "error"],
            "description": "message if unnamed",
        },
        "data": {
            "type": "string",
            "description": 'JSON: {"text"} for message, {"model", "chars"} for done, {"error", "status", '
            '"chars"} for error (the status the request would have had)',
        },
    },
}


def nullable(properties: dict[str, Any], model: type[BaseModel]) -> None:
    """Mark the fields of `model` that may be null: BentoML keeps only the first type of `X | None` when it
    lays a model's fields out in an operation (OpenAPI 3.0 says null with `nullable`)."""
    for name, field in model.model_json_schema()["properties"].items():
        if name in properties and {"type": "null"} in field.get("anyOf", []):
            shown = properties[name]
            if "$ref" in shown:  # a $ref's siblings are ignored: wrap it
                shown = {"allOf": [{"$ref": shown.pop("$ref")}], **shown}
            properties[name] = shown | {"nullable": True}


def schema_of(part: dict[str, Any]) -> dict[str, Any]:
    return part["content"]["application/json"]["schema"]


def corrected(
    spec: dict[str, Any],
    requests: dict[str, type[BaseModel]],
    responses: dict[str, type[BaseModel]],
    streams: tuple[str, ...],
) -> dict:
    """`spec` with request bodies required, top_p excluding 0, fields that may be null nullable, every error
    status documented, an error's `detail` allowed to be a list, and each event of a stream described.
    `requests` and `responses` name the model of each route's body and answer, `streams` the streams."""
    schemas = spec["components"]["schemas"]
    detail = {"anyOf": [{"type": "string"}, {"type": "array", "items": {"type": "object"}}]}
    for name in ("InvalidArgument", "NotFound", "InternalServerError"):
        schemas[name]["properties"]["detail"] = detail
    schemas["Error"] = {"type": "object", "required": ["error"], "properties": {"error": {"type": "string"}}}
    schemas["Error"]["properties"]["detail"] = detail
    for route in {*requests, *responses}:
        op = spec["paths"][route]["post"]
        op["responses"] = {str(status): answer for status, answer in op["responses"].items()}
        if route in requests:
            model, body = requests[route], schema_of(op["requestBody"])
            op["requestBody"]["required"] = bool(model.model_fields)  # the Gate takes no body for no fields
            if model.model_config.get("extra") == "forbid":
                body["additionalProperties"] = False
            fields = body.setdefault("properties", {})
            nullable(fields, model)
            if "top_p" in fields:
                fields["top_p"] |= {"minimum": 0, "exclusiveMinimum": True}  # (0, 1]: OpenAPI 3.0's form
        if route in responses:
            nullable(schema_of(op["responses"]["200"])["properties"], responses[route])
        if route in streams:
            op["responses"]["200"]["content"] = {"text/event-stream": {"schema": EVENT}}
        for status, why in ERRORS.items():
            ref = "InvalidArgument" if status == "400" else "Error"
            body = {"application/json": {"schema": {"$ref": f"#/components/schemas/{ref}"}}}
            op["responses"][status] = {"description": why, "content": body}
    return spec
