"""The read path's rules: time range and window limits, calendar buckets, gap filling.

read endpoint -> `AggregateQuery.parse` (limits checked before any SQL) -> store.aggregate SQL ->
`fill_buckets` -> answer.
"""

from __future__ import annotations

import bisect
import re
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, date, datetime, time, timedelta
from time import gmtime, strftime
from typing import Any, Final
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from devices.formats import METRIC_PATTERN
from gateway.errors import BadRequest
from gateway.store.aggregate import (
    AUTO_TARGET_BUCKETS,
    MAX_BUCKETS,
    MIN_WINDOW_US,
    Agg,
    Bucket,
    Fill,
    bucket_count,
    value_aggs,
)
from gateway.timespec import format_duration, format_ts, parse_duration, parse_instant

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


def _bad(message: str, code: str = "invalid_parameter") -> BadRequest:
    return BadRequest(message, code=code)


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
        if not metrics:
            raise _bad("name at least one metric: metric=temperature", "missing_parameter")
        for m in metrics:
            if not _METRIC_RE.fullmatch(m):
                raise _bad(f"metric={m!r} is not a metric name")
        if len(set(metrics)) > MAX_SERIES:
            raise _bad(f"at most {MAX_SERIES} metrics per query", "too_many_series")
        end_us = parse_instant(end, now_us, name="end") if end else now_us
        start_us = parse_instant(start, now_us, name="start") if start else end_us - DEFAULT_SPAN_US
        if end_us <= start_us:
            raise _bad(
                f"end ({format_ts(end_us) if end_us >= 0 else end_us}) must be after start "
                f"({format_ts(start_us) if start_us >= 0 else start_us})",
                "invalid_range",
            )
        start_us = max(start_us, 0)
        end_us = max(end_us, 1)
        aggs = _parse_aggs(agg)
        try:
            fill_mode = Fill(fill)
        except ValueError:
            raise _bad(
                f"fill={fill!r} is unknown; use one of: {', '.join(f.value for f in Fill)}",
                "invalid_fill",
            ) from None
        zone = _parse_tz(tz)
        span = end_us - start_us
        if window == "auto":
            window_us = _fitting_window(span, AUTO_TARGET_BUCKETS + 1)
        else:
            window_us = parse_duration(window)
            if window_us < MIN_WINDOW_US:
                raise _bad(f"window={window!r} is under 1s", "invalid_window")
        bounds = None
        if zone is not None and window_us % DAY_US == 0:
            try:
                bounds = local_day_bounds(start_us, end_us, window_us // DAY_US, zone)
            except (OverflowError, ValueError):  # a local date past 9999-12-31
                raise _bad(
                    f"window={window} in tz={zone.key} reaches past the year 9999",
                    "invalid_range",
                ) from None
            n = len(bounds)
        else:
            n = bucket_count(start_us, end_us, window_us)
        if n > MAX_BUCKETS:
            hint = format_duration(_fitting_window(span, MAX_BUCKETS))
            raise _bad(
                f"window={window} gives {n} buckets over this range; the limit is "
                f"{MAX_BUCKETS}: use window={hint} or longer, or a shorter range",
                "too_many_buckets",
            )
        return cls(
            metrics=list(dict.fromkeys(metrics)),
            start_us=start_us,
            end_us=end_us,
            window_us=window_us,
            aggs=aggs,
            fill=fill_mode,
            tz=zone,
            bounds=bounds,
        )

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


_DAY_PREFIXES: dict[int, str] = {}  # day number -> "2026-11-23T"
_TIMES_OF_DAY: dict[int, str] = {}  # second of the day -> "10:00:00Z" (at most 86,400)


def format_start(us: int) -> str:
    """`format_ts` of a bucket start; whole seconds from cached date and time-of-day strings
    (an answer formats up to 10,000 x 1,000 starts; `strftime` each time was most of its cost)."""
    sec, frac = divmod(us, 1_000_000)
    if frac:
        return format_ts(us)
    day, second = divmod(sec, 86_400)
    prefix = _DAY_PREFIXES.get(day)
    if prefix is None:
        if len(_DAY_PREFIXES) > 100_000:
            _DAY_PREFIXES.clear()
        prefix = _DAY_PREFIXES[day] = strftime("%Y-%m-%dT", gmtime(sec))
    tod = _TIMES_OF_DAY.get(second)
    if tod is None:
        tod = _TIMES_OF_DAY[second] = strftime("%H:%M:%SZ", gmtime(second))
    return prefix + tod


def fill_buckets(
    q: AggregateQuery, found: list[Bucket], before: float | None
) -> list[dict[str, Any]]:
    """Buckets as answered: `found` (non-empty, in order) plus empty ones as `q.fill` asks.

    previous: an empty bucket repeats the last known values (the last reading before the range
    for leading buckets; count stays 0). linear: each value is interpolated by bucket start
    between the neighbouring non-empty buckets; no extrapolation past the first or last one.
    """
    aggs = value_aggs(q.aggs)
    keys = ("start", *(a.value for a in aggs), "count")
    fmt = format_start
    nulls: tuple[float | None, ...] = (None,) * len(aggs)

    if q.fill is Fill.NONE:
        return [dict(zip(keys, (fmt(s), *v, n), strict=False)) for s, n, v in found]
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
