"""Packed history: the `chunk` table (migrations/0004_packed_history.py) read and written.

A chunk holds consecutive readings of one series, `first_ts` to `last_ts`, encoded by
gateway/store/chunk_codec.py, with its summary as columns and its per-UTC-hour partials (the
1-hour rollup) in `hours`. A series' chunks never overlap. Readings move from `reading` into
chunks in `pack_series` (the maintenance job), in the same transaction that deletes them from
`reading`, so a reading is always in exactly one of the two; a reading that arrives later for a
packed range is stored in `reading` and packed by the next run. Readers merge both:
gateway/store/readings.py (raw pages, latest, statistics) and aggregates through
`packed_partials`.

What a reader gets from packed data is exactly what was stored: identical ts, bit-identical
values (the codec's round trip), every reading once.
"""

from __future__ import annotations

import asyncio
import itertools
import sqlite3
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any, Final

import asyncpg
import numpy as np
import numpy.typing as npt
from tortoise.backends.base.client import BaseDBAsyncClient

from gateway.store import chunk_codec, partials
from gateway.store.database import Dialect, dialect_of
from gateway.store.partials import Float64s, Int64s, Partials
from gateway.store.raw_sql import fetch, sqlite_script, sqlite_transaction

# Readings per chunk: a chunk is closed once it holds this many; a run's readings are cut into
# pieces of TARGET to 2 x TARGET. bench/README.md "Packed chunks": 1,000 readings a chunk give
# 0.64 bytes a reading on the walk, 3,000 and more 0.58. On disk the row and page around
# a chunk weigh more: the week took 0.85 bytes a reading in a SQLite file at 4,096 and
# 0.55 at 8,192 (a 3 KB chunk fills a 4 KB page poorly), and fewer rows are read for long
# ranges; an edge costs ~0.03 us a reading to decode, ~0.5 ms for a whole chunk.
TARGET: Final = 8192
HOUR_US: Final = partials.HOUR_US
MINUTE_US: Final = 60_000_000
# A chunk keeps minute partials (`minutes`) when it holds at least this many readings a minute
# on average: below it, decoding a minute's readings costs about what reading its partial does,
# and the partial would take more space than they do (bench/README.md "Rollups").
MINUTE_ROLLUP_DENSITY: Final = 20
# At most this many existing chunks are rewritten (decoded, merged, encoded) by one packing
# step: late readings scattered over a long packed history would otherwise make one step (one
# transaction, holding SQLite's write lock) decode a chunk for each of its up to 10,000
# readings, gigabytes of them. The rest are left for the next step.
MAX_REWRITES: Final = 64
# How long making or dropping a partition of `chunk` may wait for its lock on PostgreSQL.
DDL_LOCK_TIMEOUT_MS: Final = 2_000
# PostgreSQL partitions of `chunk` by first_ts: 7 days each.
PARTITION_US: Final = 7 * 86_400_000_000
_SUMMARY = "n, s, lo, hi, v0, v1, mean, mean_err, m2"
_INSERT_CHUNK = (
    "INSERT INTO chunk (series_id, first_ts, last_ts, n, s, lo, hi, v0, v1, mean, mean_err, m2,"
    " hours, minutes, data) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)"
)


# Reading packed readings.


async def packed_points(
    conn: BaseDBAsyncClient, series_id: int, start_us: int, end_us: int, limit: int
) -> tuple[list[int], list[float]]:
    """Packed readings of one series with start <= ts < end, in time order, at most `limit`."""
    out_ts: list[Int64s] = []
    out_v: list[Any] = []
    have = 0
    after = -(2**63)  # chunks that begin before `start` may still hold readings after it
    while have < limit:
        rows = await fetch(
            conn,
            "SELECT first_ts, data FROM chunk WHERE series_id = ? AND last_ts >= ?"
            " AND first_ts > ? AND first_ts < ? ORDER BY first_ts LIMIT 8",
            (series_id, start_us, after, end_us),
        )
        if not rows:
            break
        for row in rows:
            chunk = chunk_codec.decode(bytes(row[1]))
            lo, hi = np.searchsorted(chunk.ts, [start_us, end_us])
            out_ts.append(chunk.ts[lo:hi])
            out_v.append(chunk.values[lo:hi])
            have += int(hi - lo)
        after = int(rows[-1][0])
    if not out_ts:
        return [], []
    ts = np.concatenate(out_ts)[:limit]
    values = np.concatenate(out_v)[:limit]
    return ts.tolist(), values.tolist()


async def packed_latest(conn: BaseDBAsyncClient, device_id: str) -> dict[int, tuple[int, float]]:
    """Per series of the device: the newest packed reading (ts, value), from the summaries."""
    rows = await fetch(
        conn,
        "SELECT c.series_id, c.last_ts, c.v1 FROM series s JOIN chunk c ON c.series_id = s.id"
        " AND c.first_ts = (SELECT max(first_ts) FROM chunk WHERE series_id = s.id)"
        " WHERE s.device_id = ?",
        (device_id,),
    )
    return {int(r[0]): (int(r[1]), float(r[2])) for r in rows}


async def packed_before(
    conn: BaseDBAsyncClient, series_ids: Sequence[int], before_us: int
) -> dict[int, tuple[int, float]]:
    """Per series: the last packed reading before `before_us` (ts, value)."""
    if not series_ids:
        return {}
    marks = ", ".join("?" * len(series_ids))
    rows = await fetch(
        conn,
        "SELECT c.series_id, c.last_ts, c.v1, c.data FROM series s JOIN chunk c"
        " ON c.series_id = s.id AND c.first_ts = (SELECT max(first_ts) FROM chunk"
        f" WHERE series_id = s.id AND first_ts < ?) WHERE s.id IN ({marks})",
        (before_us, *series_ids),
    )
    out: dict[int, tuple[int, float]] = {}
    for sid, last_ts, v1, data in rows:
        if last_ts < before_us:
            out[int(sid)] = (int(last_ts), float(v1))
            continue
        chunk = chunk_codec.decode(bytes(data))
        i = int(np.searchsorted(chunk.ts, before_us)) - 1  # >= 0: first_ts < before
        out[int(sid)] = (int(chunk.ts[i]), float(chunk.values[i]))
    return out


async def packed_counts(
    conn: BaseDBAsyncClient, device_ids: Sequence[str]
) -> dict[tuple[str, str], tuple[int, int, int]]:
    """Per (device, metric) with packed readings: (count, first ts, last ts), from summaries."""
    marks = ", ".join("?" * len(device_ids))
    rows = await fetch(
        conn,
        "SELECT s.device_id, s.metric, sum(c.n), min(c.first_ts), max(c.last_ts) FROM series s"
        f" JOIN chunk c ON c.series_id = s.id WHERE s.device_id IN ({marks})"
        " GROUP BY s.device_id, s.metric",
        list(device_ids),
    )
    return {(str(r[0]), str(r[1])): (int(r[2]), int(r[3]), int(r[4])) for r in rows}


async def packed_counts_since(
    conn: BaseDBAsyncClient, series_ids: Sequence[int], since_us: int
) -> dict[int, int]:
    """Per series with packed readings timed at or after `since_us`: how many, exactly.

    Chunks that begin at or after it count from their summaries, summed in SQL. The one across
    it (at most one a series: chunks do not overlap) counts from its minute partials (dense
    chunks keep them), else its hourly ones, and is decoded only when a partial holds readings
    on both sides of `since_us`: with `since_us` on a minute (gateway/device_views.py) a dense
    chunk never is. Not `packed_partials` with one bucket: the same answer, but its numpy work
    cost the devices page ~2 ms a series (bench/README.md, "Console page loads")."""
    out: dict[int, int] = {}
    for i in range(0, len(series_ids), 500):  # within both databases' parameter limits
        out.update(await _packed_counts_since(conn, series_ids[i : i + 500], since_us))
    return out


async def _packed_counts_since(
    conn: BaseDBAsyncClient, series_ids: Sequence[int], since_us: int
) -> dict[int, int]:
    marks = ", ".join("?" * len(series_ids))
    whole = await fetch(
        conn,
        f"SELECT series_id, sum(n) FROM chunk WHERE series_id IN ({marks}) AND first_ts >= ?"
        " GROUP BY series_id",
        (*series_ids, since_us),
    )
    out = {int(sid): int(n) for sid, n in whole}
    # The finest rollup the chunk keeps: minute partials answer wherever hourly ones do. A
    # chunk never crosses a PARTITION_US edge (`_cut`): the bound on first_ts prunes
    # PostgreSQL's partitions to one.
    across = await fetch(
        conn,
        f"SELECT series_id, first_ts, coalesce(minutes, hours) FROM chunk"
        f" WHERE series_id IN ({marks}) AND last_ts >= ? AND first_ts < ? AND first_ts >= ?",
        (*series_ids, since_us, since_us, since_us - since_us % PARTITION_US),
    )
    undecided: list[tuple[int, int]] = []
    for sid, first_ts, rollup in across:
        n = _rollup_count_since(bytes(rollup), since_us)
        if n is None:
            undecided.append((int(sid), int(first_ts)))
        elif n:
            out[int(sid)] = out.get(int(sid), 0) + n
    for (sid, _), blob in (await _chunk_column(conn, "data", undecided)).items():
        ts = chunk_codec.decode(blob).ts
        out[sid] = out.get(sid, 0) + len(ts) - int(np.searchsorted(ts, since_us))
    return {sid: n for sid, n in out.items() if n}


def _rollup_count_since(blob: bytes, since_us: int) -> int | None:
    """The readings timed at or after `since_us` that a chunk's partials (hours or minutes)
    count, or None when one of them holds readings on both sides of it."""
    p = Partials.from_bytes(blob)
    if np.any((p.t0 < since_us) & (p.t1 >= since_us)):
        return None
    return int(p.n[p.t0 >= since_us].sum())


# Aggregates over packed data.


class BucketKeys:
    """Which bucket a ts falls in: epoch-aligned `window_us`, or explicit [lo, hi) `bounds`
    (their arrays made once: `of` runs several times a series in a query)."""

    def __init__(self, window_us: int | None, bounds: Sequence[tuple[int, int]]) -> None:
        self.window_us = window_us
        self.bounds = bounds
        self._los = np.array([lo for lo, _ in bounds], dtype=np.int64)
        self._his = np.array([hi for _, hi in bounds], dtype=np.int64)

    def of(self, ts: Int64s) -> Int64s:
        """Each ts's bucket start; -1 where it is in no bucket (outside every bound)."""
        if self.window_us is not None:
            return ts - ts % self.window_us
        if not len(self._los):
            return np.full(len(ts), -1, dtype=np.int64)
        i = np.maximum(np.searchsorted(self._los, ts, side="right") - 1, 0)
        inside = (ts >= self._los[i]) & (ts < self._his[i])
        return np.where(inside, self._los[i], -1)

    def group(
        self, ts: Int64s, values: Float64s, *, moments: bool = True
    ) -> tuple[Int64s, Partials]:
        """Readings sorted by ts as one partial per bucket (those in no bucket left out)."""
        k = self.of(ts)
        ok = k != -1
        return partials.of_readings(ts[ok], values[ok], k[ok], moments=moments)

    def fit(
        self, t0: Int64s, t1: Int64s, start_us: int, end_us: int
    ) -> tuple[Int64s, npt.NDArray[np.bool_], npt.NDArray[np.bool_]]:
        """For sets of readings spanning t0..t1 (chunks, rollup partials): each one's bucket,
        whether it answers whole (its first and last readings in one bucket, inside
        [start, end)), and whether it straddles a bucket edge or an end of the range (it
        overlaps the range but does not answer whole: look finer)."""
        k0, k1 = self.of(t0), self.of(t1)
        whole = (t0 >= start_us) & (t1 < end_us) & (k0 == k1) & (k0 != -1)
        return k0, whole, ~whole & (t1 >= start_us) & (t0 < end_us)


async def packed_partials(
    conn: BaseDBAsyncClient,
    series_ids: Sequence[int],
    start_us: int,
    end_us: int,
    keys: BucketKeys,
    *,
    moments: bool = True,
) -> dict[int, tuple[Int64s, Partials]]:
    """Per series with packed readings in [start, end): bucket starts and one partial each
    (without `moments`, no stddev asked, decoded readings skip the stddev sums).

    The coarsest exact source answers: a chunk's summary when all its readings fall in one
    bucket inside the range; else its hourly partials, each one whose readings fall in one
    bucket inside the range; for an hour that straddles a bucket boundary or an end of the
    range, the chunk's minute partials the same way (dense chunks keep them), and the readings
    themselves (decoded) only for what is left. Exact for any window, range and time zone: a
    partial is used whole only when its own first and last readings share a bucket."""
    if not series_ids:
        return {}
    marks = ", ".join("?" * len(series_ids))
    rows = await fetch(
        conn,
        f"SELECT series_id, first_ts, last_ts, {_SUMMARY}, hours, minutes IS NOT NULL"
        f" FROM chunk WHERE series_id IN ({marks}) AND last_ts >= ? AND first_ts < ?"
        " ORDER BY series_id, first_ts",
        (*series_ids, start_us, end_us),
    )
    found: dict[int, tuple[list[Int64s], list[Partials]]] = {}
    cut: dict[tuple[int, int], tuple[int, Int64s]] = {}  # chunk -> (unit, starts) to go finer
    dense: set[tuple[int, int]] = set()
    for sid, chunks in _by_series_id(rows).items():
        found[sid] = _summaries(chunks, start_us, end_us, keys, cut)
        dense.update((sid, int(c[1])) for c in chunks if c[13])
    finer = [chunk for chunk in cut if chunk in dense]
    for chunk, blob in (await _chunk_column(conn, "minutes", finer)).items():
        minutes = Partials.from_bytes(blob)
        minutes = minutes.take(_member(cut[chunk][1], minutes.t0 - minutes.t0 % HOUR_US))
        k, whole, straddle = keys.fit(minutes.t0, minutes.t1, start_us, end_us)
        found[chunk[0]][0].append(k[whole])
        found[chunk[0]][1].append(minutes.take(whole))
        if straddle.any():
            starts = minutes.t0[straddle]
            cut[chunk] = (MINUTE_US, starts - starts % MINUTE_US)
        else:
            del cut[chunk]
    readings: dict[int, list[tuple[Int64s, Float64s]]] = {}
    blobs = await _chunk_column(conn, "data", list(cut))
    for chunk in sorted(cut):  # by series, then time: each series' readings come in order
        unit, starts = cut[chunk]
        decoded = chunk_codec.decode(blobs[chunk])
        lo, hi = np.searchsorted(decoded.ts, [start_us, end_us])
        ts, values = decoded.ts[lo:hi], decoded.values[lo:hi]
        pick = _member(starts, ts - ts % unit)
        readings.setdefault(chunk[0], []).append((ts[pick], values[pick]))
    for sid, pieces in readings.items():
        ts = np.concatenate([t for t, _ in pieces])
        values = np.concatenate([v for _, v in pieces])
        kk, pp = keys.group(ts, values, moments=moments)
        found[sid][0].append(kk)
        found[sid][1].append(pp)
    return {
        sid: partials.merge_by_key(np.concatenate(k), partials.concat(p))
        for sid, (k, p) in found.items()
    }


def _member(sorted_starts: Int64s, values: Int64s) -> npt.NDArray[np.bool_]:
    """Which of `values` are in `sorted_starts` (a binary search each)."""
    if not len(sorted_starts):
        return np.zeros(len(values), dtype=bool)
    at = np.minimum(np.searchsorted(sorted_starts, values), len(sorted_starts) - 1)
    return np.asarray(sorted_starts[at] == values)


def _summaries(
    chunks: Sequence[Any],
    start_us: int,
    end_us: int,
    keys: BucketKeys,
    cut: dict[tuple[int, int], tuple[int, Int64s]],
) -> tuple[list[Int64s], list[Partials]]:
    """One series' chunks: the summaries and hourly partials that answer whole (bucket keys
    and partials), and in `cut` the hours of each chunk that must be looked at finer."""
    got_keys: list[Int64s] = []
    got: list[Partials] = []
    sid = int(chunks[0][0])
    firsts = np.array([int(c[1]) for c in chunks], dtype=np.int64)
    lasts = np.array([int(c[2]) for c in chunks], dtype=np.int64)
    kf, whole, _ = keys.fit(firsts, lasts, start_us, end_us)
    if whole.any():
        got_keys.append(kf[whole])
        got.append(partials.many([(c[1], *c[2:12]) for c in itertools.compress(chunks, whole)]))
    rest = np.flatnonzero(~whole)
    if not len(rest):
        return got_keys, got
    parts = [Partials.from_bytes(bytes(chunks[i][12])) for i in rest.tolist()]
    hours = partials.concat(parts)
    owner = np.repeat(firsts[rest], [len(p) for p in parts])
    k0, usable, straddle = keys.fit(hours.t0, hours.t1, start_us, end_us)
    got_keys.append(k0[usable])
    got.append(hours.take(usable))
    for first_ts in np.unique(owner[straddle]).tolist():
        mine = straddle & (owner == first_ts)
        cut[sid, first_ts] = (HOUR_US, hours.t0[mine] - hours.t0[mine] % HOUR_US)
    return got_keys, got


def _by_series_id(rows: Sequence[Any]) -> dict[int, list[Any]]:
    out: dict[int, list[Any]] = {}
    for row in rows:
        out.setdefault(int(row[0]), []).append(row)
    return out


async def _chunk_column(
    conn: BaseDBAsyncClient, column: str, which: Sequence[tuple[int, int]]
) -> dict[tuple[int, int], bytes]:
    """`column` (data or minutes) of the chunks keyed (series_id, first_ts)."""
    out: dict[tuple[int, int], bytes] = {}
    for i in range(0, len(which), 200):
        part = which[i : i + 200]
        cond = " OR ".join(["(series_id = ? AND first_ts = ?)"] * len(part))
        rows = await fetch(
            conn,
            f"SELECT series_id, first_ts, {column} FROM chunk WHERE {cond}",
            [x for pair in part for x in pair],
        )
        out.update({(int(r[0]), int(r[1])): bytes(r[2]) for r in rows})
    return out


# Which readings a chunk already holds (the insert's duplicate check at or before the watermark).


def sqlite_packed_ts(db: sqlite3.Connection, series_id: int, ts: Sequence[int]) -> set[int]:
    """Those of `ts` that a chunk of the series holds (in the caller's transaction)."""
    rows = db.execute(
        "SELECT data FROM chunk WHERE series_id = ? AND last_ts >= ? AND first_ts <= ?",
        (series_id, min(ts), max(ts)),
    ).fetchall()
    return _held(rows, ts)


async def postgres_packed_ts(raw: Any, series_id: int, ts: Sequence[int]) -> set[int]:
    rows = await raw.fetch(
        "SELECT data FROM chunk WHERE series_id = $1 AND last_ts >= $2 AND first_ts <= $3",
        series_id,
        min(ts),
        max(ts),
    )
    return _held(rows, ts)


def _held(rows: Iterable[Any], ts: Sequence[int]) -> set[int]:
    wanted = np.array(ts, dtype=np.int64)
    held: set[int] = set()
    for row in rows:
        chunk = chunk_codec.decode(bytes(row[0]))
        held.update(wanted[np.isin(wanted, chunk.ts)].tolist())
    return held


# Deleting.


async def delete_series_chunks(conn: BaseDBAsyncClient, series_ids: Sequence[int]) -> int:
    """Delete the chunks of these series; the number of readings they held."""
    if not series_ids:
        return 0
    marks = ", ".join("?" * len(series_ids))
    rows = await fetch(
        conn, f"DELETE FROM chunk WHERE series_id IN ({marks}) RETURNING n", list(series_ids)
    )
    return sum(int(r[0]) for r in rows)


# Packing (the maintenance job).


@dataclass(slots=True)
class Packed:
    readings: int = 0  # moved from `reading` into chunks
    chunks_written: int = 0
    chunks_replaced: int = 0  # existing chunks rewritten (late readings, a growing last chunk)

    def more(self, max_rows: int) -> bool:
        """Whether a step that did this may have left readings (`pack_series`)."""
        return self.readings >= max_rows or self.chunks_replaced >= MAX_REWRITES

    def add(self, other: Packed) -> None:
        self.readings += other.readings
        self.chunks_written += other.chunks_written
        self.chunks_replaced += other.chunks_replaced


@dataclass(slots=True)
class _Plan:
    delete: list[int]  # first_ts of the chunks replaced
    write: list[tuple[Any, ...]]  # rows for _INSERT_CHUNK
    watermark: int  # the greatest last_ts written


async def series_with_readings_before(conn: BaseDBAsyncClient, before_us: int) -> list[int]:
    """The series that have unpacked readings timed before `before_us` (one index probe each)."""
    rows = await fetch(
        conn,
        "SELECT s.id FROM series s WHERE EXISTS"
        " (SELECT 1 FROM reading r WHERE r.series_id = s.id AND r.ts < ?) ORDER BY s.id",
        (before_us,),
    )
    return [int(r[0]) for r in rows]


async def pack_series(
    conn: BaseDBAsyncClient, series_id: int, before_us: int, *, max_rows: int = 10_000
) -> Packed:
    """Move up to `max_rows` of the series' oldest readings timed before `before_us` into
    chunks, rewriting at most MAX_REWRITES existing ones, in one transaction; call again
    while it packs `max_rows` or rewrites MAX_REWRITES (`more`)."""
    if dialect_of(conn) is Dialect.SQLITE:
        return await sqlite_transaction(conn, _sqlite_pack, series_id, before_us, max_rows)
    async with conn.acquire_connection() as raw, raw.transaction():
        return await _postgres_pack(raw, series_id, before_us, max_rows)


def _sqlite_pack(db: sqlite3.Connection, series_id: int, before_us: int, max_rows: int) -> Packed:
    rows = db.execute(
        "SELECT ts, value FROM reading WHERE series_id = ? AND ts < ? ORDER BY ts LIMIT ?",
        (series_id, before_us, max_rows),
    ).fetchall()
    if not rows:
        return Packed()
    ts = np.array([r[0] for r in rows], dtype=np.int64)
    values = np.array([r[1] for r in rows], dtype=np.float64)
    chunks = db.execute(_AFFECTED, (series_id, int(ts[-1]), series_id, int(ts[0]))).fetchall()
    take = _step_end(ts, chunks)
    ts, values = ts[:take], values[:take]
    plan = _plan(series_id, ts, values, chunks)
    db.executemany(
        "DELETE FROM chunk WHERE series_id = ? AND first_ts = ?",
        [(series_id, f) for f in plan.delete],
    )
    db.executemany(_INSERT_CHUNK, plan.write)
    # The write lock is held since BEGIN IMMEDIATE: the readings selected are all there are up
    # to the last one selected.
    db.execute("DELETE FROM reading WHERE series_id = ? AND ts <= ?", (series_id, int(ts[-1])))
    db.execute(
        "UPDATE series SET packed_until_us = max(coalesce(packed_until_us, ?), ?) WHERE id = ?",
        (plan.watermark, plan.watermark, series_id),
    )
    return Packed(len(ts), len(plan.write), len(plan.delete))


# The chunks readings from ts0 to ts1 may belong to: the one holding or preceding ts0, and every
# one that begins up to ts1.
_AFFECTED = (
    "SELECT first_ts, last_ts, n, data FROM chunk WHERE series_id = ? AND first_ts <= ?"
    " AND first_ts >= coalesce((SELECT max(first_ts) FROM chunk WHERE series_id = ?"
    " AND first_ts <= ?), -9223372036854775808) ORDER BY first_ts"
)


async def _postgres_pack(raw: Any, series_id: int, before_us: int, max_rows: int) -> Packed:
    # The series row locked against the insert's late-reading check (gateway/store/readings.py)
    # and another packer: the readings and chunks read here do not move until the commit.
    locked = await raw.fetchval("SELECT id FROM series WHERE id = $1 FOR NO KEY UPDATE", series_id)
    if locked is None:
        return Packed()
    rows = await raw.fetch(
        "SELECT ts, value FROM reading WHERE series_id = $1 AND ts < $2 ORDER BY ts LIMIT $3",
        series_id,
        before_us,
        max_rows,
    )
    if not rows:
        return Packed()
    ts = np.array([r[0] for r in rows], dtype=np.int64)
    values = np.array([r[1] for r in rows], dtype=np.float64)
    affected = _AFFECTED.replace("?", "{}").format("$1", "$2", "$1", "$3")
    chunks = await raw.fetch(affected, series_id, int(ts[-1]), int(ts[0]))
    take = _step_end(ts, chunks)
    ts, values = ts[:take], values[:take]
    # Decoding and encoding off the event loop (numpy and zstd release the GIL for most of it):
    # the loop keeps answering requests while a step computes.
    plan = await asyncio.to_thread(_plan, series_id, ts, values, chunks)
    if plan.delete:
        await raw.execute(
            "DELETE FROM chunk WHERE series_id = $1 AND first_ts = ANY($2::bigint[])",
            series_id,
            plan.delete,
        )
    await _ensure_partitions(raw, {row[1] for row in plan.write})
    await raw.executemany(_INSERT_CHUNK.replace("?", "${}").format(*range(1, 16)), plan.write)
    # Exactly the rows selected: a concurrent insert may have added others since (it only
    # shares the series row's lock).
    await raw.execute(
        "DELETE FROM reading WHERE series_id = $1 AND ts = ANY($2::bigint[])",
        series_id,
        ts.tolist(),
    )
    await raw.execute(
        "UPDATE series SET packed_until_us = greatest(packed_until_us, $1) WHERE id = $2",
        plan.watermark,
        series_id,
    )
    return Packed(len(ts), len(plan.write), len(plan.delete))


async def _ensure_partitions(raw: Any, first_ts: Iterable[int]) -> None:
    for period in sorted({ts // PARTITION_US for ts in first_ts}):
        name = partition_name(period)
        lo, hi = period * PARTITION_US, (period + 1) * PARTITION_US
        exists = await raw.fetchval("SELECT to_regclass($1)", name)
        if exists is None:
            # Making a partition locks `chunk` against every reader until the step commits;
            # behind a long query that wait would stall them all: give up instead (the step
            # fails and the next run tries again).
            await raw.execute(f"SET LOCAL lock_timeout = '{DDL_LOCK_TIMEOUT_MS}ms'")
            await raw.execute(
                f"CREATE TABLE IF NOT EXISTS {name} PARTITION OF chunk"
                f" FOR VALUES FROM ({lo}) TO ({hi})"
            )
            # Chunks are compressed already: no second compression attempt by TOAST.
            await raw.execute(
                f"ALTER TABLE {name} ALTER COLUMN data SET STORAGE EXTERNAL,"
                " ALTER COLUMN hours SET STORAGE EXTERNAL,"
                " ALTER COLUMN minutes SET STORAGE EXTERNAL"
            )


def partition_name(period: int) -> str:
    return f"chunk_p{period}" if period >= 0 else f"chunk_pm{-period}"


def _step_end(ts: Int64s, chunks: Sequence[Any]) -> int:
    """How many of the readings `ts` (sorted) one step packs: all, unless `_plan` would rewrite
    more than MAX_REWRITES of the existing `chunks` for them; then those before the first
    reading of the chunk after the MAX_REWRITES-th."""
    if len(chunks) <= MAX_REWRITES:
        return len(ts)
    firsts = np.array([int(c[0]) for c in chunks], dtype=np.int64)
    lasts = np.array([int(c[1]) for c in chunks], dtype=np.int64)
    full = np.array([int(c[2]) >= TARGET for c in chunks])
    owner = np.searchsorted(firsts, ts, side="right") - 1
    mine = np.maximum(owner, 0)
    at = np.flatnonzero((owner >= 0) & (~full[mine] | (ts <= lasts[mine])))  # as `_plan` does
    firsts_at = at[np.concatenate(([True], owner[at][1:] != owner[at][:-1]))]
    return len(ts) if len(firsts_at) <= MAX_REWRITES else int(firsts_at[MAX_REWRITES])


def _plan(series_id: int, ts: Int64s, values: Any, chunks: Sequence[Any]) -> _Plan:
    """Where readings (sorted, all unpacked) go: each into the chunk holding or preceding its
    ts (a chunk that is full takes only those within its own range; the rest start new
    chunks), readings before every affected chunk into new ones; every run cut to size."""
    firsts = np.array([int(c[0]) for c in chunks], dtype=np.int64)
    owner = np.searchsorted(firsts, ts, side="right") - 1
    delete: list[int] = []
    runs: list[tuple[Int64s, Any]] = []
    orphans = owner < 0
    if orphans.any():
        runs.append((ts[orphans], values[orphans]))
    for i, chunk in enumerate(chunks):
        mine = owner == i
        if not mine.any():
            continue
        first_ts, last_ts, n = int(chunk[0]), int(chunk[1]), int(chunk[2])
        if n >= TARGET:
            inside = mine & (ts <= last_ts)
            after = mine & (ts > last_ts)
            if after.any():
                runs.append((ts[after], values[after]))
            mine = inside
            if not mine.any():
                continue
        old = chunk_codec.decode(bytes(chunk[3]))
        merged_ts = np.concatenate([old.ts, ts[mine]])
        merged_v = np.concatenate([old.values, values[mine]])
        order = np.argsort(merged_ts, kind="stable")
        merged_ts, merged_v = merged_ts[order], merged_v[order]
        keep = np.concatenate(([True], merged_ts[1:] != merged_ts[:-1]))  # never needed
        runs.append((merged_ts[keep], merged_v[keep]))
        delete.append(first_ts)
    write = [
        _chunk_row(series_id, piece_ts, piece_v)
        for run_ts, run_v in runs
        for piece_ts, piece_v in _cut(run_ts, run_v)
    ]
    return _Plan(delete, write, max(int(row[2]) for row in write))


def _cut(ts: Int64s, values: Any) -> list[tuple[Int64s, Any]]:
    """A run of readings as chunks: never across a PARTITION_US edge (a chunk expires whole,
    when its last reading does, and PostgreSQL drops a partition once its chunks are gone: a
    chunk reaching into the next period would outlive its retention by up to a period), and
    TARGET to 2 x TARGET readings each where there are that many."""
    period = ts // PARTITION_US
    edges = np.flatnonzero(period[1:] != period[:-1]) + 1
    out: list[tuple[Int64s, Any]] = []
    for part_ts, part_v in zip(np.split(ts, edges), np.split(values, edges), strict=True):
        if len(part_ts) < 2 * TARGET:
            out.append((part_ts, part_v))
            continue
        k = len(part_ts) // TARGET
        out += zip(np.array_split(part_ts, k), np.array_split(part_v, k), strict=True)
    return out


def _chunk_row(series_id: int, ts: Int64s, values: Any) -> tuple[Any, ...]:
    encoded = chunk_codec.encode(ts, values)
    s = encoded.summary
    m = s.moments
    hours = partials.hourly(ts, values).to_bytes()
    minute = ts - ts % MINUTE_US
    distinct = 1 + int(np.count_nonzero(minute[1:] != minute[:-1]))
    minutes = None
    if len(ts) >= MINUTE_ROLLUP_DENSITY * distinct:
        minutes = partials.of_readings(ts, values, minute)[1].to_bytes()
    return (
        series_id,
        s.first_ts,
        s.last_ts,
        s.count,
        s.sum,
        s.min,
        s.max,
        s.first_value,
        s.last_value,
        m.mean,
        m.mean_err,
        m.m2,
        hours,
        minutes,
        encoded.data,
    )


# Retention.


@dataclass(slots=True)
class Expired:
    chunks: int = 0
    readings: int = 0  # in the chunks dropped and the unpacked rows deleted
    partitions: int = 0  # PostgreSQL partitions dropped (their space returned)


async def expire(conn: BaseDBAsyncClient, now_us: int, default_days: float) -> Expired:
    """Delete what every series' retention (its device's `retention_days`, else
    `default_days`; 0 keeps all) has passed: whole chunks whose last reading is older, and
    unpacked rows older; then, on PostgreSQL, drop partitions left empty."""
    cutoffs = await fetch(
        conn,
        "SELECT s.id, coalesce(d.retention_days, ?) FROM series s JOIN device d"
        " ON d.id = s.device_id WHERE coalesce(d.retention_days, ?) > 0",
        (default_days, default_days),
    )
    pairs = [(int(sid), now_us - int(float(days) * 86_400_000_000)) for sid, days in cutoffs]
    if dialect_of(conn) is Dialect.SQLITE:
        return await sqlite_transaction(conn, _sqlite_expire, pairs)
    async with conn.acquire_connection() as raw:
        return await _postgres_expire(raw, pairs)


def _sqlite_expire(db: sqlite3.Connection, pairs: list[tuple[int, int]]) -> Expired:
    out = Expired()
    for sid, cutoff in pairs:
        ns = db.execute(
            "DELETE FROM chunk WHERE series_id = ? AND last_ts < ? RETURNING n", (sid, cutoff)
        ).fetchall()
        out.chunks += len(ns)
        out.readings += sum(int(r[0]) for r in ns)
        out.readings += db.execute(
            "DELETE FROM reading WHERE series_id = ? AND ts < ?", (sid, cutoff)
        ).rowcount
    return out


async def _postgres_expire(raw: Any, pairs: list[tuple[int, int]]) -> Expired:
    out = Expired()
    if pairs:
        ids = [p[0] for p in pairs]
        cuts = [p[1] for p in pairs]
        async with raw.transaction():
            ns = await raw.fetch(
                "DELETE FROM chunk c USING unnest($1::integer[], $2::bigint[]) AS x(id, cut)"
                " WHERE c.series_id = x.id AND c.last_ts < x.cut RETURNING c.n",
                ids,
                cuts,
            )
            out.chunks = len(ns)
            out.readings = sum(int(r[0]) for r in ns)
            status = await raw.execute(
                "DELETE FROM reading r USING unnest($1::integer[], $2::bigint[]) AS x(id, cut)"
                " WHERE r.series_id = x.id AND r.ts < x.cut",
                ids,
                cuts,
            )
            out.readings += int(status.rsplit(" ", 1)[1])
    out.partitions = await _drop_empty_partitions(raw)
    return out


async def _drop_empty_partitions(raw: Any) -> int:
    """Drop the partitions of `chunk` that hold no rows (a later pack makes one again if it
    needs it): the space of expired chunks goes back to the file system."""
    names = await raw.fetch(
        "SELECT c.relname FROM pg_inherits i JOIN pg_class c ON c.oid = i.inhrelid"
        " WHERE i.inhparent = 'chunk'::regclass"
    )
    dropped = 0
    for (name,) in names:
        try:
            async with raw.transaction():
                await raw.execute(f"SET LOCAL lock_timeout = '{DDL_LOCK_TIMEOUT_MS}ms'")
                # Locked before it is found empty (parent first, as an insert takes them): a
                # chunk being written into it is committed before the look, or its insert
                # waits and then fails for want of the partition (rolled back; the next run
                # makes it again); never dropped with the partition after the look.
                await raw.execute(f"LOCK TABLE ONLY chunk, ONLY {name} IN ACCESS EXCLUSIVE MODE")
                if not await raw.fetchval(f"SELECT EXISTS (SELECT 1 FROM {name})"):
                    await raw.execute(f"DROP TABLE IF EXISTS {name}")
                    dropped += 1
        except asyncpg.LockNotAvailableError:
            continue  # readers are on it: the next run drops it
    return dropped


# Space and what is stored.


async def reclaim(conn: BaseDBAsyncClient, *, rows_moved: int = 0) -> int:
    """Return free space to the file system; the bytes returned.

    SQLite (databases made with incremental auto-vacuum, as fieldgate makes them): the free
    pages, at once. PostgreSQL: expired chunks go with their partitions (`expire`); the
    `reading` table keeps the pages of rows moved into chunks for reuse (autovacuum), which is
    right while it holds the usual hour or so; after a run that moved many rows (a backlog, a
    bulk load: `rows_moved` >= RECLAIM_ROWS) it is vacuumed, which cuts its empty tail pages,
    and its index rebuilt without blocking writes (REINDEX CONCURRENTLY) when that index is
    more than 4x the size its rows need."""
    if dialect_of(conn) is Dialect.SQLITE:
        return await _sqlite_reclaim(conn)
    if rows_moved < RECLAIM_ROWS:
        return 0
    async with conn.acquire_connection() as raw:
        before = int(await raw.fetchval("SELECT pg_total_relation_size('reading')"))
        # A REINDEX CONCURRENTLY that was cut short (the gateway stopped) leaves an invalid
        # copy of the index that every insert still maintains: drop it.
        for (index,) in await raw.fetch(
            "SELECT indexrelid::regclass::text FROM pg_index"
            " WHERE indrelid = 'reading'::regclass AND NOT indisvalid"
        ):
            await raw.execute(f"DROP INDEX CONCURRENTLY IF EXISTS {index}")
        await raw.execute("VACUUM reading")
        rows = float(
            await raw.fetchval("SELECT reltuples FROM pg_class WHERE oid = 'reading'::regclass")
        )
        for (index,) in await raw.fetch(
            "SELECT indexrelid::regclass::text FROM pg_index WHERE indrelid = 'reading'::regclass"
        ):
            size = int(await raw.fetchval("SELECT pg_relation_size($1::regclass)", index))
            if size > 8 * 2**20 and size > 4 * 40 * max(rows, 0.0):
                await raw.execute(f"REINDEX INDEX CONCURRENTLY {index}")
        after = int(await raw.fetchval("SELECT pg_total_relation_size('reading')"))
        return max(before - after, 0)


# A run that moved at least this many readings out of `reading` makes PostgreSQL's `reclaim`
# vacuum it and check its index.
RECLAIM_ROWS: Final = 100_000


async def _sqlite_reclaim(conn: BaseDBAsyncClient) -> int:
    page = int((await fetch(conn, "PRAGMA page_size"))[0][0])
    mode = int((await fetch(conn, "PRAGMA auto_vacuum"))[0][0])
    free = int((await fetch(conn, "PRAGMA freelist_count"))[0][0])
    if mode != 2 or not free:
        return 0
    await sqlite_script(conn, "PRAGMA incremental_vacuum")
    after = int((await fetch(conn, "PRAGMA freelist_count"))[0][0])
    return (free - after) * page
