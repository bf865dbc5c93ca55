"""InfluxDB's write endpoints (issue 13): `POST /api/v2/write` (Telegraf's
`outputs.influxdb_v2`, the official client libraries) and the 1.x `POST /write`, at the root
like InfluxDB's, so a collector moves to fieldgate by changing its URL and token.

The body is line protocol (devices/line_protocol.py), plain or gzip (gateway.api.deps); the
lines go through the one ingest path (gateway/line_ingest.py). The token is `Authorization:
Token <token>` (what InfluxDB 2 clients send), `Bearer <token>`, `Basic` with the token as the
password, or 1.x's `u`/`p` query parameters (`p` is the token); it must be a device token (its
own device's lines) or a writer token (any registered device's).

Answers follow InfluxDB's, because Telegraf and the clients act on them (they retry on 429 and
503, and drop a batch on any other 4xx): 204 when every line was stored; 400 when some were not
(the others are stored), naming the first bad line; 401, 403, 413, 415; 429 and 503 with
Retry-After. Errors have InfluxDB 2's shape, `{"code": "invalid", "message": "..."}`, with
fieldgate's own code beside it (`fieldgate_code`), and on a 400 the line (`line`) and the
rejections, by line number (`rejected`, the first 100). `/write` adds 1.x's `error` (the message).
"""

from __future__ import annotations

import base64
import binascii
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from functools import partial
from typing import Annotated, Any, Final
from urllib.parse import parse_qsl

from fastapi import APIRouter, Query, Request
from fastapi.responses import Response
from pydantic import BaseModel, Field
from starlette.types import ASGIApp, Receive, Scope, Send

from devices.formats import PayloadError
from devices.line_protocol import PRECISIONS
from devices.models import Role
from gateway.api.deps import JSON, RuntimeDep, read_body, receive_body
from gateway.api.writes import writer_refusals
from gateway.auth import Principal, principal_of
from gateway.errors import (
    BadRequest,
    FieldgateError,
    Forbidden,
    PayloadTooLarge,
    Unauthorized,
)
from gateway.line_ingest import LinesResult, ingest_lines
from gateway.runtime import Runtime

router = APIRouter(tags=["influxdb"])

# InfluxDB 2's error codes by status (its platform errors: EInvalid "invalid", ...).
_INFLUX_CODES: Final = {
    400: "invalid",
    401: "unauthorized",
    403: "forbidden",
    404: "not found",
    408: "invalid",
    413: "request too large",
    415: "unsupported media type",
    422: "unprocessable entity",
    429: "too many requests",
    503: "unavailable",
}
_MAX_LISTED = 100
# 1.x's precisions, as /write takes them, to the parser's.
_V1_PRECISIONS: Final = {"n": "ns", "ns": "ns", "u": "us", "us": "us", "ms": "ms", "s": "s"}


class InfluxError(BaseModel):
    """An error in InfluxDB 2's shape."""

    code: str = Field(description="InfluxDB's code: invalid, unauthorized, forbidden, ...")
    message: str
    fieldgate_code: str = Field(description="fieldgate's code (unauthorized, payload_too_large)")
    line: int | None = Field(default=None, description="400: the first line not stored")
    rejected: list[dict[str, Any]] | None = Field(
        default=None, description="400: rejections by line number (index), the first 100"
    )


_BODY_DOC: Final = {
    "requestBody": {
        "required": True,
        "content": {"text/plain": {"schema": {"type": "string"}}},
        "description": "InfluxDB line protocol; Content-Encoding: gzip accepted",
    }
}
_RESPONSES: Final[dict[int | str, dict[str, Any]]] = {
    204: {"description": "every line was stored"},
    **{
        status: {"model": InfluxError, "description": when}
        for status, when in (
            (400, "some lines were not stored (the others were): the first is named"),
            (401, "no valid token"),
            (403, "not a device or writer token, or its device is disabled"),
            (413, "the body (inflated) is over FIELDGATE_MAX_BODY_BYTES, or too many lines"),
            (415, "a Content-Encoding other than gzip or identity"),
            (429, "too many wrong tokens from this address; Retry-After"),
            (503, "the writer is full or the gateway is stopping; Retry-After"),
        )
    },
}


@router.post(
    "/api/v2/write",
    status_code=204,
    response_class=Response,
    responses=_RESPONSES,
    openapi_extra=_BODY_DOC,
)
async def write_v2(
    request: Request,
    runtime: RuntimeDep,
    precision: Annotated[str, Query(description="ns (default), us, ms or s")] = "ns",
    org: Annotated[str | None, Query(description="accepted, not used")] = None,
    bucket: Annotated[str | None, Query(description="accepted, not used")] = None,
) -> Response:
    """Write InfluxDB line protocol (InfluxDB 2's API); 204 once every line is committed."""
    return await answer_write(runtime, _Write.of(request, precision, v1=False))


@router.post(
    "/write",
    status_code=204,
    response_class=Response,
    responses=_RESPONSES,
    openapi_extra=_BODY_DOC,
)
async def write_v1(
    request: Request,
    runtime: RuntimeDep,
    precision: Annotated[str, Query(description="n or ns (default), u or us, ms, s")] = "ns",
    db: Annotated[str | None, Query(description="accepted, not used")] = None,
    u: Annotated[str | None, Query(description="user name: accepted, not used")] = None,
    p: Annotated[str | None, Query(description="the token, if not in Authorization")] = None,
) -> Response:
    """Write InfluxDB line protocol (InfluxDB 1.x's API); 204 once every line is committed."""
    return await answer_write(runtime, _Write.of(request, precision, v1=True, password=p))


@dataclass(frozen=True, slots=True)
class _Write:
    """One write request, as the handlers and `WriteLane` read it."""

    v1: bool
    precision: str  # as sent
    authorization: str | None
    password: str | None  # 1.x's p
    address: str | None
    read_body: Callable[[int], Awaitable[bytes]]  # the body, refused past a limit (413)

    @classmethod
    def of(
        cls, request: Request, precision: str, *, v1: bool, password: str | None = None
    ) -> _Write:
        return cls(
            v1,
            precision,
            request.headers.get("authorization"),
            password,
            request.client.host if request.client else None,
            partial(read_body, request),
        )


async def answer_write(runtime: Runtime, write: _Write) -> Response:
    """The answer to a write, once its lines are committed: the one implementation of both
    endpoints, for FastAPI's routes and for `WriteLane`."""
    v1 = write.v1
    try:
        principal = await _writer_of(runtime, write)
        precision = _V1_PRECISIONS.get(write.precision) if v1 else write.precision
        if precision not in PRECISIONS:
            raise BadRequest(
                f"precision {write.precision[:16]!r} is not one of "
                + ("n, ns, u, us, ms, s" if v1 else ", ".join(PRECISIONS)),
                code="invalid_parameter",
            )
        body = await write.read_body(runtime.settings.max_body_bytes)
        result = await _ingest(runtime, principal, body, precision)
    except FieldgateError as exc:
        return _influx_error(exc.status_code, exc.code, exc.message, exc.headers, v1=v1)
    if not result.rejected:
        if not result.lines:
            return _influx_error(400, "no_lines", "writing requires points", {}, v1=v1)
        return Response(status_code=204)
    first = result.rejected[0]
    where = f"line {first.index}: " if first.index > 0 else ""
    failed = len({r.index for r in result.rejected if r.index > 0})
    message = (
        f"{where}{first.message} ({first.code}); {result.accepted + result.duplicates} "
        f"reading(s) stored, {len(result.rejected)} rejected"
        + (f" on {failed} of {result.lines} line(s)" if failed else "")
    )
    return _influx_error(
        400,
        "partial_write",
        message,
        {},
        v1=v1,
        line=first.index if first.index > 0 else None,
        rejected=[r.as_dict() for r in result.rejected[:_MAX_LISTED]],
    )


async def _writer_of(runtime: Runtime, write: _Write) -> Principal:
    """The principal of the request's token, if it may write line protocol."""
    token = _token_of(write.authorization, write.password)
    address = write.address
    if token is None:
        raise Unauthorized(
            "missing Authorization: Token <token> header (or Bearer, or 1.x's p= parameter)"
        )
    principal = await principal_of(runtime, f"Bearer {token}", address)
    if principal.role not in (Role.DEVICE, Role.WRITER):
        raise Forbidden(
            f"line protocol is written with a device or writer token, not {principal.role.value}"
        )
    if not principal.device_enabled:
        raise Forbidden(f"device {principal.device_id!r} is disabled", code="device_disabled")
    return principal


def _token_of(authorization: str | None, password: str | None) -> str | None:
    """The token of `Authorization: Token|Bearer <token>`, `Basic` (its password), or the 1.x
    `p` parameter; None when there is none."""
    if not authorization:
        return password or None
    scheme, _, credentials = authorization.strip().partition(" ")
    credentials = credentials.strip()
    scheme = scheme.lower()
    if scheme in ("token", "bearer") and credentials:
        return credentials
    if scheme == "basic" and credentials:
        try:
            decoded = base64.b64decode(credentials, validate=True).decode("utf-8")
        except (binascii.Error, UnicodeDecodeError):
            raise Unauthorized("the Basic credentials are not base64 user:token") from None
        return decoded.partition(":")[2] or None
    raise Unauthorized("the Authorization header must be 'Token <token>' or 'Bearer <token>'")


async def _ingest(
    runtime: Runtime, principal: Principal, body: bytes, precision: str
) -> LinesResult:
    try:
        with writer_refusals(runtime):
            return await ingest_lines(runtime, principal, body, precision=precision)
    except PayloadError as exc:
        raise PayloadTooLarge(exc.message, code=exc.code) from None


def refusal(error: FieldgateError) -> Response:
    """`error` in InfluxDB 2's shape: for the refusals made before a handler runs (a declared
    Content-Length over the limit, gateway/api/limits.py)."""
    return _influx_error(error.status_code, error.code, error.message, error.headers, v1=False)


def refusal_v1(error: FieldgateError) -> Response:
    """`refusal` for `/write` (with 1.x's `error`)."""
    return _influx_error(error.status_code, error.code, error.message, error.headers, v1=True)


def _influx_error(
    status: int,
    code: str,
    message: str,
    headers: dict[str, str],
    *,
    v1: bool,
    line: int | None = None,
    rejected: list[dict[str, Any]] | None = None,
) -> Response:
    body: dict[str, Any] = {
        "code": _INFLUX_CODES.get(status, "internal error"),
        "message": message,
        "fieldgate_code": code,
    }
    if line is not None:
        body["line"] = line
    if rejected is not None:
        body["rejected"] = rejected
    if v1:
        body["error"] = message
    return JSON(body, status_code=status, headers=headers)


def query_parameters(query: str) -> dict[str, str]:
    """The query's parameters, as FastAPI reads them (the last value given); parse_qsl only
    when something in it is encoded (`%`, `+`): it costs a 100-reading write ~3%."""
    if "%" in query or "+" in query:
        return dict(parse_qsl(query, keep_blank_values=True))
    return dict(pair.partition("=")[::2] for pair in query.split("&") if pair)


class WriteLane:
    """`write_v2` and `write_v1` as plain ASGI, ahead of FastAPI's router, as
    gateway/api/writes.py's `TelemetryLane` is for native posts: FastAPI's routing and dependency
    solving cost a line protocol body of 100 readings about as much again as its ingest
    (bench/ingest_http.py --formats; bench/README.md). The same steps through the same function
    (`answer_write`), inside the same middlewares; the routes remain what the OpenAPI document
    shows, and what serves these paths where the lane is left out (tests/test_line_protocol.py
    holds the two to the same answers)."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app
        routes = {getattr(r, "endpoint", None): r for r in router.routes}
        # path -> (the route, for app.RequestBoundary's label; 1.x or not)
        self.paths = {
            "/api/v2/write": (routes[write_v2], False),
            "/write": (routes[write_v1], True),
        }

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        entry = None
        if scope["type"] == "http" and scope["method"] == "POST":
            path: str = scope["path"]
            root: str = scope.get("root_path", "")
            if root and path.startswith(root + "/"):  # under a mount: the path as routed
                path = path[len(root) :]
            entry = self.paths.get(path)
        if entry is None:
            await self.app(scope, receive, send)
            return
        route, v1 = entry
        scope["route"] = route
        authorization = declared = encoding = None
        for name, value in scope["headers"]:
            if name == b"authorization" and authorization is None:
                authorization = value.decode("latin-1")
            elif name == b"content-length":
                declared = value.decode("latin-1")
            elif name == b"content-encoding":
                encoding = value.decode("latin-1")
        query = query_parameters(scope["query_string"].decode("latin-1"))
        client = scope.get("client")

        async def body(limit: int) -> bytes:
            return await receive_body(receive, limit, declared, encoding)

        write = _Write(
            v1,
            query.get("precision", "ns"),
            authorization,
            query.get("p") if v1 else None,
            client[0] if client else None,
            body,
        )
        runtime: Runtime = scope["app"].state.runtime
        response = await answer_write(runtime, write)
        await response(scope, receive, send)
