"""The commit log (migrations/0009_commit_log.py): what each writer commit added, written in its
transaction, read by the live streams (gateway/live.py).

A row's `points` is JSON: `[[device_id, [series_id, ...], [ts, ...], [value, ...]], ...]`, a
part (one request, or the readings of one device) per entry, holding only readings the commit
really added: duplicates, readings of deleted series and readings a chunk already holds are
left out, so a stream never shows a reading twice or one that was not stored.

Ids follow commit order, which is what lets a stream resume from an id: on PostgreSQL every
commit that logs takes the transaction-level advisory lock LOCK_KEY right before its log row
gets its id, and holds it until it commits; the lock is the last one a commit takes (after its
readings are in), so it never waits for anything while holding it. SQLite has one writer.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Sequence
from typing import Any

import orjson
from tortoise.backends.base.client import BaseDBAsyncClient

from gateway.store.raw_sql import execute, fetch

# pg_advisory_xact_lock's key: "fieldlog" in ASCII, a constant no other lock of ours uses.
LOCK_KEY = 0x6669656C646C6F67

# (device_id, series_ids, ts, values): the readings of one part that a commit added.
Part = tuple[str, list[int], list[int], list[float]]

SQLITE_LOG = "INSERT INTO commit_log (at_us, points) VALUES (?, ?)"
POSTGRES_LOG = (
    "WITH lk AS (SELECT pg_advisory_xact_lock($1::bigint))"
    " INSERT INTO commit_log (at_us, points) SELECT $2, $3 FROM lk"
)
# The CTE POSTGRES_INSERT_NEW ends with when the commit logs (gateway/store/readings.py). When
# the statement added every row it was given (`$9`, the usual case), the points are the JSON
# the writer built (`$10`, no per-row work in the database); else they are built from `new`,
# the rows that went in. The lock is taken after `added` has run (its rows are inserted), so a
# commit holding it never waits for another's rows. `$8`: the commit's time, `$11`: each part's
# device id.
POSTGRES_NEW_LOGGED = (
    "), logged AS ("
    " INSERT INTO commit_log (at_us, points)"
    " SELECT $8, CASE WHEN (SELECT count(*) FROM new) = $9 THEN $10 ELSE ("
    "  SELECT json_agg(json_build_array(($11::text[])[g.part + 1], g.s, g.t, g.v)"
    "  ORDER BY g.part)::text FROM (SELECT part, array_agg(series_id ORDER BY series_id, ts) s,"
    "  array_agg(ts ORDER BY series_id, ts) t, array_agg(value ORDER BY series_id, ts) v"
    "  FROM new GROUP BY part) g) END"
    f" FROM (SELECT pg_advisory_xact_lock({LOCK_KEY}) FROM (SELECT count(*) FROM added) a) lk"
    " WHERE EXISTS (SELECT 1 FROM new)"
)


def encode(parts: Sequence[Part]) -> str:
    """The `points` of a log row."""
    return orjson.dumps(parts).decode()


def decode(points: str | bytes) -> list[Part]:
    out: list[Part] = orjson.loads(points)
    return out


def sqlite_log(db: sqlite3.Connection, at_us: int, parts: Sequence[Part]) -> None:
    """Log `parts` in the SQLite write transaction that added them (nothing if they are empty)."""
    if any(part[1] for part in parts):
        db.execute(SQLITE_LOG, (at_us, encode([p for p in parts if p[1]])))


async def postgres_log(raw: Any, at_us: int, parts: Sequence[Part]) -> None:
    """Log `parts` on the asyncpg connection `raw`, inside the transaction that added them and as
    its last statement (nothing if they are empty)."""
    kept = [p for p in parts if p[1]]
    if kept:
        await raw.execute(POSTGRES_LOG, LOCK_KEY, at_us, encode(kept))


async def read_after(
    conn: BaseDBAsyncClient, after_id: int, limit: int
) -> list[tuple[int, list[Part]]]:
    """Up to `limit` log rows with id > `after_id`, in id (commit) order."""
    rows = await fetch(
        conn,
        "SELECT id, points FROM commit_log WHERE id > ? ORDER BY id LIMIT ?",
        (after_id, limit),
    )
    return [(int(r[0]), decode(r[1])) for r in rows]


async def bounds(conn: BaseDBAsyncClient) -> tuple[int, int]:
    """(oldest id, newest id) kept in the log; (0, 0) when it is empty."""
    rows = await fetch(conn, "SELECT coalesce(min(id), 0), coalesce(max(id), 0) FROM commit_log")
    return int(rows[0][0]), int(rows[0][1])


async def newest_id(conn: BaseDBAsyncClient) -> int:
    """The id of the newest committed log row (0: none): every commit up to it is visible."""
    rows = await fetch(conn, "SELECT coalesce(max(id), 0) FROM commit_log")
    return int(rows[0][0])


async def prune(conn: BaseDBAsyncClient, before_us: int) -> int:
    """Delete log rows older than `before_us`, except the newest (it tells where the log stands
    when nothing newer came); the number deleted."""
    return await execute(
        conn,
        "DELETE FROM commit_log WHERE at_us < ? AND id < (SELECT max(id) FROM commit_log)",
        (before_us,),
    )
