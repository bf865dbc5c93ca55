"""Telemetry over HTTP: ingest (device token) and raw reads (operator token)."""

from __future__ import annotations

import base64
import binascii
from typing import Annotated

from fastapi import APIRouter, Query, Request
from fastapi.responses import Response

from devices.formats import METRIC_PATTERN, Code, PayloadError
from gateway.api.deps import JSON, RuntimeDep, read_body
from gateway.api.schemas import IngestOut, LatestOut, RawOut
from gateway.auth import DeviceAuth, OperatorAuth
from gateway.errors import BadRequest, NotFound, PayloadTooLarge, Unavailable, Unprocessable
from gateway.ingest import LimitCode
from gateway.pipeline import QueueFull, WriterStopped
from gateway.store import readings, registry
from gateway.store.database import connection
from gateway.timespec import format_ts, now_us, parse_instant

router = APIRouter(prefix="/devices/{device_id}/telemetry", tags=["telemetry"])

_END_OF_TIME = 2**63 - 1


@router.post("", response_model=IngestOut)
async def post_telemetry(
    device_id: str, request: Request, _: DeviceAuth, runtime: RuntimeDep
) -> JSON:
    """Store one message or an array of messages; answers once they are committed."""
    body = await read_body(request, runtime.settings.max_body_bytes)
    try:
        result = await runtime.ingestor.ingest(device_id, body, transport="http", wait=False)
    except PayloadError as exc:
        if exc.code in (Code.TOO_MANY_MESSAGES, LimitCode.TOO_MANY_METRICS):
            raise PayloadTooLarge(exc.message, code=exc.code) from None
        raise BadRequest(exc.message, code=exc.code) from None
    except QueueFull as exc:
        raise Unavailable(
            f"the writer is busy ({exc}); retry shortly",
            code="queue_full",
            retry_after_s=runtime.settings.retry_after_s,
        ) from None
    except WriterStopped:
        raise Unavailable("the gateway is shutting down", code="shutting_down") from None
    # Anything else reaches app.ErrorBoundary: a database outage is 503 database_unavailable
    # with Retry-After, anything else a bug (500 internal_error, logged).
    rejected = [r.as_dict() for r in result.rejected]
    if not result.valid:
        raise Unprocessable(
            "no valid readings in the payload" if rejected else "the payload holds no messages",
            code="no_valid_readings",
            details=rejected,
        )
    return JSON(
        {"accepted": result.accepted, "duplicates": result.duplicates, "rejected": rejected}
    )


async def _require_device(device_id: str) -> None:
    if not await registry.device_exists(device_id):
        raise NotFound(f"device {device_id!r} does not exist", code="device_not_found")


def _encode_cursor(ts: int) -> str:
    return base64.urlsafe_b64encode(f"ts:{ts}".encode()).decode().rstrip("=")


def _decode_cursor(cursor: str) -> int:
    try:
        text = base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4)).decode()
        kind, _, value = text.partition(":")
        if kind != "ts":
            raise ValueError(kind)
        return int(value)
    except (ValueError, binascii.Error, UnicodeDecodeError):
        raise BadRequest(
            f"cursor={cursor!r} is not a cursor this API gave", code="invalid_cursor"
        ) from None


@router.get("", response_model=RawOut)
async def get_telemetry(
    device_id: str,
    request: Request,
    _: OperatorAuth,
    runtime: RuntimeDep,
    metric: Annotated[str, Query(pattern=METRIC_PATTERN, description="a metric name")],
    start: Annotated[str | None, Query(description="RFC 3339, now, or -24h")] = None,
    end: Annotated[str | None, Query(description="RFC 3339, now, or -1h (exclusive)")] = None,
    limit: Annotated[int, Query(ge=1)] = 1000,
    cursor: Annotated[str | None, Query()] = None,
) -> Response:
    """Raw readings of one metric in time order, a page at a time (follow next_cursor).

    With `Accept: text/csv` the answer is CSV with a header row; the next page's cursor is then
    in the `X-Next-Cursor` header."""
    await _require_device(device_id)
    limit = min(limit, runtime.settings.max_page_size)
    now = now_us()
    start_us = parse_instant(start, now, name="start") if start else 0
    end_us = parse_instant(end, now, name="end") if end else _END_OF_TIME
    if cursor:
        start_us = max(start_us, _decode_cursor(cursor) + 1)
    ids = await runtime.series.ids_of(device_id, [metric])
    points: list[tuple[int, float]] = []
    if metric in ids and start_us < end_us:
        points = await readings.select_raw(connection(), ids[metric], start_us, end_us, limit + 1)
    more = len(points) > limit
    points = points[:limit]
    next_cursor = _encode_cursor(points[-1][0]) if more else None
    if "text/csv" in request.headers.get("accept", ""):
        lines = ["device,metric,ts,value"]
        lines += [f"{device_id},{metric},{format_ts(ts)},{value!r}" for ts, value in points]
        headers = {"X-Next-Cursor": next_cursor} if next_cursor else {}
        return Response(
            "\n".join(lines) + "\n", media_type="text/csv; charset=utf-8", headers=headers
        )
    return JSON(
        {
            "device": device_id,
            "metric": metric,
            "points": [{"ts": format_ts(ts), "value": value} for ts, value in points],
            "next_cursor": next_cursor,
        }
    )


@router.get("/latest", response_model=LatestOut)
async def get_latest(device_id: str, _: OperatorAuth) -> JSON:
    """The newest reading of each of the device's metrics."""
    await _require_device(device_id)
    rows = await readings.select_latest(connection(), device_id)
    return JSON(
        {
            "device": device_id,
            "values": {m: {"ts": format_ts(ts), "value": v} for m, ts, v in rows},
        }
    )
