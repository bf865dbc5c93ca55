"""Poison messages (issue 8, section 1): a message that can never be stored must not stop the
stream. On SQLite and PostgreSQL, with the machine's Mosquitto and the app's real bridge: each
poison payload is followed by valid messages, every valid one is stored, the poison one is listed
by GET /api/v1/rejected with its exact bytes, and nothing stays unacknowledged. The same payloads
over HTTP are per-reading rejections beside stored readings. Then the bridge's split between
permanent failures (the culprit is put aside and acknowledged) and transient ones (held and
retried; /readyz says when a batch is stuck), with faults injected into the ingest service.
"""

from __future__ import annotations

import asyncio
import base64
from collections.abc import AsyncIterator, Awaitable, Callable
from functools import partial
from typing import Any

import aiomqtt
import httpx
import pytest

from devices.formats import Readings
from gateway.ingest import IngestResult
from gateway.mqtt import service
from gateway.mqtt.client import BrokerAddress
from gateway.store.dead_letters import Letter, insert_letters
from gateway.timespec import now_us
from tests.conftest import Gateway, poll_until, start_mqtt_gateway
from tests.harness import sample, scrape

NOW_MS = 1_763_892_000_000  # 2025-11-23T10:00:00Z

# (name, payload, the dead letter's reason)
POISON = [
    ("ts 1e308", b'{"ts":1e308,"values":{"a":1}}', "timestamp_in_future"),
    ("ts -1e308", b'{"ts":-1e308,"values":{"a":1}}', "timestamp_before_epoch"),
    ("ts 400 digits", b'{"ts":1' + b"0" * 400 + b',"values":{"a":1}}', "timestamp_in_future"),
    ("NUL bytes", b"\x00x", "invalid_json"),
    ("NUL and bad UTF-8", b'{"values":{"a":1}}\x00\xff\xfe', "invalid_json"),
    (
        "details with NUL and a lone surrogate",
        b'{"ts":%d,"values":{"\\u0000":1,"\\ud800":2,"a\\u0000b":3,"ok":4}}' % (NOW_MS - 1),
        "invalid_metric",
    ),
]


async def _publish(url: str, *messages: tuple[str, bytes]) -> None:
    address = BrokerAddress.from_url(url)
    async with aiomqtt.Client(
        address.host, address.port, protocol=aiomqtt.ProtocolVersion.V5
    ) as client:
        for topic, payload in messages:
            await client.publish(topic, payload, qos=1)


@pytest.fixture
async def mqtt_gateway(
    database_url: str, machine_broker: str, topic_prefix: str
) -> AsyncIterator[Gateway]:
    """The app with its bridge on the machine's broker, under a topic prefix of its own."""
    async for gw in start_mqtt_gateway(
        database_url, machine_broker, topic_prefix, mqtt_stuck_batch_s=0.5
    ):
        yield gw


async def _rejected(gw: Gateway) -> list[dict[str, Any]]:
    r = await gw.client.get("/api/v1/rejected", params={"limit": 1000}, headers=gw.admin)
    assert r.status_code == 200, r.text
    letters: list[dict[str, Any]] = r.json()["rejected"]
    return letters


async def _values(gw: Gateway, device: str, metric: str) -> list[float]:
    r = await gw.client.get(
        f"/api/v1/devices/{device}/telemetry", params={"metric": metric}, headers=gw.admin
    )
    assert r.status_code == 200, r.text
    return [p["value"] for p in r.json()["points"]]


def _count(n: int, read: Callable[[], Awaitable[list[Any]]]) -> Callable[[], Awaitable[Any]]:
    async def check() -> list[Any] | None:
        got = await read()
        return got if len(got) >= n else None

    return check


def _valid(i: int) -> bytes:
    return b'{"ts":%d,"values":{"v":%d}}' % (NOW_MS + i, i)


async def _all_acknowledged(gw: Gateway) -> bool:
    mqtt = gw.app.state.runtime.components["mqtt"]
    return bool(mqtt["in_flight_messages"] == 0 and mqtt["retrying_batches"] == 0)


async def test_poison_messages_are_dead_letters_and_the_stream_goes_on(
    mqtt_gateway: Gateway, machine_broker: str, topic_prefix: str
) -> None:
    gw = mqtt_gateway
    await gw.create_device("dev-1")
    topic = f"{topic_prefix}/devices/dev-1/telemetry"
    messages: list[tuple[str, bytes]] = []
    for i, (_, payload, _) in enumerate(POISON):
        messages.append((topic, payload))
        messages += [(topic, _valid(10 * i + k)) for k in range(3)]
    # the first report: no credentials, no such device
    messages.append((f"{topic_prefix}/devices/nosuch/telemetry", POISON[0][1]))
    messages.append((topic, _valid(1000)))
    await _publish(machine_broker, *messages)

    expected = sorted([float(10 * i + k) for i in range(len(POISON)) for k in range(3)] + [1000.0])

    async def all_valid_stored() -> bool:
        return await _values(gw, "dev-1", "v") == expected

    await poll_until(all_valid_stored, within=30, what="every valid message stored")
    letters = await poll_until(
        _count(len(POISON) + 1, partial(_rejected, gw)), within=30, what="the dead letters"
    )
    await poll_until(partial(_all_acknowledged, gw), within=10, what="every message acknowledged")

    by_payload = {base64.b64decode(x["payload_base64"]): x for x in letters}
    for name, payload, reason in POISON:
        letter = by_payload.get(payload)
        assert letter is not None, f"{name}: no dead letter with its exact bytes"
        assert letter["reason"] == reason, name
        assert letter["device"] == "dev-1"
        assert letter["payload_bytes"] == len(payload)
        assert letter["payload"] == payload.decode("utf-8", errors="replace")
    unknown = [x for x in letters if x["device"] == "nosuch"]
    assert [x["reason"] for x in unknown] == ["unknown_device"]

    nasty = by_payload[POISON[-1][1]]
    assert {(d["metric"], d["code"]) for d in nasty["details"]} == {
        ("\\x00", "invalid_metric"),
        ("\\ud800", "invalid_metric"),
        ("a\\x00b", "invalid_metric"),
    }
    assert await _values(gw, "dev-1", "ok") == [4.0]  # the valid reading beside them

    ready = await gw.client.get("/readyz", headers=gw.admin)
    assert ready.status_code == 200
    assert ready.json()["status"] == "ready"


async def test_poison_timestamps_and_keys_over_http(gateway: Gateway) -> None:
    """The same payloads over HTTP: per-reading rejections (never 5xx), the valid ones stored."""
    token = await gateway.create_device("dev-h")
    body = (
        b'[{"ts":1e308,"values":{"a":1}},{"ts":-1e308,"values":{"a":2}},'
        b'{"ts":1' + b"0" * 400 + b',"values":{"a":3}},'
        b'{"ts":%d,"values":{"\\ud800":4,"\\u0000":5,"ok":6}},'
        b'{"ts":%d,"values":{"a":7}}]' % (NOW_MS, NOW_MS)
    )
    r = await gateway.post("dev-h", token, body)
    assert r.status_code == 200, r.text
    answer = r.json()
    assert answer["accepted"] == 2
    assert [(x["index"], x["metric"], x["code"]) for x in answer["rejected"]] == [
        (0, None, "timestamp_in_future"),
        (1, None, "timestamp_before_epoch"),
        (2, None, "timestamp_in_future"),
        (3, "\\ud800", "invalid_metric"),
        (3, "\\x00", "invalid_metric"),
    ]
    assert await _values(gateway, "dev-h", "a") == [7.0]
    assert await _values(gateway, "dev-h", "ok") == [6.0]

    # nothing valid at all: 422 with the rejections, not a 5xx
    r = await gateway.post("dev-h", token, b'{"ts":1e308,"values":{"\\ud800":1}}')
    assert r.status_code == 422, r.text
    assert r.json()["error"]["details"] == [
        {
            "index": 0,
            "metric": None,
            "code": "timestamp_in_future",
            "message": "ts is too far ahead: after 9999-12-31T23:59:59.999999Z, the latest time "
            "stored",
        }
    ]


class Faults:
    """Faults injected into the ingest service's store (the database and broker stay real)."""

    def __init__(self, gw: Gateway, monkeypatch: pytest.MonkeyPatch) -> None:
        self.ingestor = gw.app.state.runtime.ingestor
        self.real_store: Callable[..., Awaitable[IngestResult]] = self.ingestor.store
        self.transient = False  # dev-flaky's writes fail as if the database were down
        self.held = asyncio.Event()  # dev-perm's writes wait for it (so that a batch grows)
        self.held.set()
        self.poison_writes: list[int] = []  # readings in each write holding the poison
        monkeypatch.setattr(self.ingestor, "store", self.store)

    async def store(
        self, device_id: str, readings: Readings, received_us: int, **kwargs: Any
    ) -> IngestResult:
        if device_id == "dev-perm":
            await self.held.wait()
        if device_id in ("dev-perm", "dev-doomed") and "poison" in readings.metrics:
            self.poison_writes.append(len(readings))
            raise ValueError("value the database refuses for good")
        if device_id == "dev-flaky" and self.transient:
            raise ConnectionRefusedError("the database is down")
        return await self.real_store(device_id, readings, received_us, **kwargs)


async def test_permanent_failure_puts_the_culprit_aside_and_stores_the_rest(
    mqtt_gateway: Gateway,
    machine_broker: str,
    topic_prefix: str,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    gw = mqtt_gateway
    await gw.create_device("dev-perm")
    faults = Faults(gw, monkeypatch)
    before = await scrape(gw.client)
    topic = f"{topic_prefix}/devices/dev-perm/telemetry"
    poison = b'{"ts":%d,"values":{"poison":1,"v":-1}}' % NOW_MS
    # Writes wait until all 11 messages are in. The first three messages, sent one at a time,
    # take the bridge's 3 batch slots; the other 8 wait for a slot together, so the poison
    # message is in one batch with valid neighbours, which the database refuses as a whole.
    faults.held.clear()
    mqtt = gw.app.state.runtime.components["mqtt"]

    def in_flight(n: int) -> Callable[[], Awaitable[bool]]:
        async def check() -> bool:
            return bool(mqtt["in_flight_messages"] == n)

        return check

    for i in range(3):
        await _publish(machine_broker, (topic, _valid(i)))
        await poll_until(in_flight(i + 1), within=20, what=f"{i + 1} messages in flight")
    await _publish(
        machine_broker,
        *[(topic, _valid(i)) for i in range(3, 5)],
        (topic, poison),
        *[(topic, _valid(i)) for i in range(5, 10)],
    )
    await poll_until(in_flight(11), within=20, what="11 messages in flight")
    faults.held.set()

    async def stored() -> bool:
        return await _values(gw, "dev-perm", "v") == [float(i) for i in range(10)]

    await poll_until(stored, within=30, what="the valid messages around the culprit")
    (letter,) = await poll_until(
        _count(1, partial(_rejected, gw)), within=20, what="the culprit's dead letter"
    )
    assert letter["reason"] == "unstorable"
    assert "ValueError" in letter["message"]
    assert base64.b64decode(letter["payload_base64"]) == poison
    assert await _values(gw, "dev-perm", "poison") == []
    await poll_until(partial(_all_acknowledged, gw), within=10, what="every message acknowledged")
    after = await scrape(gw.client)
    assert sample(after, "fieldgate_mqtt_store_permanent_failures_total") > sample(
        before, "fieldgate_mqtt_store_permanent_failures_total"
    )
    # the batch with its neighbours was refused, then the culprit on its own (2 readings)
    assert max(faults.poison_writes) > 2, faults.poison_writes
    assert faults.poison_writes[-1] == 2, faults.poison_writes
    assert (await gw.client.get("/readyz", headers=gw.admin)).status_code == 200


async def test_a_dead_letter_refused_for_good_does_not_stall_the_stream(
    mqtt_gateway: Gateway,
    machine_broker: str,
    topic_prefix: str,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Last resort: the message and its dead letter are both refused for good -> logged,
    counted, acknowledged; the messages behind it are stored."""
    gw = mqtt_gateway
    await gw.create_device("dev-doomed")
    Faults(gw, monkeypatch)
    real_insert = insert_letters

    async def refuse_unstorable(letters: list[Any], **kwargs: Any) -> None:
        if any(x.reason == "unstorable" for x in letters):
            raise TypeError("this dead letter cannot be stored either")
        await real_insert(letters, **kwargs)

    monkeypatch.setattr(service, "insert_letters", refuse_unstorable)
    before = sample(await scrape(gw.client), "fieldgate_mqtt_messages_dropped_total")
    topic = f"{topic_prefix}/devices/dev-doomed/telemetry"
    await _publish(
        machine_broker,
        (topic, b'{"ts":%d,"values":{"poison":1}}' % NOW_MS),
        *[(topic, _valid(i)) for i in range(3)],
    )

    async def stored() -> bool:
        return await _values(gw, "dev-doomed", "v") == [0.0, 1.0, 2.0]

    await poll_until(stored, within=30, what="the messages behind the doomed one")
    await poll_until(partial(_all_acknowledged, gw), within=10, what="every message acknowledged")
    after = sample(await scrape(gw.client), "fieldgate_mqtt_messages_dropped_total")
    assert after == before + 1
    assert await _rejected(gw) == []


async def test_a_transient_failure_holds_the_batch_and_readyz_says_when_it_is_stuck(
    mqtt_gateway: Gateway,
    machine_broker: str,
    topic_prefix: str,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    gw = mqtt_gateway
    await gw.create_device("dev-flaky")
    faults = Faults(gw, monkeypatch)
    faults.transient = True
    topic = f"{topic_prefix}/devices/dev-flaky/telemetry"
    await _publish(machine_broker, *[(topic, _valid(i)) for i in range(5)])

    async def stuck() -> httpx.Response | None:
        r = await gw.client.get("/readyz", headers=gw.admin)
        return r if r.status_code == 503 else None

    r = await poll_until(stuck, within=20, what="/readyz to report the stuck batch")
    body = r.json()
    assert body["status"] == "not_ready"
    mqtt = body["checks"]["mqtt"]
    assert mqtt["stuck"] is True
    assert mqtt["ok"] is False
    assert mqtt["stuck_batch_s"] >= 0.5
    assert mqtt["retrying_batches"] >= 1
    assert mqtt["in_flight_messages"] == 5  # held, unacknowledged: nothing is lost
    assert body["checks"]["database"]["ok"] is True
    assert await _values(gw, "dev-flaky", "v") == []

    faults.transient = False  # the database is back

    async def stored() -> bool:
        return await _values(gw, "dev-flaky", "v") == [float(i) for i in range(5)]

    await poll_until(stored, within=30, what="the held messages stored once the database is back")
    await poll_until(partial(_all_acknowledged, gw), within=10, what="every message acknowledged")
    r = await gw.client.get("/readyz", headers=gw.admin)
    assert r.status_code == 200, r.text
    assert "stuck_batch_s" not in r.json()["checks"]["mqtt"]
    assert await _rejected(gw) == []  # transient: retried, never dead-lettered


async def test_the_dead_letter_store_takes_any_text_and_bytes(gateway: Gateway) -> None:
    """Whatever a letter holds (NUL, lone surrogates in every text, any bytes), it is stored
    and listed; texts with the escapes of devices.formats.safe_text, the payload exactly."""
    every_byte = bytes(range(256))
    await insert_letters(
        [
            Letter(
                # now: a letter older than the retention (30 days) may be pruned by the
                # gateway's first pruning pass, which runs beside this test
                now_us(),
                "mqtt",
                "dev\x00",
                "t\x00/\ud800",
                "r\x00",
                "m\x00\udfff",
                every_byte,
                [{"k\x00": ["\ud800", {"\x00": None}]}, "\x00", 1.5],
            )
        ],
        payload_limit=1000,
    )
    (letter,) = await _rejected(gateway)
    assert letter["device"] == "dev\\x00"
    assert letter["topic"] == "t\\x00/\\ud800"
    assert letter["reason"] == "r\\x00"
    assert letter["message"] == "m\\x00\\udfff"
    assert letter["details"] == [{"k\\x00": ["\\ud800", {"\\x00": None}]}, "\\x00", 1.5]
    assert base64.b64decode(letter["payload_base64"]) == every_byte
    assert letter["payload"] == every_byte.decode("utf-8", errors="replace")
    assert letter["payload_bytes"] == 256


@pytest.fixture
async def capped_gateway(
    database_url: str, machine_broker: str, topic_prefix: str
) -> AsyncIterator[Gateway]:
    """The bridge on the machine's broker, keeping at most 3 dead letters."""
    async for gw in start_mqtt_gateway(
        database_url, machine_broker, topic_prefix, dead_letter_max_rows=3
    ):
        yield gw


async def test_a_flood_of_dead_letters_keeps_only_the_newest(
    capped_gateway: Gateway, machine_broker: str, topic_prefix: str
) -> None:
    """Anyone who may publish can make dead letters: their table is capped, the oldest go."""
    gw = capped_gateway
    flood = [(f"{topic_prefix}/devices/made-up-{i}/telemetry", _valid(i)) for i in range(20)]
    await _publish(machine_broker, *flood)

    async def all_refused() -> bool:
        mqtt = gw.app.state.runtime.components["mqtt"]
        return bool(mqtt["rejected_messages"].get("unknown_device") == 20)

    await poll_until(all_refused, within=30, what="20 unknown-device refusals")
    # Batches of the flood are stored concurrently, so which 3 are newest among them depends on
    # which batch committed last; a message sent after all of them is the newest for sure.
    await _publish(machine_broker, (f"{topic_prefix}/devices/made-up-20/telemetry", _valid(20)))

    async def last_refused() -> bool:
        mqtt = gw.app.state.runtime.components["mqtt"]
        return bool(mqtt["rejected_messages"].get("unknown_device") == 21)

    await poll_until(last_refused, within=30, what="the 21st unknown-device refusal")
    letters = await _rejected(gw)
    assert len(letters) == 3
    assert letters[0]["device"] == "made-up-20"
    assert len({x["device"] for x in letters}) == 3
