"""What the store holds and what maintenance did: the figures of GET /api/v1/storage and of
the storage gauges in /metrics, the `maintenance_run` record (one row per job, the last run),
the PostgreSQL advisory lock that lets one maintenance run at a time, and SQLite's one-off
rewrite to incremental auto-vacuum (`fieldgate maintain --vacuum`).

Every figure is read from the database, so each instance sharing it answers the same.
"""

from __future__ import annotations

import contextlib
import json
import os
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any, Final

from tortoise.backends.base.client import BaseDBAsyncClient

from gateway.store.database import Dialect, dialect_of
from gateway.store.raw_sql import execute, fetch

# The advisory lock key of the maintenance job (PostgreSQL): "fgmaint" in ASCII.
MAINTENANCE_LOCK: Final = 0x66676D61696E74


@dataclass(slots=True)
class StoredBytes:
    total: int  # the database's size on disk (SQLite: file + WAL; PostgreSQL: the tables below)
    readings: int | None  # the `reading` table with its index (PostgreSQL only)
    chunks: int  # the chunks: every partition on PostgreSQL; their rows' bytes on SQLite
    series: int | None  # PostgreSQL only
    free: int | None  # SQLite: free pages in the file (reused, or returned by reclaim)
    wal: int | None  # SQLite: the write-ahead log's size


@dataclass(slots=True)
class StorageFigures:
    dialect: str
    unpacked: int  # rows of `reading`
    packed: int  # readings held in chunks
    chunks: int
    series: int
    bytes: StoredBytes
    oldest_unpacked_us: int | None
    packed_until_min_us: int | None  # the least of the series' packed watermarks
    packed_until_max_us: int | None
    runs: dict[str, Run] = field(default_factory=dict)


@dataclass(slots=True)
class Run:
    job: str
    started_us: int
    took_ms: float
    result: dict[str, Any]


async def storage_figures(conn: BaseDBAsyncClient) -> StorageFigures:
    """Readings unpacked and packed, chunks, bytes on disk, the packing watermarks, the last
    run of each maintenance job."""
    (row,) = await fetch(
        conn,
        "SELECT (SELECT count(*) FROM reading),"
        " (SELECT coalesce(sum(n), 0) FROM chunk), (SELECT count(*) FROM chunk),"
        " (SELECT count(*) FROM series),"
        " (SELECT min(packed_until_us) FROM series), (SELECT max(packed_until_us) FROM series)",
    )
    # The oldest unpacked reading: one probe of the (series_id, ts) key per series, where a
    # plain min(ts) would read every row.
    (oldest,) = await fetch(
        conn,
        "SELECT min((SELECT min(ts) FROM reading r WHERE r.series_id = s.id)) FROM series s",
    )
    dialect = dialect_of(conn)
    stored = await (_sqlite_bytes(conn) if dialect is Dialect.SQLITE else _postgres_bytes(conn))
    return StorageFigures(
        dialect=dialect.value,
        unpacked=int(row[0]),
        packed=int(row[1]),
        chunks=int(row[2]),
        series=int(row[3]),
        bytes=stored,
        oldest_unpacked_us=_int_or_none(oldest[0]),
        packed_until_min_us=_int_or_none(row[4]),
        packed_until_max_us=_int_or_none(row[5]),
        runs=await last_runs(conn),
    )


def _int_or_none(value: Any) -> int | None:
    return None if value is None else int(value)


async def _sqlite_bytes(conn: BaseDBAsyncClient) -> StoredBytes:
    page_size = int((await fetch(conn, "PRAGMA page_size"))[0][0])
    pages = int((await fetch(conn, "PRAGMA page_count"))[0][0])
    free = int((await fetch(conn, "PRAGMA freelist_count"))[0][0])
    files = await fetch(conn, "PRAGMA database_list")
    path = next((str(r[2]) for r in files if r[1] == "main"), "")
    wal = _file_size(path + "-wal") if path else 0
    # The chunks' encoded bytes, every blob column's (a blob's length is in its record header:
    # no overflow page is read); SQLite's dbstat table, which would give pages, is not in every
    # build and reads every page.
    columns = [str(r[1]) for r in await fetch(conn, "PRAGMA table_info(chunk)") if r[2] == "BLOB"]
    lengths = " + ".join(f"coalesce(length({c}), 0)" for c in columns) or "0"
    (chunk_bytes,) = await fetch(conn, f"SELECT coalesce(sum({lengths}), 0) FROM chunk")
    return StoredBytes(
        total=pages * page_size + wal,
        readings=None,
        chunks=int(chunk_bytes[0]),
        series=None,
        free=free * page_size,
        wal=wal,
    )


def _file_size(path: str) -> int:
    """A file's size; 0 if there is none (a stat: no wait worth a thread)."""
    try:
        return os.stat(path).st_size
    except FileNotFoundError:
        return 0


async def _postgres_bytes(conn: BaseDBAsyncClient) -> StoredBytes:
    (row,) = await fetch(
        conn,
        "SELECT pg_total_relation_size('reading'),"
        " (SELECT coalesce(sum(pg_total_relation_size(relid)), 0)"
        "  FROM pg_partition_tree('chunk')),"
        " pg_total_relation_size('series')",
    )
    readings, chunks, series = int(row[0]), int(row[1]), int(row[2])
    return StoredBytes(
        total=readings + chunks + series,
        readings=readings,
        chunks=chunks,
        series=series,
        free=None,
        wal=None,
    )


# The record of maintenance runs.


async def record_run(
    conn: BaseDBAsyncClient, job: str, started_us: int, took_ms: float, result: dict[str, Any]
) -> None:
    """Keep this as the last run of `job` (one row per job, replaced)."""
    await execute(
        conn,
        "INSERT INTO maintenance_run (job, started_us, took_ms, result) VALUES (?, ?, ?, ?)"
        " ON CONFLICT (job) DO UPDATE SET started_us = excluded.started_us,"
        " took_ms = excluded.took_ms, result = excluded.result",
        (job, started_us, took_ms, json.dumps(result, separators=(",", ":"))),
    )


async def last_runs(conn: BaseDBAsyncClient) -> dict[str, Run]:
    """The last run of each job that ever ran, by job."""
    rows = await fetch(conn, "SELECT job, started_us, took_ms, result FROM maintenance_run")
    return {str(r[0]): Run(str(r[0]), int(r[1]), float(r[2]), json.loads(str(r[3]))) for r in rows}


# One maintenance run at a time (PostgreSQL).


@asynccontextmanager
async def maintenance_lock(conn: BaseDBAsyncClient, *, wait: bool) -> AsyncIterator[bool]:
    """Hold the maintenance job's advisory lock for the block: yields whether it is held.

    A session-level lock on a connection of its own, taken from the pool for the block, so the
    job's own statements (on other connections, in transactions of their own) do not hold it
    and a lost connection releases it. `wait`: wait for another holder to finish; else yield
    False at once when it is taken. SQLite has no such lock and needs none for correctness
    (every step of the job takes the write lock): yields True."""
    if dialect_of(conn) is Dialect.SQLITE:
        yield True
        return
    async with conn.acquire_connection() as raw:
        if wait:
            await raw.execute("SELECT pg_advisory_lock($1)", MAINTENANCE_LOCK)
            held = True
        else:
            held = bool(await raw.fetchval("SELECT pg_try_advisory_lock($1)", MAINTENANCE_LOCK))
        try:
            yield held
        finally:
            # Released here; and by asyncpg's reset of a connection going back to its pool
            # (pg_advisory_unlock_all) if this fails, so no pooled connection keeps it.
            if held:
                with contextlib.suppress(Exception):
                    await raw.execute("SELECT pg_advisory_unlock($1)", MAINTENANCE_LOCK)


# SQLite's one-off rewrite.


async def sqlite_auto_vacuum(conn: BaseDBAsyncClient) -> str:
    """SQLite's auto-vacuum mode: none, full or incremental."""
    mode = int((await fetch(conn, "PRAGMA auto_vacuum"))[0][0])
    return {0: "none", 1: "full", 2: "incremental"}.get(mode, str(mode))


async def sqlite_rewrite_incremental(conn: BaseDBAsyncClient) -> int:
    """Rewrite the SQLite file with incremental auto-vacuum (`VACUUM`, which locks the database
    while it runs); the bytes the file shrank by."""
    async with conn.acquire_connection() as raw:
        before = await _file_bytes(raw)
        await raw.execute("PRAGMA auto_vacuum = INCREMENTAL")
        await raw.execute("VACUUM")
        return before - await _file_bytes(raw)


async def _file_bytes(raw: Any) -> int:
    cursor = await raw.execute("PRAGMA page_count")
    pages = (await cursor.fetchone())[0]
    cursor = await raw.execute("PRAGMA page_size")
    size = (await cursor.fetchone())[0]
    return int(pages) * int(size)
