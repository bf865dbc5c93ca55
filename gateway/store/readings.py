"""The readings repository: the batch insert (hot path) and the raw reads.

A reading is (series_id, ts, value) with ts in UTC epoch microseconds; the primary key
(series_id, ts) makes redelivery idempotent, so an insert ignores duplicates and reports how many
rows it really added.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from tortoise.backends.base.client import BaseDBAsyncClient

from gateway.store.database import Dialect, dialect_of
from gateway.store.sql import execute, fetch, status_count

SQLITE_INSERT = "INSERT OR IGNORE INTO reading (series_id, ts, value) VALUES (?, ?, ?)"
POSTGRES_INSERT = (
    "INSERT INTO reading (series_id, ts, value)"
    " SELECT * FROM unnest($1::integer[], $2::bigint[], $3::double precision[])"
    " ON CONFLICT DO NOTHING"
)
SQLITE_SEEN = "UPDATE device SET last_seen_us = max(coalesce(last_seen_us, 0), ?) WHERE id = ?"
POSTGRES_SEEN = (
    "UPDATE device SET last_seen_us = greatest(coalesce(device.last_seen_us, 0), v.seen)"
    " FROM unnest($1::bigint[], $2::text[]) AS v(seen, id) WHERE device.id = v.id"
)


@dataclass(slots=True)
class Rows:
    """Readings as parallel columns, ready for one insert."""

    series_ids: list[int]
    ts: list[int]
    values: list[float]

    def __len__(self) -> int:
        return len(self.values)


async def insert_batch(
    tx: BaseDBAsyncClient, parts: Sequence[Rows], seen: dict[str, int]
) -> list[int]:
    """Insert each part (one statement each, all in the caller's transaction `tx`) and mark the
    devices in `seen` as seen at the given time. Returns the rows each part really added."""
    dialect = dialect_of(tx)
    inserted: list[int] = []
    async with tx.acquire_connection() as raw:
        if dialect is Dialect.SQLITE:
            for part in parts:
                cursor = await raw.executemany(
                    SQLITE_INSERT, list(zip(part.series_ids, part.ts, part.values, strict=True))
                )
                inserted.append(int(cursor.rowcount))
                await cursor.close()
            if seen:
                await raw.executemany(SQLITE_SEEN, [(t, d) for d, t in seen.items()])
        else:
            for part in parts:
                status = await raw.execute(POSTGRES_INSERT, part.series_ids, part.ts, part.values)
                inserted.append(status_count(status))
            if seen:
                await raw.execute(POSTGRES_SEEN, list(seen.values()), list(seen.keys()))
    return inserted


async def select_raw(
    conn: BaseDBAsyncClient, series_id: int, start_us: int, end_us: int, limit: int
) -> list[tuple[int, float]]:
    """Readings of one series with start <= ts < end, in time order, at most `limit`."""
    rows = await fetch(
        conn,
        "SELECT ts, value FROM reading WHERE series_id = ? AND ts >= ? AND ts < ?"
        " ORDER BY ts LIMIT ?",
        (series_id, start_us, end_us, limit),
    )
    return [(int(r[0]), float(r[1])) for r in rows]


async def select_latest(conn: BaseDBAsyncClient, device_id: str) -> list[tuple[str, int, float]]:
    """(metric, ts, value) of the newest reading of each of a device's series."""
    rows = await fetch(
        conn,
        "SELECT s.metric, r.ts, r.value FROM series s JOIN reading r ON r.series_id = s.id"
        " AND r.ts = (SELECT max(ts) FROM reading WHERE series_id = s.id)"
        " WHERE s.device_id = ? ORDER BY s.metric",
        (device_id,),
    )
    return [(str(r[0]), int(r[1]), float(r[2])) for r in rows]


async def series_stats(conn: BaseDBAsyncClient, device_ids: Sequence[str]) -> dict[str, Any]:
    """Per device: {metric: {"count": n, "first_ts": us, "last_ts": us}}."""
    if not device_ids:
        return {}
    marks = ", ".join("?" * len(device_ids))
    rows = await fetch(
        conn,
        "SELECT s.device_id, s.metric, count(r.ts), min(r.ts), max(r.ts) FROM series s"
        f" LEFT JOIN reading r ON r.series_id = s.id WHERE s.device_id IN ({marks})"
        " GROUP BY s.device_id, s.metric",
        list(device_ids),
    )
    out: dict[str, Any] = {}
    for device_id, metric, count, first, last in rows:
        out.setdefault(device_id, {})[metric] = {
            "count": int(count),
            "first_ts": first,
            "last_ts": last,
        }
    return out


async def delete_device_readings(conn: BaseDBAsyncClient, device_id: str) -> int:
    """Readings have no foreign key (it would cost every insert), so deletes go through here."""
    return await execute(
        conn,
        "DELETE FROM reading WHERE series_id IN (SELECT id FROM series WHERE device_id = ?)",
        (device_id,),
    )
