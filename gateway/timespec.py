"""Times and durations in query parameters, and timestamps in answers.

Instants: RFC 3339 (`2026-11-23T10:00:00Z`), `now`, or relative to now (`-24h`, `-7d`, `-90s`).
Durations: `500ms`, `1s`, `90s`, `15m`, `6h`, `1d`, `2w`, and sums like `1h30m`.
Everything internal is integer UTC epoch microseconds. Every instant parsed here lies in the years
1-9999 (UTC) and every duration is at most the span between them, so whatever a client sends, a
time or window fits a 64-bit integer (the databases' BIGINT) and Python's `datetime`; anything
beyond is a 400 invalid_parameter, never an overflow deeper down.
"""

from __future__ import annotations

import re
import time
from datetime import UTC, datetime, timedelta
from typing import Final

from devices.formats import TS_MAX_US
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
# At most 24 digits a part (int() refuses over 4,300; 24 is already far past the bound below).
_PART = re.compile(r"(\d{1,24})(us|ms|s|m|h|d|w)")
_DURATION = re.compile(r"^(?:\d{1,24}(?:us|ms|s|m|h|d|w))+$")
MIN_US: Final = (datetime(1, 1, 1, tzinfo=UTC) - _EPOCH) // _US
MAX_US: Final = TS_MAX_US  # 9999-12-31T23:59:59.999999Z, the latest time stored
MAX_DURATION_US: Final = MAX_US - MIN_US


def parse_duration(text: str, *, name: str = "window") -> int:
    """Microseconds in a duration like `15m` or `1h30m`."""
    text = text.strip()
    if not _DURATION.match(text):
        raise BadRequest(
            f"{name}={text!r} is not a duration (use e.g. 10s, 15m, 1h, 1d, or 1h30m)",
            code="invalid_parameter",
        )
    us = _sum_parts(text)
    if us > MAX_DURATION_US:
        raise BadRequest(
            f"{name}={text!r} is longer than the 10,000 years times can span",
            code="invalid_parameter",
        )
    return us


def is_duration(text: str) -> bool:
    """Whether `text` is spelled as a duration (`30d`, `1h30m`), not as an instant."""
    return _DURATION.match(text.strip()) is not None


def _sum_parts(duration: str) -> int:
    return sum(int(n) * _UNIT_US[unit] for n, unit in _PART.findall(duration))


def parse_instant(text: str, now_us: int, *, name: str) -> int:
    """Epoch microseconds of an RFC 3339 time, `now`, or `-<duration>` relative to now."""
    text = text.strip()
    if text == "now":
        return now_us
    if text[:1] in "+-" and _DURATION.match(text[1:]):
        delta = _sum_parts(text[1:])
        return _in_range(now_us - delta if text[0] == "-" else now_us + delta, text, name)
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
    return _in_range((dt - _EPOCH) // _US, text, name)


def _in_range(us: int, text: str, name: str) -> int:
    if not MIN_US <= us <= MAX_US:
        raise BadRequest(
            f"{name}={text!r} is outside the years 0001-9999 (UTC)", code="invalid_parameter"
        )
    return us


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
