"""A device as operators see it: its record (retention included) with last seen and reading
counts per metric. The HTTP API (GET /devices, GET /devices/{id}) and the CLI (`fieldgate
devices list|show`) show the same view, from here."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from devices.models import Device
from gateway.store import readings
from gateway.store.database import connection
from gateway.timespec import format_ts


def device_view(device: Device, stats: dict[str, Any] | None) -> dict[str, Any]:
    """The view of `device`, given its per-metric statistics (None: no readings)."""
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
    }


async def describe_devices(devices: Sequence[Device]) -> list[dict[str, Any]]:
    """The views of `devices` (one statistics query for them all), in their order."""
    stats = await readings.series_stats(connection(), [d.id for d in devices])
    return [device_view(d, stats.get(d.id)) for d in devices]


async def describe_device(device: Device) -> dict[str, Any]:
    (view,) = await describe_devices([device])
    return view
