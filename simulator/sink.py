"""A trivial HTTP sink that answers like a gateway without doing any work: it measures the
simulator's own ceiling (how fast one process can build, send and account for requests).

    python -m simulator.sink --port 8099 &
    fieldgate simulate --gateway http://127.0.0.1:8099 --admin-token x --devices 1000 ...

It provisions any device (token `sink`), answers every telemetry POST with
`{"accepted": 0, "duplicates": 0, "rejected": []}` without reading the JSON, and keeps
connections alive. Not a gateway: nothing is validated or stored (don't --verify against it).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
from typing import Final

_DEVICE: Final = b'{"token":"sink"}'
_INGEST: Final = b'{"accepted":0,"duplicates":0,"rejected":[]}'
_LIST: Final = b'{"devices":[],"next_cursor":null}'


def _response(status: bytes, body: bytes) -> bytes:
    return (
        b"HTTP/1.1 "
        + status
        + b"\r\ncontent-type: application/json\r\ncontent-length: "
        + str(len(body)).encode()
        + b"\r\n\r\n"
        + body
    )


class SinkProtocol(asyncio.Protocol):
    """HTTP/1.1 keep-alive, one request at a time per connection (as httpx sends them)."""

    def __init__(self) -> None:
        self._buffer = b""
        self._transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self._transport = transport

    def data_received(self, data: bytes) -> None:
        self._buffer += data
        while True:
            head_end = self._buffer.find(b"\r\n\r\n")
            if head_end < 0:
                return
            head = self._buffer[:head_end].lower()
            length = 0
            at = head.find(b"content-length:")
            if at >= 0:
                length = int(
                    head[at + 15 : head.find(b"\r\n", at) if b"\r\n" in head[at:] else None]
                )
            end = head_end + 4 + length
            if len(self._buffer) < end:
                return
            self._buffer = self._buffer[end:]
            assert self._transport is not None
            self._transport.write(self._answer(head))

    @staticmethod
    def _answer(head: bytes) -> bytes:
        line = head[: head.find(b"\r\n")]
        if line.startswith(b"post") and b"/telemetry" in line:
            return _response(b"200 OK", _INGEST)
        if line.startswith(b"post") and b"/token" in line:
            return _response(b"200 OK", _DEVICE)
        if line.startswith(b"post"):
            return _response(b"201 Created", _DEVICE)
        return _response(b"200 OK", _LIST)


async def serve(host: str, port: int) -> None:
    loop = asyncio.get_running_loop()
    server = await loop.create_server(SinkProtocol, host, port)
    async with server:
        await server.serve_forever()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8099)
    args = parser.parse_args()
    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(serve(args.host, args.port))


if __name__ == "__main__":
    main()
