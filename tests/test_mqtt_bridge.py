"""The MQTT bridge in process (the app's lifespan, a real broker, a real database): bad messages,
dead letters and the /rejected API, readiness while the broker is down, the ack adapter."""

from __future__ import annotations

import asyncio
import logging
import os
import secrets
import sqlite3
import time
from collections.abc import AsyncIterator
from datetime import UTC, datetime
from functools import partial
from typing import Any

import aiomqtt
import httpx
import orjson
import pytest
from tenacity import AsyncRetrying, RetryCallState

from gateway.mqtt.bridge import backoff
from gateway.mqtt.client import BrokerAddress, BrokerClient
from gateway.mqtt.service import Topics
from gateway.store.dead_letters import Letter, insert_letters
from gateway.timespec import now_us
from tests.conftest import (
    Broker,
    Gateway,
    make_settings,
    mqtt_ready,
    poll_until,
    start_gateway,
    start_mqtt_gateway,
)
from tests.harness import running

NOW_MS = 1_763_892_000_000  # 2025-11-23T10:00:00Z


class TestTopics:
    @pytest.mark.parametrize(
        ("prefix", "topic", "device"),
        [
            ("", "devices/dev-1/telemetry", "dev-1"),
            ("site/", "site/devices/a.b_c/telemetry", "a.b_c"),
            ("site", "site/devices/x/telemetry", "x"),
            ("", "devices/bad id/telemetry", None),
            ("", "devices/x/telemetry/more", None),
            ("", "devices/x/errors", None),
            ("", "devices/dev-1/senml", "dev-1"),
            ("site", "site/devices/x/senml", "x"),
            ("", "devices/x/senml/more", None),
            ("site", "other/devices/x/telemetry", None),
            ("", "devices/" + "x" * 65 + "/telemetry", None),
        ],
    )
    def test_device_of(self, prefix: str, topic: str, device: str | None) -> None:
        assert Topics.with_prefix(prefix).device_of(topic) == device

    def test_subscription_and_errors_topic(self) -> None:
        topics = Topics.with_prefix("/site-1/")
        assert topics.subscription() == "site-1/devices/+/telemetry"
        assert topics.subscription("fieldgate") == "$share/fieldgate/site-1/devices/+/telemetry"
        assert topics.errors("dev-1") == "site-1/devices/dev-1/errors"
        assert topics.subscriptions("g") == (
            "$share/g/site-1/devices/+/telemetry",
            "$share/g/site-1/devices/+/senml",
        )
        assert topics.address_of("site-1/devices/d/senml") == ("d", "senml")
        assert topics.device_publishes("d") == (
            "site-1/devices/d/telemetry",
            "site-1/devices/d/senml",
        )


def test_backoff_grows_is_capped_and_jittered() -> None:
    wait = backoff(0.5, 30)

    def before_retry(n: int) -> float:
        state = RetryCallState(retry_object=AsyncRetrying(), fn=None, args=(), kwargs={})
        state.attempt_number = n
        return wait(state)

    first = [before_retry(1) for _ in range(200)]
    assert all(0.25 <= d <= 0.5 for d in first)
    assert len({round(d, 6) for d in first}) > 100  # jitter: reconnects do not stampede
    third = [before_retry(3) for _ in range(200)]
    assert all(1.0 <= d <= 2.0 for d in third)
    late = [before_retry(2000) for _ in range(200)]  # no overflow, capped
    assert all(15 <= d <= 30 for d in late)
    assert len({round(d, 6) for d in late}) > 100


def test_broker_address_from_url() -> None:
    a = BrokerAddress.from_url("mqtts://us%40er:p%3Ass@broker.example:8884")
    assert (a.host, a.port, a.username, a.password, a.tls) == (
        "broker.example",
        8884,
        "us@er",
        "p:ss",
        True,
    )
    assert str(a) == "mqtts://broker.example:8884"  # no credentials in /readyz or logs
    b = BrokerAddress.from_url("mqtt://10.0.0.5")
    assert (b.port, b.username, b.tls) == (1883, None, False)


def _client(url: str, client_id: str) -> BrokerClient:
    return BrokerClient(
        BrokerAddress.from_url(url),
        client_id=client_id,
        session_expiry_s=300,
        receive_maximum=10,
        keepalive_s=30,
    )


async def _publish(url: str, topic: str, *payloads: bytes, qos: int = 1) -> None:
    address = BrokerAddress.from_url(url)
    async with aiomqtt.Client(
        address.host, address.port, protocol=aiomqtt.ProtocolVersion.V5
    ) as client:
        for payload in payloads:
            await client.publish(topic, payload, qos=qos)


async def test_a_message_not_acknowledged_is_delivered_again(
    private_broker: Broker, topic_prefix: str
) -> None:
    """The adapter's manual ack: unacknowledged means redelivered on the next connection."""
    client_id = f"fg-ack-{os.getpid()}-{secrets.token_hex(3)}"
    topic = f"{topic_prefix}/devices/d/telemetry"
    async with _client(private_broker.url, client_id) as client:
        assert client.session_present is False
        await client.subscribe(topic, 1)
        await _publish(private_broker.url, topic, b"first")
        message = await asyncio.wait_for(client.next_message(), 10)
        assert message.payload == b"first"
        # leave it unacknowledged, as a gateway killed before its commit would

    async with _client(private_broker.url, client_id) as client:
        assert client.session_present is True
        again = await asyncio.wait_for(client.next_message(), 10)
        assert again.payload == b"first"  # the broker kept it: it was never acknowledged
        client.ack(again)
        await _publish(private_broker.url, topic, b"second")
        nxt = await asyncio.wait_for(client.next_message(), 10)
        assert nxt.payload == b"second"
        client.ack(nxt)

    async with _client(private_broker.url, client_id) as client:
        assert client.session_present is True
        await _publish(private_broker.url, topic, b"third")
        # acknowledged messages are not delivered again: the next one is the new one
        assert (await asyncio.wait_for(client.next_message(), 10)).payload == b"third"


@pytest.fixture
async def mqtt_gateway(
    database_url: str, machine_broker: str, topic_prefix: str
) -> AsyncIterator[Gateway]:
    """The app with its bridge on the machine's broker, under a topic prefix of its own."""
    async for gw in start_mqtt_gateway(
        database_url, machine_broker, topic_prefix, max_body_bytes=1024
    ):
        yield gw


async def _readyz(gw: Gateway) -> httpx.Response:
    return await gw.client.get("/readyz", headers=gw.admin)


async def _rejected(gw: Gateway, **params: Any) -> list[dict[str, Any]]:
    r = await gw.client.get("/api/v1/rejected", params=params, headers=gw.admin)
    assert r.status_code == 200, r.text
    letters: list[dict[str, Any]] = r.json()["rejected"]
    return letters


async def _points(gw: Gateway, device: str, metric: str) -> list[dict[str, Any]]:
    r = await gw.client.get(
        f"/api/v1/devices/{device}/telemetry", params={"metric": metric}, headers=gw.admin
    )
    assert r.status_code == 200, r.text
    points: list[dict[str, Any]] = r.json()["points"]
    return points


async def test_bad_messages_become_dead_letters_and_valid_neighbours_are_stored(
    mqtt_gateway: Gateway,
    machine_broker: str,
    topic_prefix: str,
    caplog: pytest.LogCaptureFixture,
) -> None:
    gw = mqtt_gateway
    await gw.create_device("dev-ok")
    await gw.create_device("dev-off", enabled=False)
    address = BrokerAddress.from_url(machine_broker)
    errors: list[tuple[str, dict[str, Any]]] = []

    def topic(device: str) -> str:
        return f"{topic_prefix}/devices/{device}/telemetry"

    async with aiomqtt.Client(
        address.host, address.port, protocol=aiomqtt.ProtocolVersion.V5
    ) as listener:
        await listener.subscribe(f"{topic_prefix}/devices/+/errors", qos=0)

        async def collect() -> None:
            async for m in listener.messages:
                errors.append((m.topic.value, orjson.loads(m.payload)))

        collecting = asyncio.create_task(collect())
        caplog.set_level(logging.WARNING, logger="fieldgate.mqtt")
        await _publish(
            machine_broker,
            topic("dev-ok"),
            b'{"ts": %d, "values": {"t": 1}}' % NOW_MS,
            orjson.dumps(
                [
                    {"ts": NOW_MS + 1000, "values": {"t": 2, "bad": "x"}},
                    {"ts": "yesterday", "values": {"t": 3}},
                ]
            ),
            b"{not json",
            b'{"ts": %d, "values": {"t": 4}}' % (NOW_MS + 2000),
        )
        await _publish(machine_broker, topic("dev-off"), b'{"values": {"t": 1}}')
        await _publish(machine_broker, topic("ghost"), b'{"values": {"t": 1}}')
        await _publish(machine_broker, topic("bad id!"), b'{"values": {"t": 1}}')
        await _publish(machine_broker, topic("dev-ok"), b"[" + b" " * 2000 + b"]")

        letters: list[dict[str, Any]] = await poll_until(
            lambda: _at_least(_rejected(gw), 6), within=20, what="6 dead letters"
        )
        await poll_until(lambda: _len_at_least(errors, 5), within=10, what="5 error messages")
        collecting.cancel()

    by_reason = {x["reason"]: x for x in letters}
    assert sorted(by_reason) == [
        "device_disabled",
        "invalid_json",
        "invalid_readings",
        "invalid_topic",
        "payload_too_large",
        "unknown_device",
    ]
    partly = by_reason["invalid_readings"]
    assert partly["device"] == "dev-ok"
    assert {d["code"] for d in partly["details"]} == {"invalid_value", "invalid_timestamp"}
    assert "1 reading(s) kept" in partly["message"]
    assert by_reason["invalid_json"]["payload"] == "{not json"
    assert by_reason["invalid_topic"]["device"] is None
    assert by_reason["unknown_device"]["device"] == "ghost"
    assert by_reason["device_disabled"]["device"] == "dev-off"
    too_large = by_reason["payload_too_large"]
    assert too_large["payload_bytes"] == 2002

    # the valid readings, beside and within the bad messages, are stored
    values = [p["value"] for p in await _points(gw, "dev-ok", "t")]
    assert values == [1.0, 2.0, 4.0]

    # only dev-ok's letters when asked for dev-ok
    assert {x["device"] for x in await _rejected(gw, device="dev-ok")} == {"dev-ok"}

    # counted by reason
    counts = (await _readyz(gw)).json()["checks"]["mqtt"]["rejected_messages"]
    assert counts == dict.fromkeys(by_reason, 1)
    metrics_text = (await gw.client.get("/metrics")).text
    assert 'fieldgate_mqtt_messages_rejected_total{reason="unknown_device"}' in metrics_text

    # each device heard why, on its errors topic (not the topic that names no device)
    heard = {(t.split("/")[-2], body["reason"]) for t, body in errors}
    assert heard == {
        ("dev-ok", "invalid_readings"),
        ("dev-ok", "invalid_json"),
        ("dev-ok", "payload_too_large"),
        ("dev-off", "device_disabled"),
        ("ghost", "unknown_device"),
    }

    # logged at most once a minute per device: dev-ok had three bad messages, one log line
    logged = [r.getMessage() for r in caplog.records if r.name == "fieldgate.mqtt"]
    assert sum("/devices/dev-ok/" in line for line in logged) == 1
    assert sum("/devices/ghost/" in line for line in logged) == 1


async def test_made_up_device_ids_share_one_log_line(
    mqtt_gateway: Gateway,
    machine_broker: str,
    topic_prefix: str,
    caplog: pytest.LogCaptureFixture,
) -> None:
    gw = mqtt_gateway
    caplog.set_level(logging.WARNING, logger="fieldgate.mqtt")
    for i in range(20):
        topic = f"{topic_prefix}/devices/ghost-{i}/telemetry"
        await _publish(machine_broker, topic, b'{"values": {"t": 1}}')
    letters = await poll_until(
        lambda: _at_least(_rejected(gw), 20), within=20, what="20 dead letters"
    )
    assert {x["reason"] for x in letters} == {"unknown_device"}
    # each is kept and counted, but the log has one line for them, not one per made-up id
    logged = [r.getMessage() for r in caplog.records if r.name == "fieldgate.mqtt"]
    assert sum("unknown_device" in line for line in logged) == 1, logged


async def test_epoch_seconds_are_a_dead_letter_that_says_so(
    mqtt_gateway: Gateway, machine_broker: str, topic_prefix: str
) -> None:
    gw = mqtt_gateway
    await gw.create_device("dev-s")
    seconds = NOW_MS // 1000
    await _publish(
        machine_broker,
        f"{topic_prefix}/devices/dev-s/telemetry",
        b'{"ts": %d, "values": {"t": 1}}' % seconds,
        b'{"ts": %d, "values": {"t": 2}}' % NOW_MS,
    )
    [letter] = await poll_until(lambda: _at_least(_rejected(gw), 1), within=20, what="the letter")
    assert letter["reason"] == "timestamp_too_old"
    assert letter["device"] == "dev-s"
    assert f"{seconds} looks like epoch seconds (x1000 for milliseconds)" in letter["message"]
    assert [(d["index"], d["code"]) for d in letter["details"]] == [(0, "timestamp_too_old")]
    points = await poll_until(
        lambda: _at_least(_points(gw, "dev-s", "t"), 1), within=20, what="the valid reading"
    )
    assert points == [{"ts": "2025-11-23T10:00:00Z", "value": 2.0}]


async def _at_least(letters: Any, n: int) -> list[dict[str, Any]] | None:
    got: list[dict[str, Any]] = await letters
    return got if len(got) >= n else None


async def _len_at_least(items: list[Any], n: int) -> bool:
    return len(items) >= n


async def test_rejected_api_filters_pages_and_needs_an_operator(gateway: Gateway) -> None:
    token = await gateway.create_device("dev-1")
    # Dated now (whole seconds): a letter past the retention (30 days) may be pruned by the
    # gateway's first pruning pass, which runs beside this test.
    base_us = now_us() // 1_000_000 * 1_000_000
    await insert_letters(
        [
            Letter(base_us + i, "mqtt", f"dev-{i % 2}", "t", "invalid_json", "m", b"p" * i)
            for i in range(5)
        ],
        payload_limit=3,
    )
    second = datetime.fromtimestamp(base_us // 1_000_000, UTC).strftime("%Y-%m-%dT%H:%M:%S")
    page1 = await gateway.client.get(
        "/api/v1/rejected", params={"device": "dev-0", "limit": 2}, headers=gateway.admin
    )
    assert page1.status_code == 200, page1.text
    body = page1.json()
    assert [x["received_at"] for x in body["rejected"]] == [
        f"{second}.000004Z",
        f"{second}.000002Z",
    ]
    assert body["rejected"][0]["payload"] == "ppp"  # cut to the limit
    assert body["rejected"][0]["payload_base64"] == "cHBw"  # the same bytes, exactly
    assert body["rejected"][0]["payload_bytes"] == 4
    page2 = await gateway.client.get(
        "/api/v1/rejected",
        params={"device": "dev-0", "limit": 2, "cursor": body["next_cursor"]},
        headers=gateway.admin,
    )
    assert [x["payload_bytes"] for x in page2.json()["rejected"]] == [0]
    assert page2.json()["next_cursor"] is None

    r = await gateway.client.get("/api/v1/rejected", headers={"Authorization": f"Bearer {token}"})
    assert r.status_code == 403
    assert r.json()["error"]["code"] == "forbidden"
    r = await gateway.client.get("/api/v1/rejected", params={"cursor": "x"}, headers=gateway.admin)
    assert r.status_code == 400
    assert r.json()["error"]["code"] == "invalid_cursor"


@pytest.mark.parametrize("database_url", ["sqlite"], indirect=True)
async def test_readyz_follows_the_broker_and_http_works_while_it_is_down(
    database_url: str, private_broker: Broker, topic_prefix: str
) -> None:
    settings = make_settings(
        database_url,
        mqtt_url=private_broker.url,
        mqtt_topic_prefix=topic_prefix,
        mqtt_client_id=f"fg-ready-{topic_prefix}",
        mqtt_reconnect_min_s=0.1,
        mqtt_reconnect_max_s=0.5,
    )
    async for gw in start_gateway(settings):
        await _broker_down_and_up(gw, private_broker, topic_prefix)


async def _broker_down_and_up(gw: Gateway, private_broker: Broker, topic_prefix: str) -> None:
    token = await gw.create_device("dev-1")
    await poll_until(lambda: mqtt_ready(gw), within=20, what="the bridge to connect")
    assert (await _readyz(gw)).status_code == 200

    private_broker.stop()
    down = await poll_until(
        lambda: _mqtt_down(gw), within=20, what="/readyz to report the broker down"
    )
    # still ready (200): HTTP works without the broker, so a load balancer keeps this instance
    assert down.status_code == 200
    assert down.json()["status"] == "degraded"
    checks = down.json()["checks"]
    assert checks["mqtt"]["ok"] is False
    assert checks["mqtt"]["last_error"]
    assert checks["database"]["ok"] is True

    # HTTP ingestion and reads carry on without the broker
    r = await gw.post("dev-1", token, {"ts": NOW_MS, "values": {"t": 7}})
    assert r.status_code == 200, r.text
    assert [p["value"] for p in await _points(gw, "dev-1", "t")] == [7.0]

    # the broker comes back without the session (its disk was lost): ready again, warned
    private_broker.forget_sessions()
    private_broker.start()
    up = await poll_until(lambda: _mqtt_up(gw), within=20, what="/readyz ready again")
    assert up.json()["status"] == "ready"
    mqtt = up.json()["checks"]["mqtt"]
    assert mqtt["connects"] == 2
    assert mqtt["session_present"] is False
    assert "did not keep this gateway's session" in mqtt["warning"]

    # and MQTT ingestion works again
    await _publish(
        private_broker.url,
        f"{topic_prefix}/devices/dev-1/telemetry",
        b'{"ts": %d, "values": {"t": 8}}' % (NOW_MS + 1000),
    )
    await poll_until(
        lambda: _points_are(gw, "dev-1", [7.0, 8.0]), within=20, what="the MQTT reading"
    )


@pytest.mark.parametrize("database_url", ["sqlite"], indirect=True)
async def test_stop_cuts_the_reconnect_backoff_short(
    database_url: str, private_broker: Broker, topic_prefix: str
) -> None:
    """The bridge waits between connects in tenacity's `sleep`, which `stop` interrupts: a
    gateway whose broker is down shuts down at once, not after the backoff."""
    private_broker.stop()
    settings = make_settings(
        database_url,
        mqtt_url=private_broker.url,
        mqtt_topic_prefix=topic_prefix,
        mqtt_client_id=f"fg-stop-{topic_prefix}",
        mqtt_reconnect_min_s=60,
        mqtt_reconnect_max_s=120,
    )
    async with running(settings) as gw:

        async def next_attempt_in_s() -> float | None:
            mqtt = (await _readyz(gw)).json()["checks"]["mqtt"]
            wait: float | None = mqtt.get("next_attempt_in_s")
            return wait

        wait_s = await poll_until(next_attempt_in_s, within=20, what="a reconnect scheduled")
        assert 30 <= wait_s <= 60  # the first backoff: half to all of the minimum
        stopping = time.monotonic()
    assert time.monotonic() - stopping < 5


async def _mqtt_down(gw: Gateway) -> httpx.Response | None:
    r = await _readyz(gw)
    return r if r.json()["checks"]["mqtt"]["ok"] is False else None


async def _mqtt_up(gw: Gateway) -> httpx.Response | None:
    r = await _readyz(gw)
    return r if r.status_code == 200 and r.json()["checks"]["mqtt"]["ok"] else None


async def _points_are(gw: Gateway, device: str, values: list[float]) -> bool:
    return [p["value"] for p in await _points(gw, device, "t")] == values


@pytest.mark.parametrize("database_url", ["sqlite"], indirect=True)
async def test_a_stalled_database_holds_messages_on_the_broker_not_in_memory(
    database_url: str, private_broker: Broker, topic_prefix: str
) -> None:
    """Backpressure: with the database locked, at most Receive Maximum messages are in flight
    (the broker holds the rest), and once the database is free everything is stored."""
    settings = make_settings(
        database_url,
        mqtt_url=private_broker.url,
        mqtt_topic_prefix=topic_prefix,
        mqtt_client_id=f"fg-bp-{topic_prefix}",
        mqtt_receive_maximum=20,
    )
    async for gw in start_gateway(settings):
        await _stall_and_recover(gw, database_url, private_broker, topic_prefix)


async def _stall_and_recover(
    gw: Gateway, database_url: str, private_broker: Broker, topic_prefix: str
) -> None:
    n = 300
    await gw.create_device("dev-bp")
    await poll_until(partial(mqtt_ready, gw), within=20, what="the bridge to connect")
    lock = sqlite3.connect(database_url.removeprefix("sqlite://"), isolation_level=None)
    lock.execute("BEGIN IMMEDIATE")  # the writer cannot commit until this ends
    try:
        await _publish(
            private_broker.url,
            f"{topic_prefix}/devices/dev-bp/telemetry",
            *(b'{"ts": %d, "values": {"v": %d}}' % (NOW_MS + i, i) for i in range(n)),
        )
        state = gw.app.state.runtime.components["mqtt"]  # read directly: /readyz would wait

        async def some_in_flight() -> bool:
            return bool(state["in_flight_messages"] > 0)

        await poll_until(some_in_flight, within=20, what="messages in flight")
        in_flight = []
        for _ in range(40):
            in_flight.append(state["in_flight_messages"])
            await asyncio.sleep(0.05)
        # Receive Maximum: 20 received and waiting for the commit, the broker keeps the rest
        assert max(in_flight) == 20, in_flight
        assert in_flight[-1] == 20, in_flight
        assert lock.execute("SELECT count(*) FROM reading").fetchone() == (0,)
    finally:
        lock.rollback()
        lock.close()

    async def all_stored() -> bool:
        return len(await _points(gw, "dev-bp", "v")) == n

    await poll_until(all_stored, within=60, what=f"{n} readings after the stall", interval=0.2)
