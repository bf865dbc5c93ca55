"""A device as operators see it: its record (retention included) with last seen, reading
counts per metric, and its readings and rejected messages of the last 24 hours. The HTTP API
(GET /devices, GET /devices/{id}) and the CLI (`fieldgate devices list|show`) show the same
view, from here."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Final

from devices.models import Device
from gateway.store import readings
from gateway.store.database import connection
from gateway.store.dead_letters import count_letters_since
from gateway.timespec import format_ts, now_us

MINUTE_US: Final = 60_000_000
DAY_US: Final = 86_400_000_000


def recent_since(now: int) -> int:
    """Where "the last 24 hours" (readings_24h, rejected_24h) begin: the start of the UTC
    minute 24 hours before `now`. On a minute, the packed part is counted from the chunks'
    minute rollups without decoding readings (gateway/store/packed.py); the window is 24 h to
    24 h + 1 min long."""
    return now - now % MINUTE_US - DAY_US


def device_view(
    device: Device, stats: dict[str, Any] | None, rejected_24h: int = 0
) -> dict[str, Any]:
    """The view of `device`, given its per-metric statistics (None: no readings) and its
    rejected messages of the last 24 hours."""
    metrics = {
        metric: {
            "count": s["count"],
            "first_ts": format_ts(s["first_ts"]) if s["first_ts"] is not None else None,
            "last_ts": format_ts(s["last_ts"]) if s["last_ts"] is not None else None,
            "unit": s["unit"],
        }
        for metric, s in sorted((stats or {}).items())
    }
    return {
        "id": device.id,
        "name": device.name,
        "metadata": device.metadata,
        "enabled": device.enabled,
        "created_at": format_ts(int(device.created_at.timestamp() * 1_000_000)),
        "updated_at": format_ts(int(device.updated_at.timestamp() * 1_000_000)),
        "last_seen": format_ts(device.last_seen_us) if device.last_seen_us else None,
        "retention_days": device.retention_days,
        "readings": sum(m["count"] for m in metrics.values()),
        "metrics": metrics,
        "readings_24h": sum(s.get("since", 0) for s in (stats or {}).values()),
        "rejected_24h": rejected_24h,
    }


async def describe_devices(
    devices: Sequence[Device], *, now: int | None = None
) -> list[dict[str, Any]]:
    """The views of `devices` (one statistics query for them all), in their order; the last
    24 hours end at `now` (epoch microseconds; None: the clock)."""
    ids = [d.id for d in devices]
    since = recent_since(now_us() if now is None else now)
    stats = await readings.series_stats(connection(), ids, since)
    rejected = await count_letters_since(ids, since)
    return [device_view(d, stats.get(d.id), rejected.get(d.id, 0)) for d in devices]


async def describe_device(device: Device) -> dict[str, Any]:
    (view,) = await describe_devices([device])
    return view
