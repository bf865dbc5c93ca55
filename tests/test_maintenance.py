"""The maintenance job as an operator sees it: GET /api/v1/storage and its figures, the record
of runs, the serve loop, one run at a time on PostgreSQL (advisory lock), retention per device
with its space returned, and `fieldgate maintain`; on SQLite and PostgreSQL."""

from __future__ import annotations

import asyncio
import logging
import os
import random
import subprocess
import sys
from pathlib import Path
from typing import Any

import asyncpg
import pytest

from devices.models import Role
from gateway import maintenance
from gateway.outage import database_outage
from gateway.store import storage_stats
from gateway.store.database import connection
from gateway.store.packed import PARTITION_US, partition_name
from gateway.store.raw_sql import fetch
from gateway.timespec import now_us
from tests.conftest import (
    ADMIN_TOKEN,
    PG_HOST,
    PG_PORT,
    Gateway,
    PostgresInstance,
    make_settings,
    need_service,
    poll_until,
    start_gateway,
)
from tests.harness import bearer, new_token, running, sample, scrape
from tests.test_aggregate import iso

S = 1_000_000
HOUR = 3600 * S
DAY = 24 * HOUR


async def post_readings(
    gw: Gateway, device: str, token: str, ts: list[int], *, seed: int = 0
) -> dict[int, float]:
    """Post one reading of metric `t` at each ts (500 a request); the readings posted."""
    rng = random.Random(seed)
    readings = {t: rng.uniform(-1000, 1000) for t in ts}
    items = list(readings.items())
    for i in range(0, len(items), 500):
        body = [{"ts": iso(t), "values": {"t": v}} for t, v in items[i : i + 500]]
        r = await gw.post(device, token, body)
        assert r.status_code == 200, r.text
        assert r.json()["accepted"] == len(body)
    return readings


def spread(start_us: int, n: int, step_us: int = 10 * S) -> list[int]:
    return [start_us + i * step_us for i in range(n)]


async def storage(gw: Gateway) -> dict[str, Any]:
    r = await gw.client.get("/api/v1/storage", headers=gw.admin)
    assert r.status_code == 200, r.text
    body: dict[str, Any] = r.json()
    return body


class TestStorage:
    async def test_figures_match_what_was_loaded_before_and_after_maintain(
        self, gateway: Gateway
    ) -> None:
        token = await gateway.create_device("old")
        start = now_us() - 3 * DAY
        ts = spread(start, 5_000)
        await post_readings(gateway, "old", token, ts)

        before = await storage(gateway)
        assert before["readings"] == {"unpacked": 5_000, "packed": 0, "total": 5_000}
        assert before["chunks"] == 0
        assert before["series"] == 1
        assert before["freshness"]["oldest_unpacked"] == iso(ts[0])
        assert before["freshness"]["behind"] is True  # 3 days old, compress_after 1h
        assert before["freshness"]["packed_until_max"] is None
        assert before["runs"] == {"retention": None, "pack": None, "reclaim": None}
        assert before["settings"] == {
            "compress_after": "1h",
            "compress_after_s": 3600.0,
            "retention_days": 0.0,
            "maintenance_interval_s": 300.0,
        }
        assert before["bytes"]["total"] > 0

        report = await maintenance.run_exclusive(gateway.settings, wait=False)
        assert report is not None
        assert report.packed.readings == 5_000

        after = await storage(gateway)
        assert after["readings"] == {"unpacked": 0, "packed": 5_000, "total": 5_000}
        assert after["chunks"] == report.packed.chunks_written >= 1
        assert after["freshness"]["oldest_unpacked"] is None
        assert after["freshness"]["behind"] is False
        assert after["freshness"]["packed_until_max"] == iso(ts[-1])
        assert (
            0
            < after["bytes"]["chunks"] / 5_000
            == pytest.approx(after["bytes_per_packed_reading"], rel=1e-3)
        )
        runs = after["runs"]
        assert runs["pack"]["result"]["readings"] == 5_000
        assert runs["pack"]["result"]["series"] == 1
        assert runs["retention"]["result"] == {"chunks": 0, "readings": 0, "partitions": 0}
        assert set(runs["reclaim"]["result"]) == {"bytes"}
        for job in maintenance.JOBS:
            assert runs[job]["took_ms"] >= 0
            assert runs[job]["started_at"] <= iso(now_us())

        text = await scrape(gateway.client)
        assert sample(text, "fieldgate_stored_readings", {"state": "packed"}) == 5_000
        assert sample(text, "fieldgate_stored_readings", {"state": "unpacked"}) == 0
        assert sample(text, "fieldgate_stored_chunks") == after["chunks"]
        assert sample(text, "fieldgate_maintenance_runs_total", {"job": "pack"}) >= 1
        assert sample(text, "fieldgate_readings_packed_total") >= 5_000
        last = sample(text, "fieldgate_maintenance_last_run_timestamp_seconds", {"job": "pack"})
        assert abs(last - now_us() / S) < 60

    async def test_needs_an_operator_token(self, gateway: Gateway) -> None:
        assert (await gateway.client.get("/api/v1/storage")).status_code == 401
        device_token = await gateway.create_device("d1")
        r = await gateway.client.get("/api/v1/storage", headers=bearer(device_token))
        assert r.status_code == 403
        assert r.json()["error"]["code"] == "forbidden"
        operator = await new_token(Role.OPERATOR)
        r = await gateway.client.get("/api/v1/storage", headers=bearer(operator))
        assert r.status_code == 200, r.text


async def test_serve_runs_the_job_on_its_interval(database_url: str) -> None:
    settings = make_settings(database_url, maintenance_interval_s=0.2)
    async with running(settings) as gw:
        token = await gw.create_device("d1")
        await post_readings(gw, "d1", token, spread(now_us() - 2 * DAY, 1_200))

        async def packed() -> bool:
            return bool((await storage(gw))["readings"]["packed"] == 1_200)

        await poll_until(packed, within=20, what="the serve loop to pack the readings")
        # It goes on running: a reading that arrives late is packed by a later round.
        await post_readings(gw, "d1", token, [now_us() - 2 * DAY - HOUR], seed=1)

        async def all_packed() -> dict[str, Any] | None:
            body = await storage(gw)
            return (
                body
                if body["readings"] == {"unpacked": 0, "packed": 1_201, "total": 1_201}
                else None
            )

        body = await poll_until(all_packed, within=20, what="a later round to pack the late one")
        assert body["settings"]["maintenance_interval_s"] == 0.2


async def test_an_interval_of_0_never_runs(database_url: str) -> None:
    settings = make_settings(database_url, maintenance_interval_s=0)
    async with running(settings) as gw:
        tasks = {t.get_name() for t in asyncio.all_tasks()}
        assert "maintenance" not in tasks
        assert (await storage(gw))["runs"]["pack"] is None


@pytest.mark.postgres
class TestOneRunAtATime:
    @pytest.fixture
    def database_url(self, database_url: str) -> str:
        if not database_url.startswith("postgres"):
            pytest.skip("the advisory lock is PostgreSQL's")
        return database_url

    async def test_a_run_skips_while_another_holds_the_lock(self, gateway: Gateway) -> None:
        token = await gateway.create_device("d1")
        await post_readings(gateway, "d1", token, spread(now_us() - 2 * DAY, 100))
        other = await asyncpg.connect(gateway.settings.database_url)  # another instance
        try:
            assert await other.fetchval(
                "SELECT pg_try_advisory_lock($1)", storage_stats.MAINTENANCE_LOCK
            )
            assert await maintenance.run_exclusive(gateway.settings, wait=False) is None
            assert (await storage(gateway))["readings"]["packed"] == 0
            text = await scrape(gateway.client)
            assert sample(text, "fieldgate_maintenance_skipped_total") >= 1
            await other.execute("SELECT pg_advisory_unlock($1)", storage_stats.MAINTENANCE_LOCK)
            report = await maintenance.run_exclusive(gateway.settings, wait=False)
            assert report is not None
            assert report.packed.readings == 100
        finally:
            await other.close()

    async def test_the_cli_waits_for_the_lock_and_says_so(
        self, gateway: Gateway, tmp_path: Path
    ) -> None:
        token = await gateway.create_device("d1")
        await post_readings(gateway, "d1", token, spread(now_us() - 2 * DAY, 100))
        other = await asyncpg.connect(gateway.settings.database_url)
        try:
            await other.execute("SELECT pg_advisory_lock($1)", storage_stats.MAINTENANCE_LOCK)
            process = await asyncio.create_subprocess_exec(
                sys.executable, "-c", "from gateway.cli import main; main()", "maintain", "--json",
                cwd=tmp_path,
                env={**os.environ, "FIELDGATE_DATABASE_URL": gateway.settings.database_url,
                     "FIELDGATE_MQTT_URL": "", "FIELDGATE_ADMIN_TOKEN": ADMIN_TOKEN},
                stdout=subprocess.PIPE, stderr=subprocess.PIPE,
            )  # fmt: skip
            assert process.stderr is not None
            said = await asyncio.wait_for(process.stderr.readline(), 30)
            assert b"another maintenance run is in progress" in said
            assert process.returncode is None  # waiting
            await other.execute("SELECT pg_advisory_unlock($1)", storage_stats.MAINTENANCE_LOCK)
            out, _ = await asyncio.wait_for(process.communicate(), 60)
            assert process.returncode == 0
            assert b'"readings": 100' in out
        finally:
            await other.close()


class TestRetention:
    async def test_whole_chunks_expire_by_the_device_or_the_global_setting(
        self, gateway: Gateway
    ) -> None:
        """`short` keeps 2 days (its own, over the global 0 and then 5), `keep` keeps all (its
        own 0 over the global 5), `default` follows the global setting; each has 6,000
        readings days old (keep's in another 7-day partition) and 1,000 one day old."""
        tokens = {
            "short": await gateway.create_device("short"),
            "keep": await gateway.create_device("keep", retention_days=0),
            "default": await gateway.create_device("default"),
        }
        now = now_us()
        for i, (device, token) in enumerate(tokens.items()):
            old = spread(now - (30 if device == "keep" else 12) * DAY, 6_000)
            await post_readings(gateway, device, token, old, seed=i)
        # short's retention set after its old readings were stored (sent with it set, they
        # would have been refused: beyond_retention).
        r = await gateway.client.patch(
            "/api/v1/devices/short", json={"retention_days": 2}, headers=gateway.admin
        )
        assert r.status_code == 200, r.text
        first = await maintenance.run_once(now_us=now, compress_after_us=HOUR, retention_days=0)
        assert first.expired.readings == 6_000  # short's own 2 days, though the global keeps all
        assert first.packed.readings == 2 * 6_000
        # Recent readings come after: a chunk expires whole, once its newest reading has.
        for i, (device, token) in enumerate(tokens.items()):
            await post_readings(gateway, device, token, spread(now - DAY, 1_000), seed=10 + i)
        counts = {d: await _readings(gateway, d) for d in tokens}
        assert counts == {"short": 1_000, "keep": 7_000, "default": 7_000}

        pages_before = await _pages(gateway)
        assert await _partition_of(gateway, now - 12 * DAY) is True  # (always True on SQLite)
        assert await _partition_of(gateway, now - 30 * DAY) is True
        report = await maintenance.run_once(now_us=now, compress_after_us=HOUR, retention_days=5)
        assert report.expired.readings == 6_000  # default's old ones, in whole chunks
        assert report.expired.chunks >= 1
        assert report.packed.readings == 3 * 1_000
        counts = {d: await _readings(gateway, d) for d in tokens}
        assert counts == {"short": 1_000, "keep": 7_000, "default": 1_000}

        if gateway.settings.database_url.startswith("sqlite"):
            # The freed pages went back to the file system (incremental auto-vacuum).
            pages_after = await _pages(gateway)
            assert report.reclaimed_bytes > 0
            assert pages_after[0] < pages_before[0]
            assert pages_after[1] == 0  # no free page left in the file
        else:
            # The partition(s) only default's old chunks were in are dropped; keep's old
            # chunks and everyone's recent ones keep theirs.
            assert report.expired.partitions >= 1
            assert await _partition_of(gateway, now - 12 * DAY) is False
            assert await _partition_of(gateway, now - 30 * DAY) is True

        # Retention changed by PATCH: keep goes back to the global setting (5 days).
        r = await gateway.client.patch(
            "/api/v1/devices/keep", json={"retention_days": None}, headers=gateway.admin
        )
        assert r.status_code == 200, r.text
        assert r.json()["retention_days"] is None
        again = await maintenance.run_once(now_us=now, compress_after_us=HOUR, retention_days=5)
        assert again.expired.readings == 6_000
        assert await _readings(gateway, "keep") == 1_000
        runs = (await storage(gateway))["runs"]
        assert runs["retention"]["result"]["readings"] == 6_000


async def _readings(gw: Gateway, device: str) -> int:
    r = await gw.client.get(f"/api/v1/devices/{device}", headers=gw.admin)
    assert r.status_code == 200, r.text
    return int(r.json()["readings"])


async def _pages(gw: Gateway) -> tuple[int, int]:
    """SQLite: (page_count, freelist_count)."""
    if not gw.settings.database_url.startswith("sqlite"):
        return (0, 0)
    conn = connection()
    pages = int((await fetch(conn, "PRAGMA page_count"))[0][0])
    free = int((await fetch(conn, "PRAGMA freelist_count"))[0][0])
    return pages, free


async def _partition_of(gw: Gateway, ts: int) -> bool:
    """PostgreSQL: whether the partition of `chunk` for `ts` exists (SQLite: True)."""
    if gw.settings.database_url.startswith("sqlite"):
        return True
    name = partition_name(ts // PARTITION_US)
    rows = await fetch(connection(), "SELECT to_regclass(?) IS NOT NULL", (name,))
    return bool(rows[0][0])


@pytest.mark.postgres
def test_maintain_on_a_missing_database_is_two_lines(tmp_path: Path) -> None:
    need_service("PostgreSQL", PG_HOST, PG_PORT)
    url = f"postgres://postgres@{PG_HOST}:{PG_PORT}/fg_missing_maintain"
    done = subprocess.run(
        [sys.executable, "-c", "from gateway.cli import main; main()", "maintain"],
        cwd=tmp_path,
        env={**os.environ, "FIELDGATE_DATABASE_URL": url, "FIELDGATE_MQTT_URL": ""},
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 2
    assert done.stdout == ""
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 2, done.stderr
    assert "fg_missing_maintain" in lines[0]


@pytest.mark.postgres
async def test_a_database_outage_is_recorded_not_logged_each_round(
    private_postgres: PostgresInstance, caplog: pytest.LogCaptureFixture
) -> None:
    """The serve loop meets a stopped database: the outage is told by `database_outage` (a few
    lines), no traceback per round; once the database is back the rounds run again."""
    caplog.set_level(logging.INFO)
    settings = make_settings(private_postgres.url, maintenance_interval_s=0.1)
    async with running(settings) as gw:

        async def value(name: str, labels: dict[str, str] | None = None) -> float:
            return sample(await scrape(gw.client), name, labels)

        async def more(name: str, than: float, labels: dict[str, str] | None = None) -> bool:
            return await value(name, labels) > than

        pack = {"job": "pack"}
        runs = "fieldgate_maintenance_runs_total"
        failed = "fieldgate_maintenance_failed_rounds_total"
        await poll_until(lambda: more(runs, 0, pack), within=20, what="a first round")
        failed_before = await value(failed)
        private_postgres.stop("fast")
        try:
            await poll_until(
                lambda: more(failed, failed_before + 3), within=30, what="three rounds to fail"
            )
            assert database_outage.down
        finally:
            private_postgres.start()
        done = await value(runs, pack)
        await poll_until(lambda: more(runs, done, pack), within=60, what="a round after")

        async def over() -> bool:
            return not database_outage.down

        await poll_until(over, within=30, what="the outage to be over")
    tracebacks = [r for r in caplog.records if r.name == "gateway.maintenance" and r.exc_info]
    assert tracebacks == []
    assert any("the database is unavailable" in r.getMessage() for r in caplog.records)


async def test_readings_beyond_the_retention_are_rejected_not_stored(database_url: str) -> None:
    """A reading older than the device's retention would be dropped by the next run: it is
    refused with beyond_retention (per metric, index -1) and the others are stored; a device's
    own retention wins over the global one both ways, and a PATCH applies at once."""
    settings = make_settings(database_url, retention_days=2)
    async for gateway in start_gateway(settings):
        now = now_us()
        token = await gateway.create_device("ret-global")
        body = [
            {"ts": iso(now - 3 * DAY), "values": {"t": 1.0, "h": 2.0}},
            {"ts": iso(now - 3 * DAY + 1), "values": {"t": 1.5}},
            {"ts": iso(now - DAY), "values": {"t": 3.0}},
        ]
        r = await gateway.post("ret-global", token, body)
        assert r.status_code == 200, r.text
        got = r.json()
        assert got["accepted"] == 1
        assert sorted((x["index"], x["metric"], x["code"]) for x in got["rejected"]) == [
            (-1, "h", "beyond_retention"),
            (-1, "t", "beyond_retention"),
        ]
        assert (
            "2 reading(s) of 't'"
            in next(x for x in got["rejected"] if x["metric"] == "t")["message"]
        )
        # All of a request beyond it: nothing valid.
        r = await gateway.post("ret-global", token, body[:1])
        assert r.status_code == 422
        assert r.json()["error"]["code"] == "no_valid_readings"
        # A device keeping all (0) takes them; a PATCH to 1 day refuses the 1-day-old one.
        token = await gateway.create_device("ret-own", retention_days=0)
        r = await gateway.post("ret-own", token, body)
        assert r.json()["accepted"] == 4
        r = await gateway.client.patch(
            "/api/v1/devices/ret-own", json={"retention_days": 0.5}, headers=gateway.admin
        )
        assert r.status_code == 200, r.text
        r = await gateway.post("ret-own", token, [{"ts": iso(now - DAY + 7), "values": {"t": 9}}])
        assert r.status_code == 422
        assert r.json()["error"]["details"][0]["code"] == "beyond_retention"


def test_a_retention_shorter_than_compress_after_is_refused() -> None:
    """Readings would expire before being packed, row by row: a setting error, not a surprise."""
    from pydantic import ValidationError

    with pytest.raises(ValidationError, match="FIELDGATE_RETENTION_DAYS is shorter"):
        make_settings("sqlite://x.db", retention_days=0.5, compress_after="1d")
    assert make_settings("sqlite://x.db", retention_days=1, compress_after="1d").retention_days == 1
