"""What keeping devices' broker identities costs (issue 12): device creation and token rotation
through the API with FIELDGATE_BROKER_ADMIN=mosquitto-dynsec, against the same gateway without
it in the same run, and one sync of the whole fleet.

A private Mosquitto made by `fieldgate broker init` on a free port; two `fieldgate serve`
(SQLite, each its own database): `plain` (no broker admin) and `dynsec`. Each creates the same
number of devices one request at a time, then rotates each device's token; then the broker's
clients are compared with the registry once (`BrokerIdentities.sync`, as the gateway runs it
every FIELDGATE_BROKER_SYNC_INTERVAL_S) with nothing to mend.

    .venv/bin/python bench/broker_identities.py --devices 500
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
import rig

from gateway.provisioning import broker_identities
from gateway.settings import Settings
from gateway.store import registry
from gateway.store.database import open_database


def _env_of(path: Path) -> dict[str, str]:
    out = {}
    for line in path.read_text().splitlines():
        if line and not line.startswith("#"):
            key, _, value = line.partition("=")
            out[key] = value
    return out


async def _lifecycle(gw: rig.Gateway, devices: int) -> tuple[list[float], list[float]]:
    """Per-request milliseconds of creating `devices` devices, then of rotating their tokens."""
    headers = {"Authorization": f"Bearer {gw.admin_token}"}
    created: list[float] = []
    rotated: list[float] = []
    async with httpx.AsyncClient(base_url=gw.base_url, headers=headers, timeout=30) as client:
        for i in range(devices):
            t = time.perf_counter()
            r = await client.post("/api/v1/devices", json={"id": f"d{i:05d}"})
            created.append((time.perf_counter() - t) * 1000)
            assert r.status_code == 201, r.text
        for i in range(devices):
            t = time.perf_counter()
            r = await client.post(f"/api/v1/devices/d{i:05d}/token")
            rotated.append((time.perf_counter() - t) * 1000)
            assert r.status_code == 200, r.text
    return created, rotated


async def _sync_ms(database_url: str, env: dict[str, str]) -> float:
    settings = Settings(
        _env_file=None,
        database_url=database_url,
        mqtt_url=env["FIELDGATE_MQTT_URL"],
        broker_admin="mosquitto-dynsec",
        broker_admin_username=env["FIELDGATE_BROKER_ADMIN_USERNAME"],
        broker_admin_password=env["FIELDGATE_BROKER_ADMIN_PASSWORD"],
    )
    identities = broker_identities(settings)
    assert identities is not None
    async with open_database(database_url):
        t = time.perf_counter()
        drift = await identities.sync(registry.device_enabled_states)
        took = (time.perf_counter() - t) * 1000
    assert drift.clean, drift
    assert not drift.fixed, drift
    assert not drift.deleted, drift
    return took


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--devices", type=int, default=300)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        port = rig.free_port()
        subprocess.run(  # noqa: ASYNC221 (before anything runs)
            [str(rig.FIELDGATE), "broker", "init", str(work / "broker"), "--port", str(port)],
            check=True,
            capture_output=True,
        )
        conf = work / "broker" / "mosquitto.conf"
        broker = subprocess.Popen(["mosquitto", "-c", str(conf)])  # noqa: ASYNC220
        env = _env_of(work / "broker" / "fieldgate.env")
        gateways: dict[str, rig.Gateway] = {}
        try:
            for name, extra in (("plain", {}), ("dynsec", env)):
                (work / name).mkdir()
                extra = {**extra, "FIELDGATE_MQTT_URL": "", "FIELDGATE_BROKER_SYNC_INTERVAL_S": "0"}
                if name == "dynsec":  # the bridge is not measured; the admin needs the broker
                    extra["FIELDGATE_MQTT_URL"] = env["FIELDGATE_MQTT_URL"]
                    extra["FIELDGATE_MQTT_CLIENT_ID"] = f"fieldgate-bench-ids-{port}"
                gw = rig.Gateway(f"sqlite://{work / name}/fg.db", work / name, extra)
                gateways[name] = gw
                await gw.wait_ready()
            results = {}
            for name, gw in gateways.items():
                results[name] = await _lifecycle(gw, args.devices)
            sync_ms = await _sync_ms(f"sqlite://{work / 'dynsec'}/fg.db", env)
        finally:
            for gw in gateways.values():
                gw.stop()
            broker.terminate()
            broker.wait(timeout=15)
    print(f"{args.devices} devices, one request at a time (median ms per request; p99)")
    for what, k in (("create", 0), ("rotate", 1)):
        plain = statistics.median(results["plain"][k])
        dynsec = statistics.median(results["dynsec"][k])
        p99 = sorted(results["dynsec"][k])[int(0.99 * (len(results["dynsec"][k]) - 1))]
        print(
            f"  {what:6}  plain {plain:6.2f}   dynsec {dynsec:6.2f} (p99 {p99:6.2f})"
            f"   ratio {dynsec / plain:5.2f}x"
        )
    print(f"  sync of {args.devices} devices, nothing to mend: {sync_ms:.0f} ms")


if __name__ == "__main__":
    sys.exit(asyncio.run(main()))
