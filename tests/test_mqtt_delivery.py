"""Nothing is lost between broker and database: `fieldgate serve` subprocesses, a private Mosquitto
(unbounded queues, persistence), QoS 1 publishers (one of them Mosquitto's own `mosquitto_pub`).

Each reading's (device, ts) is unique, so "stored exactly once" is: every expected (ts, value) is
in the read API and nothing else is.
"""

from __future__ import annotations

import asyncio
import os
import secrets
import shutil
import signal
import time
from collections.abc import Callable
from functools import partial
from typing import Any

import aiomqtt
import httpx
import orjson
import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.conftest import Broker, GatewayProcess, SecuredBroker, poll_until

pytestmark = pytest.mark.e2e

BASE_MS = (int(time.time()) - 3600) * 1000  # an hour ago: well inside the accepted range


def payloads(n: int) -> list[bytes]:
    """Message i holds one reading: ts = BASE_MS + i ms, value = i."""
    return [b'{"ts": %d, "values": {"v": %d}}' % (BASE_MS + i, i) for i in range(n)]


def expected_points(n: int) -> list[tuple[int, float]]:
    return [(BASE_MS * 1000 + i * 1000, float(i)) for i in range(n)]


async def publish_all(
    url: str,
    topic: str,
    messages: list[bytes],
    *,
    window: int = 200,
    label: str = "pub",
    auth: tuple[str, str] | None = None,
) -> None:
    """Publish every message at QoS 1 until the broker has acknowledged it, reconnecting (and
    resending what was unconfirmed) when the broker goes away. `auth`: (username, password)."""
    username, password = auth or (None, None)
    host, port = url.removeprefix("mqtt://").split(":")
    confirmed: set[int] = set()
    deadline = time.monotonic() + 120
    while len(confirmed) < len(messages):
        todo = [i for i in range(len(messages)) if i not in confirmed]
        assert time.monotonic() < deadline, f"{len(todo)} messages could not be published"
        try:
            async with aiomqtt.Client(
                host,
                int(port),
                # a device connects as itself (a broker that authenticates devices insists)
                identifier=username or f"{label}-{secrets.token_hex(4)}",
                username=username,
                password=password,
                protocol=aiomqtt.ProtocolVersion.V5,
                timeout=5,
            ) as client:
                client.pending_calls_threshold = 1_000_000
                room = asyncio.Semaphore(window)
                async with asyncio.TaskGroup() as group:  # one failure stops this round
                    for i in todo:
                        group.create_task(
                            _publish_one(client, room, topic, messages[i], i, confirmed)
                        )
        except* aiomqtt.MqttError:
            await asyncio.sleep(0.1)  # the broker is away: resend what is unconfirmed shortly


async def _publish_one(
    client: aiomqtt.Client,
    room: asyncio.Semaphore,
    topic: str,
    payload: bytes,
    i: int,
    confirmed: set[int],
) -> None:
    async with room:
        await client.publish(topic, payload, qos=1, timeout=5)
        confirmed.add(i)


async def mosquitto_pub(
    url: str, topic: str, messages: list[bytes], *, auth: tuple[str, str] | None = None
) -> asyncio.Task[None]:
    """Mosquitto's own C client publishing one message per stdin line (-l) at QoS 1; `auth`:
    (username, password)."""
    assert shutil.which("mosquitto_pub"), (
        "mosquitto_pub is missing (apt-get install mosquitto-clients)"
    )
    port = url.rsplit(":", 1)[1]
    proc = await asyncio.create_subprocess_exec(
        "mosquitto_pub",
        "-h",
        "127.0.0.1",
        "-p",
        port,
        "-q",
        "1",
        "-t",
        topic,
        "-i",
        auth[0] if auth else f"mospub-{secrets.token_hex(4)}",
        *(("-u", auth[0], "-P", auth[1]) if auth else ()),
        "-l",
        stdin=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )

    async def feed() -> None:
        _, err = await proc.communicate(b"\n".join(messages) + b"\n")
        assert proc.returncode == 0, err.decode()

    return asyncio.create_task(feed())


async def stored(http: httpx.AsyncClient, device: str) -> int:
    r = await http.get(f"/api/v1/devices/{device}")
    assert r.status_code == 200, r.text
    return int(r.json()["readings"])


async def all_points(http: httpx.AsyncClient, device: str) -> list[tuple[int, float]]:
    points: list[tuple[int, float]] = []
    params: dict[str, Any] = {"metric": "v", "limit": 10_000}
    while True:
        r = await http.get(f"/api/v1/devices/{device}/telemetry", params=params)
        assert r.status_code == 200, r.text
        body = r.json()
        for p in body["points"]:
            ts = orjson.loads(orjson.dumps(p["ts"]))
            points.append((_us(ts), p["value"]))
        if not body["next_cursor"]:
            return points
        params["cursor"] = body["next_cursor"]


def _us(rfc3339: str) -> int:
    from datetime import UTC, datetime

    dt = datetime.fromisoformat(rfc3339.replace("Z", "+00:00"))
    return int((dt - datetime(1970, 1, 1, tzinfo=UTC)).total_seconds() * 1_000_000)


async def readyz_mqtt(http: httpx.AsyncClient) -> dict[str, Any]:
    r = await http.get("/readyz")
    mqtt: dict[str, Any] = r.json()["checks"]["mqtt"]
    return mqtt


async def accepted_over_mqtt(http: httpx.AsyncClient) -> float:
    text = (await http.get("/metrics")).text
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if (
                sample.name == "fieldgate_readings_accepted_total"
                and sample.labels.get("transport") == "mqtt"
            ):
                return float(sample.value)
    return 0.0


def bridge_settings(broker: Broker, prefix: str, client_id: str, **more: str) -> dict[str, str]:
    return {
        "mqtt_url": broker.url,
        "mqtt_topic_prefix": prefix,
        "mqtt_client_id": client_id,
        "mqtt_reconnect_min_s": "0.1",
        "mqtt_reconnect_max_s": "1",
        **more,
    }


async def create_devices(http: httpx.AsyncClient, *devices: str) -> dict[str, str]:
    """Create the devices; their tokens."""
    tokens = {}
    for device in devices:
        r = await http.post("/api/v1/devices", json={"id": device})
        assert r.status_code == 201, r.text
        tokens[device] = r.json()["token"]
    return tokens


async def connected(http: httpx.AsyncClient) -> bool:
    try:
        return bool((await readyz_mqtt(http))["ok"])
    except httpx.TransportError:
        return False


async def test_sigkill_mid_stream_loses_nothing(
    database_url: str,
    secured_broker: SecuredBroker,
    serve: Callable[..., GatewayProcess],
) -> None:
    """20,000 QoS 1 messages; the gateway is killed with SIGKILL while they stream in and started
    again: every reading is stored exactly once (a message is acknowledged only once committed).
    With authentication on: the broker is `fieldgate broker init`'s, the gateway keeps its
    device clients, and each publisher is a device with its token."""
    n = 10_000  # per device: dev-a from mosquitto_pub, dev-b from aiomqtt
    settings = {
        **bridge_settings(secured_broker, "", f"fieldgate-kill-{os.getpid()}"),
        **secured_broker.settings,
    }
    first = serve(database_url, **settings)
    await first.start()
    async with first.client() as http:
        tokens = await create_devices(http, "dev-a", "dev-b")
        await poll_until(lambda: connected(http), within=20, what="the bridge to connect")
        url = secured_broker.anonymous_url
        pub_a = await mosquitto_pub(
            url, "devices/dev-a/telemetry", payloads(n), auth=("dev-a", tokens["dev-a"])
        )
        pub_b = asyncio.create_task(
            publish_all(
                url,
                "devices/dev-b/telemetry",
                payloads(n),
                label="pub-b",
                auth=("dev-b", tokens["dev-b"]),
            )
        )

        async def total() -> int:
            return await stored(http, "dev-a") + await stored(http, "dev-b")

        await poll_until(
            lambda: _at_least(total, 3_000), within=60, what="3,000 readings before the kill"
        )
        first.kill()
    await asyncio.gather(pub_a, pub_b)  # the broker holds what the gateway did not acknowledge

    second = serve(database_url, **settings)
    await second.start()
    async with second.client() as http:
        at_restart = await stored(http, "dev-a") + await stored(http, "dev-b")
        assert at_restart < 2 * n, "the kill came after everything was stored: not mid-stream"
        mqtt = await poll_until(lambda: _connected_state(http), within=20, what="reconnect")
        assert mqtt["session_present"] is True  # the broker kept the session across the kill

        async def done() -> bool:
            return await stored(http, "dev-a") + await stored(http, "dev-b") >= 2 * n

        await poll_until(done, within=90, what=f"{2 * n} readings", interval=0.2)
        expected = expected_points(n)
        assert await all_points(http, "dev-a") == expected
        assert await all_points(http, "dev-b") == expected


async def _at_least(count: Callable[[], Any], n: int) -> bool:
    return bool(await count() >= n)


async def _connected_state(http: httpx.AsyncClient) -> dict[str, Any] | None:
    try:
        mqtt = await readyz_mqtt(http)
    except httpx.TransportError:
        return None
    return mqtt if mqtt["ok"] else None


async def total_of(http: httpx.AsyncClient, devices: list[str]) -> int:
    return sum([await stored(http, d) for d in devices])


@pytest.mark.parametrize("database_url", ["sqlite"], indirect=True)
async def test_broker_restart_mid_stream_loses_nothing(
    database_url: str,
    private_broker: Broker,
    serve: Callable[..., GatewayProcess],
    topic_prefix: str,
) -> None:
    """Mosquitto is restarted (graceful stop, persistence on) while messages stream in; the
    bridge reconnects with backoff to its kept session and every reading is stored once."""
    n = 8_000
    gw = serve(
        database_url, **bridge_settings(private_broker, topic_prefix, f"fg-rs-{os.getpid()}")
    )
    await gw.start()
    async with gw.client() as http:
        await create_devices(http, "dev-r")
        await poll_until(lambda: connected(http), within=20, what="the bridge to connect")
        publishing = asyncio.create_task(
            publish_all(
                private_broker.url,
                f"{topic_prefix}/devices/dev-r/telemetry",
                payloads(n),
                label="pub-r",
            )
        )
        await poll_until(
            lambda: _at_least(lambda: stored(http, "dev-r"), 1_000),
            within=60,
            what="1,000 readings before the restart",
        )
        private_broker.stop()
        at_stop = await stored(http, "dev-r")
        assert at_stop < n, "the broker restarted after everything was stored: not mid-stream"
        await poll_until(lambda: _not_ok(http), within=10, what="/readyz to see the broker gone")
        private_broker.start()
        await publishing

        async def done() -> bool:
            return await stored(http, "dev-r") >= n

        await poll_until(done, within=90, what=f"{n} readings", interval=0.2)
        assert await all_points(http, "dev-r") == expected_points(n)
        mqtt = await readyz_mqtt(http)
        assert mqtt["connects"] >= 2
        assert mqtt["session_present"] is True
        assert mqtt["warning"] is None


async def _not_ok(http: httpx.AsyncClient) -> bool:
    return not (await readyz_mqtt(http))["ok"]


@pytest.mark.parametrize("database_url", ["postgres"], indirect=True)
async def test_two_gateways_share_the_stream(
    database_url: str,
    private_broker: Broker,
    serve: Callable[..., GatewayProcess],
    topic_prefix: str,
) -> None:
    """Two gateway processes on one broker (shared subscription) and one PostgreSQL database:
    each gets part of the stream, every reading is stored exactly once."""
    n = 3_000
    devices = [f"dev-{i}" for i in range(4)]
    group = f"fg{secrets.token_hex(3)}"
    gateways = [
        serve(
            database_url,
            **bridge_settings(
                private_broker, topic_prefix, f"fg-share-{i}-{os.getpid()}", mqtt_shared_group=group
            ),
        )
        for i in range(2)
    ]
    for gw in gateways:
        await gw.start()
    async with gateways[0].client() as http0, gateways[1].client() as http1:
        await create_devices(http0, *devices)
        for http in (http0, http1):
            mqtt = await poll_until(partial(_connected_state, http), within=20, what="up")
            assert mqtt["subscription"] == f"$share/{group}/{topic_prefix}/devices/+/telemetry"
        await asyncio.gather(
            *(
                publish_all(
                    private_broker.url,
                    f"{topic_prefix}/devices/{d}/telemetry",
                    payloads(n),
                    label=f"pub-{d}",
                )
                for d in devices
            )
        )

        async def done() -> bool:
            return await total_of(http0, devices) >= n * len(devices)

        await poll_until(done, within=60, what=f"{n * len(devices)} readings", interval=0.2)
        for d in devices:
            assert await all_points(http1, d) == expected_points(n)
        shares = [await accepted_over_mqtt(http0), await accepted_over_mqtt(http1)]
        assert all(s > 0 for s in shares), shares  # each instance took part of the stream
        assert sum(shares) == n * len(devices)  # and no reading was written twice


async def test_sigterm_commits_and_acknowledges_what_is_in_flight(
    database_url: str,
    private_broker: Broker,
    serve: Callable[..., GatewayProcess],
    topic_prefix: str,
) -> None:
    """SIGTERM mid-stream: the gateway stops reading, commits what it holds, acknowledges it and
    exits. The broker then holds exactly the messages that were not stored."""
    n = 10_000
    client_id = f"fg-term-{os.getpid()}-{secrets.token_hex(2)}"
    topic = f"{topic_prefix}/devices/dev-t/telemetry"
    gw = serve(database_url, **bridge_settings(private_broker, topic_prefix, client_id))
    await gw.start()
    async with gw.client() as http:
        await create_devices(http, "dev-t")
        await poll_until(lambda: connected(http), within=20, what="the bridge to connect")
        publishing = asyncio.create_task(
            publish_all(private_broker.url, topic, payloads(n), label="pub-t")
        )
        await poll_until(
            lambda: _at_least(lambda: stored(http, "dev-t"), 1_000), within=60, what="1,000"
        )
        # uvicorn shuts down gracefully, then re-raises the signal: the status says SIGTERM
        assert await asyncio.to_thread(gw.terminate) in (0, -signal.SIGTERM)
    await publishing
    log = gw.log_path.read_text()
    assert "MQTT bridge stopped" in log
    assert "Application shutdown complete" in log

    again = serve(database_url, mqtt_url="")  # HTTP only: read what the first one committed
    await again.start()
    async with again.client() as http:
        committed = {ts for ts, _ in await all_points(http, "dev-t")}
    assert 0 < len(committed) < n, "SIGTERM did not come mid-stream"

    # What the broker still holds for the gateway's session: exactly what was not committed.
    from gateway.mqtt.client import BrokerAddress, BrokerClient

    left = n - len(committed)
    redelivered: list[int] = []
    async with BrokerClient(
        BrokerAddress.from_url(private_broker.url),
        client_id=client_id,
        session_expiry_s=60,
        receive_maximum=65_535,
        keepalive_s=30,
    ) as session:
        assert session.session_present is True
        while len(redelivered) < left:
            message = await asyncio.wait_for(session.next_message(), 20)
            redelivered.append(orjson.loads(message.payload)["ts"] * 1000)
    both = sorted(committed & set(redelivered))
    assert not both, (
        f"{len(both)} committed messages were not acknowledged: {both[:3]}..{both[-3:]}; "
        f"committed {len(committed)}, redelivered {len(redelivered)} from {min(redelivered)}"
    )
    assert committed | set(redelivered) == {ts for ts, _ in expected_points(n)}
