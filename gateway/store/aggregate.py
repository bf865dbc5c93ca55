"""Time-bucket aggregation in SQL: one query builder and the two queries that run it.

The rules (which window, how many buckets, how empty buckets are filled) are
gateway/aggregation.py's; this module only turns a checked query into SQL and rows into
`Bucket`s (gateway/buckets.py, the words both share).

Buckets are computed on integer epoch microseconds, on the (series_id, ts) primary key:
`ts - ts % window` (aligned to the UNIX epoch), or, for calendar buckets such as local days, a
list of explicit [start, end) bounds joined to the readings. The same SQL runs on SQLite and
PostgreSQL. `first`/`last` are the values at the bucket's min/max ts, fetched by primary-key
lookups; `stddev` (sample) is computed in two passes (a window-function mean per bucket, then the
sum of squared deviations), which stays exact where sum-of-squares formulas cancel.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Collection, Sequence
from operator import itemgetter
from typing import Any

import asyncpg
import numpy as np
from tortoise.backends.base.client import BaseDBAsyncClient

from gateway.buckets import Agg, Bucket, value_aggs
from gateway.store import packed, partials
from gateway.store.partials import Int64s, Partials
from gateway.store.raw_sql import fetch, read_snapshot


def _grouped_columns(aggs: Collection[Agg]) -> str:
    # PostgreSQL raises "underflow" where a product or quotient of nonzero doubles rounds to
    # zero (subnormal values): those two give IEEE's zero here without dividing or multiplying
    # (sum / count rounds to zero exactly when 2 |sum| <= count x the least subnormal; a square
    # of a deviation under 1.6e-162 is at most that least subnormal).
    cols = (
        "count(*) AS n, sum(value) AS s, min(value) AS lo, max(value) AS hi,"
        " CASE WHEN abs(sum(value)) * 2 <= count(*) * CAST(5e-324 AS DOUBLE PRECISION)"
        " THEN 0.0 * sum(value) ELSE sum(value) / count(*) END AS av"
    )
    if Agg.FIRST in aggs or Agg.LAST in aggs:
        cols += ", min(ts) AS t0, max(ts) AS t1"
    if Agg.STDDEV in aggs:
        cols += (
            ", sum(CASE WHEN abs(value - m) < 1.6e-162 THEN 0.0"
            " ELSE (value - m) * (value - m) END) AS ss"
        )
    return cols


def build_sql(
    n_series: int,
    aggs: Collection[Agg],
    *,
    window_us: int | None,
    bounds: Sequence[tuple[int, int]],
) -> str:
    """The aggregate query over `n_series` series ids and [start, end) (all `?` parameters).

    Buckets are epoch-aligned `window_us` wide, or the explicit [lo, hi) `bounds` when
    `window_us` is None. Rows: series_id, bucket start, count, sum, min, max, average
    (sum / count, the same double division as in Python) [, min ts, max ts]
    [, sum of squared deviations][, first value, last value], ordered by series and bucket; the
    bracketed columns only when first/last resp. stddev are asked for.
    """
    ids = ", ".join("?" * n_series)
    stddev = Agg.STDDEV in aggs
    edge = Agg.FIRST in aggs or Agg.LAST in aggs
    if window_us is not None:
        bucket = f"ts - ts % {int(window_us)}"
        mean = f", avg(value) OVER (PARTITION BY series_id, {bucket}) AS m" if stddev else ""
        source = (
            f"SELECT series_id, {bucket} AS b, ts, value{mean} FROM reading"
            f" WHERE series_id IN ({ids}) AND ts >= ? AND ts < ?"
        )
    else:
        mean = ", avg(r.value) OVER (PARTITION BY r.series_id, k.b0) AS m" if stddev else ""
        source = (
            f"SELECT r.series_id AS series_id, k.b0 AS b, r.ts AS ts, r.value AS value{mean}"
            " FROM k JOIN reading r ON r.ts >= k.b0 AND r.ts < k.b1"
            f" WHERE r.series_id IN ({ids}) AND r.ts >= ? AND r.ts < ?"
        )
    grouped = (
        f"SELECT series_id, b, {_grouped_columns(aggs)} FROM ({source}) q GROUP BY series_id, b"
    )
    names = ["series_id", "b", "n", "s", "lo", "hi", "av"]
    names += ["t0", "t1"] if edge else []
    names += ["ss"] if stddev else []
    head = ""
    if window_us is None:
        head = (
            "WITH k(b0, b1) AS (VALUES "
            + ", ".join(f"({int(lo)}, {int(hi)})" for lo, hi in bounds)
            + ") "
        )
    if not edge:
        return f"{head}SELECT {', '.join(names)} FROM ({grouped}) a ORDER BY series_id, b"
    return (
        f"{head}SELECT {', '.join('a.' + n for n in names)}, f.value, l.value FROM ({grouped}) a"
        " JOIN reading f ON f.series_id = a.series_id AND f.ts = a.t0"
        " JOIN reading l ON l.series_id = a.series_id AND l.ts = a.t1"
        " ORDER BY a.series_id, a.b"
    )


def _stddev(n: int, ss: float) -> float | None:
    """Sample standard deviation from the count and the sum of squared deviations."""
    return math.sqrt(max(float(ss), 0.0) / (n - 1)) if n > 1 else None


def _value_reader(aggs: Sequence[Agg]) -> Callable[[Any], tuple[float | None, ...]]:
    """How to read the values of `value_aggs(aggs)`, in order, from a row of `build_sql`: one
    C-level `itemgetter` call per row unless stddev needs computing (the per-bucket work of the
    whole answer; a 10,000-bucket answer goes through this 10,000 times)."""
    edge = Agg.FIRST in aggs or Agg.LAST in aggs
    ss = 9 if edge else 7  # column of the sum of squared deviations
    first = ss + (Agg.STDDEV in aggs)  # column of the first value (the last one follows)
    columns = {Agg.AVG: 6, Agg.MIN: 4, Agg.MAX: 5, Agg.SUM: 3, Agg.FIRST: first}
    columns[Agg.LAST] = first + 1
    wanted = value_aggs(aggs)
    if Agg.STDDEV not in wanted:
        picked = [columns[a] for a in wanted]
        if not picked:  # agg=count alone: the count is the bucket's own field
            return lambda r: ()
        if len(picked) == 1:
            only = picked[0]
            return lambda r: (r[only],)
        return itemgetter(*picked)
    getters: list[Callable[[Any], float | None]] = [
        (lambda r: _stddev(r[2], r[ss])) if a is Agg.STDDEV else itemgetter(columns[a])
        for a in wanted
    ]
    return lambda r: tuple([get(r) for get in getters])


async def aggregate_windows(
    conn: BaseDBAsyncClient,
    series_ids: Sequence[int],
    start_us: int,
    end_us: int,
    aggs: Sequence[Agg],
    *,
    window_us: int | None = None,
    bounds: Sequence[tuple[int, int]] = (),
) -> dict[int, list[Bucket]]:
    """Non-empty buckets per series id, in time order; values in the order of `value_aggs`.

    Unpacked rows are aggregated by the SQL above; packed history by
    gateway/store/packed.py's partials (chunk summaries, hourly rollups, decoded edges), and
    a series with both gets the two merged bucket by bucket. Both are read in one snapshot
    (a packing step committing between them would move readings out of one into the other)."""
    if not series_ids:
        return {}
    bucket_keys = packed.BucketKeys(window_us, bounds)
    try:
        async with read_snapshot(conn) as snap:
            return await _windows(snap, series_ids, start_us, end_us, aggs, bucket_keys)
    except asyncpg.NumericValueOutOfRangeError:
        # PostgreSQL raises where a bucket's float sum (or a squared deviation) passes the
        # double range, with values near 1.8e308 (and the snapshot's transaction is over):
        # those rows are aggregated as packed ones are (an infinite sum answers null, as on
        # SQLite).
        async with read_snapshot(conn) as snap:
            return await _windows(snap, series_ids, start_us, end_us, aggs, bucket_keys, sql=False)


async def _windows(
    conn: BaseDBAsyncClient,
    series_ids: Sequence[int],
    start_us: int,
    end_us: int,
    aggs: Sequence[Agg],
    bucket_keys: packed.BucketKeys,
    *,
    sql: bool = True,
) -> dict[int, list[Bucket]]:
    moments = Agg.STDDEV in aggs
    cold = await packed.packed_partials(
        conn, series_ids, start_us, end_us, bucket_keys, moments=moments
    )
    if not sql:
        found = await _rows_as_partials(conn, series_ids, start_us, end_us, bucket_keys, moments)
        for sid, packed_part in cold.items():
            found[sid] = _merged(packed_part, found[sid]) if sid in found else packed_part
        return {sid: _partial_buckets(k, p, aggs) for sid, (k, p) in found.items()}
    query = build_sql(
        len(series_ids), aggs, window_us=bucket_keys.window_us, bounds=bucket_keys.bounds
    )
    rows = await fetch(conn, query, [*series_ids, start_us, end_us])
    read = _value_reader(aggs)
    out: dict[int, list[Bucket]] = {}
    hot: dict[int, list[Any]] = {}
    current = -1
    buckets: list[Any] = []
    for row in rows:
        sid = row[0]
        if sid != current:  # rows come ordered by series
            current = sid
            buckets = hot.setdefault(int(sid), [])
        buckets.append(row)
    for sid, sid_rows in hot.items():
        if sid not in cold:
            out[sid] = [(row[1], row[2], read(row)) for row in sid_rows]
    for sid, packed_part in cold.items():
        if sid in hot:
            packed_part = _merged(packed_part, _row_partials(hot[sid], aggs))
        out[sid] = _partial_buckets(*packed_part, aggs)
    return out


def _merged(a: tuple[Int64s, Partials], b: tuple[Int64s, Partials]) -> tuple[Int64s, Partials]:
    """Two sets of bucket partials of one series, merged bucket by bucket."""
    return partials.merge_by_key(np.concatenate([a[0], b[0]]), partials.concat([a[1], b[1]]))


async def _rows_as_partials(
    conn: BaseDBAsyncClient,
    series_ids: Sequence[int],
    start_us: int,
    end_us: int,
    keys: packed.BucketKeys,
    moments: bool,
) -> dict[int, tuple[Int64s, Partials]]:
    """The unpacked rows of the range, grouped by bucket in numpy (the rare path above)."""
    marks = ", ".join("?" * len(series_ids))
    rows = await fetch(
        conn,
        f"SELECT series_id, ts, value FROM reading WHERE series_id IN ({marks})"
        " AND ts >= ? AND ts < ? ORDER BY series_id, ts",
        [*series_ids, start_us, end_us],
    )
    by_series: dict[int, list[Any]] = {}
    for row in rows:
        by_series.setdefault(int(row[0]), []).append(row)
    out: dict[int, tuple[Int64s, Partials]] = {}
    for sid, got in by_series.items():
        ts = np.array([int(r[1]) for r in got], dtype=np.int64)
        values = np.array([float(r[2]) for r in got], dtype=np.float64)
        out[sid] = keys.group(ts, values, moments=moments)
    return out


def _row_partials(rows: Sequence[Any], aggs: Sequence[Agg]) -> tuple[Int64s, Partials]:
    """The SQL's bucket rows as partials (columns it did not select are left at zero: only the
    aggs asked are read back)."""
    edge = Agg.FIRST in aggs or Agg.LAST in aggs
    stddev = Agg.STDDEV in aggs
    ss = 9 if edge else 7
    first = ss + stddev
    out = []
    for r in rows:
        t0, t1 = (r[7], r[8]) if edge else (r[1], r[1])
        v0, v1 = (r[first], r[first + 1]) if edge else (0.0, 0.0)
        m2 = r[ss] if stddev and r[ss] is not None else 0.0
        out.append((t0, t1, r[2], r[3], r[4], r[5], v0, v1, r[6], 0.0, m2))
    return np.array([int(r[1]) for r in rows], dtype=np.int64), partials.many(out)


def _partial_buckets(keys: Int64s, p: Partials, aggs: Sequence[Agg]) -> list[Bucket]:
    columns: list[list[float | None]] = []
    n = p.n
    for a in value_aggs(aggs):
        if a is Agg.AVG:
            with np.errstate(over="ignore", invalid="ignore"):
                columns.append((p.s / n).tolist())
        elif a is Agg.STDDEV:
            columns.append([_stddev(c, m) for c, m in zip(n.tolist(), p.m2.tolist(), strict=True)])
        else:
            column = {Agg.MIN: p.lo, Agg.MAX: p.hi, Agg.SUM: p.s, Agg.FIRST: p.v0, Agg.LAST: p.v1}
            columns.append(column[a].tolist())
    values = list(zip(*columns, strict=True)) if columns else [()] * len(n)
    return list(zip(keys.tolist(), n.tolist(), values, strict=True))


async def values_before(
    conn: BaseDBAsyncClient, series_ids: Sequence[int], before_us: int
) -> dict[int, float]:
    """The last value of each series before `before_us` (for fill=previous): one query, one
    primary-key lookup per series, and the same over packed chunks; the later one wins."""
    if not series_ids:
        return {}
    async with read_snapshot(conn) as snap:
        return await _values_before(snap, series_ids, before_us)


async def _values_before(
    conn: BaseDBAsyncClient, series_ids: Sequence[int], before_us: int
) -> dict[int, float]:
    rows = await fetch(
        conn,
        "SELECT s.id, r.ts, r.value FROM series s JOIN reading r ON r.series_id = s.id"
        " AND r.ts = (SELECT max(ts) FROM reading WHERE series_id = s.id AND ts < ?)"
        " WHERE s.id IN ({})".format(", ".join("?" * len(series_ids))),
        (before_us, *series_ids),
    )
    latest = {int(sid): (int(ts), float(value)) for sid, ts, value in rows}
    for sid, (ts, value) in (await packed.packed_before(conn, series_ids, before_us)).items():
        if sid not in latest or ts > latest[sid][0]:
            latest[sid] = (ts, value)
    return {sid: value for sid, (_, value) in latest.items()}
