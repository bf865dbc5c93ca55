"""The simulator against a real gateway (`fieldgate serve` subprocess, SQLite), over HTTP and
MQTT, with faults on; assertions on the report and, directly, on the database."""

from __future__ import annotations

import asyncio
import contextlib
import os
import secrets
import signal
import sqlite3
import sys
import time
from collections.abc import Callable
from contextlib import closing
from pathlib import Path
from typing import Any

import httpx
import orjson
import pytest

from simulator.gateway_api import GatewayApi
from simulator.report import build_report
from simulator.run import Simulation, SimulationConfig, exit_code
from simulator.signals import DEFAULT_METRICS
from simulator.sink import SinkProtocol
from simulator.verify import verify
from tests.conftest import ADMIN_TOKEN, GatewayProcess, SecuredBroker, poll_until

pytestmark = pytest.mark.e2e

FIELDGATE = str(Path(sys.executable).parent / "fieldgate")
METRICS = {m.name for m in DEFAULT_METRICS}


def _prefix(kind: str) -> str:
    return f"sim{kind}-{secrets.token_hex(3)}-"


def _stored(db: Path, prefix: str) -> dict[tuple[str, str], tuple[int, int, int]]:
    """(device, metric) -> (count, min ts, max ts), straight from the gateway's SQLite file."""
    with closing(sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=10)) as conn:
        rows = conn.execute(
            "SELECT s.device_id, s.metric, count(*), min(r.ts), max(r.ts) FROM reading r"
            " JOIN series s ON s.id = r.series_id WHERE s.device_id LIKE ? || '%'"
            " GROUP BY s.device_id, s.metric",
            (prefix,),
        ).fetchall()
    return {(d, m): (n, lo, hi) for d, m, n, lo, hi in rows}


async def _gateway(
    serve: Callable[..., GatewayProcess], db: Path, **settings: str
) -> GatewayProcess:
    gw = serve(f"sqlite://{db}", **settings)
    await gw.start()
    return gw


def _check_accounting(report: dict[str, Any]) -> None:
    assert report["errors"] == 0, report["errors_by_kind"]
    assert report["bad_sent"] > 0
    assert report["rejected"] == report["bad_sent"]
    assert report["rejected_by_code"] == report["expected_rejections"]
    assert report["rejections_match"] is True
    assert report["verified"] is True
    assert report["missing"] == 0
    assert report["unexpected"] == 0
    assert report["duplicates_sent"] > 0
    assert report["accepted"] == report["sent"] - report["bad_sent"]


async def test_http_with_faults_is_verified_and_stored_once(
    serve: Callable[..., GatewayProcess], tmp_path: Path
) -> None:
    db = tmp_path / "gw.db"
    gw = await _gateway(serve, db)
    prefix = _prefix("h")
    report_path = tmp_path / "report.json"
    proc = await asyncio.create_subprocess_exec(
        FIELDGATE, "simulate", "--gateway", gw.base_url, "--admin-token", ADMIN_TOKEN,
        "--device-prefix", prefix, "--devices", "8", "--rate", "20", "--duration", "3s",
        "--ramp-up", "0.5", "--batch", "5", "--bad-ratio", "0.08", "--duplicate-ratio", "0.1",
        "--seed", "5", "--verify", "--quiet", "--report-json", str(report_path),
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT,
    )  # fmt: skip
    out, _ = await asyncio.wait_for(proc.communicate(), 60)
    assert proc.returncode == 0, out.decode()[-3000:]
    report = orjson.loads(report_path.read_bytes())
    for key in ("sent", "accepted", "rejected", "errors", "duration_s", "readings_per_s"):
        assert isinstance(report[key], int | float), key
    assert set(report["latency_ms"]) == {"p50", "p95", "p99", "max"}
    assert 0 < report["latency_ms"]["p50"] <= report["latency_ms"]["max"]
    _check_accounting(report)
    assert set(report["bad_by_kind"]) == {
        "nan", "wrong_type", "invalid_metric", "future_timestamp", "broken_json"
    }  # fmt: skip
    # duplicates: the gateway said so for each one, and stored none twice
    assert report["duplicates_reported"] == report["duplicates_sent"]
    assert report["stored_new"] + report["duplicates_reported"] == report["accepted"]

    stored = _stored(db, prefix)
    assert {m for _, m in stored} == METRICS  # no bad metric name got in
    assert len({d for d, _ in stored}) == 8
    total = sum(n for n, _, _ in stored.values())
    assert total == report["stored_new"] == report["verify"]["expected_readings"]
    now_us = time.time_ns() // 1000
    assert max(hi for _, _, hi in stored.values()) <= now_us  # no future timestamp got in
    assert "verified" in out.decode()
    assert "summary" in out.decode()


async def test_verify_finds_missing_extra_and_altered_readings(
    serve: Callable[..., GatewayProcess], tmp_path: Path
) -> None:
    db = tmp_path / "gw.db"
    gw = await _gateway(serve, db)
    prefix = _prefix("v")
    config = SimulationConfig(
        gateway=gw.base_url, admin_token=ADMIN_TOKEN, device_prefix=prefix, devices=3,
        rate=50, duration_s=0, backfill_s=20, verify=True, progress=False, seed=1,
    )  # fmt: skip
    sim = Simulation(config)
    report = await sim.run()
    assert report["verified"] is True, report
    assert report["sent"] == 3 * 20 * 50 * len(METRICS)
    assert exit_code(report) == 0

    dev0, dev1, dev2 = sim.devices
    with closing(sqlite3.connect(db, timeout=10)) as conn, conn:
        series = dict(conn.execute("SELECT device_id || '/' || metric, id FROM series").fetchall())
        gone = conn.execute(
            "DELETE FROM reading WHERE series_id = ? AND ts IN"
            " (SELECT ts FROM reading WHERE series_id = ? ORDER BY ts LIMIT 3)",
            (series[f"{dev0.id}/temperature"],) * 2,
        ).rowcount
        altered = conn.execute(
            "UPDATE reading SET value = value + 0.5 WHERE series_id = ?"
            " AND ts = (SELECT max(ts) FROM reading WHERE series_id = ?)",
            (series[f"{dev2.id}/pressure"],) * 2,
        ).rowcount
    assert (gone, altered) == (3, 1)
    tally = sim.ledger.series[(dev1.id, "humidity")]
    odd_ms = (tally.first_us + tally.last_us) // 2000 + 1  # between two of its readings
    async with httpx.AsyncClient(base_url=gw.base_url) as client:
        r = await client.post(
            f"/api/v1/devices/{dev1.id}/telemetry",
            json={"ts": odd_ms, "values": {"humidity": 50.0, "surprise": 1.0}},
            headers={"Authorization": f"Bearer {dev1.token}"},
        )
        assert r.status_code == 200, r.text
        assert r.json()["accepted"] == 2

    api = GatewayApi(gw.base_url, ADMIN_TOKEN)
    try:
        result = await verify(api, sim.ledger, fresh_devices=sim.fresh)
        cheap = await verify(api, sim.ledger, mode="aggregate", fresh_devices=sim.fresh)
    finally:
        await api.aclose()
    # the aggregate check (count exact, sum with a tolerance) sees the same four series
    assert (cheap.missing, cheap.unexpected) == (3, 2)
    assert {(m["device"], m["metric"]) for m in cheap.mismatched} == {
        (dev0.id, "temperature"), (dev1.id, "humidity"), (dev1.id, "surprise"),
        (dev2.id, "pressure"),
    }  # fmt: skip
    assert (result.missing, result.unexpected) == (3, 2)
    problems = {(m["device"], m["metric"]): m["problem"] for m in result.mismatched}
    assert problems == {
        (dev0.id, "temperature"): "count",
        (dev1.id, "humidity"): "count",
        (dev1.id, "surprise"): "never sent",
        (dev2.id, "pressure"): "checksum",
    }
    # a second run takes the same devices over (their tokens rotated) instead of failing
    again = Simulation(
        SimulationConfig(
            gateway=gw.base_url, admin_token=ADMIN_TOKEN, device_prefix=prefix, devices=3,
            rate=20, duration_s=0.5, progress=False,
        )
    )  # fmt: skip
    second = await again.run()
    assert again.fresh == set()
    assert second["errors"] == 0
    assert second["accepted"] == second["sent"] > 0
    bad = build_report(sim.stats, result, interrupted=False, seed=1)
    assert bad["verified"] is False
    assert exit_code(bad) == 1


@pytest.mark.parametrize("processes", [1, 2])
async def test_ctrl_c_stops_cleanly_with_a_partial_report(
    serve: Callable[..., GatewayProcess], tmp_path: Path, processes: int
) -> None:
    db = tmp_path / "gw.db"
    gw = await _gateway(serve, db)
    prefix = _prefix("c")
    report_path = tmp_path / "report.json"
    proc = await asyncio.create_subprocess_exec(
        FIELDGATE, "simulate", "--gateway", gw.base_url, "--admin-token", ADMIN_TOKEN,
        "--device-prefix", prefix, "--devices", "4", "--rate", "20", "--duration", "5m",
        "--duplicate-ratio", "0.1", "--verify", "--quiet", "--report-json", str(report_path),
        "--processes", str(processes),
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT,
    )  # fmt: skip
    await poll_until(
        lambda: asyncio.to_thread(lambda: sum(n for n, _, _ in _stored(db, prefix).values())),
        within=30,
        what="the simulator's first readings",
    )
    proc.send_signal(signal.SIGINT)
    out, _ = await asyncio.wait_for(proc.communicate(), 30)
    assert proc.returncode == 130, out.decode()[-3000:]
    report = orjson.loads(report_path.read_bytes())
    assert report["interrupted"] is True
    assert report["sent"] > 0
    assert report["duration_s"] < 60
    assert report["verified"] is True, report["verify"]
    stored = sum(n for n, _, _ in _stored(db, prefix).values())
    assert stored == report["verify"]["expected_readings"]
    assert report["processes"] == processes
    assert report["schedule"]["sent_batches"] < report["schedule"]["planned_batches"]


async def test_mixed_http_and_mqtt_with_faults_is_verified(
    serve: Callable[..., GatewayProcess], tmp_path: Path, machine_broker: str, topic_prefix: str
) -> None:
    db = tmp_path / "gw.db"
    gw = await _gateway(
        serve,
        db,
        mqtt_url=machine_broker,
        mqtt_topic_prefix=topic_prefix,
        mqtt_client_id=f"{topic_prefix}-gw",
        mqtt_session_expiry_s="0",
    )

    async def bridge_up() -> bool:
        async with httpx.AsyncClient(base_url=gw.base_url) as client:
            r = await client.get("/readyz")
            return bool(r.json()["checks"].get("mqtt", {}).get("ok"))

    await poll_until(bridge_up, within=20, what="the MQTT bridge to connect")
    prefix = _prefix("m")
    config = SimulationConfig(
        gateway=gw.base_url, admin_token=ADMIN_TOKEN, device_prefix=prefix, devices=10,
        rate=10, duration_s=3, batch=3, protocol="mixed", mqtt_url=machine_broker,
        mqtt_prefix=topic_prefix, mqtt_connections=2, bad_ratio=0.1, duplicate_ratio=0.1,
        seed=3, verify=True, progress=False, settle_s=15,
    )  # fmt: skip
    report = await Simulation(config).run()
    _check_accounting(report)
    assert report["protocol"] == "mixed"
    assert report["latency_ms_mqtt"]["p50"] > 0
    assert report["probes_lost"] == 0
    stored = _stored(db, prefix)
    assert sum(n for n, _, _ in stored.values()) == report["verify"]["expected_readings"]
    assert {m for _, m in stored} == METRICS
    mqtt_devices = {f"{prefix}{i:04d}" for i in range(1, 10, 2)}
    with closing(sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=10)) as conn:
        letters = conn.execute(
            "SELECT device_id, transport, reason FROM dead_letter WHERE device_id LIKE ? || '%'",
            (prefix,),
        ).fetchall()
    assert letters
    assert {d for d, _, _ in letters} <= mqtt_devices
    assert {t for _, t, _ in letters} == {"mqtt"}
    assert {r for _, _, r in letters} <= set(report["expected_rejections"]) | {"invalid_readings"}


async def test_devices_publish_as_themselves_on_a_secured_broker(
    serve: Callable[..., GatewayProcess], tmp_path: Path, secured_broker: SecuredBroker
) -> None:
    """`--mqtt-as-devices` on a broker made by `fieldgate broker init`: each simulated device
    connects with its id and token (the gateway made its broker client), publishes only its
    own topic and hears its own errors; every reading is verified."""
    db = tmp_path / "gw.db"
    gw = await _gateway(
        serve, db, **secured_broker.settings, mqtt_client_id=f"fieldgate-sim-sec-{os.getpid()}"
    )

    async def bridge_up() -> bool:
        async with httpx.AsyncClient(base_url=gw.base_url) as client:
            r = await client.get("/readyz")
            return bool(r.json()["checks"].get("mqtt", {}).get("ok"))

    await poll_until(bridge_up, within=20, what="the MQTT bridge to connect")
    prefix = _prefix("s")
    config = SimulationConfig(
        gateway=gw.base_url, admin_token=ADMIN_TOKEN, device_prefix=prefix, devices=6,
        rate=10, duration_s=2, batch=2, protocol="mqtt", mqtt_url=secured_broker.anonymous_url,
        mqtt_as_devices=True, bad_ratio=0.1, duplicate_ratio=0.1, seed=5, verify=True,
        progress=False, settle_s=15,
    )  # fmt: skip
    report = await Simulation(config).run()
    _check_accounting(report)
    assert report["mqtt_error_notices"] > 0  # each device heard its own errors
    stored = _stored(db, prefix)
    assert sum(n for n, _, _ in stored.values()) == report["verify"]["expected_readings"]


async def test_two_sender_processes_over_http_and_mqtt_store_what_was_acknowledged(
    serve: Callable[..., GatewayProcess], tmp_path: Path, machine_broker: str, topic_prefix: str
) -> None:
    db = tmp_path / "gw.db"
    gw = await _gateway(
        serve,
        db,
        mqtt_url=machine_broker,
        mqtt_topic_prefix=topic_prefix,
        mqtt_client_id=f"{topic_prefix}-gw",
        mqtt_session_expiry_s="0",
    )

    async def bridge_up() -> bool:
        async with httpx.AsyncClient(base_url=gw.base_url) as client:
            r = await client.get("/readyz")
            return bool(r.json()["checks"].get("mqtt", {}).get("ok"))

    await poll_until(bridge_up, within=20, what="the MQTT bridge to connect")
    prefix = _prefix("p")
    report_path = tmp_path / "report.json"
    proc = await asyncio.create_subprocess_exec(
        FIELDGATE, "simulate", "--gateway", gw.base_url, "--admin-token", ADMIN_TOKEN,
        "--device-prefix", prefix, "--devices", "8", "--rate", "10", "--duration", "3s",
        "--batch", "1", "--protocol", "mixed", "--mqtt", machine_broker,
        "--mqtt-prefix", topic_prefix, "--mqtt-connections", "2", "--processes", "2",
        "--bad-ratio", "0.1", "--duplicate-ratio", "0.1", "--seed", "8", "--verify", "--quiet",
        "--report-json", str(report_path),
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT,
    )  # fmt: skip
    out, _ = await asyncio.wait_for(proc.communicate(), 90)
    assert proc.returncode == 0, out.decode()[-3000:]
    report = orjson.loads(report_path.read_bytes())
    _check_accounting(report)
    assert report["processes"] == 2
    assert report["latency_ms"]["p50"] > 0
    assert report["latency_ms_mqtt"]["p50"] > 0
    schedule = report["schedule"]
    assert schedule["processes"] == len(schedule["per_process"]) == 2
    assert schedule["sent_batches"] == schedule["planned_batches"] > 0
    # --batch 1: a request / publish per grid time, bad messages sent alone on top
    assert schedule["sent_batches"] <= report["payloads"] <= schedule["sent_batches"] * 2
    assert "schedule" in out.decode()
    # what both processes acknowledged, merged, is exactly what the gateway stored
    stored = _stored(db, prefix)
    assert sum(n for n, _, _ in stored.values()) == report["verify"]["expected_readings"]
    assert {d for d, _ in stored} == {f"{prefix}{i:04d}" for i in range(8)}
    assert {m for _, m in stored} == METRICS


def _children(pid: int) -> set[int]:
    """The processes whose parent is `pid` (Linux /proc)."""
    found = set()
    for stat in Path("/proc").glob("[0-9]*/stat"):
        with contextlib.suppress(OSError, IndexError, ValueError):
            text = stat.read_text()
            if int(text.rsplit(")", 1)[1].split()[1]) == pid:
                found.add(int(stat.parent.name))
    return found


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return False
    return state != "Z"


@pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="reads /proc")
async def test_sender_processes_do_not_outlive_a_killed_parent(tmp_path: Path) -> None:
    server = await asyncio.get_running_loop().create_server(SinkProtocol, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    async with server:
        proc = await asyncio.create_subprocess_exec(
            FIELDGATE, "simulate", "--gateway", f"http://127.0.0.1:{port}", "--admin-token", "x",
            "--devices", "4", "--rate", "10", "--duration", "5m", "--processes", "2", "--quiet",
            stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.DEVNULL,
        )  # fmt: skip
        try:

            def two_children() -> set[int] | None:
                found = _children(proc.pid)
                return found if len(found) == 2 else None

            children = await poll_until(
                lambda: asyncio.to_thread(two_children),
                within=30,
                what="two sender processes",
            )
        finally:
            proc.kill()
            await proc.wait()
        try:
            await poll_until(
                lambda: asyncio.to_thread(lambda: not any(_alive(c) for c in children)),
                within=15,
                what="the sender processes to exit after their parent was killed",
            )
        finally:  # leave none behind when that failed
            for child in children:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(child, signal.SIGKILL)
