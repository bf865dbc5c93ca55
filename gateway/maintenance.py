"""The maintenance job: retention, packing and space reclaim (`run_once`), one instance at a
time (`run_exclusive`).

`fieldgate maintain` runs it once and prints the report; `serve` runs it every
FIELDGATE_MAINTENANCE_INTERVAL_S (gateway/app.py). Its steps are small transactions (one
series, at most `max_rows` readings: gateway/store/packed.py), so the writer never waits for
more than one, and a gateway that stops ends the run between two steps.

Order: retention first (nothing is packed only to be dropped), then packing of every reading
timed before `now - compress_after` (rounded down to the hour, so an hour is packed once it has
passed), then space reclaim. Each job's start, duration and result are kept in the
`maintenance_run` table (the last run of each: GET /api/v1/storage, from any instance) and
counted in /metrics.

Several gateways on one PostgreSQL database: the job runs under an advisory lock
(gateway/store/storage_stats.py); a gateway that finds it taken skips that round. One gateway
with `serve --workers N` runs it in worker 0 only (gateway/app.py): SQLite has no such lock.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import asdict, dataclass, field
from typing import Any, TypeVar

from gateway import metrics, timespec
from gateway.outage import database_outage
from gateway.settings import Settings, compress_after_us
from gateway.store import packed as store
from gateway.store import storage_stats
from gateway.store.database import connection

log = logging.getLogger(__name__)

HOUR_US = 3_600_000_000
JOBS = ("retention", "pack", "reclaim")
# `serve`'s packing rests 19x as long as each step took: at most a twentieth of the writer's
# database time (SQLite) and of the event loop goes to a backlog, so ingest keeps 0.9x of its
# rate while one is packed (bench/storage.py's +maint databases: at 9x it kept 0.85x on SQLite);
# `fieldgate maintain` rests only on SQLite (gateway/cli.py).
SERVE_PAUSE = 19.0
T = TypeVar("T")


@dataclass(slots=True)
class Report:
    packed: store.Packed = field(default_factory=store.Packed)
    expired: store.Expired = field(default_factory=store.Expired)
    reclaimed_bytes: int = 0
    series_packed: int = 0
    took_ms: dict[str, float] = field(default_factory=dict)
    stopped: bool = False  # the gateway stopped during the run: packing ended early

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def pack_cutoff(now_us: int, compress_after_us: int) -> int:
    """Readings timed before this are packed: `now - compress_after`, down to the hour."""
    edge = now_us - compress_after_us
    return edge - edge % HOUR_US


async def pack(
    before_us: int,
    *,
    max_rows: int = 10_000,
    stop: asyncio.Event | None = None,
    pause: float = 0.0,
) -> tuple[store.Packed, int]:
    """Pack every series' readings timed before `before_us`; (what was packed, series).
    Ends between two steps once `stop` is set. After each step it waits `pause` times as long
    as the step took, so a backlog is packed at a bounded share of the database (SQLite's one
    connection is the writer's too) and of the event loop."""
    conn = connection()
    total = store.Packed()
    series = await store.series_with_readings_before(conn, before_us)
    done = 0
    for series_id in series:
        while stop is None or not stop.is_set():
            t = time.perf_counter()
            step = await store.pack_series(conn, series_id, before_us, max_rows=max_rows)
            total.add(step)
            metrics.READINGS_PACKED.inc(step.readings)
            metrics.CHUNKS_WRITTEN.inc(step.chunks_written)
            if pause and step.readings:
                await _rest(pause * (time.perf_counter() - t), stop)
            if not step.more(max_rows):
                done += 1
                break
    return total, done


async def _rest(seconds: float, stop: asyncio.Event | None) -> None:
    if stop is None:
        await asyncio.sleep(seconds)
        return
    with contextlib.suppress(TimeoutError):
        await asyncio.wait_for(stop.wait(), seconds)


async def _job(
    name: str, work: Callable[[], Awaitable[T]], result: Callable[[T], Any]
) -> tuple[T, float]:
    """Run one job, timed (its outcome and milliseconds), and keep its start, duration and
    result in `maintenance_run` (an error as `{"error": ...}` when it failed, if the database
    still answers)."""
    started_us = timespec.now_us()
    t = time.perf_counter()
    try:
        out = await work()
    except Exception as exc:
        took_ms = (time.perf_counter() - t) * 1000
        metrics.MAINTENANCE_FAILURES.labels(name).inc()
        with contextlib.suppress(Exception):
            error = {"error": f"{type(exc).__name__}: {exc}"[:300]}
            await storage_stats.record_run(connection(), name, started_us, took_ms, error)
        raise
    took_ms = (time.perf_counter() - t) * 1000
    await storage_stats.record_run(connection(), name, started_us, took_ms, result(out))
    metrics.MAINTENANCE_RUNS.labels(name).inc()
    metrics.MAINTENANCE_LAST_RUN.labels(name).set(started_us / 1e6)
    metrics.MAINTENANCE_DURATION.labels(name).set(took_ms / 1000)
    return out, took_ms


async def run_once(
    *,
    now_us: int,
    compress_after_us: int,
    retention_days: float,
    max_rows: int = 10_000,
    stop: asyncio.Event | None = None,
    pause: float = 0.0,
) -> Report:
    """Retention, packing and reclaim, once; what each did and how long it took (also kept
    in `maintenance_run`)."""
    conn = connection()
    report = Report()
    report.expired, report.took_ms["retention"] = await _job(
        "retention", lambda: store.expire(conn, now_us, retention_days), asdict
    )
    metrics.RETENTION_DROPPED_READINGS.inc(report.expired.readings)
    metrics.RETENTION_DROPPED_CHUNKS.inc(report.expired.chunks)
    metrics.PARTITIONS_DROPPED.inc(report.expired.partitions)
    cutoff = pack_cutoff(now_us, compress_after_us)
    (report.packed, report.series_packed), report.took_ms["pack"] = await _job(
        "pack",
        lambda: pack(cutoff, max_rows=max_rows, stop=stop, pause=pause),
        lambda out: {**asdict(out[0]), "series": out[1], "before_us": cutoff},
    )
    report.stopped = stop is not None and stop.is_set()
    report.reclaimed_bytes, report.took_ms["reclaim"] = await _job(
        "reclaim", lambda: store.reclaim(conn, rows_moved=report.packed.readings), _bytes
    )
    metrics.RECLAIMED_BYTES.inc(report.reclaimed_bytes)
    return report


def _bytes(n: int) -> dict[str, int]:
    return {"bytes": n}


async def run_exclusive(
    settings: Settings, *, wait: bool, stop: asyncio.Event | None = None, pause: float = 0.0
) -> Report | None:
    """`run_once` now, under the maintenance lock (PostgreSQL): None when another run holds
    it and `wait` is false. The storage gauges in /metrics are set afterwards."""
    async with storage_stats.maintenance_lock(connection(), wait=wait) as held:
        if not held:
            metrics.MAINTENANCE_SKIPPED.inc()
            return None
        report = await run_once(
            now_us=timespec.now_us(),
            compress_after_us=compress_after_us(settings),
            retention_days=settings.retention_days,
            stop=stop,
            pause=pause,
        )
    await storage_figures()
    return report


async def storage_figures() -> storage_stats.StorageFigures:
    """What the store holds now (GET /api/v1/storage); sets the storage gauges from it."""
    figures = await storage_stats.storage_figures(connection())
    metrics.STORED_READINGS.labels("unpacked").set(figures.unpacked)
    metrics.STORED_READINGS.labels("packed").set(figures.packed)
    metrics.STORED_CHUNKS.set(figures.chunks)
    for part in ("total", "readings", "chunks", "series", "free", "wal"):
        value = getattr(figures.bytes, part)
        if value is not None:
            metrics.STORAGE_BYTES.labels(part).set(value)
    age_s = (
        (timespec.now_us() - figures.oldest_unpacked_us) / 1e6
        if figures.oldest_unpacked_us is not None
        else 0.0
    )
    metrics.OLDEST_UNPACKED_AGE.set(max(0.0, age_s))
    return figures


async def run_every(settings: Settings, stop: asyncio.Event) -> None:
    """`serve`'s maintenance: `run_exclusive` every FIELDGATE_MAINTENANCE_INTERVAL_S (the
    first one interval after the start) until `stop`; a round another instance holds the lock
    for is skipped. A database outage is reported to `database_outage`, not logged each time.

    Stopped by the event, not cancelled: a cancelled query would leave aiosqlite's thread
    answering a loop that may be closed by then; a run in progress ends after its current
    step."""
    every_s = settings.maintenance_interval_s
    while not stop.is_set():
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), every_s)
        if stop.is_set():
            break
        try:
            report = await run_exclusive(settings, wait=False, stop=stop, pause=SERVE_PAUSE)
        except Exception as exc:
            metrics.MAINTENANCE_FAILED_ROUNDS.inc()
            if not database_outage.record(exc):
                log.exception("the maintenance job failed; trying again in %.0f s", every_s)
            continue
        if report is None:
            log.debug("another instance is running the maintenance job; skipping this round")
        elif report.packed.readings or report.expired.readings:
            log.info(
                "maintenance: packed %d readings, expired %d", report.packed.readings,
                report.expired.readings,
            )  # fmt: skip
