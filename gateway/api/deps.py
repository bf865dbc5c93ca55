"""Dependencies shared by the routers, defined once."""

from __future__ import annotations

import zlib
from typing import Annotated, Any, Final, TypeVar

import orjson
from fastapi import Depends, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import Response
from pydantic import BaseModel, ValidationError
from starlette.requests import ClientDisconnect
from starlette.types import Receive

from gateway.errors import BadRequest, PayloadTooLarge, UnsupportedMediaType
from gateway.runtime import Runtime

M = TypeVar("M", bound=BaseModel)


async def _runtime(request: Request) -> Runtime:
    # async: FastAPI runs a plain `def` dependency in a worker thread, a thread hop per request.
    runtime: Runtime = request.app.state.runtime
    return runtime


RuntimeDep = Annotated[Runtime, Depends(_runtime)]


class JSON(Response):
    """A JSON answer rendered by orjson."""

    media_type = "application/json"

    def render(self, content: Any) -> bytes:
        return orjson.dumps(content)


async def read_body(request: Request, limit: int) -> bytes:
    """The request body, decoded as its Content-Encoding says (`receive_body`), refused with 413
    as soon as it passes `limit` bytes."""
    headers = request.headers
    return await receive_body(
        request.receive, limit, headers.get("content-length"), headers.get("content-encoding")
    )


# Content-Encoding values read (RFC 9110 names them case-insensitively; x-gzip is gzip's alias).
_GZIP: Final = frozenset(("gzip", "x-gzip"))
_IDENTITY: Final = "identity"


async def receive_body(
    receive: Receive, limit: int, declared: str | None = None, encoding: str | None = None
) -> bytes:
    """The body from an ASGI `receive`, refused with 413 as soon as it passes `limit` bytes
    (before a byte is read when its declared Content-Length does); ClientDisconnect when the
    client goes away first, as Starlette's `Request.stream` raises.

    `encoding` is the Content-Encoding header: none or `identity` reads the body as it is;
    `gzip` inflates it as it arrives, and `limit` holds for the inflated body (a small body that
    inflates past it, a zip bomb, is refused having inflated no more than `limit` + 1 bytes);
    anything else is 415 `unsupported_encoding`, before a byte is read. Every ingest endpoint
    reads its body here, so each gets gzip (Telegraf and the InfluxDB clients send it)."""
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise PayloadTooLarge(f"the body is {declared} bytes; the limit is {limit}")
    if encoding is not None:
        coding = encoding.strip().lower()
        if coding in _GZIP:
            return await _inflate_body(receive, limit)
        if coding not in (_IDENTITY, ""):
            raise UnsupportedMediaType(
                f"Content-Encoding {encoding[:40]!r} is not supported: send gzip or identity",
                code="unsupported_encoding",
            )
    chunks: list[bytes] = []
    size = 0
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            raise ClientDisconnect()
        chunk = message.get("body", b"")
        size += len(chunk)
        if size > limit:
            raise PayloadTooLarge(f"the body is over the limit of {limit} bytes")
        chunks.append(chunk)
        if not message.get("more_body", False):
            return b"".join(chunks)


async def _inflate_body(receive: Receive, limit: int) -> bytes:
    """A gzip body (one or more members, as gzip allows) inflated as it arrives, with no more
    than `limit` + 1 inflated bytes ever held (zlib's `max_length`)."""
    inflater = zlib.decompressobj(wbits=16 + zlib.MAX_WBITS)  # gzip framing only
    chunks: list[bytes] = []
    size = 0
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            raise ClientDisconnect()
        data = message.get("body", b"")
        try:
            while data:
                piece = inflater.decompress(data, limit + 1 - size)
                size += len(piece)
                if size > limit:
                    raise PayloadTooLarge(f"the body inflates past the limit of {limit} bytes")
                chunks.append(piece)
                if inflater.eof and inflater.unused_data:  # the next gzip member
                    data = inflater.unused_data
                    inflater = zlib.decompressobj(wbits=16 + zlib.MAX_WBITS)
                else:
                    data = inflater.unconsumed_tail
        except zlib.error as exc:
            raise BadRequest(f"the gzip body is broken: {exc}", code="invalid_gzip") from None
        if not message.get("more_body", False):
            if not inflater.eof:
                raise BadRequest("the gzip body ends before its end", code="invalid_gzip")
            return b"".join(chunks)


async def read_json(request: Request, model: type[M], limit: int) -> M:
    """The request body as `model`, read by the handler *after* its auth dependency ran.

    FastAPI reads and parses a declared body parameter before it runs any dependency, so a
    handler that declares one would take a whole upload from a client without a token. Handlers
    with a JSON body call this instead (and document the body with `json_body_doc`). Errors are
    the ones FastAPI would raise: 400 invalid_json, 422 invalid_body."""
    body = await read_body(request, limit)
    if not body.strip():
        raise RequestValidationError(
            [{"type": "missing", "loc": ("body",), "msg": "Field required", "input": None}]
        )
    try:
        return model.model_validate_json(body)
    except ValidationError as exc:
        errors = exc.errors(include_url=False, include_input=False)
        raise RequestValidationError(
            [{**err, "loc": ("body", *err["loc"])} for err in errors]
        ) from None


def json_body_doc(model: type[BaseModel]) -> dict[str, Any]:
    """OpenAPI for a body read by `read_json` (FastAPI sees no body parameter to document)."""
    schema = model.model_json_schema()
    if "$defs" in schema:  # its #/$defs/... references would point into the OpenAPI document
        raise ValueError(f"{model.__name__} nests models; document it in components instead")
    return {
        "requestBody": {
            "required": True,
            "content": {"application/json": {"schema": schema}},
        }
    }
