"""Telemetry in over HTTP (the write endpoint beside api/reads.py): a device posts readings
(device token); the ingest rules are gateway/ingest.py.

`POST /api/v1/devices/{id}/telemetry` is the hot path: most devices post one reading every few
seconds, so a fleet's request rate is set by what one such request costs. FastAPI's routing and
dependency solving cost several times the ingest itself (bench/README.md, "requests.py"), so
`TelemetryLane`, a plain ASGI middleware, answers these requests itself, ahead of FastAPI's
router. It runs the same steps in the same order as the documented route below, through the
same functions (`principal_of`, `device_writer`, `receive_body`, `take_telemetry`,
`render_error`), inside the same middlewares (request limits, app.RequestBoundary);
tests/test_telemetry_lane.py holds the two to the same answers. The route remains what the
OpenAPI document shows, and what serves the endpoint where the lane is left out.

The body's format follows its Content-Type (`payload_parser`): `application/senml+json` is a
SenML pack (devices/senml.py); anything else, `application/json` or none included, the native
format. The lane's cost for native JSON stays one header comparison."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any, Final

import orjson
from fastapi import APIRouter, Request
from starlette.types import ASGIApp, Receive, Scope, Send

from devices.formats import Code, PayloadError, parse_telemetry
from devices.senml import MEDIA_TYPE as SENML_MEDIA_TYPE
from devices.senml import parse_senml
from gateway.api.deps import JSON, RuntimeDep, read_body, receive_body
from gateway.api.schemas import IngestOut
from gateway.auth import DeviceAuth, device_writer, principal_of
from gateway.errors import BadRequest, PayloadTooLarge, Unavailable, Unprocessable, render_error
from gateway.ingest import IngestResult, LimitCode, Parser
from gateway.runtime import Runtime
from gateway.writer import QueueFull, WriterStopped

router = APIRouter(prefix="/devices/{device_id}/telemetry", tags=["telemetry"])

_JSON: Final = b"application/json"
_SENML: Final = SENML_MEDIA_TYPE.encode()
# OpenAPI: the two body formats (the route reads the raw body; the parsers validate it).
_BODY_DOC: Final[dict[str, Any]] = {
    "requestBody": {
        "required": True,
        "content": {
            "application/json": {
                "schema": {"description": "one message or an array of messages (README)"}
            },
            SENML_MEDIA_TYPE: {
                "schema": {"description": "a SenML pack (RFC 8428): an array of records"}
            },
        },
    }
}


def payload_parser(content_type: bytes | None) -> Parser:
    """The parser of a body with this Content-Type: SenML for `application/senml+json` (any
    case, parameters allowed), the native format for anything else."""
    if content_type is None or content_type == _JSON:
        return parse_telemetry
    if content_type.split(b";", 1)[0].strip().lower() == _SENML:
        return parse_senml
    return parse_telemetry


@router.post("", response_model=IngestOut, openapi_extra=_BODY_DOC)
async def post_telemetry(
    device_id: str, request: Request, _: DeviceAuth, runtime: RuntimeDep
) -> JSON:
    """Store one message or an array of messages (`application/json`), or a SenML pack
    (`application/senml+json`); answers once they are committed."""
    body = await read_body(request, runtime.settings.max_body_bytes)
    content_type = request.headers.get("content-type")
    parser = payload_parser(content_type.encode("latin-1") if content_type is not None else None)
    return JSON(await take_telemetry(runtime, device_id, body, parser))


async def take_telemetry(
    runtime: Runtime, device_id: str, body: bytes, parser: Parser = parse_telemetry
) -> dict[str, Any]:
    """Ingest an authorised device's payload; the answer once it is committed, or the error."""
    result = await ingest_payload(runtime, device_id, body, parser)
    rejected = [r.as_dict() for r in result.rejected]
    if not result.valid:
        raise Unprocessable(
            "no valid readings in the payload" if rejected else "the payload holds no messages",
            code="no_valid_readings",
            details=rejected,
        )
    return {"accepted": result.accepted, "duplicates": result.duplicates, "rejected": rejected}


async def ingest_payload(
    runtime: Runtime, device_id: str, body: bytes, parser: Parser = parse_telemetry
) -> IngestResult:
    """Ingest an authorised device's payload over HTTP, in `parser`'s format: the result once
    it is committed, or the HTTP error (400/413 for the payload, 503 for an overload). Every
    HTTP format's endpoint answers from this result in its own words."""
    try:
        with writer_refusals(runtime):
            result = await runtime.ingestor.ingest(
                device_id, body, transport="http", wait=False, parser=parser
            )
    except PayloadError as exc:
        if exc.code in (Code.TOO_MANY_MESSAGES, LimitCode.TOO_MANY_METRICS):
            raise PayloadTooLarge(exc.message, code=exc.code) from None
        raise BadRequest(exc.message, code=exc.code) from None
    # Anything else reaches app.RequestBoundary: a database outage is 503 database_unavailable
    # with Retry-After, anything else a bug (500 internal_error, logged).
    return result


@contextmanager
def writer_refusals(runtime: Runtime) -> Iterator[None]:
    """The writer's refusals as HTTP answers, for every format's endpoint: full, 503
    `queue_full` with Retry-After; stopping, 503 `shutting_down`."""
    try:
        yield
    except QueueFull as exc:
        raise Unavailable(
            f"the writer is busy ({exc}); retry shortly",
            code="queue_full",
            retry_after_s=runtime.settings.retry_after_s,
        ) from None
    except WriterStopped:
        raise Unavailable("the gateway is shutting down", code="shutting_down") from None


_SUFFIX: Final = "/telemetry"


class TelemetryLane:
    """`post_telemetry` as plain ASGI (see the module's docstring); every other request goes on
    to `app`. Installed innermost of the app's middlewares, in front of FastAPI's router."""

    def __init__(self, app: ASGIApp, *, prefix: str) -> None:
        self.app = app
        self.head = prefix + "/devices/"
        # The route's own object: app.RequestBoundary labels the request by its path template.
        self.route = next(
            r for r in router.routes if getattr(r, "endpoint", None) is post_telemetry
        )

    def device_of(self, scope: Scope) -> str | None:
        """The device id of a telemetry post (the route's `{device_id}`: one path segment)."""
        path: str = scope["path"]
        root: str = scope.get("root_path", "")
        if root and path.startswith(root + "/"):  # under a mount: the path below it, as routed
            path = path[len(root) :]
        if (
            scope["method"] != "POST"
            or not path.endswith(_SUFFIX)
            or not path.startswith(self.head)
        ):
            return None
        device_id = path[len(self.head) : -len(_SUFFIX)]
        return device_id if device_id and "/" not in device_id else None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        device_id = self.device_of(scope) if scope["type"] == "http" else None
        if device_id is None:
            await self.app(scope, receive, send)
            return
        scope["route"] = self.route
        runtime: Runtime = scope["app"].state.runtime
        authorization = declared = encoding = content_type = None
        for name, value in scope["headers"]:
            if name == b"authorization" and authorization is None:
                authorization = value.decode("latin-1")
            elif name == b"content-length":
                declared = value.decode("latin-1")
            elif name == b"content-encoding":  # gzip (receive_body); one check per header
                encoding = value.decode("latin-1")
            elif name == b"content-type" and content_type is None:
                content_type = value
        client = scope.get("client")
        try:
            principal = await principal_of(runtime, authorization, client[0] if client else None)
            device_writer(principal, device_id)
            body = await receive_body(receive, runtime.settings.max_body_bytes, declared, encoding)
            parser = parse_telemetry if content_type == _JSON else payload_parser(content_type)
            answer = orjson.dumps(await take_telemetry(runtime, device_id, body, parser))
        except Exception as exc:
            response = render_error(exc)
            if response is None:
                raise  # app.RequestBoundary answers it (503 for an outage, else 500, logged)
            await response(scope, receive, send)
            return
        headers = [(b"content-length", b"%d" % len(answer)), (b"content-type", _JSON)]
        await send({"type": "http.response.start", "status": 200, "headers": headers})
        await send({"type": "http.response.body", "body": answer})
