"""The readings repository: the batch insert (hot path) and the raw reads.

A reading is (series_id, ts, value) with ts in UTC epoch microseconds; the primary key
(series_id, ts) makes redelivery idempotent, so an insert ignores duplicates and reports how many
rows it really added.
"""

from __future__ import annotations

import heapq
import sqlite3
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from itertools import chain, repeat
from typing import Any

import asyncpg
import orjson
from tortoise.backends.base.client import BaseDBAsyncClient

from gateway.store import commit_log, packed
from gateway.store.commit_log import Part
from gateway.store.database import Dialect, dialect_of
from gateway.store.raw_sql import execute, fetch, read_snapshot, sqlite_transaction

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
# Packed history (issue 10): a reading timed at or before its series' packed watermark
# (`packed_until_us`, returned with `live`) may be in a chunk, which SQL cannot look into: such
# readings are left out here and checked against the chunks by `_postgres_late`.
# Appends skip the lookup: a row timed after its series' newest row in `reading` (`newest`, one
# backward index probe a series, in the statement's snapshot like the NOT EXISTS) cannot be
# among the rows the lookup would see; only older rows are looked up. Database CPU per row of
# 3,000-row appends, median 4.0 -> 3.3 us; redelivered rows cost up to ~0.9 us more
# (bench/README.md, same section).
# The four columns go as array literals (`_pg_array`), not as binary arrays: asyncpg's array
# encoder checks every element against collections.abc (an ABC isinstance call each), which
# cost the event loop 1.1-1.9 us a reading; the literals cost it ~0.3 and the database ~0.1-0.3
# more to parse (bench/README.md, "PostgreSQL ingest (issue 10)", "At storage.py's shape").
_NEW_HEAD = (
    "WITH live AS ("
    " SELECT id, coalesce(packed_until_us, -1) AS pu,"
    " coalesce((SELECT max(r.ts) FROM reading r WHERE r.series_id = s.id), -1) AS newest"
    " FROM series s WHERE id = ANY($7::integer[]) FOR KEY SHARE"
    "), batch AS ("
    " SELECT DISTINCT ON (b.series_id, b.ts) b.series_id, b.ts, b.value, b.part, l.newest"
    " FROM unnest($1::text::integer[], $2::text::bigint[], $3::text::double precision[],"
    " $4::text::integer[]) WITH ORDINALITY AS b(series_id, ts, value, part, n)"
    " JOIN live l ON l.id = b.series_id WHERE b.ts > l.pu"
    " ORDER BY b.series_id, b.ts, b.n"
    "), new AS ("
    " SELECT * FROM batch b WHERE b.ts > b.newest OR NOT EXISTS"
    " (SELECT 1 FROM reading r WHERE r.series_id = b.series_id AND r.ts = b.ts)"
    "), added AS ("
    " INSERT INTO reading (series_id, ts, value) SELECT series_id, ts, value FROM new"
)
_NEW_TAIL = (
    "), seen AS ("
    " UPDATE device SET last_seen_us = v.seen"
    " FROM unnest($5::bigint[], $6::text[]) AS v(seen, id) WHERE device.id = v.id"
    " AND (device.last_seen_us IS NULL OR device.last_seen_us < v.seen)"
    ") SELECT part, count(*), 0::bigint FROM new GROUP BY part"
    " UNION ALL SELECT id, -1, pu FROM live"
)
POSTGRES_INSERT_NEW = _NEW_HEAD + _NEW_TAIL
# The same, writing the commit log row too (live streams: gateway/store/commit_log.py).
POSTGRES_INSERT_NEW_LOGGED = _NEW_HEAD + " RETURNING 1" + commit_log.POSTGRES_NEW_LOGGED + _NEW_TAIL
# The fallback (a concurrent writer of the same keys), with the same `live` check: ON CONFLICT
# DO NOTHING, and the rows really added per series. A series belongs to one device, and a round
# holds at most one part per device, so the per-series counts add up to exact per-part counts.
# `live` is locked FOR SHARE here, which waits for a packing step of the series (and makes the
# next one wait): ON CONFLICT looks at the rows committed when it gets to each one, not at the
# statement's snapshot, so a reading the packer moved into a chunk meanwhile would be no
# conflict and be stored again. (The usual statement above is safe with FOR KEY SHARE: its
# NOT EXISTS reads the snapshot, where a reading packed since is still a row.) In id order, as
# `_postgres_late` locks them, so the two never wait on each other in a cycle.
_ON_CONFLICT = (
    "WITH live AS ("
    " SELECT id, coalesce(packed_until_us, -1) AS pu FROM series WHERE id = ANY($6::integer[])"
    " ORDER BY id FOR SHARE"
    "), added AS ("
    " INSERT INTO reading (series_id, ts, value)"
    " SELECT u.* FROM unnest($1::integer[], $2::bigint[], $3::double precision[])"
    " AS u(series_id, ts, value) JOIN live l ON l.id = u.series_id WHERE u.ts > l.pu"
    " ON CONFLICT DO NOTHING RETURNING {returning}"
    "), seen AS ("
    " UPDATE device SET last_seen_us = greatest(coalesce(device.last_seen_us, 0), v.seen)"
    " FROM unnest($4::bigint[], $5::text[]) AS v(seen, id) WHERE device.id = v.id"
    ") SELECT series_id, count(*), 0::bigint{rows} FROM added GROUP BY series_id"
    " UNION ALL SELECT id, -1, pu{none} FROM live"
)
POSTGRES_INSERT = _ON_CONFLICT.format(returning="series_id", rows="", none="")
# The same, with the rows each series really added as JSON `[[ts, ...], [value, ...]]`, for the
# commit log.
POSTGRES_INSERT_ROWS = _ON_CONFLICT.format(
    returning="series_id, ts, value",
    rows=", json_build_array(array_agg(ts), array_agg(value))::text",
    none=", NULL",
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
    conn: BaseDBAsyncClient,
    parts: Sequence[tuple[str, Rows]],
    seen: dict[str, int],
    log_at_us: int | None = None,
) -> list[int]:
    """Insert each (device_id, rows) part and mark the devices in `seen` as seen at the given
    time, all in one transaction, committed when this returns. Returns the rows each part really
    added (the rest were duplicates, of stored rows or of an earlier part), or GONE for a part
    whose series no longer exist (none of its rows stored). With `log_at_us`, the rows really
    added are also written to the commit log (gateway/store/commit_log.py) in the transaction
    that adds them, timed `log_at_us`.

    This is the writer's hot path, built to take as few trips to the database as possible: every
    await is a turn of the event loop, which is busy with the HTTP requests of the next commit.
    On PostgreSQL several of these may run at once (the writer's commits in flight), on parts of
    different devices.
    """
    if dialect_of(conn) is Dialect.SQLITE:
        # One call to aiosqlite's thread for BEGIN, the inserts, the update and COMMIT.
        return await sqlite_transaction(conn, _sqlite_insert, parts, seen, log_at_us)
    return await _postgres_insert(conn, parts, seen, log_at_us)


def _sqlite_insert(
    db: sqlite3.Connection,
    parts: Sequence[tuple[str, Rows]],
    seen: dict[str, int],
    log_at_us: int | None,
) -> list[int]:
    series = {sid for _, rows in parts for sid in rows.series_ids}
    marks = _sqlite_live_series(db, series)
    counts = _sqlite_insert_whole(db, parts, marks, series)
    logged: list[Part] | None = None if log_at_us is None else []
    if counts is None:
        counts = _sqlite_insert_parts(db, parts, marks, logged)
    elif logged is not None:  # every row of every part went in
        logged = [(d, rows.series_ids, rows.ts, rows.values) for d, rows in parts]
    if seen:
        db.executemany(SQLITE_SEEN, [(t, d) for d, t in seen.items()])
    if logged is not None and log_at_us is not None:
        commit_log.sqlite_log(db, log_at_us, logged)
    return counts


def _sqlite_insert_whole(
    db: sqlite3.Connection,
    parts: Sequence[tuple[str, Rows]],
    marks: dict[int, int],
    series: set[int],
) -> list[int] | None:
    """The usual commit as one statement: every series still there, no reading at or before a
    packed watermark, and every row new; then each part added all its rows. Else None, with
    nothing changed (the statement is undone to its savepoint), for `_sqlite_insert_parts`.

    A statement per part (to count each part's rows) cost the database thread ~4 us a part in
    Python, per request: one-reading posts of many devices make a part of each reading. Whether
    any row was a duplicate shows in the one count; duplicates are redeliveries, the rare case."""
    if not marks.keys() >= series:
        return None  # a deleted device's part: GONE, found part by part
    newest_mark = max(marks.values(), default=-1)
    if newest_mark >= 0 and min(min(rows.ts) for _, rows in parts) <= newest_mark:
        return None  # a reading a chunk may hold
    db.execute("SAVEPOINT whole")
    every = chain.from_iterable(
        zip(rows.series_ids, rows.ts, rows.values, strict=True) for _, rows in parts
    )
    added = db.executemany(SQLITE_INSERT, every).rowcount
    if added == sum(len(rows) for _, rows in parts):
        db.execute("RELEASE whole")
        return [len(rows) for _, rows in parts]
    db.execute("ROLLBACK TO whole")
    db.execute("RELEASE whole")
    return None


def _sqlite_insert_parts(
    db: sqlite3.Connection,
    parts: Sequence[tuple[str, Rows]],
    marks: dict[int, int],
    logged: list[Part] | None,
) -> list[int]:
    """A statement per part: exact counts when some rows are duplicates, late or gone. With
    `logged`, a statement per row instead, so that exactly the rows added are appended to it
    (the rare path: a redelivery, a reading a chunk may hold, a deleted device)."""
    counts: list[int] = []
    for device_id, rows in parts:
        distinct = set(rows.series_ids)
        if not marks.keys() >= distinct:
            counts.append(GONE)
            continue
        triples: Iterable[tuple[int, int, float]] = zip(
            rows.series_ids, rows.ts, rows.values, strict=True
        )
        late = _late_rows(rows, marks, distinct)
        if late:
            held = {
                (sid, t)
                for sid, ts in _by_series(late).items()
                for t in packed.sqlite_packed_ts(db, sid, ts)
            }
            every = zip(rows.series_ids, rows.ts, rows.values, strict=True)
            triples = [r for r in every if r[:2] not in held]
        if logged is None:
            counts.append(db.executemany(SQLITE_INSERT, triples).rowcount)
            continue
        added = [r for r in triples if db.execute(SQLITE_INSERT, r).rowcount]
        counts.append(len(added))
        if added:
            sids, ts, values = (list(c) for c in zip(*added, strict=True))
            logged.append((device_id, sids, ts, values))
    return counts


def _sqlite_live_series(db: sqlite3.Connection, series_ids: set[int]) -> dict[int, int]:
    """Those of `series_ids` that still exist (in the write transaction: no delete between),
    each with its packed watermark (-1: nothing packed)."""
    wanted = list(series_ids)
    live: dict[int, int] = {}
    for i in range(0, len(wanted), 500):
        chunk = wanted[i : i + 500]
        marks = ", ".join("?" * len(chunk))
        live.update(
            db.execute(
                f"SELECT id, coalesce(packed_until_us, -1) FROM series WHERE id IN ({marks})",
                chunk,
            ).fetchall()
        )
    return live


def _late_rows(
    rows: Rows, marks: dict[int, int], distinct: set[int] | None = None
) -> list[tuple[int, int, float]]:
    """The readings of `rows` timed at or before their series' packed watermark: those a chunk
    may hold. One C-level min() per part when there are none (the usual case: readings newer
    than an hour); a pass over the part's readings only when there may be. `distinct`: the
    part's series ids, when the caller has them."""
    series = distinct if distinct is not None else set(rows.series_ids)
    newest_mark = max((marks.get(sid, -1) for sid in series), default=-1)
    if newest_mark < 0 or min(rows.ts) > newest_mark:
        return []
    return [
        (sid, t, v)
        for sid, t, v in zip(rows.series_ids, rows.ts, rows.values, strict=True)
        if t <= marks.get(sid, -1)
    ]


def _by_series(late: Iterable[tuple[int, int, float]]) -> dict[int, list[int]]:
    out: dict[int, list[int]] = {}
    for sid, t, _ in late:
        out.setdefault(sid, []).append(t)
    return out


async def _postgres_insert(
    conn: BaseDBAsyncClient,
    parts: Sequence[tuple[str, Rows]],
    seen: dict[str, int],
    log_at_us: int | None,
) -> list[int]:
    async with conn.acquire_connection() as raw:
        try:
            counts, marks = await _postgres_insert_new(raw, parts, seen, log_at_us)
        except asyncpg.UniqueViolationError:
            # Another session committed some of these keys after our snapshot (another gateway
            # process on the same database); the statement was rolled back whole.
            counts, marks = await _postgres_insert_on_conflict(raw, parts, seen, log_at_us)
        late = {
            i: rows
            for i, (_, part) in enumerate(parts)
            if counts[i] != GONE and (rows := _late_rows(part, marks))
        }
        if late:
            await _postgres_late(raw, late, counts, parts, log_at_us)
        return counts


async def _postgres_late(
    raw: Any,
    late: dict[int, list[tuple[int, int, float]]],
    counts: list[int],
    parts: Sequence[tuple[str, Rows]],
    log_at_us: int | None,
) -> None:
    """Store the readings the insert left out for being at or before their series' packed
    watermark, unless a chunk holds them (then they are duplicates), adding to each part's count.
    The series rows are locked as the packer locks them, so no reading moves into a chunk
    between the check and the insert."""
    series_ids = sorted({sid for rows in late.values() for sid, _, _ in rows})
    logged: list[Part] = []
    async with raw.transaction():
        locked = await raw.fetch(
            "SELECT id FROM series WHERE id = ANY($1::integer[]) ORDER BY id FOR NO KEY UPDATE",
            series_ids,
        )
        live = {int(r[0]) for r in locked}
        for i, rows in late.items():
            if not live.issuperset(sid for sid, _, _ in rows):
                counts[i] = GONE
                continue
            held = {
                (sid, t)
                for sid, ts in _by_series(rows).items()
                for t in await packed.postgres_packed_ts(raw, sid, ts)
            }
            fresh = [r for r in rows if r[:2] not in held]
            if fresh:
                sids, ts, values = (list(c) for c in zip(*fresh, strict=True))
                added = await raw.fetch(
                    "INSERT INTO reading (series_id, ts, value)"
                    " SELECT * FROM unnest($1::integer[], $2::bigint[], $3::double precision[])"
                    " ON CONFLICT DO NOTHING RETURNING series_id, ts, value",
                    sids,
                    ts,
                    values,
                )
                counts[i] += len(added)
                if added:
                    logged.append(
                        (
                            parts[i][0],
                            [int(r[0]) for r in added],
                            [int(r[1]) for r in added],
                            [float(r[2]) for r in added],
                        )
                    )
        if log_at_us is not None:
            await commit_log.postgres_log(raw, log_at_us, logged)


async def _postgres_insert_new(
    raw: Any, parts: Sequence[tuple[str, Rows]], seen: dict[str, int], log_at_us: int | None
) -> tuple[list[int], dict[int, int]]:
    if len(parts) == 1:
        rows = parts[0][1]
        series_ids, ts, values = rows.series_ids, rows.ts, rows.values
    else:
        series_ids = list(chain.from_iterable(rows.series_ids for _, rows in parts))
        ts = list(chain.from_iterable(rows.ts for _, rows in parts))
        values = list(chain.from_iterable(rows.values for _, rows in parts))
    part = list(chain.from_iterable(repeat(i, len(rows)) for i, (_, rows) in enumerate(parts)))
    distinct = list(dict.fromkeys(series_ids))
    args: list[Any] = [
        _pg_array(series_ids),
        _pg_array(ts),
        _pg_array(values),
        _pg_array(part),
        list(seen.values()),
        list(seen),
        distinct,
    ]
    statement = POSTGRES_INSERT_NEW
    if log_at_us is not None:
        statement = POSTGRES_INSERT_NEW_LOGGED
        logged = [(d, rows.series_ids, rows.ts, rows.values) for d, rows in parts]
        args += [log_at_us, len(ts), commit_log.encode(logged), [d for d, _ in parts]]
    added = await raw.fetch(statement, *args)
    counts = [0] * len(parts)
    marks: dict[int, int] = {}
    for i, n, mark in added:
        if n == GONE:
            marks[i] = mark  # a series id, not a part
        else:
            counts[i] = n
    _mark_gone(parts, range(len(parts)), marks, counts)
    return counts, marks


def _pg_array(items: list[int] | list[float]) -> str:
    """A PostgreSQL array literal of ints or finite floats: orjson writes each number as its
    shortest round-trip text (ints exactly), which float8in/int8in read back bit for bit."""
    return "{" + orjson.dumps(items)[1:-1].decode() + "}"


def _mark_gone(
    parts: Sequence[tuple[str, Rows]],
    members: Iterable[int],
    live: dict[int, int],
    counts: list[int],
) -> None:
    """GONE for each of `members` whose series are not all `live` (none of its rows went in)."""
    for i in members:
        if not live.keys() >= set(parts[i][1].series_ids):
            counts[i] = GONE


async def _postgres_insert_on_conflict(
    raw: Any, parts: Sequence[tuple[str, Rows]], seen: dict[str, int], log_at_us: int | None
) -> tuple[list[int], dict[int, int]]:
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
    marks: dict[int, int] = {}
    if len(rounds) == 1 and log_at_us is None:
        await _postgres_round(raw, parts, rounds[0], seen, counts, marks, None)
        return counts, marks
    # Several statements (or a statement and the log row): one transaction.
    logged: list[Part] | None = None if log_at_us is None else []
    async with raw.transaction():
        for k, members in enumerate(rounds):
            await _postgres_round(
                raw, parts, members, seen if k == 0 else {}, counts, marks, logged
            )
        if logged is not None and log_at_us is not None:
            await commit_log.postgres_log(raw, log_at_us, logged)
    return counts, marks


async def _postgres_round(
    raw: Any,
    parts: Sequence[tuple[str, Rows]],
    members: list[int],
    seen: dict[str, int],
    counts: list[int],
    marks: dict[int, int],
    logged: list[Part] | None,
) -> None:
    """One statement for `members` (at most one part of each device); with `logged`, the rows
    it really added are appended to it, a part per series."""
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
        POSTGRES_INSERT if logged is None else POSTGRES_INSERT_ROWS,
        series_ids,
        ts,
        values,
        list(seen.values()),
        list(seen.keys()),
        distinct,
    )
    live: dict[int, int] = {}
    for series_id, n, mark, *points in added:
        if n == GONE:
            live[series_id] = mark
            continue
        counts[owner[series_id]] += n
        if logged is not None:
            added_ts, added_values = orjson.loads(points[0])
            device_id = parts[owner[series_id]][0]
            logged.append((device_id, [series_id] * n, added_ts, added_values))
    marks.update(live)
    _mark_gone(parts, members, live, counts)


async def select_raw(
    conn: BaseDBAsyncClient, series_id: int, start_us: int, end_us: int, limit: int
) -> list[tuple[int, float]]:
    """Readings of one series with start <= ts < end, in time order, at most `limit`: the
    unpacked rows and the packed chunks merged (a reading is in exactly one of them: both
    read in one snapshot)."""
    async with read_snapshot(conn) as snap:
        rows = await fetch(
            snap,
            "SELECT ts, value FROM reading WHERE series_id = ? AND ts >= ? AND ts < ?"
            " ORDER BY ts LIMIT ?",
            (series_id, start_us, end_us, limit),
        )
        ts, values = await packed.packed_points(snap, series_id, start_us, end_us, limit)
    hot = [(int(r[0]), float(r[1])) for r in rows]
    if not ts:
        return hot
    cold = list(zip(ts, values, strict=True))
    if not hot:
        return cold
    return list(heapq.merge(cold, hot))[:limit]


async def select_latest(
    conn: BaseDBAsyncClient, device_id: str
) -> list[tuple[str, int, float, str | None]]:
    """(metric, ts, value, unit) of the newest reading of each of a device's series (rows and
    chunks read in one snapshot)."""
    async with read_snapshot(conn) as snap:
        rows = await fetch(
            snap,
            "SELECT s.id, s.metric, r.ts, r.value, s.unit FROM series s LEFT JOIN reading r ON"
            " r.series_id = s.id AND r.ts = (SELECT max(ts) FROM reading WHERE series_id = s.id)"
            " WHERE s.device_id = ? ORDER BY s.metric",
            (device_id,),
        )
        cold = await packed.packed_latest(snap, device_id)
    out: list[tuple[str, int, float, str | None]] = []
    for sid, metric, ts, value, unit in rows:
        newest = (int(ts), float(value)) if ts is not None else None
        packed_newest = cold.get(int(sid))
        if packed_newest is not None and (newest is None or packed_newest[0] > newest[0]):
            newest = packed_newest
        if newest is not None:
            out.append((str(metric), *newest, unit))
    return out


async def series_stats(conn: BaseDBAsyncClient, device_ids: Sequence[str]) -> dict[str, Any]:
    """Per device: {metric: {"count": n, "first_ts": us, "last_ts": us, "unit": unit or None}}:
    unpacked rows counted,
    packed ones summed from the chunks' summaries (both in one snapshot)."""
    if not device_ids:
        return {}
    marks = ", ".join("?" * len(device_ids))
    async with read_snapshot(conn) as snap:
        rows = await fetch(
            snap,
            "SELECT s.device_id, s.metric, count(r.ts), min(r.ts), max(r.ts), s.unit"
            f" FROM series s LEFT JOIN reading r ON r.series_id = s.id"
            f" WHERE s.device_id IN ({marks}) GROUP BY s.device_id, s.metric, s.unit",
            list(device_ids),
        )
        cold = await packed.packed_counts(snap, device_ids)
    out: dict[str, Any] = {}
    for device_id, metric, count, first, last, unit in rows:
        n, lo, hi = cold.get((device_id, metric), (0, None, None))
        out.setdefault(device_id, {})[metric] = {
            "count": int(count) + n,
            "first_ts": _least(first, lo),
            "last_ts": _greatest(last, hi),
            "unit": unit,
        }
    return out


def _least(a: int | None, b: int | None) -> int | None:
    return b if a is None else a if b is None else min(a, b)


def _greatest(a: int | None, b: int | None) -> int | None:
    return b if a is None else a if b is None else max(a, b)


async def delete_series_readings(conn: BaseDBAsyncClient, series_ids: Sequence[int]) -> int:
    """Readings have no foreign key (it would cost every insert), so deletes go through here:
    the unpacked rows and the packed chunks; the number of readings deleted."""
    if not series_ids:
        return 0
    marks = ", ".join("?" * len(series_ids))
    rows = await execute(conn, f"DELETE FROM reading WHERE series_id IN ({marks})", series_ids)
    return rows + await packed.delete_series_chunks(conn, series_ids)
