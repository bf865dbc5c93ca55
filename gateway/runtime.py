"""The long-lived parts of one running gateway, owned by the app's lifespan."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from devices.formats import epoch_us
from gateway import provisioning
from gateway.auth import Authenticator
from gateway.broker.dynsec import BrokerAdminError
from gateway.broker.hook import BrokerHook
from gateway.broker.identities import BrokerIdentities
from gateway.ingest import Ingestor, Retention
from gateway.live import LiveHub
from gateway.outage import database_outage
from gateway.settings import Settings
from gateway.store import registry
from gateway.store.series import SeriesCache
from gateway.throttle import AuthThrottle
from gateway.timespec import format_ts, now_us
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
    # Devices' identities at the broker (FIELDGATE_BROKER_ADMIN), if fieldgate keeps them.
    identities: BrokerIdentities | None = None
    # The answers to a broker that asks over HTTP (FIELDGATE_BROKER_HOOK_SECRET), if it may.
    broker_hook: BrokerHook | None = None
    # The live streams' hub (gateway/live.py); None when FIELDGATE_LIVE_LOG_WINDOW_S is 0.
    live: LiveHub | None = None
    # Readiness of optional parts (the MQTT bridge), by name: {"ok": bool, ...details}.
    components: dict[str, dict[str, Any]] = field(default_factory=dict)
    # Caches of who may write (the MQTT bridge's and the broker hook's device states), dropped
    # with the tokens.
    credential_listeners: list[Callable[[], None]] = field(default_factory=list)

    @classmethod
    def build(cls, settings: Settings) -> Runtime:
        writer = Writer(
            batch_size=settings.batch_size,
            queue_size=settings.queue_size,
            linger_s=settings.flush_interval_ms / 1000,
            commits_in_flight=settings.commits_in_flight or None,
            live_log=settings.live_log_window_s > 0,
        )
        live = LiveHub(settings) if settings.live_log_window_s > 0 else None
        if live is not None:
            writer.on_commit = live.wake
        series = SeriesCache(max_series_per_device=settings.max_series_per_device)
        authenticator = Authenticator(settings.admin_token, settings.auth_cache_ttl_s)
        broker_hook = BrokerHook.from_settings(settings, authenticator)
        return cls(
            settings=settings,
            writer=writer,
            series=series,
            authenticator=authenticator,
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
            identities=provisioning.broker_identities(settings),
            broker_hook=broker_hook,
            live=live,
            credential_listeners=[broker_hook.forget] if broker_hook else [],
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

    async def keep_broker_identities(self, stop: asyncio.Event) -> None:
        """Compare the broker's device clients with the registry and mend them
        (gateway/broker/identities.py) now and every `broker_sync_interval_s` until `stop`;
        /readyz shows the last outcome as `checks.broker_identities` (not ok: the broker could
        not be read, or devices have no client or share their id with someone else's)."""
        identities = self.identities
        if identities is None:
            return
        every_s = self.settings.broker_sync_interval_s
        check: dict[str, Any] = {"ok": False, "broker": str(identities.dynsec.address)}
        self.components["broker_identities"] = check
        while not stop.is_set():
            try:
                drift = await identities.sync(registry.device_enabled_states)
            except BrokerAdminError as exc:
                check.update(ok=False, error=str(exc)[:300])
                log.warning("the broker's device identities could not be synced: %s", exc)
            except Exception as exc:
                if not database_outage.record(exc):
                    log.exception("syncing the broker's device identities failed")
                check.update(ok=False, error=f"{type(exc).__name__}: {exc}"[:300])
            else:
                check.pop("error", None)
                check.update(ok=drift.clean, synced_at=format_ts(now_us()), **drift.summary())
                if drift.deleted or drift.fixed:
                    log.info(
                        "broker identities synced: %d deleted, %d mended",
                        len(drift.deleted),
                        len(drift.fixed),
                    )
                if not drift.clean:
                    log.warning(
                        "%d device(s) have no broker client (rotate their tokens: `fieldgate "
                        "broker sync --rotate-missing`), %d share their id with another client",
                        len(drift.missing),
                        len(drift.conflicts),
                    )
            if not every_s:
                return
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), every_s)

    async def record_token_uses(self, stop: asyncio.Event) -> None:
        """Write when tokens were last used (`Authenticator.take_uses`) every
        `token_last_used_interval_s`, and once more on `stop`: one transaction a batch, never a
        write per request. What a failed write held (the database is away) goes into the next."""
        every_s = self.settings.token_last_used_interval_s
        while not stop.is_set():
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), every_s)
            await self.write_token_uses()

    async def write_token_uses(self) -> None:
        uses = self.authenticator.take_uses()
        try:
            await registry.record_token_uses(uses)
        except Exception as exc:
            self.authenticator.give_back_uses(uses)
            if not database_outage.record(exc):
                log.exception("writing when tokens were last used failed")

    async def revoke_token(self, token_id: int) -> None:
        """Delete an operator or admin token (TokenNotFound, DeviceTokenNotManaged): refused
        here at once, and by every other gateway sharing the database within a poll of the
        auth change counter."""
        token_hash = await registry.revoke_token(token_id)
        self.authenticator.forget([token_hash])

    async def delete_device(self, device_id: str) -> None:
        """Delete a device with its tokens, series and readings (DeviceNotFound if there is no
        such device), and everything this instance caches about it."""
        await registry.require_device(device_id)
        series_ids = await provisioning.delete_device(self.identities, device_id)
        self.series.forget(device_id)
        self.forget_credentials()  # its tokens, and its state in the bridge and the hook
        self.ingestor.retention.forget([device_id])
        # Readings have no foreign key (it would cost every insert): a write of this device that
        # was already queued or committing may still add rows for its old series. Once those
        # commits are done, delete what they added. (Another instance's writes cannot: a commit
        # stores rows only for series that exist, see store.readings.insert_batch.)
        await self.writer.flush()
        await registry.delete_orphaned_readings(series_ids)
