"""Time-bucket aggregation in SQL: aggregate functions and fill modes as enums, one query builder.

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
from enum import StrEnum
from typing import Any, Final

from tortoise.backends.base.client import BaseDBAsyncClient

from gateway.store.sql import fetch

MAX_BUCKETS: Final = 10_000
AUTO_TARGET_BUCKETS: Final = 500
MIN_WINDOW_US: Final = 1_000_000


class Agg(StrEnum):
    AVG = "avg"
    MIN = "min"
    MAX = "max"
    SUM = "sum"
    COUNT = "count"
    FIRST = "first"
    LAST = "last"
    STDDEV = "stddev"


class Fill(StrEnum):
    NONE = "none"  # omit empty buckets
    NULL = "null"  # empty buckets with nulls, count 0
    PREVIOUS = "previous"  # carry the last known value forward
    LINEAR = "linear"  # interpolate between the neighbouring buckets


# One non-empty bucket: (start in epoch microseconds, number of readings, the value of each agg
# of `value_aggs(aggs)`, in that order). Plain tuples: an answer can hold 10,000 x 1,000 of them.
Bucket = tuple[int, int, tuple[float | None, ...]]


def value_aggs(aggs: Sequence[Agg]) -> list[Agg]:
    """The aggs that carry a value, in the order asked (`count` is a bucket's own field)."""
    return [a for a in aggs if a is not Agg.COUNT]


def bucket_count(start_us: int, end_us: int, window_us: int) -> int:
    """Epoch-aligned buckets needed to cover [start, end)."""
    first = start_us - start_us % window_us
    return max(0, -(-(end_us - first) // window_us))


def _grouped_columns(aggs: Collection[Agg]) -> str:
    cols = "count(*) AS n, sum(value) AS s, min(value) AS lo, max(value) AS hi"
    if Agg.FIRST in aggs or Agg.LAST in aggs:
        cols += ", min(ts) AS t0, max(ts) AS t1"
    if Agg.STDDEV in aggs:
        cols += ", sum((value - m) * (value - m)) AS ss"
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
    `window_us` is None. Rows: series_id, bucket start, count, sum, min, max [, min ts, max ts]
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
    names = ["series_id", "b", "n", "s", "lo", "hi"]
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


def _value_getters(aggs: Sequence[Agg]) -> list[Callable[[Any], float | None]]:
    """For each agg of `value_aggs(aggs)`, how to read its value from a row of `build_sql`."""
    edge = Agg.FIRST in aggs or Agg.LAST in aggs
    ss = 8 if edge else 6  # column of the sum of squared deviations
    first = ss + (Agg.STDDEV in aggs)  # column of the first value (the last one follows)
    getters: dict[Agg, Callable[[Any], float | None]] = {
        Agg.AVG: lambda r: float(r[3]) / r[2],
        Agg.MIN: lambda r: float(r[4]),
        Agg.MAX: lambda r: float(r[5]),
        Agg.SUM: lambda r: float(r[3]),
        Agg.STDDEV: lambda r: _stddev(r[2], r[ss]),
        Agg.FIRST: lambda r: float(r[first]),
        Agg.LAST: lambda r: float(r[first + 1]),
    }
    return [getters[a] for a in value_aggs(aggs)]


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
    """Non-empty buckets per series id, in time order; values in the order of `value_aggs`."""
    if not series_ids:
        return {}
    sql = build_sql(len(series_ids), aggs, window_us=window_us, bounds=bounds)
    rows = await fetch(conn, sql, [*series_ids, start_us, end_us])
    getters = _value_getters(aggs)
    out: dict[int, list[Bucket]] = {}
    current = -1
    buckets: list[Bucket] = []
    for row in rows:
        sid = row[0]
        if sid != current:  # rows come ordered by series
            current = sid
            buckets = out.setdefault(int(sid), [])
        buckets.append((int(row[1]), int(row[2]), tuple([get(row) for get in getters])))
    return out


async def values_before(
    conn: BaseDBAsyncClient, series_ids: Sequence[int], before_us: int
) -> dict[int, float]:
    """The last value of each series before `before_us` (for fill=previous), by index lookups."""
    out: dict[int, float] = {}
    for sid in series_ids:
        rows = await fetch(
            conn,
            "SELECT value FROM reading WHERE series_id = ? AND ts < ? ORDER BY ts DESC LIMIT 1",
            (sid, before_us),
        )
        if rows:
            out[sid] = float(rows[0][0])
    return out
