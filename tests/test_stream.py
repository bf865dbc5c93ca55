"""Live streams (SSE) against a real `fieldgate serve`: readings posted over HTTP and published
over MQTT arrive once each, only after commit, in commit order; a stream dropped mid-way resumes
with Last-Event-ID missing nothing and repeating nothing, also across two gateways on one
PostgreSQL; history then live with no gap or overlap; a stalled consumer is told and dropped
while the writer goes on; the limits and refusals."""

from __future__ import annotations

import asyncio
import contextlib
import socket
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import Any

import aiomqtt
import httpx
import orjson
import pytest

from gateway.live import HistoryPage, HistoryPages, LiveEvent, Subscription, parse_event_id
from tests.conftest import ADMIN_TOKEN, GatewayProcess, poll_until
from tests.harness import is_sqlite

T0 = 1_764_000_000_000  # epoch ms, 2025-11-24
Reading = tuple[str, str, int, float]  # device, metric, ts (ms), value


@pytest.fixture
def database_url(emptied_database_url: str) -> str:
    """PostgreSQL: one database for the module's tests, emptied before each (conftest)."""
    return emptied_database_url


@dataclass
class Event:
    event: str
    id: str | None
    data: Any


@dataclass
class Stream:
    """An open SSE response read in the background: its events, as they came."""

    response: httpx.Response
    events: list[Event] = field(default_factory=list)
    ended: bool = False

    def readings(self) -> list[Reading]:
        out: list[Reading] = []
        for e in self.events:
            if e.event == "readings":
                out += [
                    (e.data["device"], p["metric"], _ms(p["ts"]), p["value"])
                    for p in e.data["points"]
                ]
        return out

    @property
    def last_id(self) -> str | None:
        ids = [e.id for e in self.events if e.id]
        return ids[-1] if ids else None


def _ms(ts: str) -> int:
    from datetime import datetime

    return int(datetime.fromisoformat(ts.replace("Z", "+00:00")).timestamp() * 1000 + 0.5)


class _Parser:
    def __init__(self, stream: Stream) -> None:
        self.stream = stream
        self.event = "message"
        self.data: list[str] = []
        self.id: str | None = None

    def line(self, line: str) -> None:
        if line == "":
            if self.data:
                self.stream.events.append(
                    Event(self.event, self.id, orjson.loads("\n".join(self.data)))
                )
            self.event, self.data, self.id = "message", [], None
        elif not line.startswith(":"):
            name, _, value = line.partition(":")
            value = value.removeprefix(" ")
            if name == "data":
                self.data.append(value)
            elif name == "event":
                self.event = value
            elif name == "id":
                self.id = value


def _parse(stream: Stream, lines: list[str]) -> None:
    parser = _Parser(stream)
    for line in [*lines, ""]:
        parser.line(line)


async def _read(stream: Stream) -> None:
    parser = _Parser(stream)
    try:
        async for line in stream.response.aiter_lines():
            parser.line(line)
    except (httpx.ReadError, httpx.RemoteProtocolError):
        pass
    stream.ended = True


@contextlib.asynccontextmanager
async def open_stream(
    gw: GatewayProcess, path: str, *, token: str = ADMIN_TOKEN, **headers: str
) -> AsyncIterator[Stream]:
    async with (
        httpx.AsyncClient(base_url=gw.base_url, timeout=httpx.Timeout(30, read=None)) as client,
        client.stream(
            "GET",
            path,
            headers={"Authorization": f"Bearer {token}", "Accept": "text/event-stream", **headers},
        ) as response,
    ):
        assert response.status_code == 200, await response.aread()
        assert response.headers["content-type"].startswith("text/event-stream")
        stream = Stream(response)
        reader = asyncio.create_task(_read(stream))
        try:
            yield stream
        finally:
            reader.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await reader


async def until(check: Callable[[], bool], what: str, within: float = 20) -> None:
    async def ok() -> bool:
        return check()

    await poll_until(ok, within=within, what=what, interval=0.02)


async def create(gw: GatewayProcess, device_id: str) -> str:
    async with gw.client() as client:
        r = await client.post("/api/v1/devices", json={"id": device_id})
        assert r.status_code == 201, r.text
        return str(r.json()["token"])


async def post(
    client: httpx.AsyncClient, device_id: str, token: str, readings: list[tuple[str, int, float]]
) -> httpx.Response:
    body = [{"ts": t, "values": {m: v}} for m, t, v in readings]
    r = await client.post(
        f"/api/v1/devices/{device_id}/telemetry",
        json=body,
        headers={"Authorization": f"Bearer {token}"},
    )
    assert r.status_code == 200, r.text
    return r


def ids_in_order(stream: Stream) -> None:
    positions = [parse_event_id(e.id) for e in stream.events if e.id]
    assert all(p is not None for p in positions)
    assert positions == sorted(positions), "events out of commit order"  # type: ignore[type-var]
    assert len(set(positions)) == len(positions), "an event id twice"


class TestLive:
    async def test_http_and_mqtt_readings_arrive_once_each_in_commit_order(
        self,
        database_url: str,
        serve: Callable[..., GatewayProcess],
        machine_broker: str,
        topic_prefix: str,
    ) -> None:
        gw = serve(
            database_url,
            mqtt_url=machine_broker,
            mqtt_topic_prefix=topic_prefix,
            mqtt_client_id=f"fieldgate-{topic_prefix}",
        )
        await gw.start()
        tokens = {d: await create(gw, d) for d in ("s1", "s2", "s3")}
        sent: list[Reading] = []
        async with (
            open_stream(gw, "/api/v1/devices/s1/telemetry/stream") as one,
            open_stream(gw, "/api/v1/telemetry/stream?device=s1&device=s2") as fleet,
            open_stream(gw, "/api/v1/devices/s1/telemetry/stream?metric=h") as only_h,
            gw.client() as client,
        ):
            for k in range(20):
                for d in ("s1", "s2", "s3"):
                    rows = [("t", T0 + k, float(k)), ("h", T0 + k, k + 0.5)]
                    await post(client, d, tokens[d], rows)
                    sent += [(d, m, t, v) for m, t, v in rows]
            # a redelivery (stored already: not streamed again) and a late reading
            await post(client, "s1", tokens["s1"], [("t", T0, 0.0), ("t", T0 - 86_400_000, -1.0)])
            sent.append(("s1", "t", T0 - 86_400_000, -1.0))
            async with aiomqtt.Client("127.0.0.1", 1883) as mqtt:
                for k in range(20, 30):
                    payload = orjson.dumps({"ts": T0 + k, "values": {"t": float(k)}})
                    await mqtt.publish(f"{topic_prefix}/devices/s1/telemetry", payload, qos=1)
                    sent.append(("s1", "t", T0 + k, float(k)))
            want_one = sorted(r for r in sent if r[0] == "s1")
            await until(lambda: len(one.readings()) >= len(want_one), "s1's readings")
            await until(lambda: len(fleet.readings()) >= len(want_one) + 40, "the fleet's")
            await until(lambda: len(only_h.readings()) >= 20, "s1's h readings")
            # one more commit after all: nothing arrived late or twice meanwhile
            await post(client, "s1", tokens["s1"], [("t", T0 + 999, 9.0)])
            await until(lambda: ("s1", "t", T0 + 999, 9.0) in one.readings(), "the last one")
        assert sorted(one.readings()) == sorted([*want_one, ("s1", "t", T0 + 999, 9.0)])
        fleet_want = sorted(
            [r for r in sent if r[0] in ("s1", "s2")] + [("s1", "t", T0 + 999, 9.0)]
        )
        assert sorted(fleet.readings()) == fleet_want
        assert sorted(only_h.readings()) == sorted(r for r in sent if r[:2] == ("s1", "h"))
        for stream in (one, fleet, only_h):
            ids_in_order(stream)

    async def test_a_dropped_stream_resumes_with_last_event_id(
        self, database_url: str, serve: Callable[..., GatewayProcess]
    ) -> None:
        gw = serve(database_url)
        await gw.start()
        token = await create(gw, "r1")
        sent: list[Reading] = []
        async with gw.client() as client:
            async with open_stream(gw, "/api/v1/devices/r1/telemetry/stream") as first:
                for k in range(10):
                    await post(client, "r1", token, [("t", T0 + k, float(k))])
                    sent.append(("r1", "t", T0 + k, float(k)))
                await until(lambda: len(first.readings()) >= 4, "some events")
            # dropped; the device goes on meanwhile
            for k in range(10, 25):
                await post(client, "r1", token, [("t", T0 + k, float(k))])
                sent.append(("r1", "t", T0 + k, float(k)))
            got = first.readings()
            assert first.last_id is not None
            async with open_stream(
                gw, "/api/v1/devices/r1/telemetry/stream", **{"Last-Event-ID": first.last_id}
            ) as second:
                await until(lambda: len(got) + len(second.readings()) >= len(sent), "the rest")
                await post(client, "r1", token, [("t", T0 + 100, 1.0)])
                sent.append(("r1", "t", T0 + 100, 1.0))
                await until(lambda: ("r1", "t", T0 + 100, 1.0) in second.readings(), "live")
        assert sorted(got + second.readings()) == sorted(sent)  # none missed, none twice
        ids_in_order(second)

    @pytest.mark.postgres
    async def test_two_gateways_on_one_postgres(
        self, database_url: str, serve: Callable[..., GatewayProcess]
    ) -> None:
        if is_sqlite(database_url):
            pytest.skip("several gateways share a PostgreSQL database")
        a, b = serve(database_url), serve(database_url)
        await asyncio.gather(a.start(), b.start())
        tokens = {d: await create(a, d) for d in ("m1", "m2")}
        sent: list[Reading] = []

        async def writes(gw: GatewayProcess, device: str, base: int) -> None:
            async with gw.client() as client:
                for k in range(40):
                    rows = [("t", T0 + base + k, float(k)), ("u", T0 + base + k, 2.0 * k)]
                    await post(client, device, tokens[device], rows)
                    sent.extend((device, m, t, v) for m, t, v in rows)

        async with open_stream(a, "/api/v1/telemetry/stream") as on_a:
            async with open_stream(b, "/api/v1/telemetry/stream") as on_b:
                await asyncio.gather(writes(a, "m1", 0), writes(b, "m2", 0), writes(b, "m1", 1000))
                await until(lambda: len(on_a.readings()) >= len(sent), "A to see all")
                await until(lambda: len(on_b.readings()) >= len(sent), "B to see all")
            # A's stream, dropped half-way, resumes on B
            half = [e for e in on_a.events if e.id][len(on_a.events) // 2]
            assert half.id is not None
            before = [
                r
                for e in on_a.events[: on_a.events.index(half) + 1]
                for r in Stream(on_a.response, [e]).readings()
            ]
            async with open_stream(
                b, "/api/v1/telemetry/stream", **{"Last-Event-ID": half.id}
            ) as resumed:
                await until(
                    lambda: len(before) + len(resumed.readings()) >= len(sent), "the resume"
                )
                resumed_ids = [e.id for e in resumed.events]
        assert sorted(on_a.readings()) == sorted(sent)
        assert sorted(on_b.readings()) == sorted(sent)
        # both gateways saw one order: the commit log's
        assert [e.id for e in on_a.events] == [e.id for e in on_b.events]
        assert sorted(before + resumed.readings()) == sorted(sent)
        assert resumed_ids == [e.id for e in on_a.events][on_a.events.index(half) + 1 :]

    async def test_history_then_live_has_no_gap_and_no_overlap(
        self, database_url: str, serve: Callable[..., GatewayProcess]
    ) -> None:
        gw = serve(database_url, max_page_size="7")  # many pages
        await gw.start()
        token = await create(gw, "h1")
        sent: list[Reading] = []
        async with gw.client() as client:
            for k in range(30):
                await post(client, "h1", token, [("t", T0 + 10 * k, float(k)), ("u", T0 + k, 1.0)])
                sent += [("h1", "t", T0 + 10 * k, float(k)), ("h1", "u", T0 + k, 1.0)]
            stop = asyncio.Event()

            async def meanwhile() -> None:
                # while the history is read: new readings, late ones inside its range, and
                # some before its start (not history, but committed after: live)
                k = 0
                while not stop.is_set() or k < 30:
                    ts = [T0 + 10_000 + k, T0 + 10 * k + 5, T0 - 100_000 - k]
                    await post(client, "h1", token, [("t", t, -1.0 - k) for t in ts])
                    sent.extend(("h1", "t", t, -1.0 - k) for t in ts)
                    k += 1

            start = "2025-11-24T16:00:00Z"  # T0
            async with open_stream(gw, f"/api/v1/devices/h1/telemetry/stream?start={start}") as s:
                # subscribed (the answer has begun): what the device sends now is in the history
                # or the live part
                writer = asyncio.create_task(meanwhile())
                await until(lambda: any(e.id for e in s.events), "a live event")
                stop.set()
                await writer
                # the history holds readings from T0 on; everything after it, live
                wanted = [r for r in sent if r[2] >= T0 or r[3] < 0]
                await until(lambda: len(s.readings()) >= len(wanted), "history and live")
                await post(client, "h1", token, [("t", T0 + 99_999, 7.0)])
                await until(lambda: ("h1", "t", T0 + 99_999, 7.0) in s.readings(), "the last")
        got = s.readings()
        assert sorted(got) == sorted([*wanted, ("h1", "t", T0 + 99_999, 7.0)])
        assert len(got) == len(set(got))

    async def test_a_stalled_consumer_is_told_and_dropped_and_the_writer_goes_on(
        self, database_url: str, serve: Callable[..., GatewayProcess]
    ) -> None:
        gw = serve(database_url, stream_buffer_events="3")
        await gw.start()
        token = await create(gw, "big")
        sent: list[Reading] = []
        path = "/api/v1/devices/big/telemetry/stream"
        # A consumer that reads nothing yet (a small receive buffer, soon full): the gateway's
        # sends stop, then the stream's queue fills.
        reader, writer = await raw_get(gw, path)
        async with contextlib.aclosing(_Closing(writer)), gw.client() as client:
            await until_streams(client, 1)
            started = time.monotonic()
            for k in range(40):  # ~10 MB of events: more than the kernel's buffers hold
                rows = [("t", T0 + 5000 * k + j, float(j)) for j in range(5000)]
                await post(client, "big", token, rows)  # each answered 200: never held up
                sent += [("big", m, t, v) for m, t, v in rows]
            took = time.monotonic() - started
            # now read what it holds: the events it took, `overflow`, the end
            slow = await read_raw_stream(reader)
            events = [e.event for e in slow.events]
            assert events[-1] == "overflow", events[-5:]
            assert slow.events[-1].data["code"] == "stream_overflow"
            assert "readings" in events
            got = slow.readings()
            assert len(got) < len(sent)
            assert slow.last_id is not None
            async with open_stream(gw, path, **{"Last-Event-ID": slow.last_id}) as again:
                await until(lambda: len(got) + len(again.readings()) >= len(sent), "the rest")
            assert sorted(got + again.readings()) == sorted(sent)
            await until_streams(client, 0)
        assert took < 120

    async def test_a_consumer_that_never_reads_is_disconnected(
        self, database_url: str, serve: Callable[..., GatewayProcess]
    ) -> None:
        gw = serve(database_url, stream_buffer_events="1000", stream_send_timeout_s="1")
        await gw.start()
        token = await create(gw, "stuck")
        _, writer = await raw_get(gw, "/api/v1/telemetry/stream")
        async with contextlib.aclosing(_Closing(writer)), gw.client() as client:
            await until_streams(client, 1)
            for k in range(40):
                rows = [("t", T0 + 5000 * k + j, 1.0) for j in range(5000)]
                await post(client, "stuck", token, rows)
            # its sends stall, and after the send timeout the gateway lets it go
            await until_streams(client, 0)


@dataclass
class _Closing:
    writer: asyncio.StreamWriter

    async def aclose(self) -> None:
        self.writer.close()
        with contextlib.suppress(OSError):
            await self.writer.wait_closed()


async def raw_get(
    gw: GatewayProcess, path: str
) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    """A stream request over a socket with a small receive buffer, not read until the caller
    reads it."""
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sock.setblocking(False)
    await asyncio.get_running_loop().sock_connect(sock, ("127.0.0.1", gw.port))
    reader, writer = await asyncio.open_connection(sock=sock, limit=2**16)
    writer.write(
        f"GET {path} HTTP/1.1\r\nHost: fieldgate\r\nAuthorization: Bearer {ADMIN_TOKEN}\r\n"
        "Accept: text/event-stream\r\n\r\n".encode()
    )
    await writer.drain()
    return reader, writer


async def until_streams(client: httpx.AsyncClient, n: int) -> None:
    """Wait until the gateway has `n` streams open (its /metrics says)."""

    async def count() -> bool:
        text = (await client.get("/metrics")).text
        for line in text.splitlines():
            if line.startswith("fieldgate_streams_open "):
                return float(line.split()[1]) == n
        return n == 0

    await poll_until(count, within=30, what=f"{n} open streams")


async def read_raw_stream(reader: asyncio.StreamReader) -> Stream:
    """An SSE answer read off a socket to its end (HTTP/1.1, chunked)."""
    head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 30)
    assert head.startswith(b"HTTP/1.1 200"), head
    body = bytearray()
    while True:
        size = int((await asyncio.wait_for(reader.readline(), 30)).strip(), 16)
        if size == 0:
            break
        body += await reader.readexactly(size)
        await reader.readexactly(2)
    stream = Stream(httpx.Response(200))
    _parse(stream, body.decode().splitlines())
    stream.ended = True
    return stream


class TestRefusals:
    async def test_who_may_stream_and_the_limits(
        self, database_url: str, serve: Callable[..., GatewayProcess]
    ) -> None:
        gw = serve(database_url, streams_per_token="2")
        await gw.start()
        device_token = await create(gw, "x1")
        path = "/api/v1/devices/x1/telemetry/stream"
        async with httpx.AsyncClient(base_url=gw.base_url, timeout=10) as client:
            r = await client.get(path)
            assert r.status_code == 401
            r = await client.get(path, headers={"Authorization": f"Bearer {device_token}"})
            assert r.status_code == 403
            admin = {"Authorization": f"Bearer {ADMIN_TOKEN}"}
            r = await client.get("/api/v1/devices/nope/telemetry/stream", headers=admin)
            assert r.status_code == 404
            r = await client.get(path, headers={**admin, "Last-Event-ID": "not-an-id"})
            assert r.status_code == 400
            assert r.json()["error"]["code"] == "invalid_event_id"
            r = await client.get(f"{path}?metric=bad%20name", headers=admin)
            assert r.status_code == 400
            async with open_stream(gw, path), open_stream(gw, "/api/v1/telemetry/stream"):
                r = await client.get(path, headers=admin)
                assert r.status_code == 429
                assert r.json()["error"]["code"] == "too_many_streams"
                assert r.headers["Retry-After"]
            # closed: room again
            async with open_stream(gw, path):
                pass

    async def test_clients_that_leave_at_once_give_their_streams_back(
        self, database_url: str, serve: Callable[..., GatewayProcess]
    ) -> None:
        gw = serve(database_url, streams_per_token="2")
        await gw.start()
        await create(gw, "x3")
        for _ in range(10):  # each asks for a stream and hangs up before reading a byte
            _, writer = await raw_get(gw, "/api/v1/devices/x3/telemetry/stream")
            await _Closing(writer).aclose()
        async with gw.client() as client:
            await until_streams(client, 0)
        async with open_stream(gw, "/api/v1/devices/x3/telemetry/stream"):
            pass  # not refused: the 10 gave theirs back

    async def test_streams_off(
        self, database_url: str, serve: Callable[..., GatewayProcess]
    ) -> None:
        gw = serve(database_url, live_log_window_s="0")
        await gw.start()
        await create(gw, "x2")
        async with gw.client() as client:
            r = await client.get("/api/v1/devices/x2/telemetry/stream")
            assert r.status_code == 503
            assert r.json()["error"]["code"] == "streams_disabled"

    async def test_a_resume_older_than_the_log_is_told_to_reload(
        self, database_url: str, serve: Callable[..., GatewayProcess]
    ) -> None:
        gw = serve(database_url, live_log_window_s="0.4")
        await gw.start()
        token = await create(gw, "old")
        async with gw.client() as client:
            for k in range(3):
                await post(client, "old", token, [("t", T0 + k, 1.0)])
            async with open_stream(gw, "/api/v1/devices/old/telemetry/stream?start=-3650d") as s:
                await until(lambda: len(s.readings()) == 3, "the history")

            async def told_to_reset() -> bool:
                async with open_stream(
                    gw, "/api/v1/devices/old/telemetry/stream", **{"Last-Event-ID": "1.old"}
                ) as again:
                    await until(lambda: bool(again.events) or True, "anything")
                    await asyncio.sleep(0.2)
                    return any(e.event == "reset" for e in again.events)

            await poll_until(told_to_reset, within=20, what="the log to be pruned")
            # ... and the stream goes on live after telling it
            async with open_stream(
                gw, "/api/v1/devices/old/telemetry/stream", **{"Last-Event-ID": "1.old"}
            ) as again:
                await until(lambda: bool(again.events), "the reset event")
                await post(client, "old", token, [("t", T0 + 50, 2.0)])
                await until(lambda: ("old", "t", T0 + 50, 2.0) in again.readings(), "live")
            assert again.events[0].event == "reset"
            assert again.events[0].data["code"] == "resume_too_old"


class TestRules:
    """The hub's rules without a server."""

    def test_event_ids(self) -> None:
        assert parse_event_id("12.dev-1") == (12, "dev-1")
        assert parse_event_id("12.a.b") == (12, "a.b")
        for bad in ("", "x.d", "12", "-1.d", "1" * 20 + ".d"):
            assert parse_event_id(bad) is None

    def test_a_full_queue_overflows_and_takes_no_more(self) -> None:
        sub = Subscription("k", None, None, buffer=2)
        for i in range(4):
            sub.offer(LiveEvent(i + 1, "d", [("t", i, 1.0)]))
        assert sub.overflowed
        assert [e.log_id for e in sub.queue] == [1, 2]

    def test_selection(self) -> None:
        sub = Subscription("k", frozenset({"a"}), frozenset({"t"}), buffer=5, after=(3, "a"))
        points = [("t", 1, 1.0), ("u", 1, 2.0)]
        assert sub.select(3, "a", points) is None  # at the resume point
        assert sub.select(4, "b", points) is None  # another device
        event = sub.select(4, "a", points)
        assert event is not None
        assert event.points == [("t", 1, 1.0)]
        assert event.id == "4.a"

    def test_history_pages_drop_exactly_what_they_sent(self) -> None:
        pages = HistoryPages()
        # page 1 of t: ts 0..99, read while the log stood at 10 (no commit meanwhile)
        pages.add("t", HistoryPage(0, 100, 10, 10, None))
        # page 2: ts 100.., read while commits 11 and 12 came in: it holds ts 150 only
        pages.add("t", HistoryPage(100, 10**18, 10, 12, frozenset({100, 150})))
        assert pages.sent(9, "t", 50)  # committed before page 1 was read, in its range
        assert not pages.sent(11, "t", 50)  # committed after page 1 was read
        assert pages.sent(11, "t", 150)  # committed while page 2 was read, and in it
        assert not pages.sent(12, "t", 170)  # ... and not in it
        assert not pages.sent(13, "t", 150)  # after every page
        assert not pages.sent(5, "t", -1)  # before the history's start
        assert not pages.sent(5, "u", 50)  # a metric with no pages
        kept = pages.unsent(LiveEvent(11, "d", [("t", 150, 1.0), ("t", 170, 2.0)]))
        assert kept is not None
        assert kept.points == [("t", 170, 2.0)]
        assert pages.unsent(LiveEvent(11, "d", [("t", 150, 1.0)])) is None
