"""Tortoise models of the device domain.

Readings are not a Tortoise model: they are the hot path, stored as `(series_id, ts, value)` with
the primary key `(series_id, ts)` (WITHOUT ROWID on SQLite), which Tortoise cannot declare. The
table is created by `migrations/` and written and read with plain SQL in `gateway/store/`.
"""

from __future__ import annotations

import re
from enum import StrEnum

from tortoise import fields
from tortoise.models import Model

DEVICE_ID_PATTERN = r"^[A-Za-z0-9_.\-]{1,64}$"
DEVICE_ID_RE = re.compile(DEVICE_ID_PATTERN)


def is_device_id(text: str) -> bool:
    """Whether `text` can name a device at all (anything else names none, whatever is stored)."""
    return DEVICE_ID_RE.fullmatch(text) is not None


class Role(StrEnum):
    """Who a token speaks for: admin > operator (reads all); beside them, the two that only
    write: device (its own telemetry) and writer (line protocol for any registered device: a
    collector such as Telegraf forwarding many devices, issue 13)."""

    ADMIN = "admin"
    OPERATOR = "operator"
    DEVICE = "device"
    WRITER = "writer"

    def may(self, needed: Role) -> bool:
        """Whether this role's token may do what `needed` may. The writing roles stand apart
        from the ladder: a device or writer token may do only its own role's job (a writer reads
        nothing and manages nothing), and no reading role writes as a device or a writer."""
        if needed in _WRITING or self in _WRITING:
            return self is needed
        return _LADDER.index(self) >= _LADDER.index(needed)


_WRITING = frozenset((Role.DEVICE, Role.WRITER))
_LADDER = (Role.OPERATOR, Role.ADMIN)


class IssuedRole(StrEnum):
    """The roles issued on their own (`fieldgate tokens create`, POST /api/v1/tokens): a device
    token comes with its device."""

    OPERATOR = Role.OPERATOR.value
    ADMIN = Role.ADMIN.value
    WRITER = Role.WRITER.value


class Device(Model):
    id = fields.CharField(primary_key=True, max_length=64)
    name = fields.CharField(max_length=200, default="")
    metadata: fields.Field[dict[str, object]] = fields.JSONField(default=dict)
    enabled = fields.BooleanField(default=True)
    created_at = fields.DatetimeField(auto_now_add=True)
    updated_at = fields.DatetimeField(auto_now=True)
    # Receive time (epoch microseconds) of the last accepted write; updated once per batch.
    last_seen_us = fields.BigIntField(null=True)
    # Days of readings kept (whole packed chunks expire); NULL: FIELDGATE_RETENTION_DAYS; 0: all.
    retention_days = fields.FloatField(null=True)

    class Meta:
        table = "device"


# One (device, metric) pair, whose integer id keys the readings table. (Comments, not docstrings:
# Tortoise copies a model's docstring into the schema, and its SQLite DDL splits on semicolons.)
class Series(Model):
    id = fields.IntField(primary_key=True)
    device: fields.ForeignKeyRelation[Device] = fields.ForeignKeyField(
        "models.Device", related_name="series", on_delete=fields.CASCADE
    )
    metric = fields.CharField(max_length=64)
    # The last ts any packed chunk of the series holds (NULL: none): readings after it are not
    # in a chunk, so only those at or before it need the chunk check on insert.
    packed_until_us = fields.BigIntField(null=True)
    # The unit its values are in, as the first payload that named one said (SenML `u`/`bu`);
    # NULL: none given (the native format has no units). 32: devices.senml.UNIT_MAX.
    unit = fields.CharField(max_length=32, null=True)

    class Meta:
        table = "series"
        unique_together = (("device", "metric"),)


# A bearer token, stored as the SHA-256 of its value (the value is shown once).
class ApiToken(Model):
    id = fields.IntField(primary_key=True)
    token_hash = fields.CharField(max_length=64, unique=True)
    role = fields.CharEnumField(Role, max_length=16)
    device: fields.ForeignKeyNullableRelation[Device] = fields.ForeignKeyField(
        "models.Device", related_name="tokens", null=True, on_delete=fields.CASCADE
    )
    name = fields.CharField(max_length=200, default="")
    created_at = fields.DatetimeField(auto_now_add=True)
    # When it stops working (epoch microseconds, UTC); NULL: never.
    expires_us = fields.BigIntField(null=True)
    # The latest use any gateway has written (epoch microseconds; NULL: none yet). Gateways keep
    # uses in memory and write them in one batch now and then, never per request, and only
    # forward.
    last_used_us = fields.BigIntField(null=True)

    class Meta:
        table = "api_token"


class AuthChange(Model):
    """A number that every change taking a credential away moves on (one row).

    A token rotated or revoked, a device disabled or deleted: the change and the move share a
    transaction. Every gateway sharing the database polls it and drops its cached tokens when it
    moves, so such a change reaches all of them within a poll (`FIELDGATE_AUTH_SYNC_INTERVAL_S`),
    wherever it was made: another instance, another worker, the CLI."""

    id = fields.IntField(primary_key=True)
    generation = fields.BigIntField(default=0)

    class Meta:
        table = "auth_change"
