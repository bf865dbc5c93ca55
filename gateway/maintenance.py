"""The maintenance job: retention, packing and space reclaim, once (`run_once`).

`fieldgate maintain` runs it once and prints the report; `serve` runs it every
FIELDGATE_MAINTENANCE_INTERVAL_S. Its steps are small transactions (one series, at most
`max_rows` readings: gateway/store/packed.py), so the writer never waits for more than one.

Order: retention first (nothing is packed only to be dropped), then packing of every reading
timed before `now - compress_after` (rounded down to the hour, so an hour is packed once it has
passed), then space reclaim.
"""

from __future__ import annotations

import logging
import time
from dataclasses import asdict, dataclass, field
from typing import Any

from gateway.store import packed as store
from gateway.store.database import connection

log = logging.getLogger(__name__)

HOUR_US = 3_600_000_000


@dataclass(slots=True)
class Report:
    packed: store.Packed = field(default_factory=store.Packed)
    expired: store.Expired = field(default_factory=store.Expired)
    reclaimed_bytes: int = 0
    series_packed: int = 0
    took_ms: dict[str, float] = field(default_factory=dict)

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def pack_cutoff(now_us: int, compress_after_us: int) -> int:
    """Readings timed before this are packed: `now - compress_after`, down to the hour."""
    edge = now_us - compress_after_us
    return edge - edge % HOUR_US


async def pack(before_us: int, *, max_rows: int = 10_000) -> tuple[store.Packed, int]:
    """Pack every series' readings timed before `before_us`; (what was packed, series)."""
    conn = connection()
    total = store.Packed()
    series = await store.series_with_readings_before(conn, before_us)
    for series_id in series:
        while True:
            step = await store.pack_series(conn, series_id, before_us, max_rows=max_rows)
            total.add(step)
            if step.readings < max_rows:
                break
    return total, len(series)


async def run_once(
    *, now_us: int, compress_after_us: int, retention_days: float, max_rows: int = 10_000
) -> Report:
    """Retention, packing and reclaim, once; what each did and how long it took."""
    conn = connection()
    report = Report()
    t = time.perf_counter()
    report.expired = await store.expire(conn, now_us, retention_days)
    report.took_ms["retention"] = (time.perf_counter() - t) * 1000
    t = time.perf_counter()
    report.packed, report.series_packed = await pack(
        pack_cutoff(now_us, compress_after_us), max_rows=max_rows
    )
    report.took_ms["pack"] = (time.perf_counter() - t) * 1000
    t = time.perf_counter()
    report.reclaimed_bytes = await store.reclaim(conn, rows_moved=report.packed.readings)
    report.took_ms["reclaim"] = (time.perf_counter() - t) * 1000
    return report
