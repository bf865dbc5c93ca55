"""Limits on metrics and series, on SQLite and PostgreSQL: distinct metrics per payload
(413 too_many_metrics), series per device (readings of new metrics past it are rejected with
series_limit, the rest stored), and new series created in chunks so that one device creating
thousands of them does not stall the writes of the others."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from typing import Any

import aiomqtt
import httpx
import orjson
import pytest

from gateway.mqtt.client import BrokerAddress
from gateway.store import series as series_module
from tests.conftest import Gateway, make_settings, poll_until, start_gateway, start_mqtt_gateway
from tests.harness import committed, stored

T0 = 1_700_000_000_000


def error_code(r: httpx.Response) -> str:
    return str(r.json()["error"]["code"])


async def series_of(gw: Gateway, device_id: str) -> list[str]:
    rows = await committed(
        gw.settings.database_url,
        "SELECT metric FROM series WHERE device_id = ? ORDER BY metric",
        device_id,
    )
    return [str(r[0]) for r in rows]


@pytest.fixture
async def limited(database_url: str) -> AsyncIterator[Gateway]:
    settings = make_settings(database_url, max_metrics_per_request=8, max_series_per_device=6)
    async for gw in start_gateway(settings):
        yield gw


class TestMetricsPerPayload:
    async def test_too_many_distinct_metrics_is_413_and_nothing_is_created(
        self, limited: Gateway
    ) -> None:
        token = await limited.create_device("dev-a")
        nine = {"ts": T0, "values": {f"m{i}": i for i in range(9)}}
        r = await limited.post("dev-a", token, nine)
        assert r.status_code == 413, r.text
        assert error_code(r) == "too_many_metrics"
        assert await series_of(limited, "dev-a") == []
        # Split over messages of one payload, they are still nine distinct metrics.
        split = [{"ts": T0, "values": {f"m{i}": i}} for i in range(9)]
        r = await limited.post("dev-a", token, split)
        assert r.status_code == 413, r.text
        assert await stored(limited.settings.database_url, "dev-a") == []

    async def test_many_readings_of_few_metrics_are_fine(self, limited: Gateway) -> None:
        token = await limited.create_device("dev-a")
        body = [{"ts": T0 + i, "values": {f"m{j}": i for j in range(6)}} for i in range(50)]
        r = await limited.post("dev-a", token, body)
        assert r.status_code == 200, r.text
        assert r.json()["accepted"] == 300


class TestSeriesPerDevice:
    async def test_new_metrics_past_the_limit_are_rejected_the_rest_stored(
        self, limited: Gateway
    ) -> None:
        token = await limited.create_device("dev-a")
        r = await limited.post("dev-a", token, {"ts": T0, "values": {"a": 1, "b": 2, "c": 3}})
        assert r.status_code == 200, r.text
        # 3 known + 5 new: room for 3 of the new ones, in the order they appear.
        body: list[dict[str, Any]] = [
            {"ts": T0 + 1, "values": {"a": 10, "n1": 11, "n2": 12}},
            {"ts": T0 + 2, "values": {"n3": 13, "n4": 14, "n5": 15}},
            {"ts": T0 + 3, "values": {"n4": 24, "b": 20}},
        ]
        r = await limited.post("dev-a", token, body)
        assert r.status_code == 200, r.text
        answer = r.json()
        assert answer["accepted"] == 5  # a, n1, n2, n3 of the first two messages, b
        rejected = answer["rejected"]
        assert [(x["metric"], x["code"], x["index"]) for x in rejected] == [
            ("n4", "series_limit", -1),
            ("n5", "series_limit", -1),
        ]
        assert "2 reading(s)" in rejected[0]["message"]
        assert await series_of(limited, "dev-a") == ["a", "b", "c", "n1", "n2", "n3"]
        got = await stored(limited.settings.database_url, "dev-a")
        assert {m for m, _, _ in got} == {"a", "b", "c", "n1", "n2", "n3"}
        assert len(got) == 3 + 5

    async def test_only_new_metrics_past_the_limit_is_422_and_known_ones_still_work(
        self, limited: Gateway
    ) -> None:
        token = await limited.create_device("dev-a")
        full = {"ts": T0, "values": {f"m{i}": i for i in range(5)}}
        assert (await limited.post("dev-a", token, full)).status_code == 200
        assert (await limited.post("dev-a", token, {"values": {"m5": 5}})).status_code == 200
        r = await limited.post("dev-a", token, {"values": {"m6": 6}})
        assert r.status_code == 422, r.text
        assert error_code(r) == "no_valid_readings"
        assert [d["code"] for d in r.json()["error"]["details"]] == ["series_limit"]
        r = await limited.post("dev-a", token, {"ts": T0 + 1, "values": {"m0": 1}})
        assert r.status_code == 200, r.text
        # The limit is per device: another device starts from zero.
        other = await limited.create_device("dev-b")
        assert (await limited.post("dev-b", other, full)).status_code == 200
        assert len(await series_of(limited, "dev-b")) == 5


@pytest.fixture
async def roomy(database_url: str) -> AsyncIterator[Gateway]:
    settings = make_settings(
        database_url, max_metrics_per_request=5_000, max_series_per_device=10_000
    )
    async for gw in start_gateway(settings):
        yield gw


class TestSeriesCreationDoesNotStallOthers:
    async def test_another_device_writes_while_one_creates_5000_series(
        self, roomy: Gateway
    ) -> None:
        token_a = await roomy.create_device("dev-a")
        token_b = await roomy.create_device("dev-b")
        r = await roomy.post("dev-b", token_b, {"ts": T0, "values": {"t": 0}})
        assert r.status_code == 200, r.text
        assert series_module.CREATE_CHUNK < 5_000  # several chunks, so others get turns

        big = {"ts": T0, "values": {f"m{i:05d}": float(i) for i in range(5_000)}}
        creating = asyncio.create_task(roomy.post("dev-a", token_a, big))
        latencies: list[float] = []
        i = 0
        while not creating.done():
            i += 1
            started = time.monotonic()
            r = await roomy.post("dev-b", token_b, {"ts": T0 + i, "values": {"t": i}})
            latencies.append(time.monotonic() - started)
            assert r.status_code == 200, r.text
        r = await creating
        assert r.status_code == 200, r.text
        assert r.json()["accepted"] == 5_000
        assert len(await series_of(roomy, "dev-a")) == 5_000
        # Generous for a loaded CI machine: a chunk takes milliseconds; one statement for all
        # 5,000 held the other device's writes for 9.3 s on SQLite.
        assert max(latencies) < 3.0, (len(latencies), max(latencies))
        got = await stored(roomy.settings.database_url, "dev-b")
        assert len(got) == i + 1


@pytest.fixture
async def mqtt_limited(
    database_url: str, machine_broker: str, topic_prefix: str
) -> AsyncIterator[Gateway]:
    async for gw in start_mqtt_gateway(
        database_url,
        machine_broker,
        topic_prefix,
        max_metrics_per_request=8,
        max_series_per_device=6,
    ):
        yield gw


class TestOverMqtt:
    async def test_the_same_limits_hold_for_mqtt_and_the_stream_goes_on(
        self, mqtt_limited: Gateway, machine_broker: str, topic_prefix: str
    ) -> None:
        gw = mqtt_limited
        await gw.create_device("dev-a")
        address = BrokerAddress.from_url(machine_broker)
        topic = f"{topic_prefix}/devices/dev-a/telemetry"
        payloads = [
            orjson.dumps({"ts": T0, "values": {f"m{i}": i for i in range(9)}}),  # too many
            orjson.dumps({"ts": T0, "values": {f"n{i}": i for i in range(7)}}),  # 6 fit
            orjson.dumps({"ts": T0 + 1, "values": {"n0": 100}}),
        ]
        async with aiomqtt.Client(
            address.host, address.port, protocol=aiomqtt.ProtocolVersion.V5
        ) as client:
            for payload in payloads:
                await client.publish(topic, payload, qos=1)

        async def done() -> list[tuple[str, int, float]] | None:
            got = await stored(gw.settings.database_url, "dev-a")
            return got if len(got) == 7 else None

        got = await poll_until(done, within=20, what="the readings that fit")
        assert {m for m, _, _ in got} == {f"n{i}" for i in range(6)}
        r = await gw.client.get("/api/v1/rejected", headers=gw.admin)
        letters = {x["reason"]: x for x in r.json()["rejected"]}
        assert set(letters) == {"too_many_metrics", "series_limit"}
        # The message that held a 7th new metric is a dead letter naming it; its 6 others stored.
        over = letters["series_limit"]
        assert [(d["metric"], d["code"]) for d in over["details"]] == [("n6", "series_limit")]
        assert "6 reading(s) kept" in over["message"]
        assert await series_of(gw, "dev-a") == [f"n{i}" for i in range(6)]
