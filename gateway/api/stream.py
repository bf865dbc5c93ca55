"""Live streams over HTTP: Server-Sent Events of committed readings (operator token), resumable
by Last-Event-ID (gateway/live.py has the rules).

Events:
- `readings` (`id: {log id}.{device}`): `{"device", "points": [{"metric", "ts", "value"}]}`, one
  per committed batch of a device's readings; history pages (`start`/`cursor`) come first, as
  `readings` events without an id;
- `reset`: the Last-Event-ID is older than the log keeps (or not this gateway's); what follows
  is live, so reload the history that was missed;
- `overflow`: the consumer fell behind; the stream ends, resume with the last id;
- `: ping` comments every FIELDGATE_STREAM_HEARTBEAT_S.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Annotated

import anyio
import orjson
from fastapi import APIRouter, Header, Query, Request
from sse_starlette import EventSourceResponse, ServerSentEvent
from starlette.background import BackgroundTask

from devices.credentials import hash_token
from devices.formats import metric_ok
from devices.models import is_device_id
from gateway import metrics
from gateway.api.deps import RuntimeDep
from gateway.auth import OperatorAuth
from gateway.errors import BadRequest, NotFound, Unavailable
from gateway.history import decode_cursor
from gateway.live import (
    HistoryPages,
    LiveHub,
    Position,
    Subscription,
    first_of,
    history,
    parse_event_id,
)
from gateway.runtime import Runtime
from gateway.store import registry
from gateway.timespec import now_us, parse_instant

router = APIRouter(tags=["streams"])

# Devices a fleet stream may name.
MAX_STREAM_DEVICES = 1000

_DOC = {
    200: {
        "description": "text/event-stream: `readings` events (id `{log}.{device}`), `reset`,"
        " `overflow`, and `: ping` comments",
        "content": {"text/event-stream": {"schema": {"type": "string"}}},
    }
}

Metric = Annotated[
    list[str] | None,
    Query(description="only these metrics (repeat the parameter); all when absent"),
]
LastEventId = Annotated[
    str | None, Header(description="the id of the last event received: resume after it")
]
LastEventIdQuery = Annotated[
    str | None,
    Query(description="as the Last-Event-ID header, for clients that cannot set it"),
]


@router.get(
    "/devices/{device_id}/telemetry/stream",
    response_class=EventSourceResponse,
    responses=_DOC,  # type: ignore[arg-type]
)
async def device_stream(
    device_id: str,
    request: Request,
    _: OperatorAuth,
    runtime: RuntimeDep,
    metric: Metric = None,
    start: Annotated[
        str | None,
        Query(description="send the history from here first (RFC 3339, now, -1h), then live"),
    ] = None,
    cursor: Annotated[
        str | None,
        Query(description="as start: the next_cursor of the raw readings API (one metric)"),
    ] = None,
    last_event_id: LastEventId = None,
    resume: LastEventIdQuery = None,
) -> EventSourceResponse:
    """A device's committed readings as Server-Sent Events, live (and its history first, with
    `start` or `cursor`); resumable with Last-Event-ID."""
    await registry.require_device(device_id)
    metrics_wanted = _metrics(metric)
    start_us = _history_start(start, cursor, metrics_wanted)
    position = _resume(last_event_id or resume)
    if position is not None and start_us is not None:
        raise BadRequest("resume with Last-Event-ID or start from history, not both")
    series: dict[str, int] = {}
    if start_us is not None:
        series = await runtime.series.all_of(device_id)
        if metrics_wanted is not None:
            series = {m: s for m, s in series.items() if m in metrics_wanted}
    hub = _hub(runtime)
    sub = await hub.subscribe(_key(request), frozenset([device_id]), metrics_wanted)
    return _respond(runtime, hub, sub, position, device_id, series, start_us)


@router.get(
    "/telemetry/stream",
    response_class=EventSourceResponse,
    responses=_DOC,  # type: ignore[arg-type]
)
async def fleet_stream(
    request: Request,
    _: OperatorAuth,
    runtime: RuntimeDep,
    device: Annotated[
        list[str] | None,
        Query(description="only these devices (repeat the parameter); every device when absent"),
    ] = None,
    metric: Metric = None,
    last_event_id: LastEventId = None,
    resume: LastEventIdQuery = None,
) -> EventSourceResponse:
    """Committed readings of several devices (or all) as Server-Sent Events, live; resumable
    with Last-Event-ID."""
    devices = None
    if device:
        if len(device) > MAX_STREAM_DEVICES:
            raise BadRequest(
                f"at most {MAX_STREAM_DEVICES} devices per stream", code="too_many_devices"
            )
        bad = [d for d in device if not is_device_id(d)]
        if bad:
            raise NotFound(f"no device {bad[0]!r}")
        devices = frozenset(device)
    metrics_wanted = _metrics(metric)
    position = _resume(last_event_id or resume)
    hub = _hub(runtime)
    sub = await hub.subscribe(_key(request), devices, metrics_wanted)
    return _respond(runtime, hub, sub, position, None, {}, None)


def _hub(runtime: Runtime) -> LiveHub:
    if runtime.live is None:
        raise Unavailable(
            "live streams are off on this gateway (FIELDGATE_LIVE_LOG_WINDOW_S=0)",
            code="streams_disabled",
            retry_after_s=60,
        )
    return runtime.live


def _key(request: Request) -> str:
    """Whose stream it is, for the per-token limit (the token's hash, never the token)."""
    return hash_token(request.headers.get("authorization", ""))


def _metrics(metric: list[str] | None) -> frozenset[str] | None:
    if not metric:
        return None
    bad = [m for m in metric if not metric_ok(m)]
    if bad:
        raise BadRequest(f"metric={bad[0]!r} is not a metric name", code="invalid_parameter")
    return frozenset(metric)


def _history_start(
    start: str | None, cursor: str | None, metrics_wanted: frozenset[str] | None
) -> int | None:
    if start is not None and cursor is not None:
        raise BadRequest("give start or cursor, not both")
    if start is not None:
        return parse_instant(start, now_us(), name="start")
    if cursor is not None:
        if metrics_wanted is None or len(metrics_wanted) != 1:
            raise BadRequest(
                "a cursor of the raw readings API belongs to one metric: name it with metric="
            )
        return decode_cursor(cursor) + 1
    return None


def _resume(text: str | None) -> Position | None:
    if not text:
        return None
    position = parse_event_id(text)
    if position is None:
        raise BadRequest(
            f"Last-Event-ID {text[:80]!r} is not an event id of this API", code="invalid_event_id"
        )
    return position


def _respond(
    runtime: Runtime,
    hub: LiveHub,
    sub: Subscription,
    position: Position | None,
    device: str | None,
    series: dict[str, int],
    start_us: int | None,
) -> EventSourceResponse:
    settings = runtime.settings
    if position is not None:
        sub.after = max(sub.after, position)
    # Set by sse-starlette when uvicorn shuts down: the stream then ends with its response
    # complete (cancelled, uvicorn would log "ASGI callable returned without completing").
    shutdown = anyio.Event()
    return EventSourceResponse(
        _events(hub, sub, position, device, series, start_us, settings.max_page_size, shutdown),
        ping=settings.stream_heartbeat_s,
        send_timeout=settings.stream_send_timeout_s,
        headers={"Cache-Control": "no-store", "X-Accel-Buffering": "no"},
        shutdown_event=shutdown,
        shutdown_grace_period=2.0,
        # Also after the answer: a stream whose client left before its events began never runs
        # the generator's `finally` (unsubscribing twice is nothing).
        background=BackgroundTask(hub.unsubscribe, sub),
    )


async def _events(
    hub: LiveHub,
    sub: Subscription,
    position: Position | None,
    device: str | None,
    series: dict[str, int],
    start_us: int | None,
    page_size: int,
    shutdown: anyio.Event,
) -> AsyncIterator[ServerSentEvent]:
    """The stream: history or what a resume missed, then live events until the consumer falls
    behind, goes away or the gateway stops."""
    metrics.STREAMS_OPEN.inc()
    pages: HistoryPages | None = None
    try:
        if start_us is not None and device is not None:
            pages = HistoryPages()
            async for data in history(device, series, start_us, page_size, pages):
                yield ServerSentEvent(data=data.decode(), event="readings")
        elif position is not None:
            if await hub.holds(position):
                async for event in hub.replay(sub, position):
                    metrics.STREAM_EVENTS.inc()
                    yield ServerSentEvent(data=event.data().decode(), id=event.id, event="readings")
            else:
                yield ServerSentEvent(
                    data=_error(
                        "resume_too_old",
                        "the events after this id are no longer kept"
                        " (FIELDGATE_LIVE_LOG_WINDOW_S); what follows is live: reload the history",
                    ),
                    event="reset",
                )
        while True:
            while sub.queue:
                event = sub.queue.popleft()
                if pages is not None:
                    kept = pages.unsent(event)
                    if kept is None:
                        continue
                    event = kept
                metrics.STREAM_EVENTS.inc()
                yield ServerSentEvent(data=event.data().decode(), id=event.id, event="readings")
            if sub.overflowed:
                metrics.STREAM_ENDS.labels("overflow").inc()
                yield ServerSentEvent(
                    data=_error(
                        "stream_overflow",
                        f"this stream fell more than {sub.buffer} events behind; reconnect with"
                        " Last-Event-ID to resume",
                    ),
                    event="overflow",
                )
                return
            if hub.stopping.is_set() or shutdown.is_set():
                metrics.STREAM_ENDS.labels("shutdown").inc()
                return
            sub.ready.clear()
            await first_of(sub.ready, hub.stopping, shutdown)
    finally:
        hub.unsubscribe(sub)
        metrics.STREAMS_OPEN.dec()


def _error(code: str, message: str) -> str:
    return orjson.dumps({"code": code, "message": message}).decode()
