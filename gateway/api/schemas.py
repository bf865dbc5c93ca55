"""Request and answer shapes of the HTTP API (pydantic; the answers document OpenAPI)."""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from devices.models import DEVICE_ID_PATTERN, Device, Role
from gateway.timespec import format_ts


class DeviceCreate(BaseModel):
    model_config = ConfigDict(extra="forbid")

    id: str = Field(pattern=DEVICE_ID_PATTERN, description="1-64 characters of A-Z a-z 0-9 _ . -")
    name: str = Field(default="", max_length=200)
    metadata: dict[str, Any] = Field(default_factory=dict)
    enabled: bool = True


class DeviceUpdate(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: str | None = Field(default=None, max_length=200)
    metadata: dict[str, Any] | None = None
    enabled: bool | None = None


class MetricStats(BaseModel):
    count: int
    first_ts: str | None
    last_ts: str | None


class DeviceOut(BaseModel):
    id: str
    name: str
    metadata: dict[str, Any]
    enabled: bool
    created_at: str
    updated_at: str
    last_seen: str | None = Field(description="when the gateway last stored a write from it")
    readings: int = Field(description="readings stored, all metrics")
    metrics: dict[str, MetricStats]


class DeviceCreated(DeviceOut):
    token: str = Field(description="the device's bearer token; shown only this once")


class DeviceList(BaseModel):
    devices: list[DeviceOut]
    next_cursor: str | None


class TokenOut(BaseModel):
    token: str
    role: Role


class Rejected(BaseModel):
    index: int
    metric: str | None
    code: str
    message: str


class IngestOut(BaseModel):
    accepted: int = Field(description="readings stored")
    duplicates: int = Field(description="readings already stored before (ignored)")
    rejected: list[Rejected]


class Point(BaseModel):
    ts: str
    value: float


class RawOut(BaseModel):
    device: str
    metric: str
    points: list[Point]
    next_cursor: str | None


class LatestValue(BaseModel):
    ts: str
    value: float


class LatestOut(BaseModel):
    device: str
    values: dict[str, LatestValue]


def device_out(device: Device, stats: dict[str, Any] | None) -> dict[str, Any]:
    metrics = {
        metric: {
            "count": s["count"],
            "first_ts": format_ts(s["first_ts"]) if s["first_ts"] is not None else None,
            "last_ts": format_ts(s["last_ts"]) if s["last_ts"] is not None else None,
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
        "readings": sum(m["count"] for m in metrics.values()),
        "metrics": metrics,
    }
