"""Errors are data: every failure the API reports is one of these, rendered by one handler as

    {"error": {"code": "...", "message": "...", "details": [...]}}

Hierarchy:

    FieldgateError (500 internal_error)
    ├── BadRequest (400 bad_request; codes: invalid_json, invalid_parameter, ...)
    ├── Unauthorized (401 unauthorized, token_expired)
    ├── Forbidden (403 forbidden)
    ├── NotFound (404 not_found)
    ├── Conflict (409 broker_client_exists)
    ├── PayloadTooLarge (413 payload_too_large, too_many_messages)
    ├── UnsupportedMediaType (415 unsupported_encoding)
    ├── Unprocessable (422 no_valid_readings, invalid_body, ...)
    ├── TooManyRequests (429 too_many_streams; carries Retry-After)
    └── Unavailable (503 queue_full, database_unavailable; carries Retry-After)

The store's own refusals (gateway.store.errors) are mapped to HTTP here, in `DOMAIN_ERRORS`.
Any other exception reaches gateway.app.RequestBoundary: a database outage is 503
database_unavailable with Retry-After, anything else a bug (500 internal_error, logged once).
"""

from __future__ import annotations

from typing import Any

import orjson
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import Response
from starlette.exceptions import HTTPException as StarletteHTTPException

from devices.formats import safe_json
from gateway.store.errors import (
    DeviceExists,
    DeviceNotFound,
    DeviceTokenNotManaged,
    StoreError,
    TokenNotFound,
)


class FieldgateError(Exception):
    status_code = 500
    code = "internal_error"

    def __init__(
        self,
        message: str,
        *,
        code: str | None = None,
        details: list[Any] | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.message = message
        if code is not None:
            self.code = code
        self.details = details or []
        self.headers = headers or {}


class BadRequest(FieldgateError):
    status_code = 400
    code = "bad_request"


class Unauthorized(FieldgateError):
    status_code = 401
    code = "unauthorized"

    def __init__(
        self, message: str = "a valid bearer token is required", *, code: str | None = None
    ) -> None:
        super().__init__(message, code=code, headers={"WWW-Authenticate": "Bearer"})


class Forbidden(FieldgateError):
    status_code = 403
    code = "forbidden"


class NotFound(FieldgateError):
    status_code = 404
    code = "not_found"


class Conflict(FieldgateError):
    status_code = 409
    code = "conflict"


class PayloadTooLarge(FieldgateError):
    status_code = 413
    code = "payload_too_large"


class UnsupportedMediaType(FieldgateError):
    status_code = 415
    code = "unsupported_media_type"


class Unprocessable(FieldgateError):
    status_code = 422
    code = "unprocessable"


class TooManyRequests(FieldgateError):
    status_code = 429
    code = "too_many_requests"

    def __init__(self, message: str, *, code: str | None = None, retry_after_s: int = 1) -> None:
        super().__init__(message, code=code, headers={"Retry-After": str(retry_after_s)})


class Unavailable(FieldgateError):
    status_code = 503
    code = "unavailable"

    def __init__(self, message: str, *, code: str | None = None, retry_after_s: int = 1) -> None:
        super().__init__(message, code=code, headers={"Retry-After": str(retry_after_s)})


_LOGGED = "fieldgate: this traceback is logged already"


def mark_logged(exc: BaseException) -> None:
    """Say that `exc`'s traceback is logged (the writer logs a failed commit once, however many
    requests shared it): the error boundary then answers without logging it again."""
    if _LOGGED not in getattr(exc, "__notes__", ()):
        exc.add_note(_LOGGED)


def is_logged(exc: BaseException) -> bool:
    return _LOGGED in getattr(exc, "__notes__", ())


def error_response(
    status: int, code: str, message: str, details: list[Any] | None = None, **headers: str
) -> Response:
    body = {"error": {"code": code, "message": message, "details": details or []}}
    try:
        content = orjson.dumps(body)
    except orjson.JSONEncodeError:
        # Client text echoed in an error (a name, a key) may hold what JSON cannot carry (a lone
        # surrogate): written out as escapes, so a client's mistake never becomes a 500.
        content = orjson.dumps(safe_json(body))
    return Response(content, status_code=status, media_type="application/json", headers=headers)


# The store's refusals as HTTP answers: (status, code).
DOMAIN_ERRORS: dict[type[StoreError], tuple[int, str]] = {
    DeviceNotFound: (404, "device_not_found"),
    DeviceExists: (409, "device_exists"),
    TokenNotFound: (404, "token_not_found"),
    DeviceTokenNotManaged: (409, "device_token"),
}


def render_error(exc: Exception) -> Response | None:
    """The answer to one of our own errors (a FieldgateError, a store refusal), or None for any
    other exception: the handlers below, and the telemetry lane, which meets no handler."""
    if isinstance(exc, FieldgateError):
        return error_response(exc.status_code, exc.code, exc.message, exc.details, **exc.headers)
    if isinstance(exc, StoreError):
        status, code = DOMAIN_ERRORS.get(type(exc), (500, "internal_error"))
        return error_response(status, code, exc.message)
    return None


async def _own_error(_: Request, exc: Exception) -> Response:
    response = render_error(exc)
    assert response is not None
    return response


async def _validation_error(_: Request, exc: Exception) -> Response:
    """Query, path and header problems are 400 invalid_parameter; a JSON body that is not JSON is
    400 invalid_json; a JSON body of the wrong shape (a bad device id, say) is 422 invalid_body."""
    assert isinstance(exc, RequestValidationError)
    errors = exc.errors()
    details = [
        {"loc": [str(p) for p in err.get("loc", ())], "message": err.get("msg", "")}
        for err in errors
    ]
    where = ", ".join(".".join(d["loc"]) for d in details)
    if any(err.get("type") == "json_invalid" for err in errors):
        return error_response(400, "invalid_json", "the body is not valid JSON", details)
    if errors and all(tuple(err.get("loc", ()))[:1] == ("body",) for err in errors):
        return error_response(422, "invalid_body", f"invalid request body: {where}", details)
    return error_response(400, "invalid_parameter", f"invalid request: {where}", details)


async def _http_error(_: Request, exc: Exception) -> Response:
    assert isinstance(exc, StarletteHTTPException)
    if exc.status_code == 400 and exc.__cause__ is not None:
        # FastAPI could not decode the JSON body: bytes that are not UTF-8 (invalid_json), or
        # JSON that Python will not hold, such as an integer of more than 4,300 digits or
        # nesting past the recursion limit (invalid_body, as any other body of the wrong shape).
        cause = exc.__cause__
        if isinstance(cause, UnicodeDecodeError):
            return error_response(400, "invalid_json", "the body is not UTF-8 JSON")
        return error_response(
            422, "invalid_body", f"the body could not be read: {type(cause).__name__}: {cause}"
        )
    code = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code, "http_error")
    return error_response(exc.status_code, code, str(exc.detail), None, **(exc.headers or {}))


def install_error_handlers(app: FastAPI) -> None:
    app.add_exception_handler(FieldgateError, _own_error)
    app.add_exception_handler(StoreError, _own_error)
    app.add_exception_handler(RequestValidationError, _validation_error)
    app.add_exception_handler(StarletteHTTPException, _http_error)
