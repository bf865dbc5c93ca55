"""`fieldgate serve --workers 2` as a subprocess: both workers serve HTTP and take MQTT messages
from the shared subscription, every acknowledged reading is stored once, /metrics sums the
workers, a killed worker is replaced under its index, and SIGTERM drains them all (exit 0)."""

from __future__ import annotations

import asyncio
import os
import re
import secrets
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import aiomqtt
import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.conftest import free_port, poll_until

pytestmark = pytest.mark.e2e

FIELDGATE = Path(sys.executable).parent / "fieldgate"
ADMIN = "workers-admin-" + secrets.token_hex(12)
DEVICES = [f"w-{i}" for i in range(4)]
HTTP_CONNECTIONS = 32
HTTP_PER_CONNECTION = 12
MQTT_PER_DEVICE = 60
SERVING = re.compile(r"worker (\d) \(pid (\d+)\) is serving")
STOPPED = re.compile(
    r"worker (\d) \(pid (\d+)\) stopped: (\d+) HTTP requests, (\d+) readings stored, "
    r"(\d+) MQTT messages"
)


class Workers:
    """One `fieldgate serve --workers 2`, its output in a file."""

    def __init__(self, workdir: Path, env: dict[str, str]) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = workdir / "serve.log"
        with self.log.open("ab") as out:
            self.process = subprocess.Popen(
                [FIELDGATE, "serve", "--port", str(self.port), "--workers", "2"],
                cwd=workdir,
                env=env,
                stdout=out,
                stderr=subprocess.STDOUT,
            )

    def output(self) -> str:
        return self.log.read_text(errors="replace")

    def serving(self) -> dict[int, int]:
        """Worker index -> pid, of the latest start of each."""
        return {int(k): int(pid) for k, pid in SERVING.findall(self.output())}

    def stop(self) -> int:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                return self.process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(timeout=10)
                pytest.fail(f"serve --workers ignored SIGTERM:\n{self.output()[-3000:]}")
        return self.process.returncode


def _env(database_url: str, broker: str, prefix: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("FIELDGATE_", "PROMETHEUS"))}
    env.update(
        FIELDGATE_DATABASE_URL=database_url,
        FIELDGATE_ADMIN_TOKEN=ADMIN,
        FIELDGATE_MQTT_URL=broker,
        FIELDGATE_MQTT_TOPIC_PREFIX=prefix,
        FIELDGATE_MQTT_CLIENT_ID=f"fg-{prefix or secrets.token_hex(4)}",
        FIELDGATE_MQTT_SESSION_EXPIRY_S="60",
        FIELDGATE_WORKERS_ON_SQLITE="true",  # refused by default (test_sqlite_is_refused)
    )
    return env


@pytest.fixture
def workers(
    tmp_path: Path, empty_database_url: str, machine_broker: str, topic_prefix: str
) -> Iterator[Workers]:
    server = Workers(tmp_path, _env(empty_database_url, machine_broker, topic_prefix))
    try:
        yield server
    finally:
        server.stop()


def _metric(text: str, name: str, **labels: str) -> float:
    total = 0.0
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == name and all(sample.labels.get(k) == v for k, v in labels.items()):
                total += sample.value
    return total


async def _ready(server: Workers) -> None:
    async def both_serving_and_subscribed() -> bool:
        if server.process.poll() is not None:
            pytest.fail(f"serve --workers exited early:\n{server.output()[-3000:]}")
        out = server.output()
        # each worker's bridge connected (it subscribes to more than one filter)
        connected = set(re.findall(r"connected to \S+ as \S+-w(\d) ", out))
        return len(server.serving()) == 2 and connected == {"0", "1"}

    await poll_until(both_serving_and_subscribed, within=30, what="two workers to serve")


async def _post_http(api: httpx.AsyncClient, tokens: dict[str, str], t0: int) -> int:
    """HTTP_CONNECTIONS clients at once, each on its own connection; the readings acknowledged."""

    async def one_connection(c: int) -> int:
        device = DEVICES[c % len(DEVICES)]
        headers = {"Authorization": f"Bearer {tokens[device]}"}
        acknowledged = 0
        async with httpx.AsyncClient(base_url=str(api.base_url), timeout=30) as client:
            for i in range(HTTP_PER_CONNECTION):
                ts = t0 + (c * HTTP_PER_CONNECTION + i) * 10
                r = await client.post(
                    f"/devices/{device}/telemetry",
                    json={"ts": ts, "values": {"h": i}},
                    headers=headers,
                )
                assert r.status_code == 200, r.text
                acknowledged += r.json()["accepted"]
        return acknowledged

    return sum(await asyncio.gather(*(one_connection(c) for c in range(HTTP_CONNECTIONS))))


async def _publish_mqtt(broker: str, prefix: str, t0: int) -> int:
    host, port = broker.removeprefix("mqtt://").split(":")
    async with aiomqtt.Client(host, int(port), identifier=f"pub-{prefix}") as client:
        for device in DEVICES:
            for i in range(MQTT_PER_DEVICE):
                payload = f'{{"ts": {t0 + i * 10}, "values": {{"m": {i}}}}}'
                await client.publish(f"{prefix}/devices/{device}/telemetry", payload, qos=1)
    return len(DEVICES) * MQTT_PER_DEVICE


async def _stored(api: httpx.AsyncClient, metric: str) -> list[int]:
    """Timestamps of every stored reading of `metric`, over all devices."""
    stamps: list[int] = []
    for device in DEVICES:
        query: dict[str, Any] = {"metric": metric, "start": "-3h", "limit": 10_000}
        while True:
            r = await api.get(f"/devices/{device}/telemetry", params=query)
            assert r.status_code == 200, r.text
            body = r.json()
            stamps += [(device, p["ts"]) for p in body["points"]]  # type: ignore[misc]
            if not body["next_cursor"]:
                break
            query["cursor"] = body["next_cursor"]
    return stamps


async def test_two_workers_store_every_reading_once(
    workers: Workers, machine_broker: str, topic_prefix: str
) -> None:
    await _ready(workers)
    # A worker killed is replaced under its index, and resumes its MQTT client id's session.
    before = workers.serving()
    os.kill(before[1], signal.SIGKILL)

    async def replaced() -> bool:
        now = workers.serving()
        out = workers.output()
        return (
            now.get(1) not in (None, before[1])
            and "died" in out
            and out.count(f"as fg-{topic_prefix}-w1 ") >= 2
        )

    await poll_until(replaced, within=30, what="the killed worker's replacement to connect")
    # uvicorn's SIGHUP would start each replacement under a new index (a new MQTT session):
    # refused, the workers stay.
    serving = workers.serving()
    workers.process.send_signal(signal.SIGHUP)
    await poll_until(
        lambda: _now("SIGHUP ignored" in workers.output()), within=10, what="SIGHUP refused"
    )
    admin = {"Authorization": f"Bearer {ADMIN}"}
    async with httpx.AsyncClient(
        base_url=workers.url + "/api/v1", headers=admin, timeout=30
    ) as api:
        tokens = {}
        for device in DEVICES:
            r = await api.post("/devices", json={"id": device})
            assert r.status_code == 201, r.text
            tokens[device] = r.json()["token"]
        t0 = (int(time.time()) - 3600) * 1000
        http_sent, mqtt_sent = await asyncio.gather(
            _post_http(api, tokens, t0), _publish_mqtt(machine_broker, topic_prefix, t0)
        )
        assert http_sent == HTTP_CONNECTIONS * HTTP_PER_CONNECTION

        async def mqtt_stored() -> list[int] | None:
            got = await _stored(api, "m")
            return got if len(got) >= mqtt_sent else None

        mqtt_points = await poll_until(mqtt_stored, within=30, what="every MQTT reading")
        http_points = await _stored(api, "h")
        # Every acknowledged reading once: counts equal, no timestamp twice.
        assert len(http_points) == len(set(http_points)) == http_sent
        assert len(mqtt_points) == len(set(mqtt_points)) == mqtt_sent

        # /metrics, answered by one worker, sums both.
        text = (await api.get(workers.url + "/metrics")).text
        accepted = "fieldgate_readings_accepted_total"
        assert _metric(text, accepted, transport="http") == http_sent
        assert _metric(text, accepted, transport="mqtt") == mqtt_sent
        assert _metric(text, "fieldgate_mqtt_connected") == 1

    assert workers.serving() == serving
    assert workers.stop() == 0, workers.output()[-3000:]
    stopped = {int(m[0]): m for m in STOPPED.findall(workers.output())}
    assert set(stopped) == {0, 1}, workers.output()[-3000:]
    # Both took HTTP connections and MQTT messages (the shared subscription spreads them).
    for _, _, requests, _, messages in stopped.values():
        assert int(requests) > 0
        assert int(messages) > 0
    assert "Traceback" not in workers.output()


def test_sqlite_is_refused(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("FIELDGATE_")}
    env.update(FIELDGATE_DATABASE_URL=f"sqlite://{tmp_path}/f.db", FIELDGATE_MQTT_URL="")
    done = subprocess.run(
        [FIELDGATE, "serve", "--port", str(free_port()), "--workers", "2"],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 2
    assert "--workers 2 on SQLite" in done.stderr
    assert "FIELDGATE_WORKERS_ON_SQLITE=true" in done.stderr
    assert not (tmp_path / "f.db").exists()  # refused before it touched anything


async def test_a_worker_that_cannot_start_stops_the_parent(tmp_path: Path) -> None:
    """A replacement that fails before it serves would fail again on every restart: the parent
    stops the other worker and exits 2 saying so, instead of restarting it forever. (Made to
    fail here by removing the run's directory, where a worker claims its index and keeps its
    metrics: the replacement fails while importing.)"""
    server = Workers(tmp_path, _env(f"sqlite://{tmp_path}/f.db", "", ""))
    try:
        await poll_until(
            lambda: _now(len(server.serving()) == 2), within=30, what="two workers to serve"
        )
        shutil.rmtree(_run_dir(server.serving()[0]))
        os.kill(server.serving()[1], signal.SIGKILL)
        await poll_until(
            lambda: _now(server.process.poll() is not None), within=30, what="the parent to stop"
        )
        assert server.process.returncode == 2, server.output()[-3000:]
        assert "times in a row before serving" in server.output()
        assert "a worker could not start" in server.output()
    finally:
        server.stop()


def _run_dir(worker_pid: int) -> str:
    """The run's directory, as the parent handed it to its workers."""
    environ = Path(f"/proc/{worker_pid}/environ").read_bytes().split(b"\0")
    found = next(v for v in environ if v.startswith(b"PROMETHEUS_MULTIPROC_DIR="))
    return found.split(b"=", 1)[1].decode()


async def _now(value: bool) -> bool:
    return value
