"""Raw history reads: one metric's readings a page at a time (cursors), and the latest values.

GET .../telemetry, .../telemetry/latest (gateway/api/reads.py: binds HTTP)
  -> read_page / read_latest: the device exists, the range and cursor, the page size
  -> gateway/store/readings.py: SQL
"""

from __future__ import annotations

import base64
import binascii
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any, Final

from gateway.errors import BadRequest
from gateway.store import readings, registry
from gateway.store.database import connection
from gateway.store.series import SeriesCache
from gateway.timespec import format_ts, now_us, parse_instant

_END_OF_TIME: Final = 2**63 - 1


def encode_cursor(ts: int) -> str:
    """The cursor of the page after the reading at `ts` (opaque to clients)."""
    return base64.urlsafe_b64encode(f"ts:{ts}".encode()).decode().rstrip("=")


def decode_cursor(cursor: str) -> int:
    """The `ts` a cursor of `encode_cursor` holds; BadRequest (invalid_cursor) for any other."""
    try:
        text = base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4)).decode()
        kind, _, value = text.partition(":")
        if kind != "ts":
            raise ValueError(kind)
        return int(value)
    except (ValueError, binascii.Error, UnicodeDecodeError):
        raise BadRequest(
            f"cursor={cursor!r} is not a cursor this API gave", code="invalid_cursor"
        ) from None


@dataclass(slots=True)
class RawPage:
    """One page of raw readings (ts in epoch microseconds) and the cursor of the next, if any."""

    device: str
    metric: str
    points: list[tuple[int, float]]
    next_cursor: str | None
    unit: str | None = None

    def body(self) -> dict[str, Any]:
        """The JSON answer (gateway/api/schemas.py RawOut)."""
        return {
            "device": self.device,
            "metric": self.metric,
            "unit": self.unit,
            "points": [{"ts": format_ts(ts), "value": value} for ts, value in self.points],
            "next_cursor": self.next_cursor,
        }

    def columns(self) -> list[str]:
        return ["device", "metric", "ts", "value"]

    def rows(self) -> Iterator[list[Any]]:
        for ts, value in self.points:
            yield [self.device, self.metric, format_ts(ts), value]


async def read_page(
    series: SeriesCache,
    device_id: str,
    metric: str,
    *,
    start: str | None,
    end: str | None,
    limit: int,
    max_page_size: int,
    cursor: str | None,
) -> RawPage:
    """Readings of `metric` with start <= ts < end, in time order, at most `limit` (capped at
    `max_page_size`), after the reading `cursor` points at; an unknown metric has none.
    DeviceNotFound if the device does not exist."""
    await registry.require_device(device_id)
    limit = min(limit, max_page_size)
    now = now_us()
    start_us = parse_instant(start, now, name="start") if start else 0
    end_us = parse_instant(end, now, name="end") if end else _END_OF_TIME
    if cursor:
        start_us = max(start_us, decode_cursor(cursor) + 1)
    ids = await series.ids_of(device_id, [metric])
    points: list[tuple[int, float]] = []
    if metric in ids and start_us < end_us:
        # One more than asked: whether there is a next page.
        points = await readings.select_raw(connection(), ids[metric], start_us, end_us, limit + 1)
    more = len(points) > limit
    points = points[:limit]
    next_cursor = encode_cursor(points[-1][0]) if more else None
    return RawPage(device_id, metric, points, next_cursor, series.unit_of(device_id, metric))


async def read_latest(device_id: str) -> dict[str, Any]:
    """The newest reading of each of the device's metrics, as answered (LatestOut);
    DeviceNotFound if the device does not exist."""
    await registry.require_device(device_id)
    rows = await readings.select_latest(connection(), device_id)
    return {
        "device": device_id,
        "values": {m: {"ts": format_ts(ts), "value": v, "unit": unit} for m, ts, v, unit in rows},
    }
