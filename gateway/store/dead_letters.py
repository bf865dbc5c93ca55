"""Dead letters: messages the gateway refused (MQTT has no answer to carry the reason), kept so
operators can see what a device sent and why it was rejected.

`device_id` is the id the message claimed (from its topic), with no foreign key: messages from
unknown devices are dead letters too, and a letter outlives the device it names.

A letter must be storable whatever the device sent, or a bad message could never be put aside:
the payload is kept as bytes (exactly, up to the configured length), and every text of a `Letter`
(topic, message, the details' strings) goes through `devices.formats.safe_text` when it is made, so
a NUL or a lone surrogate is written out as an escape instead of failing the insert (PostgreSQL
text and jsonb refuse NUL; JSON cannot encode a lone surrogate).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from tortoise import fields
from tortoise.backends.base.client import BaseDBAsyncClient
from tortoise.functions import Count
from tortoise.models import Model

from devices.formats import safe_json, safe_text
from gateway.store.database import connection
from gateway.store.raw_sql import execute


# A refused message: where it came from, why, and its first bytes. (A comment, not a docstring:
# Tortoise copies a model's docstring into the schema.)
class DeadLetter(Model):
    id = fields.BigIntField(primary_key=True)
    received_us = fields.BigIntField()
    transport = fields.CharField(max_length=8)
    device_id = fields.CharField(max_length=64, null=True, db_index=True)
    topic = fields.CharField(max_length=512)
    reason = fields.CharField(max_length=64)
    message = fields.TextField()
    details: fields.Field[list[Any]] = fields.JSONField(default=list)
    payload = fields.BinaryField()  # the first bytes, exactly
    payload_bytes = fields.IntField()

    class Meta:
        table = "dead_letter"


@dataclass(slots=True)
class Letter:
    """A dead letter about to be stored; its texts are made safe (`safe_text`) on creation, so
    it can be stored and sent (as JSON) whatever the message held."""

    received_us: int
    transport: str
    device_id: str | None
    topic: str
    reason: str
    message: str
    payload: bytes
    details: list[Any] = field(default_factory=list)

    def __post_init__(self) -> None:
        if self.device_id is not None:
            self.device_id = safe_text(self.device_id)
        self.topic = safe_text(self.topic)
        self.reason = safe_text(self.reason)
        self.message = safe_text(self.message)
        self.details = safe_json(self.details)


async def insert_letters(
    letters: list[Letter],
    *,
    payload_limit: int,
    keep_at_most: int = 0,
    using: BaseDBAsyncClient | None = None,
) -> None:
    """Store `letters` in one statement; payloads are cut to `payload_limit` bytes. With
    `keep_at_most`, the oldest letters beyond that many are deleted (anyone who may publish can
    make dead letters: the table must not grow with a flood of them until the retention)."""
    if not letters:
        return
    await DeadLetter.bulk_create(
        [
            DeadLetter(
                received_us=x.received_us,
                transport=x.transport,
                device_id=x.device_id,
                topic=x.topic[:512],
                reason=x.reason[:64],
                message=x.message,
                details=x.details,
                payload=bytes(x.payload[:payload_limit]),
                payload_bytes=len(x.payload),
            )
            for x in letters
        ],
        using_db=using,
    )
    if keep_at_most:
        await trim_letters(keep_at_most, using=using)


async def trim_letters(keep_at_most: int, *, using: BaseDBAsyncClient | None = None) -> None:
    """Delete the oldest letters beyond the newest `keep_at_most` (by id: ids only grow). One
    statement on the primary key, cheap when there is nothing to delete."""
    await execute(
        using or connection(),
        "DELETE FROM dead_letter WHERE id <= (SELECT MAX(id) FROM dead_letter) - ?",
        (keep_at_most,),
    )


async def list_letters(
    *, device_id: str | None, before_id: int | None, limit: int
) -> list[DeadLetter]:
    """Newest first; only `device_id`'s when given; ids below `before_id` when given."""
    query = DeadLetter.all().order_by("-id").limit(limit)
    if device_id is not None:
        query = query.filter(device_id=device_id)
    if before_id is not None:
        query = query.filter(id__lt=before_id)
    return await query


async def count_letters_since(device_ids: Sequence[str], since_us: int) -> dict[str, int]:
    """Per device of `device_ids` with any: its letters received at or after `since_us` (one
    query for them all)."""
    if not device_ids:
        return {}
    rows = (
        await DeadLetter.filter(device_id__in=list(device_ids), received_us__gte=since_us)
        .group_by("device_id")
        .annotate(n=Count("id"))
        .values_list("device_id", "n")
    )
    return {str(device_id): int(n) for device_id, n in rows}


async def prune_letters(older_than_us: int) -> int:
    """Delete the letters received before `older_than_us`; how many went."""
    return await DeadLetter.filter(received_us__lt=older_than_us).delete()
