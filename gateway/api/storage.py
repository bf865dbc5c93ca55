"""What the store holds and what maintenance did (operator token): GET /api/v1/storage."""

from __future__ import annotations

from dataclasses import asdict
from typing import Any, Literal

from fastapi import APIRouter
from pydantic import BaseModel, Field

from gateway import maintenance
from gateway.api.deps import JSON, RuntimeDep
from gateway.auth import OperatorAuth
from gateway.settings import Settings, compress_after_us
from gateway.store.storage_stats import Run, StorageFigures
from gateway.timespec import format_ts, now_us

router = APIRouter(prefix="/storage", tags=["storage"])

HOUR_S = 3600.0


class StoredReadings(BaseModel):
    unpacked: int = Field(description="readings stored as rows, not packed yet")
    packed: int = Field(description="readings held in compressed chunks")
    total: int


class StoredBytes(BaseModel):
    total: int = Field(
        description="the database on disk: SQLite's file and WAL; on PostgreSQL the tables "
        "reading, chunk (every partition) and series with their indexes and TOAST"
    )
    readings: int | None = Field(description="the reading table (PostgreSQL; null on SQLite)")
    chunks: int = Field(
        description="the chunks: every partition of the table on PostgreSQL; their encoded "
        "bytes on SQLite"
    )
    series: int | None = Field(description="the series table (PostgreSQL; null on SQLite)")
    free: int | None = Field(
        description="free pages inside the SQLite file (null on PostgreSQL): reused, or "
        "returned by the reclaim job with incremental auto-vacuum"
    )
    wal: int | None = Field(description="the SQLite write-ahead log (null on PostgreSQL)")


class Freshness(BaseModel):
    oldest_unpacked: str | None = Field(description="the ts of the oldest unpacked reading")
    oldest_unpacked_age_s: float | None
    behind: bool = Field(
        description="the oldest unpacked reading is older than compress_after + 1 h (packing "
        "takes whole hours) + the maintenance interval: packing is not keeping up, or not running"
    )
    packed_until_min: str | None = Field(
        description="the least of the series' packed watermarks (the last packed ts of each)"
    )
    packed_until_max: str | None


class SettingsInForce(BaseModel):
    compress_after: str = Field(description="FIELDGATE_COMPRESS_AFTER")
    compress_after_s: float
    retention_days: float = Field(
        description="FIELDGATE_RETENTION_DAYS (0: keep all); a device's retention_days wins"
    )
    maintenance_interval_s: float = Field(
        description="FIELDGATE_MAINTENANCE_INTERVAL_S of this instance (0: it never runs the job)"
    )


class JobRun(BaseModel):
    started_at: str
    took_ms: float
    result: dict[str, Any] = Field(
        description="what the job did (retention: chunks, readings, partitions; pack: readings, "
        "chunks_written, chunks_replaced, series; reclaim: bytes), or {error} if it failed"
    )


class StorageOut(BaseModel):
    database: Literal["sqlite", "postgres"]
    readings: StoredReadings
    chunks: int
    series: int
    bytes: StoredBytes
    bytes_per_packed_reading: float | None = Field(description="bytes.chunks / readings.packed")
    freshness: Freshness
    settings: SettingsInForce
    runs: dict[str, JobRun | None] = Field(
        description="the last run of each job (retention, pack, reclaim) by any instance or "
        "`fieldgate maintain`; null: never run"
    )


def _ts(us: int | None) -> str | None:
    return format_ts(us) if us is not None else None


def _run(run: Run | None) -> dict[str, Any] | None:
    if run is None:
        return None
    return {"started_at": format_ts(run.started_us), "took_ms": run.took_ms, "result": run.result}


def storage_view(figures: StorageFigures, settings: Settings, now: int) -> dict[str, Any]:
    """The answer of GET /storage from the figures and the settings in force."""
    compress_after_s = compress_after_us(settings) / 1e6
    age_s = (now - figures.oldest_unpacked_us) / 1e6 if figures.oldest_unpacked_us else None
    late_s = compress_after_s + HOUR_S + settings.maintenance_interval_s
    return {
        "database": figures.dialect,
        "readings": {
            "unpacked": figures.unpacked,
            "packed": figures.packed,
            "total": figures.unpacked + figures.packed,
        },
        "chunks": figures.chunks,
        "series": figures.series,
        "bytes": asdict(figures.bytes),
        "bytes_per_packed_reading": (
            round(figures.bytes.chunks / figures.packed, 4) if figures.packed else None
        ),
        "freshness": {
            "oldest_unpacked": _ts(figures.oldest_unpacked_us),
            "oldest_unpacked_age_s": round(age_s, 3) if age_s is not None else None,
            "behind": age_s is not None and age_s > late_s,
            "packed_until_min": _ts(figures.packed_until_min_us),
            "packed_until_max": _ts(figures.packed_until_max_us),
        },
        "settings": {
            "compress_after": settings.compress_after,
            "compress_after_s": compress_after_s,
            "retention_days": settings.retention_days,
            "maintenance_interval_s": settings.maintenance_interval_s,
        },
        "runs": {job: _run(figures.runs.get(job)) for job in maintenance.JOBS},
    }


@router.get("", response_model=StorageOut)
async def get_storage(_: OperatorAuth, runtime: RuntimeDep) -> JSON:
    """Readings unpacked and packed, bytes on disk, packing freshness, the last maintenance runs."""
    figures = await maintenance.storage_figures()
    return JSON(storage_view(figures, runtime.settings, now_us()))
