"""Dead letters over HTTP: the messages the gateway refused, with reasons (operator token)."""

from __future__ import annotations

import base64
import re
from typing import Annotated, Any, Final

from fastapi import APIRouter, Query
from pydantic import BaseModel, Field

from gateway.api.deps import JSON, RuntimeDep
from gateway.auth import OperatorAuth
from gateway.errors import BadRequest
from gateway.store.dead_letters import DeadLetter, list_letters
from gateway.timespec import format_ts

router = APIRouter(prefix="/rejected", tags=["rejected"])

_CURSOR_RE: Final = re.compile(r"[0-9]{1,19}")
_MAX_ID: Final = 2**63 - 1


class RejectedMessage(BaseModel):
    id: int
    received_at: str
    transport: str
    device: str | None = Field(description="the device id the topic named (null if none)")
    topic: str
    reason: str = Field(description="a stable code: invalid_json, unknown_device, ...")
    message: str
    details: list[Any] = Field(description="per-reading rejections, as the HTTP API reports them")
    payload: str = Field(description="the payload's first bytes (UTF-8, invalid bytes replaced)")
    payload_base64: str = Field(description="the same first bytes, exactly (standard base64)")
    payload_bytes: int = Field(description="the payload's whole size")


class RejectedList(BaseModel):
    rejected: list[RejectedMessage]
    next_cursor: str | None


def _out(letter: DeadLetter) -> dict[str, Any]:
    return {
        "id": letter.id,
        "received_at": format_ts(letter.received_us),
        "transport": letter.transport,
        "device": letter.device_id,
        "topic": letter.topic,
        "reason": letter.reason,
        "message": letter.message,
        "details": letter.details,
        "payload": bytes(letter.payload).decode("utf-8", errors="replace"),
        "payload_base64": base64.b64encode(letter.payload).decode("ascii"),
        "payload_bytes": letter.payload_bytes,
    }


def _parse_cursor(cursor: str) -> int:
    """A dead letter's id: ASCII digits within BIGINT (str.isdigit also takes "²", int() not)."""
    if not _CURSOR_RE.fullmatch(cursor) or int(cursor) > _MAX_ID:
        raise BadRequest(f"cursor={cursor!r} is not a cursor this API gave", code="invalid_cursor")
    return int(cursor)


@router.get("", response_model=RejectedList)
async def get_rejected(
    _: OperatorAuth,
    runtime: RuntimeDep,
    device: Annotated[str | None, Query(min_length=1, max_length=64)] = None,
    limit: Annotated[int, Query(ge=1)] = 100,
    cursor: Annotated[str | None, Query(description="next_cursor of the previous page")] = None,
) -> JSON:
    """Rejected messages (dead letters), newest first, optionally of one device."""
    limit = min(limit, runtime.settings.max_page_size)
    before = _parse_cursor(cursor) if cursor is not None else None
    letters = await list_letters(device_id=device, before_id=before, limit=limit + 1)
    more = len(letters) > limit
    letters = letters[:limit]
    return JSON(
        {
            "rejected": [_out(x) for x in letters],
            "next_cursor": str(letters[-1].id) if more else None,
        }
    )
