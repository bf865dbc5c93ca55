"""The HTTP server `fieldgate serve` runs: uvicorn, with limits on slow and surplus clients.

uvicorn bounds idle keep-alive connections (`timeout_keep_alive`) and, when asked, the graceful
shutdown (`timeout_graceful_shutdown`: requests still running then are cancelled). It has no
deadline for a new connection's request line and headers, no cap on their size with httptools,
and its connection cap (`limit_concurrency`) answers text/plain. `GuardedHttpProtocol` (its
httptools protocol, subclassed) adds those:

- a connection must send a complete request line and headers within `http_header_timeout_s` of
  opening, or of the first byte of its next request: else it gets 408 (or, if it sent nothing,
  is just closed);
- request line and headers of more than `http_max_header_bytes` get 431;
- bytes that are not HTTP/1.1 (a malformed request line, header, Content-Length or chunk)
  get 400 `invalid_http`, as JSON like every other error;
- a request on a connection past `max_connections` open ones gets 503 `too_many_connections`.

It also marks a request whose whole body has arrived (`BODY_RECEIVED`), so the app's body
deadline (gateway/api/limits.py) is not armed for a wait that cannot happen: a timer per request
cost ~13% of a one-reading post's CPU.

Every one of these answers is JSON (`{"error": ...}`) and closes the connection. The body read
timeout and the body size limits are the app's (gateway/api/limits.py): only the app knows when
it waits for a body. uvicorn 0.54's httptools protocol was read for this; the parts used are its
constructor, connection_made/lost, data_received, send_400_response and the parser callbacks
on_message_begin, on_headers_complete and on_message_complete (tests/test_serve_limits.py runs
them against `fieldgate serve`).
"""

from __future__ import annotations

import asyncio
import errno
import http
import os
import socket
from typing import Any

import orjson
import uvicorn
from starlette.types import ASGIApp, Receive, Scope, Send
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

from gateway.settings import Settings

# Set in a request's scope once its whole body has arrived (uvicorn holds it for the app's next
# `receive`, which then cannot wait): gateway/api/limits.py times only a body still to come.
BODY_RECEIVED = "fieldgate.body_received"


def _error(
    status: int, code: str, message: str, retry_after_s: int | None = None
) -> tuple[list[tuple[bytes, bytes]], bytes]:
    """Headers and body of a JSON error answer that closes the connection."""
    body = orjson.dumps({"error": {"code": code, "message": message, "details": []}})
    headers = [
        (b"content-type", b"application/json"),
        (b"content-length", str(len(body)).encode()),
        (b"connection", b"close"),
    ]
    if retry_after_s is not None:
        headers.append((b"retry-after", str(retry_after_s).encode()))
    return headers, body


def _raw_error(status: int, code: str, message: str) -> bytes:
    """A whole JSON error answer as bytes, for a connection with no request to answer through."""
    headers, body = _error(status, code, message)
    status_line = f"HTTP/1.1 {status} {http.HTTPStatus(status).phrase}\r\n".encode()
    return (
        status_line
        + b"".join(name + b": " + value + b"\r\n" for name, value in headers)
        + (b"\r\n" + body)
    )


class GuardedHttpProtocol(HttpToolsProtocol):
    """uvicorn's httptools protocol with a header deadline, a header size cap and a JSON
    connection cap. Configured by subclassing (`protocol_for`): uvicorn makes one per connection
    with its own constructor arguments."""

    header_timeout_s: float = 10.0
    max_header_bytes: int = 64 * 1024
    max_connections: int = 1_000

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._header_timer: asyncio.TimerHandle | None = None
        self._header_bytes = 0  # received while awaiting the head (all of it head, if unfinished)
        self._head_bytes = 0  # of the request line and headers parsed
        self._began = False  # a byte of the request awaited came in

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._await_headers()

    def connection_lost(self, exc: Exception | None) -> None:
        self._headers_done()
        super().connection_lost(exc)

    def data_received(self, data: bytes) -> None:
        if self._header_timer is not None:
            self._header_bytes += len(data)
        super().data_received(data)
        if (
            self._header_timer is not None
            and self._header_bytes > self.max_header_bytes
            and not self.transport.is_closing()
        ):
            self._refuse(
                431,
                "headers_too_large",
                f"the request line and headers are over {self.max_header_bytes} bytes",
            )

    def on_message_begin(self) -> None:
        super().on_message_begin()
        self._began = True
        if self._header_timer is None:  # a later request on a kept-alive connection
            self._await_headers()

    def on_url(self, url: bytes) -> None:
        self._head_bytes += len(url)
        super().on_url(url)

    def on_header(self, name: bytes, value: bytes) -> None:
        self._head_bytes += len(name) + len(value) + 4
        super().on_header(name, value)

    def on_message_complete(self) -> None:
        super().on_message_complete()
        if self.cycle is not None and not self.cycle.more_body:
            self.cycle.scope[BODY_RECEIVED] = True  # type: ignore[literal-required]

    def on_headers_complete(self) -> None:
        too_large = self._head_bytes > self.max_header_bytes
        self._headers_done()
        refusal: ASGIApp | None = None
        if too_large:
            refusal = _refusal(
                431,
                "headers_too_large",
                f"the request line and headers are over {self.max_header_bytes} bytes",
            )
        elif len(self.connections) > self.max_connections:
            refusal = _refusal(
                503,
                "too_many_connections",
                "the gateway holds as many connections as it may; retry shortly",
                retry_after_s=1,
            )
        if refusal is None:
            super().on_headers_complete()
            return
        # uvicorn picks the app for the request from self.app: answer this one with the
        # refusal instead (the connection closes after it).
        app = self.app
        self.app = refusal
        try:
            super().on_headers_complete()
        finally:
            self.app = app

    def _await_headers(self) -> None:
        self._header_bytes = self._head_bytes = 0
        self._header_timer = self.loop.call_later(self.header_timeout_s, self._header_timeout)

    def _headers_done(self) -> None:
        if self._header_timer is not None:
            self._header_timer.cancel()
            self._header_timer = None
        self._header_bytes = self._head_bytes = 0
        self._began = False

    def _header_timeout(self) -> None:
        self._header_timer = None
        if self.transport.is_closing():
            return
        if self.cycle is not None and not self.cycle.response_complete:
            # The head of a pipelined next request, while this one is still being answered:
            # not the client's delay; look again one deadline later.
            self._header_timer = self.loop.call_later(self.header_timeout_s, self._header_timeout)
            return
        if not self._began:  # nothing sent at all: nobody to answer
            self.transport.close()
            return
        self._refuse(
            408,
            "request_timeout",
            f"the request line and headers did not arrive within {self.header_timeout_s:g} s",
        )

    def send_400_response(self, msg: str) -> None:
        # uvicorn's answer to bytes its HTTP parser refuses (a malformed request line, header,
        # Content-Length or chunk) is text/plain: answer the error body every client gets.
        cycle = self.cycle
        if cycle is not None and not cycle.response_complete and not cycle.more_body:
            # Behind a request read whole and still being answered (pipelined): a 400 now
            # would come first and be read as that request's answer, though it may be
            # committed. Answer it, then close (as uvicorn's graceful shutdown does).
            cycle.keep_alive = False
            return
        self.transport.write(_raw_error(400, "invalid_http", f"not a valid HTTP request ({msg})"))
        self.transport.close()

    def _refuse(self, status: int, code: str, message: str) -> None:
        self._headers_done()
        if self.cycle is None or self.cycle.response_complete:
            self.transport.write(_raw_error(status, code, message))
        self.transport.close()


def _refusal(status: int, code: str, message: str, retry_after_s: int | None = None) -> ASGIApp:
    """An ASGI app that answers every request with this error (closing the connection)."""
    headers, body = _error(status, code, message, retry_after_s)

    async def refuse(scope: Scope, receive: Receive, send: Send) -> None:
        await send({"type": "http.response.start", "status": status, "headers": headers})
        await send({"type": "http.response.body", "body": body})

    return refuse


def protocol_for(settings: Settings) -> type[GuardedHttpProtocol]:
    """The protocol class with `settings`' limits."""

    class Protocol(GuardedHttpProtocol):
        header_timeout_s = settings.http_header_timeout_s
        max_header_bytes = settings.http_max_header_bytes
        max_connections = settings.max_connections

    return Protocol


class CannotListen(Exception):
    """The address to serve on cannot be taken (in use, not this machine's, not resolvable)."""


def listen(host: str, port: int) -> socket.socket:
    """A socket bound to host:port and listening, or `CannotListen` saying why.

    `fieldgate serve` takes its port first, before it migrates or connects to the broker: a
    second `serve` on a taken port stops there, before it can touch the database or take the
    first one's MQTT session (same default client id). Connections that arrive before the app
    has started wait in the backlog."""
    try:
        family = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0][0]
        return socket.create_server((host, port), family=family, backlog=2048)
    except OSError as exc:  # socket.gaierror included
        reason = os.strerror(exc.errno) if exc.errno else str(exc)
        hint = (
            " (is another fieldgate serve running? stop it, or pick another --port)"
            if exc.errno == errno.EADDRINUSE
            else ""
        )
        raise CannotListen(f"cannot listen on {host}:{port}: {reason}{hint}") from None


def base_url(sock: socket.socket, *, tls: bool = False) -> str:
    """The address `sock` serves, as a client would type it: http://127.0.0.1:8000 (https://
    with `tls`). Bound to every address (0.0.0.0, ::), it names this machine's loopback, which a
    client on it can use."""
    host, port = sock.getsockname()[:2]
    host = {"0.0.0.0": "127.0.0.1", "::": "::1"}.get(host, host)
    scheme = "https" if tls else "http"
    return f"{scheme}://[{host}]:{port}" if ":" in host else f"{scheme}://{host}:{port}"


def serve(app: ASGIApp, settings: Settings, *, sock: socket.socket, log_level: str) -> None:
    """Serve `app` on `sock` (from `listen`) until SIGTERM/SIGINT; requests still running
    `shutdown_timeout_s` after the signal are cancelled (the app answers them 503
    shutting_down, or the connection closes)."""
    config = uvicorn.Config(
        app, log_level=log_level, http=protocol_for(settings), **server_options(settings)
    )
    uvicorn.Server(config).run(sockets=[sock])


def server_options(settings: Settings) -> dict[str, Any]:
    """uvicorn's options from the settings, for one process or each worker
    (gateway/workers.py)."""
    return {
        "access_log": False,
        "timeout_keep_alive": settings.http_keep_alive_s,
        "timeout_graceful_shutdown": settings.shutdown_timeout_s,
        # HTTPS: uvicorn loads these (checked when the settings were: gateway/tls.py) into its
        # context, in each worker too. GuardedHttpProtocol's header deadline and connection cap
        # start once the TLS handshake is done; the event loop bounds a handshake at 60 s.
        "ssl_certfile": settings.ssl_certfile,
        "ssl_keyfile": settings.ssl_keyfile,
    }
