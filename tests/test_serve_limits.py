"""Slow, surplus and oversized clients against a real `fieldgate serve` (raw sockets): header
and body read deadlines, the header size cap, the connection cap, the shutdown deadline, and
the memory an unauthenticated upload may cost. These are limits of the HTTP server, not of
the store: SQLite only."""

from __future__ import annotations

import asyncio
import contextlib
import json
import signal
import time
from collections.abc import Callable
from pathlib import Path

import httpx
import pytest

from tests.conftest import ADMIN_TOKEN, GatewayProcess, poll_until
from tests.harness import committed

pytestmark = pytest.mark.e2e

Serve = Callable[..., GatewayProcess]


@pytest.fixture
def database_url(tmp_path: Path) -> str:
    return f"sqlite://{tmp_path}/fieldgate.db"


async def connect(gw: GatewayProcess) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    return await asyncio.open_connection("127.0.0.1", gw.port)


async def until_closed(reader: asyncio.StreamReader, within: float) -> tuple[bytes, float]:
    """Everything the server sends until it closes the connection, and how long that took."""
    started = time.monotonic()
    try:
        data = await asyncio.wait_for(reader.read(), within)
    except ConnectionResetError:
        data = b""
    return data, time.monotonic() - started


def status_and_error(answer: bytes) -> tuple[int, str | None]:
    head, _, body = answer.partition(b"\r\n\r\n")
    status = int(head.split(b" ", 2)[1])
    error = json.loads(body).get("error") if body.startswith(b"{") else None
    return status, error["code"] if error else None


async def get_healthz(
    reader: asyncio.StreamReader, writer: asyncio.StreamWriter
) -> tuple[int, str | None]:
    """One keep-alive GET /healthz on an open connection; (status, error code)."""
    writer.write(b"GET /healthz HTTP/1.1\r\nHost: fieldgate\r\n\r\n")
    await writer.drain()
    head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 10)
    length = next(
        int(line.split(b":", 1)[1])
        for line in head.split(b"\r\n")
        if line.lower().startswith(b"content-length:")
    )
    body = await asyncio.wait_for(reader.readexactly(length), 10)
    return status_and_error(head + body)


def peak_rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1])
    raise AssertionError("no VmHWM in /proc/<pid>/status")


class TestSlowClients:
    async def test_silent_and_half_sent_headers_are_cut_at_the_deadline(
        self, serve: Serve, database_url: str
    ) -> None:
        gw = serve(database_url, http_header_timeout_s="1", http_max_header_bytes="2048")
        await gw.start()
        # Nothing at all: closed without an answer.
        reader, writer = await connect(gw)
        data, took = await until_closed(reader, 10)
        assert data == b""
        assert 0.5 < took < 5
        writer.close()
        # Half a request head: 408.
        reader, writer = await connect(gw)
        writer.write(b"POST /api/v1/devices HTTP/1.1\r\nHost: fieldgate\r\nContent-Le")
        data, took = await until_closed(reader, 10)
        assert status_and_error(data) == (408, "request_timeout")
        assert took < 5
        writer.close()
        # A request head dribbled one header at a time still has one deadline.
        reader, writer = await connect(gw)
        writer.write(b"GET /healthz HTTP/1.1\r\n")
        started = time.monotonic()
        first = b""
        for i in range(50):
            writer.write(f"X-Slow-{i}: 1\r\n".encode())
            await writer.drain()
            try:  # the slow client's pace: one header per 0.1 s, until the server answers
                first = await asyncio.wait_for(reader.read(1), 0.1)
                break
            except TimeoutError:
                continue
        data, _ = await until_closed(reader, 10)
        assert status_and_error(first + data) == (408, "request_timeout")
        assert time.monotonic() - started < 5
        writer.close()
        # A head over the size cap: 431.
        reader, writer = await connect(gw)
        writer.write(b"GET /healthz HTTP/1.1\r\nHost: fieldgate\r\nX-Big: " + b"a" * 4096)
        data, _ = await until_closed(reader, 10)
        assert status_and_error(data) == (431, "headers_too_large")
        writer.close()
        # ... and a complete one, in one piece.
        reader, writer = await connect(gw)
        writer.write(
            b"GET /healthz HTTP/1.1\r\nHost: fieldgate\r\nX-Big: " + b"a" * 3000 + b"\r\n\r\n"
        )
        data, _ = await until_closed(reader, 10)
        assert status_and_error(data) == (431, "headers_too_large")
        writer.close()
        # The server still serves.
        async with httpx.AsyncClient(base_url=gw.base_url) as client:
            assert (await client.get("/healthz")).status_code == 200

    async def test_half_a_body_is_cut_at_the_deadline(
        self, serve: Serve, database_url: str
    ) -> None:
        gw = serve(database_url, http_body_timeout_s="1")
        await gw.start()
        reader, writer = await connect(gw)
        writer.write(
            b"POST /api/v1/devices HTTP/1.1\r\nHost: fieldgate\r\n"
            + f"Authorization: Bearer {ADMIN_TOKEN}\r\n".encode()
            + b"Content-Type: application/json\r\nContent-Length: 100\r\n\r\n"
            + b'{"id": "half-'
        )
        data, took = await until_closed(reader, 15)
        assert status_and_error(data) == (408, "request_timeout")
        assert took < 6
        writer.close()
        async with gw.client() as client:
            assert (await client.get("/api/v1/devices")).json()["devices"] == []


class TestMalformedRequests:
    @pytest.mark.parametrize(
        "request_bytes",
        [
            b"GARBAGE\r\n\r\n",
            b"GET /healthz HTTP/1.1\r\nHost: fieldgate\r\nContent-Length: -1\r\n\r\n",
            b"GET /healthz HTTP/1.1\r\nHost: fieldgate\r\nContent-Length: 1"
            + b"0" * 30
            + b"\r\n\r\n",
            b"POST /api/v1/devices HTTP/1.1\r\nHost: fieldgate\r\nTransfer-Encoding: chunked\r\n"
            b"\r\nzz\r\n",
        ],
        ids=["request-line", "negative-length", "huge-length", "bad-chunk"],
    )
    async def test_bytes_that_are_not_http_get_a_json_400(
        self, serve: Serve, database_url: str, request_bytes: bytes
    ) -> None:
        gw = serve(database_url)
        await gw.start()
        reader, writer = await connect(gw)
        writer.write(request_bytes)
        data, _ = await until_closed(reader, 10)
        writer.close()
        assert status_and_error(data) == (400, "invalid_http"), data
        async with httpx.AsyncClient(base_url=gw.base_url) as client:
            assert (await client.get("/healthz")).status_code == 200

    async def test_garbage_behind_a_request_does_not_take_its_answer(
        self, serve: Serve, database_url: str
    ) -> None:
        gw = serve(database_url)
        await gw.start()
        body = b'{"id": "dev-a"}'
        reader, writer = await connect(gw)
        writer.write(
            b"POST /api/v1/devices HTTP/1.1\r\nHost: fieldgate\r\n"
            + f"Authorization: Bearer {ADMIN_TOKEN}\r\nContent-Type: application/json\r\n".encode()
            + f"Content-Length: {len(body)}\r\n\r\n".encode()
            + body
            + b"GARBAGE\r\n\r\n"
        )
        data, _ = await until_closed(reader, 10)
        writer.close()
        # The device was created: the first answer on the connection must say so.
        assert data.startswith(b"HTTP/1.1 201 "), data
        assert await committed(database_url, "SELECT id FROM device") == [("dev-a",)]


class TestConnectionCap:
    async def test_a_connection_past_the_cap_gets_503(
        self, serve: Serve, database_url: str
    ) -> None:
        gw = serve(database_url, max_connections="3", http_keep_alive_s="60")
        await gw.start()
        held = [await connect(gw) for _ in range(3)]
        for reader, writer in held:
            assert await get_healthz(reader, writer) == (200, None)
        reader, writer = await connect(gw)
        assert await get_healthz(reader, writer) == (503, "too_many_connections")
        data, _ = await until_closed(reader, 10)  # and it is closed after the answer
        assert data == b""
        writer.close()
        # The held connections still work; one closed makes room for a new one.
        assert await get_healthz(*held[0]) == (200, None)
        held[0][1].close()

        async def room() -> bool:
            reader, writer = await connect(gw)
            try:
                return await get_healthz(reader, writer) == (200, None)
            finally:
                writer.close()

        await poll_until(room, within=10, what="a free connection slot")
        for _, writer in held[1:]:
            writer.close()


class TestShutdownDeadline:
    async def test_sigterm_with_a_half_sent_body_exits_within_the_deadline(
        self, serve: Serve, database_url: str
    ) -> None:
        gw = serve(database_url, shutdown_timeout_s="2", http_body_timeout_s="120")
        await gw.start()
        async with gw.client() as client:
            r = await client.post("/api/v1/devices", json={"id": "dev-a"})
            assert r.status_code == 201, r.text
            token = r.json()["token"]
        body = b'{"ts": 1700000000000, "values": {"t": 1.0}}'
        reader, writer = await connect(gw)
        writer.write(
            b"POST /api/v1/devices/dev-a/telemetry HTTP/1.1\r\nHost: fieldgate\r\n"
            + f"Authorization: Bearer {token}\r\n".encode()
            + f"Content-Length: {len(body)}\r\n\r\n".encode()
            + body[:20]
        )
        await writer.drain()
        async with httpx.AsyncClient(base_url=gw.base_url) as client:  # the request is in
            assert (await client.get("/healthz")).status_code == 200
        started = time.monotonic()
        status = await asyncio.to_thread(gw.terminate, timeout=60)
        took = time.monotonic() - started
        assert took < 2 + 8, f"exit took {took:.1f} s"
        assert status in (0, -signal.SIGTERM)  # uvicorn re-raises the signal it handled
        data, _ = await until_closed(reader, 10)
        # Cut, not acknowledged: a 503, or just the connection closed.
        assert data == b"" or status_and_error(data) == (503, "shutting_down"), data
        writer.close()
        rows = await committed(database_url, "SELECT count(*) FROM reading")
        assert rows == [(0,)]
        # A slow client cut at the deadline is no bug: uvicorn's one line, no traceback.
        log = gw.log_path.read_text()
        assert "timeout graceful shutdown exceeded" in log
        assert "Traceback" not in log, log[-3000:]


class TestUnauthenticatedUploads:
    @pytest.mark.parametrize("path", ["/api/v1/devices", "/api/v1/devices/dev-a/telemetry"])
    async def test_a_huge_upload_without_a_token_costs_no_memory(
        self, serve: Serve, database_url: str, path: str
    ) -> None:
        gw = serve(database_url)
        await gw.start()
        assert gw.process is not None
        before = peak_rss_kib(gw.process.pid)
        total = 0
        answers: list[bytes] = []
        chunk = b"%x\r\n" % (1 << 20) + b"x" * (1 << 20) + b"\r\n"
        for _ in range(2):
            reader, writer = await connect(gw)
            received = bytearray()

            async def collect(
                reader: asyncio.StreamReader = reader, into: bytearray = received
            ) -> None:
                # Read while the upload goes on: once the server closes on unread data, the
                # kernel resets the connection, and an answer not read by then is lost.
                with contextlib.suppress(ConnectionResetError, BrokenPipeError):
                    while data := await reader.read(1 << 16):
                        into.extend(data)

            collector = asyncio.create_task(collect())
            writer.write(
                f"POST {path} HTTP/1.1\r\nHost: fieldgate\r\n".encode()
                + b"Content-Type: application/json\r\nTransfer-Encoding: chunked\r\n\r\n"
            )
            with contextlib.suppress(ConnectionResetError, BrokenPipeError):
                for _ in range(200):  # up to 200 MiB
                    if received or collector.done():
                        break
                    writer.write(chunk)
                    await writer.drain()
                    await asyncio.sleep(0)  # let the collector read
                    total += 1 << 20
            await asyncio.wait_for(collector, 10)
            answers.append(bytes(received))
            writer.close()
        grown_mib = (peak_rss_kib(gw.process.pid) - before) / 1024
        assert grown_mib < 30, f"peak RSS grew {grown_mib:.0f} MiB"
        assert total < 2 * 200 << 20  # the server stopped taking the upload
        # The answer is 401; a client still sending when the server closes may get a reset
        # before it reads it (the server does not linger): both mean refused, unread.
        for answer in answers:
            assert answer == b"" or status_and_error(answer) == (401, "unauthorized"), answer
        # One that stops after the headers and a small first chunk reads its 401 every time.
        reader, writer = await connect(gw)
        writer.write(
            f"POST {path} HTTP/1.1\r\nHost: fieldgate\r\n".encode()
            + b"Transfer-Encoding: chunked\r\n\r\n"
            + b"64\r\n"
            + b"x" * 100
            + b"\r\n"
        )
        data, _ = await until_closed(reader, 10)
        assert status_and_error(data) == (401, "unauthorized")
        writer.close()
        # A declared Content-Length over the limit is refused before any of it is sent.
        reader, writer = await connect(gw)
        writer.write(
            f"POST {path} HTTP/1.1\r\nHost: fieldgate\r\n".encode()
            + f"Content-Length: {200 << 20}\r\n\r\n".encode()
        )
        data, _ = await until_closed(reader, 10)
        assert status_and_error(data) == (413, "payload_too_large")
        writer.close()
