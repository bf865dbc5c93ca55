"""The long-lived parts of one running gateway, owned by the app's lifespan."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from devices.formats import epoch_us
from gateway.auth import Authenticator
from gateway.ingest import Ingestor, Retention
from gateway.settings import Settings
from gateway.store import registry
from gateway.store.series import SeriesCache
from gateway.throttle import AuthThrottle
from gateway.writer import Writer


@dataclass
class Runtime:
    settings: Settings
    writer: Writer
    series: SeriesCache
    authenticator: Authenticator
    ingestor: Ingestor
    auth_throttle: AuthThrottle
    # Readiness of optional parts (the MQTT bridge), by name: {"ok": bool, ...details}.
    components: dict[str, dict[str, Any]] = field(default_factory=dict)

    @classmethod
    def build(cls, settings: Settings) -> Runtime:
        writer = Writer(
            batch_size=settings.batch_size,
            queue_size=settings.queue_size,
            linger_s=settings.flush_interval_ms / 1000,
            commits_in_flight=settings.commits_in_flight or None,
        )
        series = SeriesCache(max_series_per_device=settings.max_series_per_device)
        return cls(
            settings=settings,
            writer=writer,
            series=series,
            authenticator=Authenticator(settings.admin_token, settings.auth_cache_ttl_s),
            auth_throttle=AuthThrottle(
                limit=settings.auth_failure_limit, window_s=settings.auth_failure_window_s
            ),
            ingestor=Ingestor(
                writer,
                series,
                max_messages=settings.max_messages,
                max_future_skew_s=settings.max_future_skew_s,
                max_metrics_per_request=settings.max_metrics_per_request,
                earliest_us=epoch_us(settings.min_timestamp),
                retention=Retention(settings.retention_days, settings.auth_cache_ttl_s),
            ),
        )

    async def delete_device(self, device_id: str) -> None:
        """Delete a device with its tokens, series and readings (DeviceNotFound if there is no
        such device), and everything this instance caches about it."""
        await registry.require_device(device_id)
        series_ids = await registry.delete_device(device_id)
        self.series.forget(device_id)
        self.authenticator.forget()
        self.ingestor.retention.forget([device_id])
        # Readings have no foreign key (it would cost every insert): a write of this device that
        # was already queued or committing may still add rows for its old series. Once those
        # commits are done, delete what they added. (Another instance's writes cannot: a commit
        # stores rows only for series that exist, see store.readings.insert_batch.)
        await self.writer.flush()
        await registry.delete_orphaned_readings(series_ids)
