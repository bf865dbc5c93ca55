"""The long-lived parts of one running gateway, owned by the app's lifespan."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from devices.formats import epoch_us
from gateway.auth import Authenticator
from gateway.ingest import Ingestor, Retention
from gateway.outage import database_outage
from gateway.settings import Settings
from gateway.store import registry
from gateway.store.series import SeriesCache
from gateway.throttle import AuthThrottle
from gateway.writer import Writer

log = logging.getLogger(__name__)


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
    # Caches of who may write (the MQTT bridge's device states), dropped with the tokens.
    credential_listeners: list[Callable[[], None]] = field(default_factory=list)

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

    def forget_credentials(self) -> None:
        """Drop every cached token and device state: a credential was taken away."""
        self.authenticator.forget()
        for forget in self.credential_listeners:
            forget()

    async def follow_auth_changes(self, stop: asyncio.Event) -> None:
        """Poll the auth change counter (devices/models.py, AuthChange) every
        `auth_sync_interval_s` until `stop`, and drop the cached credentials when it moves: a
        token rotated or a device disabled or deleted by another instance, another worker or the
        CLI stops working here within a poll, not only when the cache lapses. A read that fails
        (the database is away) is skipped; the next one catches up."""
        every_s = self.settings.auth_sync_interval_s
        seen: int | None = None
        while not stop.is_set():
            try:
                now = await registry.auth_generation()
            except Exception as exc:
                if not database_outage.record(exc):
                    log.exception("reading the auth change counter failed")
            else:
                if seen is not None and now != seen:
                    self.forget_credentials()
                seen = now
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), every_s)

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
