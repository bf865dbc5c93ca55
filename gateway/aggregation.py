"""The read path's aggregation rules, and the service the aggregate endpoints call.

    GET .../aggregate (gateway/api/reads.py: binds HTTP)
      -> AggregateQuery.parse: limits checked before any SQL (metrics, range, aggs, fill, tz,
         window, bucket count)
      -> device_aggregate / fleet_aggregate: which series (devices that exist, MAX_SERIES)
      -> gateway/store/aggregate.py: SQL, non-empty buckets per series
      -> fill_buckets: empty buckets as `fill` asks, starts formatted
      -> AggregateAnswer: the JSON body, or rows for CSV

The words shared with the SQL builder (`Agg`, `Bucket`) are gateway/buckets.py's; `Fill` and the
limits are the rules' own (the store never sees them).
"""

from __future__ import annotations

import bisect
import re
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from datetime import UTC, date, datetime, time, timedelta
from enum import StrEnum
from functools import lru_cache
from time import gmtime, strftime
from typing import Any, Final
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from devices.formats import METRIC_PATTERN
from gateway.buckets import Agg, Bucket, value_aggs
from gateway.errors import BadRequest
from gateway.store import registry
from gateway.store.aggregate import aggregate_windows, values_before
from gateway.store.database import connection
from gateway.store.series import SeriesCache, find_series, series_units
from gateway.timespec import format_duration, format_ts, parse_duration, parse_instant

# Buckets one answer may hold, per series (checked before the query runs).
MAX_BUCKETS: Final = 10_000
# Buckets `window=auto` aims at.
AUTO_TARGET_BUCKETS: Final = 500
MIN_WINDOW_US: Final = 1_000_000
DAY_US: Final = 86_400_000_000
# Series one query may read: the metrics it names, the devices it names, and what they match.
# (Also what keeps a query's parameters under the databases' limits: PostgreSQL takes at most
# 32,767 per statement, SQLite 32,766.)
MAX_SERIES: Final = 1000
DEFAULT_SPAN_US: Final = DAY_US
# Windows `auto` and the "try window=..." hint choose from.
NICE_WINDOWS_US: Final = tuple(
    parse_duration(w)
    for w in (
        *("1s", "2s", "5s", "10s", "15s", "30s", "1m", "2m", "5m", "10m", "15m", "30m"),
        *("1h", "2h", "3h", "6h", "12h", "1d", "2d", "7d", "14d", "28d"),
    )
)
_EPOCH_DATE: Final = date(1970, 1, 1)

_METRIC_RE: Final = re.compile(METRIC_PATTERN)


class Fill(StrEnum):
    NONE = "none"  # omit empty buckets
    NULL = "null"  # empty buckets with nulls, count 0
    PREVIOUS = "previous"  # carry the last known value forward
    LINEAR = "linear"  # interpolate between the neighbouring buckets


def _bad(message: str, code: str = "invalid_parameter") -> BadRequest:
    return BadRequest(message, code=code)


def bucket_count(start_us: int, end_us: int, window_us: int) -> int:
    """Epoch-aligned buckets needed to cover [start, end)."""
    first = start_us - start_us % window_us
    return max(0, -(-(end_us - first) // window_us))


def _fitting_window(span_us: int, max_buckets: int) -> int:
    for w in NICE_WINDOWS_US:
        if bucket_count(0, span_us, w) <= max_buckets - 1:
            return w
    return -(-span_us // (max_buckets - 1))


@dataclass(slots=True)
class AggregateQuery:
    metrics: list[str]
    start_us: int
    end_us: int
    window_us: int
    aggs: list[Agg]
    fill: Fill
    tz: ZoneInfo | None
    # Explicit [lo, hi) buckets when calendar-aligned (tz with whole-day windows), else None.
    bounds: list[tuple[int, int]] | None

    @classmethod
    def parse(
        cls,
        *,
        metrics: Sequence[str],
        start: str | None,
        end: str | None,
        window: str,
        agg: str,
        fill: str,
        tz: str | None,
        now_us: int,
    ) -> AggregateQuery:
        """The query the parameters ask for; BadRequest (400, with a hint) for any that is
        wrong, or for more than MAX_BUCKETS buckets. No SQL has run yet."""
        names = _parse_metrics(metrics)
        start_us, end_us = _parse_range(start, end, now_us)
        aggs = _parse_aggs(agg)
        fill_mode = _parse_fill(fill)
        zone = _parse_tz(tz)
        window_us = _parse_window(window, end_us - start_us)
        bounds = _calendar_bounds(start_us, end_us, window_us, zone, window)
        n = len(bounds) if bounds is not None else bucket_count(start_us, end_us, window_us)
        if n > MAX_BUCKETS:
            hint = format_duration(_fitting_window(end_us - start_us, MAX_BUCKETS))
            raise _bad(
                f"window={window} gives {n} buckets over this range; the limit is "
                f"{MAX_BUCKETS}: use window={hint} or longer, or a shorter range",
                "too_many_buckets",
            )
        return cls(names, start_us, end_us, window_us, aggs, fill_mode, zone, bounds)

    def bucket_starts(self) -> list[int]:
        """Every bucket start in the range (for the fill modes that show empty buckets)."""
        if self.bounds is not None:
            return [lo for lo, _ in self.bounds]
        w = self.window_us
        first = self.start_us - self.start_us % w
        return list(range(first, self.end_us, w))

    def header(self) -> dict[str, Any]:
        head: dict[str, Any] = {
            "window": format_duration(self.window_us),
            "start": format_ts(self.start_us),
            "end": format_ts(self.end_us),
        }
        if self.tz is not None:
            head["tz"] = self.tz.key
        return head

    def columns(self) -> list[str]:
        """The keys of each answered bucket, in order: start, the value aggs, count."""
        return ["start", *(a.value for a in value_aggs(self.aggs)), "count"]


def _parse_metrics(metrics: Sequence[str]) -> list[str]:
    """The metric names, each once, in the order given."""
    if not metrics:
        raise _bad("name at least one metric: metric=temperature", "missing_parameter")
    for m in metrics:
        if not _METRIC_RE.fullmatch(m):
            raise _bad(f"metric={m!r} is not a metric name")
    names = list(dict.fromkeys(metrics))
    if len(names) > MAX_SERIES:
        raise _bad(f"at most {MAX_SERIES} metrics per query", "too_many_series")
    return names


def _parse_range(start: str | None, end: str | None, now_us: int) -> tuple[int, int]:
    """[start, end) in epoch microseconds: end defaults to now, start to end - 24h; clamped to
    the epoch (no reading is stored before it)."""
    end_us = parse_instant(end, now_us, name="end") if end else now_us
    start_us = parse_instant(start, now_us, name="start") if start else end_us - DEFAULT_SPAN_US
    if end_us <= start_us:
        raise _bad(
            f"end ({format_ts(end_us) if end_us >= 0 else end_us}) must be after start "
            f"({format_ts(start_us) if start_us >= 0 else start_us})",
            "invalid_range",
        )
    return max(start_us, 0), max(end_us, 1)


def _parse_fill(fill: str) -> Fill:
    try:
        return Fill(fill)
    except ValueError:
        raise _bad(
            f"fill={fill!r} is unknown; use one of: {', '.join(f.value for f in Fill)}",
            "invalid_fill",
        ) from None


def _parse_window(window: str, span_us: int) -> int:
    """The window in microseconds; `auto` picks the nice window giving ~AUTO_TARGET_BUCKETS."""
    if window == "auto":
        return _fitting_window(span_us, AUTO_TARGET_BUCKETS + 1)
    window_us = parse_duration(window)
    if window_us < MIN_WINDOW_US:
        raise _bad(f"window={window!r} is under 1s", "invalid_window")
    return window_us


def _calendar_bounds(
    start_us: int, end_us: int, window_us: int, zone: ZoneInfo | None, window: str
) -> list[tuple[int, int]] | None:
    """Local-midnight buckets when a zone is given and the window is whole days, else None
    (epoch-aligned buckets)."""
    if zone is None or window_us % DAY_US:
        return None
    try:
        return local_day_bounds(start_us, end_us, window_us // DAY_US, zone)
    except (OverflowError, ValueError):  # a local date past 9999-12-31
        raise _bad(
            f"window={window} in tz={zone.key} reaches past the year 9999", "invalid_range"
        ) from None


def _parse_aggs(text: str) -> list[Agg]:
    names = [a.strip() for a in text.split(",") if a.strip()]
    if not names:
        raise _bad("agg is empty; use e.g. agg=avg,min,max", "invalid_agg")
    aggs: list[Agg] = []
    for name in names:
        try:
            aggs.append(Agg(name))
        except ValueError:
            raise _bad(
                f"agg={name!r} is unknown; use any of: {', '.join(a.value for a in Agg)}",
                "invalid_agg",
            ) from None
    return list(dict.fromkeys(aggs))


def _parse_tz(tz: str | None) -> ZoneInfo | None:
    if not tz:
        return None
    try:
        return ZoneInfo(tz)
    except (ZoneInfoNotFoundError, ValueError, OSError):  # OSError: a name too long for a file
        raise _bad(f"tz={tz!r} is not an IANA time zone (e.g. Europe/Oslo)", "invalid_tz") from None


def local_day_bounds(
    start_us: int, end_us: int, days: int, zone: ZoneInfo
) -> list[tuple[int, int]]:
    """[lo, hi) of `days`-day buckets starting at local midnight in `zone` (DST-aware; days are
    counted from 1970-01-01 so buckets are stable across queries), covering [start, end)."""

    def local_midnight_us(d: date) -> int:
        dt = datetime.combine(d, time(0), tzinfo=zone)
        return (dt.astimezone(UTC) - datetime(1970, 1, 1, tzinfo=UTC)) // timedelta(microseconds=1)

    first_day = datetime.fromtimestamp(start_us / 1e6, tz=zone).date()
    n = (first_day - _EPOCH_DATE).days
    day = _EPOCH_DATE + timedelta(days=n - n % days)
    bounds: list[tuple[int, int]] = []
    lo = local_midnight_us(day)
    while lo < end_us:
        day += timedelta(days=days)
        hi = local_midnight_us(day)
        bounds.append((lo, hi))
        lo = hi
        if len(bounds) > MAX_BUCKETS:
            break
    return bounds


@lru_cache(maxsize=4096)
def _day_prefix(day: int) -> str:
    """Day number since the epoch -> "2026-11-23T"."""
    return strftime("%Y-%m-%dT", gmtime(day * 86_400))


@lru_cache(maxsize=86_400)
def _time_of_day(second: int) -> str:
    """Second of the day -> "10:00:00Z"."""
    return strftime("%H:%M:%SZ", gmtime(second))


def format_start(us: int) -> str:
    """`format_ts` of a bucket start; whole seconds from cached date and time-of-day strings
    (an answer formats up to 10,000 x 1,000 starts; `strftime` each time was most of its cost)."""
    sec, frac = divmod(us, 1_000_000)
    if frac:
        return format_ts(us)
    day, second = divmod(sec, 86_400)
    return _day_prefix(day) + _time_of_day(second)


def fill_buckets(
    q: AggregateQuery, found: list[Bucket], before: float | None
) -> list[dict[str, Any]]:
    """Buckets as answered: `found` (non-empty, in order) plus empty ones as `q.fill` asks.

    previous: an empty bucket repeats the last known values (the last reading before the range
    for leading buckets; count stays 0). linear: each value is interpolated by bucket start
    between the neighbouring non-empty buckets; no extrapolation past the first or last one.
    """
    aggs = value_aggs(q.aggs)
    keys = q.columns()
    fmt = format_start
    nulls: tuple[float | None, ...] = (None,) * len(aggs)

    if q.fill is Fill.NONE:
        return _bucket_dicts(keys, found)
    by_start = {b[0]: b for b in found}
    starts = q.bucket_starts()
    out: list[dict[str, Any]] = []
    if q.fill is Fill.NULL:
        for s in starts:
            b = by_start.get(s)
            n, v = (b[1], b[2]) if b is not None else (0, nulls)
            out.append(dict(zip(keys, (fmt(s), *v, n), strict=False)))
        return out
    if q.fill is Fill.PREVIOUS:
        last = nulls
        if before is not None:
            last = tuple(None if a is Agg.STDDEV else before for a in aggs)
        for s in starts:
            b = by_start.get(s)
            if b is not None:
                last = b[2]
                out.append(dict(zip(keys, (fmt(s), *b[2], b[1]), strict=False)))
            else:
                out.append(dict(zip(keys, (fmt(s), *last, 0), strict=False)))
        return out
    # linear
    known = [b[0] for b in found]
    for s in starts:
        b = by_start.get(s)
        if b is not None:
            out.append(dict(zip(keys, (fmt(s), *b[2], b[1]), strict=False)))
            continue
        i = bisect.bisect_left(known, s)
        if i == 0 or i == len(known):
            out.append(dict(zip(keys, (fmt(s), *nulls, 0), strict=False)))
            continue
        left, right = found[i - 1], found[i]
        frac = (s - left[0]) / (right[0] - left[0])
        values = tuple(
            None if lv is None or rv is None else lv + (rv - lv) * frac
            for lv, rv in zip(left[2], right[2], strict=True)
        )
        out.append(dict(zip(keys, (fmt(s), *values, 0), strict=False)))
    return out


def _bucket_dicts(keys: list[str], found: list[Bucket]) -> list[dict[str, Any]]:
    """Non-empty buckets as answered, built with the keys spelled out for up to three value
    aggs (twice as fast as dict(zip(...)): an answer can hold 10,000 x 1,000 buckets)."""
    fmt = format_start
    start, *names, count = keys
    if len(names) == 1:
        (a,) = names
        return [{start: fmt(s), a: v[0], count: n} for s, n, v in found]
    if len(names) == 2:
        a, b = names
        return [{start: fmt(s), a: v[0], b: v[1], count: n} for s, n, v in found]
    if len(names) == 3:
        a, b, c = names
        return [{start: fmt(s), a: v[0], b: v[1], c: v[2], count: n} for s, n, v in found]
    return [dict(zip(keys, (fmt(s), *v, n), strict=True)) for s, n, v in found]


# The service: which series an aggregate reads, and its answer.


@dataclass(slots=True)
class AggregateAnswer:
    """The series of one aggregate query, each {"device", "metric", "unit", "buckets"}, in the
    order answered; `device` is the one device of a device query, None for a fleet query."""

    query: AggregateQuery
    series: list[dict[str, Any]]
    device: str | None

    def body(self) -> dict[str, Any]:
        """The JSON answer (gateway/api/schemas.py declares its three shapes)."""
        q = self.query
        if self.device is None:
            metric = q.metrics[0] if len(q.metrics) == 1 else q.metrics
            return {"metric": metric, **q.header(), "series": self.series}
        if len(self.series) == 1:
            only = self.series[0]
            return {
                "device": self.device,
                "metric": only["metric"],
                "unit": only["unit"],
                **q.header(),
                "buckets": only["buckets"],
            }
        return {"device": self.device, **q.header(), "series": self.series}

    def columns(self) -> list[str]:
        return ["device", "metric", *self.query.columns()]

    def rows(self) -> Iterator[list[Any]]:
        """One row per bucket, as `columns()` names them (None for a missing value)."""
        keys = self.query.columns()
        for s in self.series:
            device, metric = s["device"], s["metric"]
            for b in s["buckets"]:
                yield [device, metric, *(b[k] for k in keys)]


async def device_aggregate(
    series: SeriesCache, device_id: str, q: AggregateQuery
) -> AggregateAnswer:
    """Buckets of one device's metrics, one series per metric asked (empty where it has none);
    DeviceNotFound if the device does not exist."""
    ids = await series.ids_of(device_id, q.metrics)
    # A series belongs to an existing device (deleting a device deletes its series, and ids_of
    # reads them from the database), so the device needs a look-up only when a metric has none.
    if len(ids) < len(q.metrics):
        await registry.require_device(device_id)
    found = await _filled_buckets(q, list(ids.values()))
    empty = fill_buckets(q, [], None) if len(ids) < len(q.metrics) else []
    answered = [
        {
            "device": device_id,
            "metric": m,
            "unit": series.unit_of(device_id, m),  # as ids_of just read it
            "buckets": found[ids[m]] if m in ids else empty,
        }
        for m in q.metrics
    ]
    return AggregateAnswer(q, answered, device_id)


async def fleet_aggregate(q: AggregateQuery, devices: Sequence[str] | None) -> AggregateAnswer:
    """Buckets of the metrics across devices: the named ones (each gets a series per metric, in
    the order named, empty where it has none; DeviceNotFound names any that do not exist), or
    every device that has them, ordered by device and metric. At most MAX_SERIES series."""
    named = _named_devices(devices)
    if named is not None:
        await registry.require_devices(named)
    targets = await find_series(q.metrics, named)
    if len(targets) > MAX_SERIES:
        raise _bad(
            f"{len(targets)} series match; at most {MAX_SERIES} per query: name devices",
            "too_many_series",
        )
    found = await _filled_buckets(q, [sid for sid, _, _ in targets])
    units = await series_units([sid for sid, _, _ in targets])
    if named is None:
        answered = [
            {"device": d, "metric": m, "unit": units.get(sid), "buckets": found[sid]}
            for sid, d, m in targets
        ]
        return AggregateAnswer(q, answered, None)
    ids = {(d, m): sid for sid, d, m in targets}
    empty = fill_buckets(q, [], None) if len(ids) < len(named) * len(q.metrics) else []
    answered = [
        {
            "device": d,
            "metric": m,
            "unit": units.get(ids[d, m]) if (d, m) in ids else None,
            "buckets": found[ids[d, m]] if (d, m) in ids else empty,
        }
        for d in named
        for m in q.metrics
    ]
    return AggregateAnswer(q, answered, None)


def _named_devices(devices: Sequence[str] | None) -> list[str] | None:
    """The devices named, each once, in order; None when none are named (all devices)."""
    if not devices:
        return None
    named = list(dict.fromkeys(devices))
    if len(named) > MAX_SERIES:
        raise _bad(f"at most {MAX_SERIES} devices per query", "too_many_series")
    return named


async def _filled_buckets(
    q: AggregateQuery, series_ids: list[int]
) -> dict[int, list[dict[str, Any]]]:
    """The answered buckets of each series: the store's non-empty ones, filled as `q.fill` asks."""
    conn = connection()
    found = await aggregate_windows(
        conn,
        series_ids,
        q.start_us,
        q.end_us,
        q.aggs,
        window_us=None if q.bounds is not None else q.window_us,
        bounds=q.bounds or (),
    )
    before = {}
    if q.fill is Fill.PREVIOUS:
        before = await values_before(conn, series_ids, q.start_us)
    return {sid: fill_buckets(q, found.get(sid, []), before.get(sid)) for sid in series_ids}
