"""The simulator's HTTP/1.1 lane against a scripted server: bodies, keep-alive, reconnects."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager

import pytest
from rich.console import Console

from simulator.http_lane import HttpLane, LaneError, retry_after
from simulator.report import LiveView, Stats, build_report, print_summary

Answer = Callable[[bytes, bytes], bytes | None]  # (head, body) -> raw answer; None closes


@asynccontextmanager
async def scripted(answer: Answer) -> AsyncIterator[tuple[str, list[int]]]:
    """A server answering each request with `answer`; yields its URL and a connection count."""
    connections = [0]

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        connections[0] += 1
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                length = 0
                for line in head.split(b"\r\n"):
                    if line.lower().startswith(b"content-length:"):
                        length = int(line.split(b":")[1])
                body = await reader.readexactly(length)
                raw = answer(head, body)
                if raw is None:
                    break
                writer.write(raw)
                await writer.drain()
                if b"connection: close" in raw.lower():
                    break
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        writer.close()

    server = await asyncio.start_server(handle, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    async with server:
        yield f"http://127.0.0.1:{port}", connections


def _ok(body: bytes, *extra: bytes) -> bytes:
    return (
        b"HTTP/1.1 200 OK\r\n" + b"".join(extra) + b"Content-Length: %d\r\n\r\n" % len(body) + body
    )


async def test_keep_alive_echo_and_headers() -> None:
    seen: list[bytes] = []

    def answer(head: bytes, body: bytes) -> bytes:
        seen.append(head)
        return _ok(body[::-1], b"Retry-After: 3\r\n")

    async with scripted(answer) as (url, connections):
        lane = HttpLane(url + "/base", timeout_s=5, tls=None)
        for i in range(3):
            status, head, body = await lane.post("/x", b"Authorization: Bearer t\r\n", b"abc%d" % i)
            assert (status, body) == (200, b"%dcba" % i)
            assert retry_after(head) == 3.0
        await lane.aclose()
    assert connections[0] == 1
    assert seen[0].startswith(b"POST /base/x HTTP/1.1\r\nHost: 127.0.0.1:")
    assert b"Authorization: Bearer t\r\nContent-Length: 4\r\n" in seen[0]


async def test_chunked_answers() -> None:
    def answer(head: bytes, body: bytes) -> bytes:
        return (
            b"HTTP/1.1 422 Unprocessable\r\nTransfer-Encoding: chunked\r\n\r\n"
            b'3\r\n{"a\r\n4\r\n":1}\r\n0\r\n\r\n'
        )

    async with scripted(answer) as (url, _):
        lane = HttpLane(url, timeout_s=5, tls=None)
        assert (await lane.post("/", b"", b"x"))[::2] == (422, b'{"a":1}')
        assert (await lane.post("/", b"", b"y"))[0] == 422
        await lane.aclose()


async def test_reconnects_after_the_server_closes() -> None:
    count = [0]

    def answer(head: bytes, body: bytes) -> bytes | None:
        count[0] += 1
        if count[0] == 1:
            return _ok(b"1", b"Connection: close\r\n")
        if count[0] == 3:
            return None  # an idle keep-alive connection the server dropped: retried once
        return _ok(b"%d" % count[0])

    async with scripted(answer) as (url, connections):
        lane = HttpLane(url, timeout_s=5, tls=None)
        assert (await lane.post("/", b"", b""))[2] == b"1"
        assert (await lane.post("/", b"", b""))[2] == b"2"
        assert (await lane.post("/", b"", b""))[2] == b"4"
        await lane.aclose()
    assert connections[0] == 3


async def test_errors_are_lane_errors() -> None:
    async with scripted(lambda head, body: b"SSH-2.0-nope\r\n\r\n") as (url, _):
        lane = HttpLane(url, timeout_s=5, tls=None)
        with pytest.raises(LaneError, match="status line"):
            await lane.post("/", b"", b"")
    closed = HttpLane("http://127.0.0.1:9", timeout_s=5, tls=None)  # discard port: refused
    with pytest.raises(LaneError):
        await closed.post("/", b"", b"")


def test_live_view_and_summary_render() -> None:
    stats = Stats("http", 3)
    stats.sent, stats.accepted, stats.errors = 1500, 1490, 2
    stats.latencies_ms.extend([1.0, 2.0, 3.0, 50.0])
    console = Console(record=True, width=120)
    console.print(LiveView(stats))
    report = build_report(stats, None, interrupted=True, seed=4)
    print_summary(console, report)
    text = console.export_text()
    assert "1,500" in text
    assert "interrupted" in text
    assert report["latency_ms"] == {"p50": 2.0, "p95": 50.0, "p99": 50.0, "max": 50.0}
    assert report["verified"] is None
