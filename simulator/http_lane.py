"""The telemetry hot path: HTTP/1.1 POSTs on one keep-alive connection, written in one go.

Measured on the 2-core test machine against the gateway with `--batch 1`: through httpx's client
a POST cost the simulator ~1.3-1.8 ms of CPU, through httpx's transport ~0.9 ms, while the gateway
spent ~1 ms taking it; one simulator process could not outrun one gateway, which the issue asks
for. A request here is one `write` and a few `readline`s (~0.1 ms). It speaks only what the
simulator needs: POST with a body, answers with Content-Length or chunked bodies, keep-alive,
`Connection: close`. Everything else (provisioning, reads, verification) uses httpx.
"""

from __future__ import annotations

import asyncio
import contextlib
import ssl
from typing import Final
from urllib.parse import urlsplit

_MAX_LINE: Final = 64 * 1024


class LaneError(Exception):
    """The connection failed or the answer was not HTTP/1.1 as expected (safe to retry:
    storing telemetry is idempotent)."""


class HttpLane:
    """One connection to `base_url`, used by one request at a time."""

    def __init__(self, base_url: str, *, timeout_s: float, tls: ssl.SSLContext | None) -> None:
        parts = urlsplit(base_url)
        self._tls = tls if parts.scheme == "https" else None
        self._host = parts.hostname or "127.0.0.1"
        self._port = parts.port or (443 if parts.scheme == "https" else 80)
        self._prefix = parts.path.rstrip("/").encode()
        netloc = parts.netloc.rsplit("@", 1)[-1]
        self._head = b"Host: " + netloc.encode() + b"\r\n"
        self._timeout_s = timeout_s
        self._reader: asyncio.StreamReader | None = None
        self._writer: asyncio.StreamWriter | None = None

    async def aclose(self) -> None:
        writer, self._reader, self._writer = self._writer, None, None
        if writer is not None:
            writer.close()
            with contextlib.suppress(OSError, ssl.SSLError):
                await writer.wait_closed()

    async def post(self, path: str, headers: bytes, body: bytes) -> tuple[int, bytes, bytes]:
        """(status, lower-cased header block, body); `headers` are whole `Name: value\\r\\n`
        lines. A reused connection the server had closed is reopened once, transparently."""
        reused = self._writer is not None
        try:
            async with asyncio.timeout(self._timeout_s):
                return await self._exchange(path, headers, body)
        except (OSError, EOFError, asyncio.IncompleteReadError, ssl.SSLError, LaneError) as exc:
            await self.aclose()
            if reused and isinstance(exc, asyncio.IncompleteReadError | ConnectionError):
                try:
                    async with asyncio.timeout(self._timeout_s):
                        return await self._exchange(path, headers, body)
                except (OSError, EOFError, asyncio.IncompleteReadError, ssl.SSLError) as again:
                    await self.aclose()
                    raise LaneError(f"{type(again).__name__}: {again}") from None
            raise LaneError(f"{type(exc).__name__}: {exc}") from None
        except TimeoutError:
            await self.aclose()
            raise LaneError(f"no answer within {self._timeout_s} s") from None

    async def _exchange(self, path: str, headers: bytes, body: bytes) -> tuple[int, bytes, bytes]:
        if self._writer is None:
            self._reader, self._writer = await asyncio.open_connection(
                self._host, self._port, ssl=self._tls, limit=_MAX_LINE
            )
        reader, writer = self._reader, self._writer
        assert reader is not None
        writer.write(
            b"POST " + self._prefix + path.encode() + b" HTTP/1.1\r\n" + self._head + headers
            + b"Content-Length: %d\r\n\r\n" % len(body)
            + body
        )  # fmt: skip
        status_line = await reader.readuntil(b"\r\n")
        parts = status_line.split(b" ", 2)
        if len(parts) < 2 or not parts[0].startswith(b"HTTP/1.") or not parts[1].isdigit():
            raise LaneError(f"not an HTTP/1.1 status line: {status_line[:80]!r}")
        status = int(parts[1])
        head = b"\r\n" + (await reader.readuntil(b"\r\n\r\n")).lower()
        length = _header(head, b"content-length")
        if length is not None:
            answer = await reader.readexactly(int(length))
        elif _header(head, b"transfer-encoding") == b"chunked":
            answer = await _chunked(reader)
        else:
            answer = await reader.read()  # until the server closes
            await self.aclose()
        if _header(head, b"connection") == b"close":
            await self.aclose()
        return status, head, answer


def _header(head: bytes, name: bytes) -> bytes | None:
    at = head.find(b"\r\n" + name + b":")
    if at < 0:
        return None
    start = at + len(name) + 3
    return head[start : head.find(b"\r\n", start)].strip()


async def _chunked(reader: asyncio.StreamReader) -> bytes:
    out = bytearray()
    while True:
        size = int((await reader.readuntil(b"\r\n")).split(b";")[0].strip(), 16)
        if size == 0:
            await reader.readuntil(b"\r\n")  # no trailers from our servers
            return bytes(out)
        out += await reader.readexactly(size)
        await reader.readexactly(2)


def retry_after(head: bytes) -> float:
    """Seconds in a Retry-After header (1 when absent or not a number)."""
    value = _header(head, b"retry-after")
    try:
        return max(0.05, float(value)) if value is not None else 1.0
    except ValueError:
        return 1.0
