"""The refusals in the OpenAPI document: every error answers `{"error": {"code", "message",
"details"}}` (gateway.errors), which FastAPI cannot know: by itself it documents a 422 of its
own shape (`{"detail": [...]}`) that fieldgate never sends. `document_errors` declares the
statuses each operation can answer with our shape instead, once, for every route."""

from __future__ import annotations

from typing import Any

from fastapi import FastAPI

from gateway.api.schemas import ErrorOut

_REF = "#/components/schemas/ErrorOut"

# status -> when; `_statuses` picks those that apply to an operation.
_WHEN = {
    "400": "invalid parameters or JSON (invalid_parameter, invalid_json, invalid_cursor, ...)",
    "401": "no valid bearer token (unauthorized)",
    "403": "the token's role may not do this, or its device is disabled (forbidden)",
    "404": "no such device (device_not_found)",
    "408": "the request body did not arrive in time (request_timeout)",
    "413": "the body is over its limit (payload_too_large, too_many_messages, ...)",
    "422": "the body is JSON of the wrong shape (invalid_body), or holds no valid reading "
    "(no_valid_readings, with a rejection per reading in details)",
    "429": "too many wrong tokens from this address (too_many_auth_failures; Retry-After)",
    "503": "try again shortly: the writer is full, the database is down, or the gateway is "
    "shutting down (queue_full, database_unavailable, shutting_down; Retry-After)",
}


def _statuses(path: str, method: str, operation: dict[str, Any]) -> list[str]:
    if "{device_token}" in path:
        # ThingsBoard's device API (api/thingsboard.py): the device token is in the path, and
        # a body without one valid reading is 400 there, as ThingsBoard answers.
        return ["400", "401", "403", "408", "413", "429", "503"]
    statuses = ["400", "503"]
    schemes = {name for requirement in operation.get("security", []) for name in requirement}
    if schemes:
        statuses.append("401")
    # Roles (403) and the failure throttle (429) are the API tokens', not the broker hook's.
    if "bearerAuth" in schemes:
        statuses += ["403", "429"]
    if "{device_id}" in path:
        statuses.append("404")
    if method in ("post", "patch"):
        statuses += ["408", "413", "422"]
    return sorted(statuses)


def _declare(schema: dict[str, Any], prefix: str) -> None:
    components = schema.setdefault("components", {}).setdefault("schemas", {})
    error = ErrorOut.model_json_schema(ref_template="#/components/schemas/{model}")
    components.update(error.pop("$defs", {}))
    components["ErrorOut"] = error
    for path, operations in schema.get("paths", {}).items():
        for method, operation in operations.items():
            responses = operation.setdefault("responses", {})
            responses.pop("422", None)  # FastAPI's own shape: parameters are 400 here
            if not path.startswith(prefix):
                continue
            for status in _statuses(path, method, operation):
                responses[status] = {
                    "description": _WHEN[status],
                    "content": {"application/json": {"schema": {"$ref": _REF}}},
                }
    for unused in ("HTTPValidationError", "ValidationError"):
        components.pop(unused, None)


def document_errors(app: FastAPI, prefix: str) -> None:
    """Make `app.openapi()` declare fieldgate's error answers for the routes under `prefix`."""
    generate = app.openapi

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            _declare(generate(), prefix)
        assert app.openapi_schema is not None
        return app.openapi_schema

    app.openapi = openapi  # type: ignore[method-assign]
