"""Test access around the app: read what is committed over a fresh connection, read through the
API, hold the database's write lock so the writer stalls, poll with a deadline, create tokens."""

from __future__ import annotations

import asyncio
import sqlite3
import subprocess
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager, closing, suppress
from typing import Any

import asyncpg
import httpx
import orjson
import pytest
from prometheus_client.parser import text_string_to_metric_families

from devices.models import Role
from gateway.settings import Settings
from gateway.store import registry
from gateway.store.database import Dialect, connection
from gateway.store.raw_sql import placeholders
from tests.conftest import Gateway, start_gateway


def is_sqlite(database_url: str) -> bool:
    return database_url.startswith("sqlite://")


async def committed(database_url: str, sql: str, *args: Any) -> list[tuple[Any, ...]]:
    """Rows of `sql` (written with `?`) over a new connection: it sees committed data only."""
    if is_sqlite(database_url):
        with closing(sqlite3.connect(database_url.removeprefix("sqlite://"))) as conn:
            return [tuple(r) for r in conn.execute(sql, args).fetchall()]
    conn = await asyncpg.connect(database_url, timeout=10)
    try:
        return [tuple(r) for r in await conn.fetch(placeholders(Dialect.POSTGRES, sql), *args)]
    finally:
        await conn.close()


async def commit_log_readings(database_url: str) -> list[tuple[int, int, float]]:
    """(series id, ts, value) of each reading in the commit log (live streams), in log order;
    each part's device checked against its series' device."""
    owner = dict(await committed(database_url, "SELECT id, device_id FROM series"))
    out: list[tuple[int, int, float]] = []
    for (points,) in await committed(database_url, "SELECT points FROM commit_log ORDER BY id"):
        for device, sids, ts, values in orjson.loads(points):
            assert {owner[s] for s in sids} == {device}
            out += zip(sids, ts, values, strict=True)
    return out


async def stored(database_url: str, device_id: str) -> list[tuple[str, int, float]]:
    """(metric, ts, value) of every committed reading of a device, in order."""
    rows = await committed(
        database_url,
        "SELECT s.metric, r.ts, r.value FROM reading r JOIN series s ON s.id = r.series_id"
        " WHERE s.device_id = ? ORDER BY s.metric, r.ts",
        device_id,
    )
    return [(str(m), int(ts), float(v)) for m, ts, v in rows]


async def read_points(
    gw: Gateway, device_id: str, metric: str, **params: Any
) -> list[dict[str, Any]]:
    """Every point of a metric through the raw read API, following cursors."""
    points: list[dict[str, Any]] = []
    query: dict[str, Any] = {"metric": metric, **params}
    for _ in range(10_000):
        r = await gw.client.get(
            f"/api/v1/devices/{device_id}/telemetry", params=query, headers=gw.admin
        )
        assert r.status_code == 200, r.text
        body = r.json()
        points.extend(body["points"])
        if not body["next_cursor"]:
            return points
        query["cursor"] = body["next_cursor"]
    raise AssertionError("the cursor never ran out")


async def wait_until(condition: Callable[[], bool], timeout_s: float = 10.0) -> None:
    """Poll `condition` (letting other tasks run) until it holds; fail at the deadline."""
    deadline = time.monotonic() + timeout_s
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"condition not met within {timeout_s} s")
        await asyncio.sleep(0.002)


@asynccontextmanager
async def writes_held(gw: Gateway) -> AsyncIterator[None]:
    """While inside, the writer's commit cannot proceed (readings queue up, nothing commits).

    SQLite: hold the Tortoise client's connection lock (every statement of the app waits).
    PostgreSQL: lock the reading table against writes from another session (reads still work).
    """
    if is_sqlite(gw.settings.database_url):
        lock: asyncio.Lock = connection()._lock  # type: ignore[attr-defined]
        async with lock:
            yield
        return
    conn = await asyncpg.connect(gw.settings.database_url, timeout=10)
    try:
        tx = conn.transaction()
        await tx.start()
        await conn.execute("LOCK TABLE reading IN EXCLUSIVE MODE")
        try:
            yield
        finally:
            await tx.rollback()
    finally:
        await conn.close()


async def new_token(role: Role, name: str = "test") -> str:
    """An operator or admin token stored in the running gateway's database."""
    return await registry.create_token(role, name)


# Endpoints whose handlers answer as InfluxDB does, errors included (gateway/api/influxql.py),
# because its clients (Grafana, Telegraf) read them so; what routing refuses before them (405) is
# the API's own shape.
INFLUXDB_PATHS = {"/query"}
# InfluxDB's write endpoints answer in InfluxDB 2's error shape, `{"code", "message"}` with
# fieldgate's own code beside it (gateway/api/influx_write.py).
INFLUXDB_WRITE_PATHS = {"/api/v2/write", "/write"}


def bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


def sample(
    text: str, name: str, labels: dict[str, str] | None = None, *, missing: float = 0.0
) -> float:
    """One sample's value from Prometheus text (`missing` when absent)."""
    want = labels or {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            if s.name == name and all(s.labels.get(k) == v for k, v in want.items()):
                return float(s.value)
    return missing


async def scrape(client: httpx.AsyncClient) -> str:
    r = await client.get("/metrics")
    assert r.status_code == 200, r.text
    return r.text


@asynccontextmanager
async def running(settings: Settings) -> AsyncIterator[Gateway]:
    """`start_gateway` as a context manager: the app's lifespan ends on leaving the block."""
    gateways = start_gateway(settings)
    gw = await gateways.__anext__()
    try:
        yield gw
    finally:
        # Run the generator on past its yield (aclose() would throw GeneratorExit into the
        # lifespan's TaskGroup, which reports it as an error).
        with suppress(StopAsyncIteration):
            await gateways.__anext__()


def wait_for_healthz(
    base_url: str,
    process: subprocess.Popen[bytes],
    output: Callable[[], str],
    within_s: float = 30,
) -> None:
    """Block until a `fieldgate serve` answers /healthz (fail if it exits first, with the end
    of `output()`): for synchronous tests, where asyncio.run cannot run (Playwright's sync API
    runs its own loop)."""
    deadline = time.monotonic() + within_s
    with httpx.Client(base_url=base_url, timeout=2) as client:
        while True:
            if process.poll() is not None:
                pytest.fail(f"fieldgate serve exited early:\n{output()[-3000:]}")
            try:
                if client.get("/healthz").status_code == 200:
                    return
            except httpx.TransportError:
                pass
            if time.monotonic() > deadline:
                pytest.fail(f"no /healthz within {within_s} s:\n{output()[-3000:]}")
            time.sleep(0.05)  # the poll's interval, under the deadline above
