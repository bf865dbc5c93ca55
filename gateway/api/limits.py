"""Request body limits every client meets, authenticated or not, before any handler runs.

`RequestLimits` is a plain ASGI middleware around the whole app:

- every request body has a byte limit: the route's own (`BodyLimit`: telemetry takes
  `max_body_bytes`) or the default (`max_request_body_bytes`, for the admin JSON endpoints). A
  declared Content-Length over it is answered 413 `payload_too_large` before a byte of the body
  is read; a streamed (chunked) body is counted as it is read and cut where it passes the limit.
- each wait for the next piece of a body is bounded (`body_timeout_s`): a client that stops
  sending halfway gets 408 `request_timeout` instead of holding a request open for good. Past
  that first `body_timeout_s`, the body must also keep up an average of `body_min_rate` bytes a
  second (Apache's mod_reqtimeout MinRate): a trickle of a byte now and then, each in time, is
  cut too, while a big body on a slow link that keeps the rate takes as long as it needs.
- an answer given before the body was read to its end (401 before a big upload, 413, 408)
  closes the connection (`Connection: close`), so the rest of the upload is not waited for.
- a request cancelled before it was answered (the server's shutdown deadline passed,
  gateway/server.py) is answered 503 `shutting_down`: it was not acknowledged.

Handlers check the bearer token before they read a body (`gateway.api.deps.read_json`), so an
unauthenticated client never gets its body read at all. The header read timeout, the connection
cap and the shutdown deadline sit one level lower, in the HTTP server (gateway/server.py).
"""

from __future__ import annotations

import asyncio
import contextlib
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from starlette.responses import Response
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from gateway.errors import FieldgateError, PayloadTooLarge, Unavailable, error_response
from gateway.server import BODY_RECEIVED


class RequestTimeout(FieldgateError):
    status_code = 408
    code = "request_timeout"


@dataclass(frozen=True, slots=True)
class BodyLimit:
    """A route whose bodies may be larger (or must be smaller) than the default; `render`
    answers its refusals in another shape than fieldgate's (InfluxDB's, for its endpoints)."""

    method: str
    path: re.Pattern[str]
    max_bytes: int
    render: Callable[[FieldgateError], Response] | None = None


def _declared_length(scope: Scope) -> tuple[int | None, bool]:
    """(Content-Length or None, whether the request has a body at all)."""
    length: int | None = None
    chunked = False
    for name, value in scope["headers"]:
        if name == b"content-length":
            # The HTTP parser has already refused a malformed one.
            length = int(value) if value.strip().isdigit() else None
        elif name == b"transfer-encoding":
            chunked = True
    return length, chunked or bool(length)


class RequestLimits:
    def __init__(
        self,
        app: ASGIApp,
        *,
        max_body_bytes: int,
        body_timeout_s: float,
        body_min_rate: int = 0,
        routes: Sequence[BodyLimit] = (),
    ) -> None:
        self.app = app
        self.max_body_bytes = max_body_bytes
        self.body_timeout_s = body_timeout_s
        self.body_min_rate = body_min_rate
        self.routes = tuple(routes)

    def route_for(self, scope: Scope) -> BodyLimit | None:
        for route in self.routes:
            if scope["method"] == route.method and route.path.fullmatch(scope["path"]):
                return route
        return None

    def limit_for(self, scope: Scope) -> int:
        route = self.route_for(scope)
        return self.max_body_bytes if route is None else route.max_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        route = self.route_for(scope)
        limit = self.max_body_bytes if route is None else route.max_bytes
        render = None if route is None else route.render
        declared, has_body = _declared_length(scope)
        if declared is not None and declared > limit:
            error = PayloadTooLarge(f"the body is {declared} bytes; the limit is {limit}")
            await _answer(send, error, render)
            return
        guard = _BodyGuard(
            scope, receive, send, limit, self.body_timeout_s, self.body_min_rate, has_body=has_body
        )
        try:
            await self.app(scope, guard.receive, guard.send)
        except (PayloadTooLarge, RequestTimeout) as exc:
            # Raised where nothing catches it (outside a handler); a handler's is rendered by the
            # app's error handler like any other FieldgateError.
            if guard.response_started:
                raise
            await _answer(send, exc, render)
        except asyncio.CancelledError:
            # Only the server's shutdown deadline cancels a request. It ends here, answered (or
            # its answer cut short): re-raised, uvicorn would log a traceback for each request
            # cut, one per slow client still connected at shutdown.
            if not guard.response_started:
                with contextlib.suppress(Exception):
                    await _answer(
                        send, Unavailable("the gateway is shutting down", code="shutting_down")
                    )


class _BodyGuard:
    """One request's receive and send, wrapped: the body must arrive within the deadlines and
    stay under `limit`; an answer sent before the body's end closes the connection."""

    __slots__ = (
        "_began",
        "_limit",
        "_loop",
        "_min_rate",
        "_receive",
        "_received",
        "_scope",
        "_send",
        "_timeout_s",
        "body_left",
        "response_started",
    )

    def __init__(
        self,
        scope: Scope,
        receive: Receive,
        send: Send,
        limit: int,
        timeout_s: float,
        min_rate: int,
        *,
        has_body: bool,
    ) -> None:
        self._scope = scope
        self._receive = receive
        self._send = send
        self._limit = limit
        self._timeout_s = timeout_s
        self._min_rate = min_rate
        self._loop = asyncio.get_running_loop()
        self._began: float | None = None  # when the body was first waited for
        self._received = 0
        self.body_left = has_body
        self.response_started = False

    def _wait_s(self) -> float:
        """How long the next part of the body may take to arrive."""
        now = self._loop.time()
        if self._began is None:
            self._began = now
        wait_s = self._timeout_s
        if self._min_rate:  # by now it must have sent `min_rate` a second beyond the first wait
            wait_s = min(
                wait_s, self._began + self._timeout_s + self._received / self._min_rate - now
            )
        return wait_s

    def _too_slow(self) -> RequestTimeout:
        if self._min_rate:
            return RequestTimeout(
                f"the request body did not arrive in time (a pause of at most "
                f"{self._timeout_s:g} s, then at least {self._min_rate} bytes a second)"
            )
        return RequestTimeout(f"no more of the request body arrived within {self._timeout_s:g} s")

    async def receive(self) -> Message:
        if not self.body_left:
            return await self._receive()  # only http.disconnect is left: no deadline on that
        if self._scope.get(BODY_RECEIVED):
            # All of it is here (the server says so): this receive returns it without waiting.
            return self._count(await self._receive())
        wait_s = self._wait_s()
        try:
            if wait_s <= 0:
                raise TimeoutError
            async with asyncio.timeout(wait_s):
                message = await self._receive()
        except TimeoutError:
            raise self._too_slow() from None
        return self._count(message)

    def _count(self, message: Message) -> Message:
        if message["type"] == "http.request":
            self._received += len(message.get("body", b""))
            self.body_left = message.get("more_body", False)
            if self._received > self._limit:
                raise PayloadTooLarge(f"the body is over the limit of {self._limit} bytes")
        else:
            self.body_left = False
        return message

    async def send(self, message: Message) -> None:
        if message["type"] == "http.response.start":
            self.response_started = True
            if self.body_left:
                # Answered before the body was read to its end: the rest is not worth waiting
                # for, and the connection cannot carry another request after it.
                message = {
                    **message,
                    "headers": [*message.get("headers", ()), (b"connection", b"close")],
                }
        await self._send(message)


async def _answer(
    send: Send, error: FieldgateError, render: Callable[[FieldgateError], Response] | None = None
) -> None:
    response = (
        error_response(error.status_code, error.code, error.message, error.details, **error.headers)
        if render is None
        else render(error)
    )
    response.headers["connection"] = "close"
    await send(
        {
            "type": "http.response.start",
            "status": response.status_code,
            "headers": response.raw_headers,
        }
    )
    await send({"type": "http.response.body", "body": response.body})
