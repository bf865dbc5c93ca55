"""Dead letters: messages the gateway refused (MQTT has no answer to carry the reason), kept so
operators can see what a device sent and why it was rejected.

`device_id` is the id the message claimed (from its topic), with no foreign key: messages from
unknown devices are dead letters too, and a letter outlives the device it names.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from tortoise import fields
from tortoise.backends.base.client import BaseDBAsyncClient
from tortoise.models import Model


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
    payload = fields.TextField()
    payload_bytes = fields.IntField()

    class Meta:
        table = "dead_letter"


@dataclass(slots=True)
class Letter:
    """A dead letter about to be stored."""

    received_us: int
    transport: str
    device_id: str | None
    topic: str
    reason: str
    message: str
    payload: bytes
    details: list[Any] = field(default_factory=list)


def _text(payload: bytes, limit: int) -> str:
    return payload[:limit].decode("utf-8", errors="replace")


async def insert_letters(
    letters: list[Letter], *, payload_limit: int, using: BaseDBAsyncClient | None = None
) -> None:
    """Store `letters` in one statement; payloads are cut to `payload_limit` bytes."""
    if not letters:
        return
    await DeadLetter.bulk_create(
        [
            DeadLetter(
                received_us=x.received_us,
                transport=x.transport,
                device_id=x.device_id,
                topic=x.topic[:512],
                reason=x.reason,
                message=x.message,
                details=x.details,
                payload=_text(x.payload, payload_limit),
                payload_bytes=len(x.payload),
            )
            for x in letters
        ],
        using_db=using,
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


async def prune_letters(older_than_us: int) -> int:
    """Delete the letters received before `older_than_us`; how many went."""
    return await DeadLetter.filter(received_us__lt=older_than_us).delete()
