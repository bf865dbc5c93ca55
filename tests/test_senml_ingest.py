"""SenML through the gateway: `POST .../telemetry` with `Content-Type: application/senml+json`
and the MQTT topic `devices/{id}/senml` go through the one ingest path; units are kept per series
and answered by the read APIs. Both databases; MQTT on the machine's broker. (The parser alone:
tests/test_senml.py; the lane and the route answering alike: tests/test_telemetry_lane.py.)"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from datetime import datetime
from typing import Any

import aiomqtt
import orjson
import pytest

from gateway.mqtt.client import BrokerAddress
from gateway.mqtt.service import BatchHandler, Incoming, Topics
from tests.conftest import Gateway, poll_until, start_mqtt_gateway

SENML = {"Content-Type": "application/senml+json"}
T0 = 1_700_000_000  # 2023-11-14T22:13:20Z, in SenML's seconds
URN = "urn:dev:ow:10e2073a01080063"


@pytest.fixture
def database_url(emptied_database_url: str) -> str:
    return emptied_database_url


async def post_senml(gw: Gateway, device: str, token: str, pack: Any) -> Any:
    return await gw.client.post(
        f"/api/v1/devices/{device}/telemetry",
        content=pack if isinstance(pack, bytes) else orjson.dumps(pack),
        headers={"Authorization": f"Bearer {token}", **SENML},
    )


async def read(gw: Gateway, path: str, **params: Any) -> Any:
    r = await gw.client.get(f"/api/v1{path}", params=params, headers=gw.admin)
    assert r.status_code == 200, r.text
    return r.json()


class TestHttp:
    async def test_an_rfc_pack_is_stored_with_its_units(self, gateway: Gateway) -> None:
        token = await gateway.create_device("meter")
        pack = [
            {"bn": f"{URN}:", "bt": T0, "bu": "A", "n": "voltage", "u": "V", "v": 120.1},
            {"n": "current", "t": -5, "v": 1.2},
            {"n": "current", "t": -4, "v": 1.3},
            {"n": "current", "v": 1.7},
        ]
        r = await post_senml(gateway, "meter", token, pack)
        assert r.status_code == 200, r.text
        assert r.json() == {"accepted": 4, "duplicates": 0, "rejected": []}

        raw = await read(gateway, "/devices/meter/telemetry", metric=f"{URN}:current")
        assert raw["unit"] == "A"
        assert [(p["ts"], p["value"]) for p in raw["points"]] == [
            ("2023-11-14T22:13:15Z", 1.2),
            ("2023-11-14T22:13:16Z", 1.3),
            ("2023-11-14T22:13:20Z", 1.7),
        ]
        latest = await read(gateway, "/devices/meter/telemetry/latest")
        assert latest["values"][f"{URN}:voltage"] == {
            "ts": "2023-11-14T22:13:20Z",
            "value": 120.1,
            "unit": "V",
        }
        detail = await read(gateway, "/devices/meter")
        assert {m: s["unit"] for m, s in detail["metrics"].items()} == {
            f"{URN}:voltage": "V",
            f"{URN}:current": "A",
        }
        window = {"start": "2023-11-14T22:00:00Z", "end": "2023-11-14T23:00:00Z", "window": "1h"}
        one = await read(
            gateway, "/devices/meter/telemetry/aggregate", metric=f"{URN}:voltage", **window
        )
        assert one["unit"] == "V"
        both = await read(
            gateway,
            "/devices/meter/telemetry/aggregate",
            metric=[f"{URN}:voltage", f"{URN}:current", "nothing"],
            **window,
        )
        assert [s["unit"] for s in both["series"]] == ["V", "A", None]
        fleet = await read(gateway, "/telemetry/aggregate", metric=f"{URN}:current", **window)
        assert [(s["device"], s["unit"]) for s in fleet["series"]] == [("meter", "A")]
        named = await read(
            gateway,
            "/telemetry/aggregate",
            metric=f"{URN}:current",
            device=["meter"],
            **window,
        )
        assert [s["unit"] for s in named["series"]] == ["A"]

    async def test_relative_times_are_from_the_receive_time(self, gateway: Gateway) -> None:
        token = await gateway.create_device("rel")
        before = time.time()
        r = await post_senml(gateway, "rel", token, [{"n": "t", "v": 1, "t": -60}, {"n": "h"}])
        after = time.time()
        assert r.status_code == 200, r.text
        assert r.json()["accepted"] == 1
        assert r.json()["rejected"] == [
            {
                "index": 1,
                "metric": "h",
                "code": "missing_value",
                "message": "the record has no value (v)",
            }
        ]
        raw = await read(gateway, "/devices/rel/telemetry", metric="t")
        (point,) = raw["points"]
        stored = datetime.fromisoformat(point["ts"]).timestamp()
        assert before - 60 - 0.001 <= stored <= after - 60 + 0.001

    async def test_a_series_keeps_its_first_unit(self, gateway: Gateway) -> None:
        """The first unit sticks; a later pack in another unit is refused for that metric (the
        device's other readings are stored); a native post (no unit) is taken."""
        token = await gateway.create_device("u")
        r = await post_senml(gateway, "u", token, [{"n": "temp", "u": "Cel", "v": 21, "t": T0}])
        assert r.status_code == 200, r.text
        r = await post_senml(
            gateway,
            "u",
            token,
            [
                {"bt": T0 + 60, "n": "temp", "u": "K", "v": 294.15},
                {"n": "hum", "u": "%RH", "v": 40},
            ],
        )
        assert r.status_code == 200, r.text
        (refused,) = r.json()["rejected"]
        assert (refused["index"], refused["metric"], refused["code"]) == (
            -1,
            "temp",
            "unit_mismatch",
        )
        assert "'Cel'" in refused["message"]
        assert r.json()["accepted"] == 1
        r = await gateway.post("u", token, {"ts": (T0 + 120) * 1000, "values": {"temp": 22}})
        assert r.json()["accepted"] == 1
        raw = await read(gateway, "/devices/u/telemetry", metric="temp")
        assert raw["unit"] == "Cel"
        assert [p["value"] for p in raw["points"]] == [21.0, 22.0]

        only_wrong = await post_senml(gateway, "u", token, [{"n": "temp", "u": "K", "v": 1}])
        assert only_wrong.status_code == 422
        assert only_wrong.json()["error"]["details"][0]["code"] == "unit_mismatch"

    async def test_a_native_series_takes_the_first_unit_given(self, gateway: Gateway) -> None:
        token = await gateway.create_device("n")
        await gateway.post("n", token, {"ts": T0 * 1000, "values": {"t": 1}})
        assert (await read(gateway, "/devices/n/telemetry", metric="t"))["unit"] is None
        r = await post_senml(gateway, "n", token, [{"n": "t", "u": "Cel", "v": 2, "t": T0 + 1}])
        assert r.json()["accepted"] == 1
        assert (await read(gateway, "/devices/n/telemetry", metric="t"))["unit"] == "Cel"

    async def test_malformed_packs_answer_with_each_record_and_keep_the_rest(
        self, gateway: Gateway
    ) -> None:
        token = await gateway.create_device("m")
        pack = [
            {"bn": "m.", "n": "ok", "v": 1, "t": T0},
            {"n": "label", "vs": "Machine Room"},
            {"n": "bad name!", "v": 1},
            {"n": "ok", "v": "1"},
            {"n": "ok", "t": -1, "v": 2, "bt": T0},
        ]
        r = await post_senml(gateway, "m", token, pack)
        assert r.status_code == 200, r.text
        assert [(x["index"], x["metric"], x["code"]) for x in r.json()["rejected"]] == [
            (1, "m.label", "unsupported_value"),
            (2, "m.bad name!", "invalid_metric"),
            (3, "m.ok", "invalid_value"),
        ]
        assert r.json()["accepted"] == 2

        nothing = await post_senml(gateway, "m", token, [{"n": "x", "vb": True}])
        assert nothing.status_code == 422
        assert nothing.json()["error"]["code"] == "no_valid_readings"
        for body, code in (
            (b"{not json", "invalid_json"),
            ({"n": "x", "v": 1}, "invalid_pack"),
            ([{"n": "x", "v": 1, "x_": 1}], "invalid_pack"),
        ):
            r = await post_senml(gateway, "m", token, body)
            assert r.status_code == 400, r.text
            assert r.json()["error"]["code"] == code
        records = [{"n": "x", "v": 1}] * (gateway.settings.max_messages + 1)
        too_many = await post_senml(gateway, "m", token, records)
        assert too_many.status_code == 413
        assert too_many.json()["error"]["code"] == "too_many_messages"


@pytest.fixture
async def mqtt_gateway(
    database_url: str, machine_broker: str, topic_prefix: str
) -> AsyncIterator[Gateway]:
    async for gw in start_mqtt_gateway(database_url, machine_broker, topic_prefix):
        yield gw


async def test_mqtt_senml_topic_is_ingested_with_dead_letters(
    mqtt_gateway: Gateway, machine_broker: str, topic_prefix: str
) -> None:
    gw = mqtt_gateway
    await gw.create_device("node")
    ready = (await gw.client.get("/readyz", headers=gw.admin)).json()["checks"]["mqtt"]
    assert ready["subscriptions"] == [
        f"{topic_prefix}/devices/+/telemetry",
        f"{topic_prefix}/devices/+/senml",
    ]
    assert ready["refused_subscriptions"] == []
    address = BrokerAddress.from_url(machine_broker)
    topic = f"{topic_prefix}/devices/node/senml"

    def stored(n: int) -> Any:
        async def check() -> list[float] | None:
            raw = await read(gw, "/devices/node/telemetry", metric="node:temp")
            values = [p["value"] for p in raw["points"]]
            return values if len(values) >= n else None

        return check

    async with aiomqtt.Client(
        address.host, address.port, protocol=aiomqtt.ProtocolVersion.V5
    ) as client:
        first = [
            {"bn": "node:", "bt": T0, "n": "temp", "u": "Cel", "v": 21.5},
            {"n": "temp", "t": 60, "v": 21.7},
            {"n": "door", "vb": True},
        ]
        await client.publish(topic, orjson.dumps(first), qos=1)
        # (the first unit is the one stored first: batches of one device may run side by side)
        await poll_until(stored(2), within=20, what="the first pack")
        await client.publish(topic, b'{"values": {"t": 1}}', qos=1)  # native, on the SenML topic
        await client.publish(topic, orjson.dumps([{"n": "node:temp", "u": "K", "v": 1}]), qos=1)
        await client.publish(
            f"{topic_prefix}/devices/node/telemetry",
            orjson.dumps({"ts": (T0 + 120) * 1000, "values": {"node:temp": 21.9}}),
            qos=1,
        )
    assert await poll_until(stored(3), within=20, what="3 readings") == [21.5, 21.7, 21.9]
    raw = await read(gw, "/devices/node/telemetry", metric="node:temp")
    assert raw["unit"] == "Cel"

    async def letters() -> list[dict[str, Any]] | None:
        found = (await read(gw, "/rejected", device="node"))["rejected"]
        return found if len(found) >= 3 else None

    by_reason = {x["reason"]: x for x in await poll_until(letters, within=20, what="3 letters")}
    assert set(by_reason) == {"unsupported_value", "invalid_pack", "unit_mismatch"}
    assert by_reason["unsupported_value"]["details"][0]["index"] == 2
    assert by_reason["unsupported_value"]["topic"] == topic
    assert "2 reading(s) kept" in by_reason["unsupported_value"]["message"]


class TestOneMqttBatch:
    """The bridge's batch handler, given one batch (the broker decides batches; here the test
    does): units are told apart per message."""

    async def test_units_per_message_of_one_batch(self, gateway: Gateway) -> None:
        await gateway.create_device("b")
        handler = BatchHandler(
            gateway.app.state.runtime.ingestor,
            Topics(),
            max_payload_bytes=10_000,
            dead_letter_payload_bytes=1_000,
            device_cache_ttl_s=1,
        )

        def pack(unit: str, value: float, t: int) -> Incoming:
            body = orjson.dumps([{"n": "temp", "u": unit, "v": value, "t": T0 + t}])
            return Incoming("devices/b/senml", body)

        def native(value: float, t: int) -> Incoming:
            body = orjson.dumps({"ts": (T0 + t) * 1000, "values": {"temp": value}})
            return Incoming("devices/b/telemetry", body)

        # a first unit, another in a later message, a reading without one
        batch = [pack("Cel", 1, 0), pack("K", 2, 1), native(3, 2)]
        letters = await handler.handle(batch)
        assert [(x.payload, x.reason) for x in letters] == [(batch[1].payload, "unit_mismatch")]
        # the series has its unit now: another is refused, a reading without one is taken
        batch = [pack("K", 4, 3), native(5, 4)]
        letters = await handler.handle(batch)
        assert [(x.payload, x.reason) for x in letters] == [(batch[0].payload, "unit_mismatch")]
        raw = await read(gateway, "/devices/b/telemetry", metric="temp")
        assert raw["unit"] == "Cel"
        assert [p["value"] for p in raw["points"]] == [1.0, 3.0, 5.0]
