"""Telemetry in over HTTP (the write endpoint beside api/reads.py): a device posts readings
(device token); the ingest rules are gateway/ingest.py."""

from __future__ import annotations

from fastapi import APIRouter, Request

from devices.formats import Code, PayloadError
from gateway.api.deps import JSON, RuntimeDep, read_body
from gateway.api.schemas import IngestOut
from gateway.auth import DeviceAuth
from gateway.errors import BadRequest, PayloadTooLarge, Unavailable, Unprocessable
from gateway.ingest import LimitCode
from gateway.writer import QueueFull, WriterStopped

router = APIRouter(prefix="/devices/{device_id}/telemetry", tags=["telemetry"])


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
