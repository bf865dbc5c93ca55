"""A device's lifecycle across the registry and the broker's identities, in one place for the
HTTP API and the CLI: create, rotate its token, enable or disable, delete.

With FIELDGATE_BROKER_ADMIN unset there are no broker identities and these are the registry's
own operations. With it set (gateway/broker/identities.py), the order is chosen so that a
failure halfway never leaves a credential working that should not, and never leaves the broker
holding a device the registry does not:

- create: registry, then broker. A broker that cannot take it undoes the registry's part and
  the caller gets 503 broker_unavailable: no half-made device (409 broker_client_exists when
  the broker has a client with the device's id that fieldgate did not make: never changed).
- rotate: broker, then registry, in the registry's transaction. A broker that cannot take the
  new password fails the rotation and nothing changes (503); the old token keeps working on
  both sides until a rotation succeeds.
- disable, delete: registry, then broker. Taking a credential away never waits for the broker:
  the gateway already refuses a disabled or deleted device's messages (its bridge asks the
  registry), and the next sync mends what the broker missed. The failure is logged.
"""

from __future__ import annotations

import logging
from typing import Any

from devices.models import Device
from gateway.broker.dynsec import BrokerAdminError, Dynsec
from gateway.broker.identities import BrokerClientTaken, BrokerIdentities
from gateway.errors import Conflict, Unavailable
from gateway.mqtt.client import BrokerAddress
from gateway.mqtt.service import Topics
from gateway.settings import Settings
from gateway.store import registry

log = logging.getLogger("fieldgate.broker")

_RETRY_AFTER_S = 5


def broker_identities(settings: Settings) -> BrokerIdentities | None:
    """The broker's identity store the settings name (FIELDGATE_BROKER_ADMIN), or None."""
    if settings.broker_admin != "mosquitto-dynsec":
        return None
    dynsec = Dynsec(
        BrokerAddress.from_url(
            settings.mqtt_url,
            ca_file=settings.mqtt_ca_file,
            client_certfile=settings.mqtt_client_certfile,
            client_keyfile=settings.mqtt_client_keyfile,
        ),
        settings.broker_admin_username,
        settings.broker_admin_password or "",
    )
    return BrokerIdentities(dynsec, Topics.with_prefix(settings.mqtt_topic_prefix))


def _taken(exc: BrokerClientTaken) -> Conflict:
    return Conflict(str(exc), code="reserved_device_id" if exc.reserved else "broker_client_exists")


def _unavailable(exc: BrokerAdminError) -> Unavailable:
    return Unavailable(
        f"the broker's identities cannot be changed: {exc}",
        code="broker_unavailable",
        retry_after_s=_RETRY_AFTER_S,
    )


async def create_device(
    identities: BrokerIdentities | None,
    device_id: str,
    name: str,
    metadata: dict[str, Any],
    enabled: bool,
    *,
    retention_days: float | None = None,
) -> tuple[Device, str]:
    """A new device and its token; with broker identities, its broker client too (or neither,
    and 503 broker_unavailable)."""
    device, token = await registry.create_device(
        device_id, name, metadata, enabled, retention_days=retention_days
    )
    if identities is not None:
        try:
            await identities.create(device_id, token, enabled=enabled)
        except (BrokerAdminError, BrokerClientTaken) as exc:
            await registry.delete_device(device_id)
            if isinstance(exc, BrokerClientTaken):
                raise _taken(exc) from None
            raise _unavailable(exc) from None
    return device, token


async def rotate_token(
    identities: BrokerIdentities | None, device: Device
) -> tuple[str, list[str]]:
    """A new token for `device` (its old ones stop working); returns it and the old hashes."""
    if identities is None:
        return await registry.rotate_device_token(device)

    async def tell_broker(token: str) -> None:
        try:
            await identities.set_password(device.id, token, enabled=device.enabled)
        except BrokerClientTaken as exc:
            raise _taken(exc) from None
        except BrokerAdminError as exc:
            raise _unavailable(exc) from None

    return await registry.rotate_device_token(device, before_commit=tell_broker)


async def update_device(
    identities: BrokerIdentities | None, device: Device, changes: dict[str, Any]
) -> Device:
    """Change a device's fields; an enabled flag that changed reaches the broker after."""
    was_enabled = device.enabled
    device = await registry.update_device(device, changes)
    if identities is not None and device.enabled != was_enabled:
        try:
            await identities.set_enabled(device.id, device.enabled)
        except BrokerAdminError as exc:
            log.error(
                "device %r: the broker was not told it is now %s (%s); the next sync will",
                device.id,
                "enabled" if device.enabled else "disabled",
                exc,
            )
    return device


async def delete_device(identities: BrokerIdentities | None, device_id: str) -> list[int]:
    """Delete a device with its tokens, series and readings, then its broker client; returns
    its series ids."""
    series_ids = await registry.delete_device(device_id)
    if identities is not None:
        try:
            await identities.delete(device_id)
        except BrokerAdminError as exc:
            log.error(
                "device %r was deleted, but not its broker client (%s); the next sync will",
                device_id,
                exc,
            )
    return series_ids
