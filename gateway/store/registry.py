"""The device and token repository: every ORM query of the registry."""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Collection, Sequence
from datetime import datetime
from typing import Any

from tortoise.backends.base.client import BaseDBAsyncClient
from tortoise.exceptions import IntegrityError
from tortoise.expressions import Q
from tortoise.transactions import in_transaction

from devices.credentials import generate_token, hash_token
from devices.models import ApiToken, AuthChange, Device, Role, Series, is_device_id
from gateway.store.database import CONNECTION, connection
from gateway.store.errors import (
    DeviceExists,
    DeviceNotFound,
    DeviceTokenNotManaged,
    TokenNotFound,
)
from gateway.store.readings import delete_series_readings

# The one place that decides whether a device exists: a text that cannot be a device id (too
# long for the column, a character outside the id alphabet, a NUL) names no device, and is
# answered without a query (Tortoise refuses an over-long key, PostgreSQL a NUL in text).


async def get_device(device_id: str) -> Device:
    """The stored device `device_id`; raises DeviceNotFound."""
    device = await Device.get_or_none(id=device_id) if is_device_id(device_id) else None
    if device is None:
        raise DeviceNotFound(device_id)
    return device


async def require_device(device_id: str) -> None:
    """Raises DeviceNotFound unless `device_id` names a stored device."""
    if not (is_device_id(device_id) and await Device.exists(id=device_id)):
        raise DeviceNotFound(device_id)


async def require_devices(device_ids: Sequence[str]) -> None:
    """Raises DeviceNotFound (naming every missing one) unless all of `device_ids` exist."""
    states = await device_states(device_ids)
    missing = [d for d in device_ids if states[d] is None]
    if missing:
        raise DeviceNotFound(missing)


async def device_states(device_ids: Collection[str]) -> dict[str, bool | None]:
    """Each of `device_ids` -> whether it is enabled, or None when it names no stored device
    (one query for them all)."""
    wanted = [d for d in device_ids if is_device_id(d)]
    rows = await Device.filter(id__in=wanted).values_list("id", "enabled") if wanted else []
    found = {str(device_id): bool(enabled) for device_id, enabled in rows}
    return {d: found.get(d) for d in device_ids}


async def retention_days(device_ids: Collection[str]) -> dict[str, float | None]:
    """Each stored device of `device_ids` -> its own retention_days (None: the global setting);
    devices that do not exist are left out (one query for them all)."""
    wanted = [d for d in device_ids if is_device_id(d)]
    rows = await Device.filter(id__in=wanted).values_list("id", "retention_days") if wanted else []
    return {str(d): (None if days is None else float(days)) for d, days in rows}


async def list_devices(*, after: str | None, limit: int, search: str | None = None) -> list[Device]:
    """Devices in id order, those after the device id `after` (a page's cursor) if given, and
    only those whose id or name holds `search` (case-insensitive; `%`, `_` and `\\` match
    themselves) if given. The search is a scan of `device` in id order (no index serves a
    substring): ~10,000 rows are a few milliseconds (bench/README.md, "Console page loads")."""
    query = Device.all().order_by("id").limit(limit)
    if after is not None:
        query = query.filter(id__gt=after)
    if search:
        query = query.filter(Q(id__icontains=search) | Q(name__icontains=search))
    return await query


async def create_device(
    device_id: str,
    name: str,
    metadata: dict[str, Any],
    enabled: bool,
    *,
    retention_days: float | None = None,
) -> tuple[Device, str]:
    """A new device and its token (returned once, stored hashed); raises DeviceExists."""
    try:
        async with in_transaction(CONNECTION) as tx:
            device = await Device.create(
                id=device_id,
                name=name,
                metadata=metadata,
                enabled=enabled,
                retention_days=retention_days,
                using_db=tx,
            )
            token = await _issue_device_token(device, tx)
    except IntegrityError:
        raise DeviceExists(device_id) from None
    return device, token


async def _issue_device_token(device: Device, tx: BaseDBAsyncClient) -> str:
    token = generate_token(Role.DEVICE)
    await ApiToken.create(
        token_hash=hash_token(token), role=Role.DEVICE, device=device, name="device", using_db=tx
    )
    return token


async def update_device(device: Device, changes: dict[str, Any]) -> Device:
    for key, value in changes.items():
        setattr(device, key, value)
    async with in_transaction(CONNECTION) as tx:
        await device.save(using_db=tx)
        if "enabled" in changes:  # disabling takes its tokens' writes away; enabling gives back
            await _auth_changed(tx)
    return device


async def delete_device(device_id: str) -> list[int]:
    """Delete a device with its tokens, series and readings; returns its series ids."""
    async with in_transaction(CONNECTION) as tx:
        series_ids = (
            await Series.filter(device_id=device_id).using_db(tx).values_list("id", flat=True)
        )
        ids = [int(str(i)) for i in series_ids]
        # The device (and, by cascade, its series) first: on PostgreSQL that waits for a packer
        # holding a series row (gateway/store/packed.py) and stops the next one, so no chunk
        # lands after the delete below.
        await Device.filter(id=device_id).using_db(tx).delete()
        await delete_series_readings(tx, ids)
        await _auth_changed(tx)
    return ids


async def rotate_device_token(
    device: Device, *, before_commit: Callable[[str], Awaitable[None]] | None = None
) -> tuple[str, list[str]]:
    """Replace the device's tokens with a new one; returns it and the old hashes.
    `before_commit(token)` runs inside the transaction, last: if it raises, nothing changes."""
    async with in_transaction(CONNECTION) as tx:
        old = (
            await ApiToken.filter(device_id=device.id)
            .using_db(tx)
            .values_list("token_hash", flat=True)
        )
        await ApiToken.filter(device_id=device.id).using_db(tx).delete()
        token = await _issue_device_token(device, tx)
        await _auth_changed(tx)
        if before_commit is not None:
            await before_commit(token)
    return token, [str(h) for h in old]


async def device_enabled_states() -> dict[str, tuple[bool, datetime]]:
    """Every device's id -> (enabled, created at) (one query)."""
    rows = await Device.all().values_list("id", "enabled", "created_at")
    return {str(d): (bool(enabled), created) for d, enabled, created in rows}


async def create_token(role: Role, name: str) -> str:
    """A new operator or admin token (returned once, stored hashed)."""
    _, token = await issue_token(role, name)
    return token


async def issue_token(
    role: Role, name: str, *, expires_us: int | None = None
) -> tuple[ApiToken, str]:
    """A new operator or admin token, valid until `expires_us` (None: no end): its row, and
    its value (returned once, stored hashed)."""
    if role is Role.DEVICE:
        raise ValueError("device tokens come with their device (create_device)")
    token = generate_token(role)
    row = await ApiToken.create(
        token_hash=hash_token(token), role=role, name=name, expires_us=expires_us
    )
    return row, token


async def list_tokens() -> list[ApiToken]:
    """Every operator and admin token, oldest first (device tokens belong to their devices)."""
    return await ApiToken.filter(device_id__isnull=True).order_by("id")


_MAX_TOKEN_ID = 2**31 - 1  # api_token.id is a 32-bit integer


async def revoke_token(token_id: int) -> str:
    """Delete an operator or admin token and move the auth change counter in the same
    transaction (every gateway drops its cached tokens within a poll); returns its hash, for
    this instance's cache. Raises TokenNotFound, or DeviceTokenNotManaged for a device's."""
    if not 1 <= token_id <= _MAX_TOKEN_ID:  # names no token (and PostgreSQL would refuse it)
        raise TokenNotFound(token_id)
    async with in_transaction(CONNECTION) as tx:
        query = ApiToken.filter(id=token_id).using_db(tx)
        rows = await query.values_list("token_hash", "device_id")
        if not rows:
            raise TokenNotFound(token_id)
        ((token_hash, device_id),) = rows
        if device_id is not None:
            raise DeviceTokenNotManaged(token_id, str(device_id))
        await query.delete()
        await _auth_changed(tx)
    return str(token_hash)


async def record_token_uses(uses: dict[str, int]) -> None:
    """Write when tokens were last used (token hash -> epoch microseconds), in one
    transaction; a time earlier than the one stored (another gateway's, written first) is not
    written. Unknown hashes (a token revoked since) change nothing."""
    if not uses:
        return
    async with in_transaction(CONNECTION) as tx:
        for token_hash, used_us in uses.items():
            await (
                ApiToken.filter(token_hash=token_hash)
                .filter(Q(last_used_us__isnull=True) | Q(last_used_us__lt=used_us))
                .using_db(tx)
                .update(last_used_us=used_us)
            )


async def find_token(token_hash: str) -> tuple[Role, str | None, bool, int | None] | None:
    """(role, device id, device enabled, expires) of the token with this hash, if any;
    expires is epoch microseconds or None. An expired token is found: the caller says so."""
    row = await ApiToken.get_or_none(token_hash=token_hash).prefetch_related("device")
    if row is None:
        return None
    device = row.device
    return (
        Role(row.role),
        (device.id if device else None),
        (device.enabled if device else True),
        row.expires_us,
    )


async def auth_generation() -> int:
    """The auth change counter (devices/models.py, AuthChange): it moves whenever a credential
    is taken away, by any instance or the CLI."""
    row = await AuthChange.get_or_none(id=1).values_list("generation", flat=True)
    return int(str(row)) if row is not None else 0


async def _auth_changed(tx: BaseDBAsyncClient) -> None:
    # An upsert, not an update of the row the migration made: a database emptied table by table
    # (tests, a restore of some tables) may not have it, and the move must not be lost.
    await tx.execute_query(
        "INSERT INTO auth_change (id, generation) VALUES (1, 1)"
        " ON CONFLICT (id) DO UPDATE SET generation = auth_change.generation + 1"
    )


async def has_admin_token() -> bool:
    return await ApiToken.filter(role=Role.ADMIN).exists()


async def delete_orphaned_readings(series_ids: list[int]) -> int:
    """Readings a write that was in flight during `delete_device` added for its series."""
    return await delete_series_readings(connection(), series_ids)
