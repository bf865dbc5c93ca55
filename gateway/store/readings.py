"""The readings repository: the batch insert (hot path) and the raw reads.

A reading is (series_id, ts, value) with ts in UTC epoch microseconds; the primary key
(series_id, ts) makes redelivery idempotent, so an insert ignores duplicates and reports how many
rows it really added.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from itertools import chain, repeat
from typing import Any

import asyncpg
from tortoise.backends.base.client import BaseDBAsyncClient

from gateway.store.database import Dialect, dialect_of
from gateway.store.raw_sql import execute, fetch, sqlite_transaction

SQLITE_INSERT = "INSERT OR IGNORE INTO reading (series_id, ts, value) VALUES (?, ?, ?)"
SQLITE_SEEN = "UPDATE device SET last_seen_us = max(coalesce(last_seen_us, 0), ?) WHERE id = ?"
# PostgreSQL, the usual path: one statement (its own transaction) for the whole commit. `batch`
# keeps the first occurrence of each (series_id, ts) in the commit (duplicates within it), `new`
# drops the rows already stored, and what is left is inserted with a plain INSERT: no
# ON CONFLICT, whose speculative insertion costs more: database CPU per row of 4,000-row
# statements, new rows / all redelivered, 2.33 / 1.25 us with POSTGRES_INSERT, 2.08 / 1.08 with
# this (bench/README.md, "PostgreSQL ingest (issue 10)", also what did not win). Every row of
# `new` is inserted or the statement fails, so counting `new` by part (the index of the request
# in the commit) gives exact per-request counts. The insert runs
# in (series_id, ts) order, so two commits that ever touch the same keys take them in the same
# order. A reading committed by another session after this statement's snapshot fails it with
# unique_violation; `_postgres_insert` then falls back to POSTGRES_INSERT below.
# Rows go in only for series that still exist (`live`, locked against a concurrent delete until
# the commit): a gateway's cached series ids go stale when another instance or the CLI deletes
# the device. `live` comes back as (id, -1) rows, so the caller sees which parts were stale.
# Packed history (issue 10) adds one more anti-join to `new`, for the readings a chunk holds:
#   AND NOT EXISTS (SELECT 1 FROM chunk c WHERE c.series_id = b.series_id
#                   AND b.ts BETWEEN c.first_ts AND c.last_ts AND <b.ts is one of c's>)
# so a redelivered reading of a packed range is counted as a duplicate and not stored again.
POSTGRES_INSERT_NEW = (
    "WITH live AS ("
    " SELECT id FROM series WHERE id = ANY($7::integer[]) FOR KEY SHARE"
    "), batch AS ("
    " SELECT DISTINCT ON (b.series_id, b.ts) b.series_id, b.ts, b.value, b.part"
    " FROM unnest($1::integer[], $2::bigint[], $3::double precision[], $4::integer[])"
    " WITH ORDINALITY AS b(series_id, ts, value, part, n)"
    " WHERE b.series_id IN (SELECT id FROM live)"
    " ORDER BY b.series_id, b.ts, b.n"
    "), new AS ("
    " SELECT * FROM batch b WHERE NOT EXISTS"
    " (SELECT 1 FROM reading r WHERE r.series_id = b.series_id AND r.ts = b.ts)"
    "), added AS ("
    " INSERT INTO reading (series_id, ts, value) SELECT series_id, ts, value FROM new"
    "), seen AS ("
    " UPDATE device SET last_seen_us = v.seen"
    " FROM unnest($5::bigint[], $6::text[]) AS v(seen, id) WHERE device.id = v.id"
    " AND (device.last_seen_us IS NULL OR device.last_seen_us < v.seen)"
    ") SELECT part, count(*) FROM new GROUP BY part"
    " UNION ALL SELECT id, -1 FROM live"
)
# The fallback (a concurrent writer of the same keys), with the same `live` check: ON CONFLICT
# DO NOTHING, and the rows really added per series. A series belongs to one device, and a round
# holds at most one part per device, so the per-series counts add up to exact per-part counts.
POSTGRES_INSERT = (
    "WITH live AS ("
    " SELECT id FROM series WHERE id = ANY($6::integer[]) FOR KEY SHARE"
    "), added AS ("
    " INSERT INTO reading (series_id, ts, value)"
    " SELECT u.* FROM unnest($1::integer[], $2::bigint[], $3::double precision[])"
    " AS u(series_id, ts, value) WHERE u.series_id IN (SELECT id FROM live)"
    " ON CONFLICT DO NOTHING RETURNING series_id"
    "), seen AS ("
    " UPDATE device SET last_seen_us = greatest(coalesce(device.last_seen_us, 0), v.seen)"
    " FROM unnest($4::bigint[], $5::text[]) AS v(seen, id) WHERE device.id = v.id"
    ") SELECT series_id, count(*) FROM added GROUP BY series_id"
    " UNION ALL SELECT id, -1 FROM live"
)
# A part's count when its series no longer exist: nothing of it was stored.
GONE = -1


@dataclass(slots=True)
class Rows:
    """Readings as parallel columns, ready for one insert."""

    series_ids: list[int]
    ts: list[int]
    values: list[float]

    def __len__(self) -> int:
        return len(self.values)


async def insert_batch(
    conn: BaseDBAsyncClient, parts: Sequence[tuple[str, Rows]], seen: dict[str, int]
) -> list[int]:
    """Insert each (device_id, rows) part and mark the devices in `seen` as seen at the given
    time, all in one transaction, committed when this returns. Returns the rows each part really
    added (the rest were duplicates, of stored rows or of an earlier part), or GONE for a part
    whose series no longer exist (none of its rows stored).

    This is the writer's hot path, built to take as few trips to the database as possible: every
    await is a turn of the event loop, which is busy with the HTTP requests of the next commit.
    On PostgreSQL several of these may run at once (the writer's commits in flight), on parts of
    different devices.
    """
    if dialect_of(conn) is Dialect.SQLITE:
        # One call to aiosqlite's thread for BEGIN, the inserts, the update and COMMIT.
        return await sqlite_transaction(conn, _sqlite_insert, parts, seen)
    return await _postgres_insert(conn, parts, seen)


def _sqlite_insert(
    db: sqlite3.Connection, parts: Sequence[tuple[str, Rows]], seen: dict[str, int]
) -> list[int]:
    live = _sqlite_live_series(db, {sid for _, rows in parts for sid in rows.series_ids})
    counts: list[int] = []
    for _, rows in parts:
        if not live.issuperset(rows.series_ids):
            counts.append(GONE)
            continue
        cursor = db.executemany(
            SQLITE_INSERT, zip(rows.series_ids, rows.ts, rows.values, strict=True)
        )
        counts.append(cursor.rowcount)
    if seen:
        db.executemany(SQLITE_SEEN, [(t, d) for d, t in seen.items()])
    return counts


def _sqlite_live_series(db: sqlite3.Connection, series_ids: set[int]) -> set[int]:
    """Those of `series_ids` that still exist (in the write transaction: no delete between)."""
    wanted = list(series_ids)
    live: set[int] = set()
    for i in range(0, len(wanted), 500):
        chunk = wanted[i : i + 500]
        marks = ", ".join("?" * len(chunk))
        live.update(r[0] for r in db.execute(f"SELECT id FROM series WHERE id IN ({marks})", chunk))
    return live


async def _postgres_insert(
    conn: BaseDBAsyncClient, parts: Sequence[tuple[str, Rows]], seen: dict[str, int]
) -> list[int]:
    async with conn.acquire_connection() as raw:
        try:
            return await _postgres_insert_new(raw, parts, seen)
        except asyncpg.UniqueViolationError:
            # Another session committed some of these keys after our snapshot (another gateway
            # process on the same database); the statement was rolled back whole.
            return await _postgres_insert_on_conflict(raw, parts, seen)


async def _postgres_insert_new(
    raw: Any, parts: Sequence[tuple[str, Rows]], seen: dict[str, int]
) -> list[int]:
    if len(parts) == 1:
        rows = parts[0][1]
        series_ids, ts, values = rows.series_ids, rows.ts, rows.values
    else:
        series_ids = list(chain.from_iterable(rows.series_ids for _, rows in parts))
        ts = list(chain.from_iterable(rows.ts for _, rows in parts))
        values = list(chain.from_iterable(rows.values for _, rows in parts))
    part = list(chain.from_iterable(repeat(i, len(rows)) for i, (_, rows) in enumerate(parts)))
    distinct = list(dict.fromkeys(series_ids))
    added = await raw.fetch(
        POSTGRES_INSERT_NEW, series_ids, ts, values, part, list(seen.values()), list(seen), distinct
    )
    counts = [0] * len(parts)
    live: set[int] = set()
    for i, n in added:
        if n == GONE:
            live.add(i)  # a series id, not a part
        else:
            counts[i] = n
    _mark_gone(parts, range(len(parts)), live, counts)
    return counts


def _mark_gone(
    parts: Sequence[tuple[str, Rows]], members: Iterable[int], live: set[int], counts: list[int]
) -> None:
    """GONE for each of `members` whose series are not all `live` (none of its rows went in)."""
    for i in members:
        if not live.issuperset(parts[i][1].series_ids):
            counts[i] = GONE


async def _postgres_insert_on_conflict(
    raw: Any, parts: Sequence[tuple[str, Rows]], seen: dict[str, int]
) -> list[int]:
    # Rounds: the first part of each device, then the second ones, ...; usually just one round,
    # which is one statement (its own transaction).
    rounds: list[list[int]] = []
    depth: dict[str, int] = {}
    for i, (device_id, _) in enumerate(parts):
        k = depth.get(device_id, 0)
        depth[device_id] = k + 1
        if k == len(rounds):
            rounds.append([])
        rounds[k].append(i)
    counts = [0] * len(parts)
    if len(rounds) == 1:
        await _postgres_round(raw, parts, rounds[0], seen, counts)
    else:
        async with raw.transaction():
            for k, members in enumerate(rounds):
                await _postgres_round(raw, parts, members, seen if k == 0 else {}, counts)
    return counts


async def _postgres_round(
    raw: Any,
    parts: Sequence[tuple[str, Rows]],
    members: list[int],
    seen: dict[str, int],
    counts: list[int],
) -> None:
    owner: dict[int, int] = {}
    for i in members:
        owner.update(dict.fromkeys(parts[i][1].series_ids, i))
    if len(members) == 1:
        rows = parts[members[0]][1]
        series_ids, ts, values = rows.series_ids, rows.ts, rows.values
    else:
        series_ids = list(chain.from_iterable(parts[i][1].series_ids for i in members))
        ts = list(chain.from_iterable(parts[i][1].ts for i in members))
        values = list(chain.from_iterable(parts[i][1].values for i in members))
    distinct = list(owner)
    added = await raw.fetch(
        POSTGRES_INSERT, series_ids, ts, values, list(seen.values()), list(seen.keys()), distinct
    )
    live: set[int] = set()
    for series_id, n in added:
        if n == GONE:
            live.add(series_id)
        else:
            counts[owner[series_id]] += n
    _mark_gone(parts, members, live, counts)


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


async def delete_series_readings(conn: BaseDBAsyncClient, series_ids: Sequence[int]) -> int:
    if not series_ids:
        return 0
    marks = ", ".join("?" * len(series_ids))
    return await execute(conn, f"DELETE FROM reading WHERE series_id IN ({marks})", series_ids)
