"""Times and durations in query parameters, and timestamps in answers.

Instants: RFC 3339 (`2026-11-23T10:00:00Z`), `now`, or relative to now (`-24h`, `-7d`, `-90s`).
Durations: `500ms`, `1s`, `90s`, `15m`, `6h`, `1d`, `2w`, and sums like `1h30m`.
Everything internal is integer UTC epoch microseconds.
"""

from __future__ import annotations

import re
import time
from datetime import UTC, datetime, timedelta
from typing import Final

from gateway.errors import BadRequest

_EPOCH: Final = datetime(1970, 1, 1, tzinfo=UTC)
_US: Final = timedelta(microseconds=1)
_UNIT_US: Final = {
    "us": 1,
    "ms": 1_000,
    "s": 1_000_000,
    "m": 60_000_000,
    "h": 3_600_000_000,
    "d": 86_400_000_000,
    "w": 604_800_000_000,
}
_PART = re.compile(r"(\d+)(us|ms|s|m|h|d|w)")
_DURATION = re.compile(r"^(?:\d+(?:us|ms|s|m|h|d|w))+$")


def parse_duration(text: str, *, name: str = "window") -> int:
    """Microseconds in a duration like `15m` or `1h30m`."""
    text = text.strip()
    if not _DURATION.match(text):
        raise BadRequest(
            f"{name}={text!r} is not a duration (use e.g. 10s, 15m, 1h, 1d, or 1h30m)",
            code="invalid_parameter",
        )
    return sum(int(n) * _UNIT_US[unit] for n, unit in _PART.findall(text))


def parse_instant(text: str, now_us: int, *, name: str) -> int:
    """Epoch microseconds of an RFC 3339 time, `now`, or `-<duration>` relative to now."""
    text = text.strip()
    if text == "now":
        return now_us
    if text[:1] in "+-" and _DURATION.match(text[1:]):
        delta = parse_duration(text[1:], name=name)
        return now_us - delta if text[0] == "-" else now_us + delta
    try:
        dt = datetime.fromisoformat(text)
    except ValueError:
        raise BadRequest(
            f"{name}={text!r} is not a time (use RFC 3339 like 2026-11-23T10:00:00Z, now, or -24h)",
            code="invalid_parameter",
        ) from None
    if dt.tzinfo is None:
        raise BadRequest(
            f"{name}={text!r} has no UTC offset (add Z or +01:00)", code="invalid_parameter"
        )
    return (dt - _EPOCH) // _US


def now_us() -> int:
    return time.time_ns() // 1000


def format_ts(us: int) -> str:
    """RFC 3339 in UTC with `Z`; milliseconds or microseconds only when there are some."""
    sec, frac = divmod(us, 1_000_000)
    base = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(sec))
    if not frac:
        return base + "Z"
    if frac % 1000 == 0:
        return f"{base}.{frac // 1000:03d}Z"
    return f"{base}.{frac:06d}Z"


def format_duration(us: int) -> str:
    """The shortest exact spelling: 60_000_000 -> '1m', 5_400_000_000 -> '1h30m'."""
    if us <= 0:
        return "0s"
    parts = []
    for unit in ("d", "h", "m", "s", "ms", "us"):
        n, us = divmod(us, _UNIT_US[unit])
        if n:
            parts.append(f"{n}{unit}")
    return "".join(parts)
