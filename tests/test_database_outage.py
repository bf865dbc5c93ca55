"""A PostgreSQL outage under load (writes, reads, device admin): `fieldgate serve` on a private
PostgreSQL that the test stops mid-stream and starts again. Every answer is a 2xx or a 503
`database_unavailable` with Retry-After (never a 500 or a dropped connection), every acknowledged
reading is stored, the gateway recovers by itself, and its log says so in a few lines, without a
traceback."""

from __future__ import annotations

import asyncio
import os
import re
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

import httpx
import pytest

from tests.conftest import ADMIN_TOKEN, GatewayProcess, PostgresInstance, poll_until

pytestmark = [pytest.mark.e2e, pytest.mark.postgres]

T0_MS = 1_700_000_000_000
WRITERS = 4
OUTAGE_S = 3.0  # ten times the token cache's TTL below
RETRY_AFTER_S = "2"
CLI = "from gateway.cli import main; main()"
DAY = "start=2023-11-14T00:00:00Z&end=2023-11-15T00:00:00Z&window=1h"
READ_PATHS = (
    "/api/v1/devices",
    "/api/v1/devices/{d}",
    "/api/v1/devices/{d}/telemetry?metric=m&limit=5",
    "/api/v1/devices/{d}/telemetry/latest",
    "/api/v1/devices/{d}/telemetry/aggregate?metric=m&" + DAY,
    "/api/v1/telemetry/aggregate?metric=m&" + DAY,
    "/api/v1/rejected",
)


@dataclass
class Stream:
    """What the clients saw: every status, every refusal that broke the contract, every reading
    a 2xx acknowledged."""

    statuses: Counter[int] = field(default_factory=Counter)
    refused_by_route: Counter[str] = field(default_factory=Counter)
    wrong: list[str] = field(default_factory=list)
    acknowledged: dict[str, list[int]] = field(default_factory=dict)
    stop: asyncio.Event = field(default_factory=asyncio.Event)

    def check(self, route: str, what: str, r: httpx.Response) -> None:
        self.statuses[r.status_code] += 1
        if r.status_code == 503:
            self.refused_by_route[route] += 1
        if r.status_code < 300:
            return
        if r.status_code != 503:
            self.wrong.append(f"{what}: {r.status_code} {r.text[:300]}")
            return
        try:
            code = r.json()["error"]["code"]
        except ValueError:
            code = f"not JSON: {r.text[:200]}"
        if code != "database_unavailable" or r.headers.get("retry-after") != RETRY_AFTER_S:
            self.wrong.append(f"{what}: 503 {code} Retry-After={r.headers.get('retry-after')}")


async def _write(gw: GatewayProcess, device: str, token: str, stream: Stream) -> None:
    headers = {"Authorization": f"Bearer {token}"}
    acked = stream.acknowledged.setdefault(device, [])
    i = 0
    async with httpx.AsyncClient(base_url=gw.base_url, headers=headers, timeout=20) as client:
        while not stream.stop.is_set():
            i += 1
            try:
                r = await client.post(
                    f"/api/v1/devices/{device}/telemetry",
                    json={"ts": T0_MS + i, "values": {"m": i}},
                )
            except httpx.TransportError as exc:
                stream.wrong.append(f"POST {device}: {type(exc).__name__} {exc}")
                continue
            stream.check("POST telemetry", f"POST {device}", r)
            if r.status_code == 200:
                acked.append(i)
            else:
                await asyncio.sleep(0.02)  # a client backing off, a little


async def _read(gw: GatewayProcess, token: str, devices: list[str], stream: Stream) -> None:
    headers = {"Authorization": f"Bearer {token}"}
    i = 0
    async with httpx.AsyncClient(base_url=gw.base_url, headers=headers, timeout=20) as client:
        while not stream.stop.is_set():
            route = READ_PATHS[i % len(READ_PATHS)]
            path = route.format(d=devices[i % len(devices)])
            i += 1
            try:
                r = await client.get(path)
            except httpx.TransportError as exc:
                stream.wrong.append(f"GET {path}: {type(exc).__name__} {exc}")
                continue
            stream.check(route, f"GET {path}", r)
            await asyncio.sleep(0.01)


async def _administer(gw: GatewayProcess, devices: list[str], stream: Stream) -> None:
    """Device admin (the admin token is configured, so it needs no lookup): rename devices."""
    i = 0
    async with gw.client() as client:
        while not stream.stop.is_set():
            d = devices[i % len(devices)]
            i += 1
            try:
                r = await client.patch(f"/api/v1/devices/{d}", json={"name": f"name {i}"})
            except httpx.TransportError as exc:
                stream.wrong.append(f"PATCH {d}: {type(exc).__name__} {exc}")
                continue
            stream.check("PATCH device", f"PATCH {d}", r)
            await asyncio.sleep(0.05)


async def _stored(client: httpx.AsyncClient, device: str) -> set[int]:
    """The values stored for `device` (each reading's value is its sequence number)."""
    r = await client.get(f"/api/v1/devices/{device}/telemetry", params={"metric": "m"})
    assert r.status_code == 200, r.text
    got = r.json()
    assert got["next_cursor"] is None  # fewer than a page (1,000 readings)
    return {int(p["value"]) for p in got["points"]}


def _operator_token(database_url: str) -> str:
    """An operator token made with the CLI, so reads look their token up in the database."""
    done = subprocess.run(
        [sys.executable, "-c", CLI, "tokens", "create", "--role", "operator", "--name", "outage"],
        env={**os.environ, "FIELDGATE_DATABASE_URL": database_url},
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    return done.stdout.strip().splitlines()[-1]


@pytest.mark.parametrize("stop_mode", ["fast", "immediate"])
async def test_postgres_outage_mid_stream(
    private_postgres: PostgresInstance, serve: Callable[..., GatewayProcess], stop_mode: str
) -> None:
    """`fast`: PostgreSQL ends its sessions and shuts down cleanly; `immediate`: it crashes
    (and recovers from its WAL on the next start)."""
    gw = serve(private_postgres.url, auth_cache_ttl_s="0.3", retry_after_s=RETRY_AFTER_S)
    await gw.start()
    operator = _operator_token(private_postgres.url)
    stream = Stream()
    devices = [f"outage-{n}" for n in range(WRITERS)]
    async with gw.client() as admin:
        tokens = []
        for d in devices:
            r = await admin.post("/api/v1/devices", json={"id": d})
            assert r.status_code == 201, r.text
            tokens.append(r.json()["token"])
        clients = [
            asyncio.create_task(_write(gw, d, t, stream))
            for d, t in zip(devices, tokens, strict=True)
        ]
        clients += [asyncio.create_task(_read(gw, operator, devices, stream)) for _ in range(2)]
        clients.append(asyncio.create_task(_administer(gw, devices, stream)))

        async def acked() -> int:
            return sum(len(v) for v in stream.acknowledged.values())

        async def refusals() -> int:  # answers that are not a 2xx, and dropped connections
            return sum(n for status, n in stream.statuses.items() if status >= 300) + len(
                stream.wrong
            )

        await poll_until(lambda: _above(acked, 50), within=10, what="writes before the stop")
        log_before = gw.log_path.read_text(errors="replace")
        private_postgres.stop(stop_mode)
        stopped_at = time.monotonic()
        acked_at_stop = await acked()
        # Past the token cache's TTL (0.3 s): token lookups go to the stopped database too.
        await poll_until(
            lambda: _above(refusals, 200),
            within=15,
            what="refusals while the database is down",
        )
        await asyncio.sleep(max(0.0, OUTAGE_S - (time.monotonic() - stopped_at)))  # keep sending
        acked_during = await acked() - acked_at_stop
        private_postgres.start()
        refused_at_start = await refusals()
        acked_at_start = await acked()
        await poll_until(
            lambda: _above(acked, acked_at_start + 50),
            within=20,
            what="writes acknowledged again after the restart",
        )
        stream.stop.set()
        await asyncio.gather(*clients)

        assert not stream.wrong, "\n".join(stream.wrong[:20])
        assert set(stream.statuses) <= {200, 503}, stream.statuses
        # Every kind of request met the outage (and answered 503 database_unavailable).
        routes = {"POST telemetry", "PATCH device", *READ_PATHS}
        assert set(stream.refused_by_route) == routes, stream.refused_by_route
        assert refused_at_start >= 200
        assert acked_during <= WRITERS  # at most the commits in flight when it stopped
        # Every acknowledged reading is stored, read back after the recovery.
        for d in devices:
            missing = set(stream.acknowledged[d]) - await _stored(admin, d)
            assert not missing, f"{d}: {len(missing)} acknowledged readings are not stored"
        # Recovered without a restart: the same process, ready, and it says the database is up.
        assert gw.process is not None
        assert gw.process.poll() is None
        assert (await admin.get("/readyz")).status_code == 200
        text = (await admin.get("/metrics")).text
        assert re.search(r"^fieldgate_database_up 1\.0$", text, re.M), text
        refused = re.search(r"^fieldgate_database_refused_requests_total (\S+)$", text, re.M)
        assert refused, text
        assert float(refused[1]) >= refused_at_start

    log = gw.log_path.read_text(errors="replace").removeprefix(log_before)
    assert "Traceback" not in log, log[-5000:]
    lines = [line for line in log.splitlines() if line.strip()]
    assert len(lines) <= 6, "\n".join(lines)  # became unavailable, back (+ maybe a flap)
    assert any("database is unavailable" in line for line in lines), log
    assert any("database is back" in line for line in lines), log
    assert ADMIN_TOKEN not in log


async def _above(value: Callable[[], Awaitable[int]], bound: int) -> bool:
    return await value() > bound
