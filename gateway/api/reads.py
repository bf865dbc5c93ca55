"""Reads over HTTP (operator token): raw readings a page at a time, the latest values, and
aggregated time windows of one device or a fleet; JSON or CSV."""

from __future__ import annotations

import base64
import binascii
import csv
import io
from typing import Annotated, Any

from fastapi import APIRouter, Depends, Query, Request
from fastapi.responses import Response

from devices.formats import METRIC_PATTERN
from gateway.aggregation import MAX_SERIES, AggregateQuery, fill_buckets
from gateway.api.deps import JSON, RuntimeDep
from gateway.api.schemas import LatestOut, RawOut
from gateway.auth import OperatorAuth
from gateway.errors import BadRequest
from gateway.store import readings, registry
from gateway.store.aggregate import Fill, aggregate_windows, values_before
from gateway.store.database import connection
from gateway.store.series import find_series
from gateway.timespec import format_ts, now_us, parse_instant

router = APIRouter(tags=["reads"])

_END_OF_TIME = 2**63 - 1


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


@router.get("/devices/{device_id}/telemetry", response_model=RawOut)
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
    await registry.require_device(device_id)
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


@router.get("/devices/{device_id}/telemetry/latest", response_model=LatestOut)
async def get_latest(device_id: str, _: OperatorAuth) -> JSON:
    """The newest reading of each of the device's metrics."""
    await registry.require_device(device_id)
    rows = await readings.select_latest(connection(), device_id)
    return JSON(
        {
            "device": device_id,
            "values": {m: {"ts": format_ts(ts), "value": v} for m, ts, v in rows},
        }
    )


Metrics = Annotated[list[str], Query(description="a metric name; repeat for several")]
Start = Annotated[str | None, Query(description="RFC 3339, now, or -24h (default end - 24h)")]
End = Annotated[str | None, Query(description="RFC 3339, now, or -1h (default now; exclusive)")]
Window = Annotated[str, Query(description="1s..1d, e.g. 90s, 15m, 6h, or auto (~500 buckets)")]
Aggs = Annotated[str, Query(description="any of avg,min,max,sum,count,first,last,stddev")]
FillMode = Annotated[str, Query(description="none, null, previous or linear")]
Tz = Annotated[
    str | None, Query(description="IANA zone aligning whole-day windows, e.g. Europe/Oslo")
]


async def _aggregate_query(
    metric: Metrics,
    start: Start = None,
    end: End = None,
    window: Window = "auto",
    agg: Aggs = "avg",
    fill: FillMode = "none",
    tz: Tz = None,
) -> AggregateQuery:
    """The parameters both aggregate endpoints share, checked before any SQL runs."""
    return AggregateQuery.parse(
        metrics=metric,
        start=start,
        end=end,
        window=window,
        agg=agg,
        fill=fill,
        tz=tz,
        now_us=now_us(),
    )


AggregateQueryDep = Annotated[AggregateQuery, Depends(_aggregate_query)]


def _wants_csv(request: Request) -> bool:
    return "text/csv" in request.headers.get("accept", "")


async def _series_buckets(
    q: AggregateQuery, targets: list[tuple[int, str, str]]
) -> dict[int, list[dict[str, Any]]]:
    conn = connection()
    ids = [sid for sid, _, _ in targets]
    found = await aggregate_windows(
        conn,
        ids,
        q.start_us,
        q.end_us,
        q.aggs,
        window_us=None if q.bounds is not None else q.window_us,
        bounds=q.bounds or (),
    )
    before = await values_before(conn, ids, q.start_us) if q.fill is Fill.PREVIOUS else {}
    return {sid: fill_buckets(q, found.get(sid, []), before.get(sid)) for sid in ids}


def _csv(q: AggregateQuery, series: list[dict[str, Any]]) -> Response:
    out = io.StringIO()
    columns = ["start", *[a.value for a in q.aggs if a.value != "count"], "count"]
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow(["device", "metric", *columns])
    for s in series:
        for b in s["buckets"]:
            writer.writerow(
                [s["device"], s["metric"], *("" if b[c] is None else b[c] for c in columns)]
            )
    return Response(out.getvalue(), media_type="text/csv; charset=utf-8")


@router.get("/devices/{device_id}/telemetry/aggregate")
async def device_aggregate(
    device_id: str, q: AggregateQueryDep, request: Request, _: OperatorAuth, runtime: RuntimeDep
) -> Response:
    """Time buckets of one device's metrics (one series per metric)."""
    ids = await runtime.series.ids_of(device_id, q.metrics)
    # A series belongs to an existing device (deleting a device deletes its series and drops
    # them from this cache), so the device needs a look-up only when a metric has no series.
    if len(ids) < len(q.metrics):
        await registry.require_device(device_id)
    targets = [(ids[m], device_id, m) for m in q.metrics if m in ids]
    buckets = await _series_buckets(q, targets)
    by_metric = {m: buckets[sid] for sid, _, m in targets}
    empty = fill_buckets(q, [], None)
    series = [
        {"device": device_id, "metric": m, "buckets": by_metric.get(m, empty)} for m in q.metrics
    ]
    if _wants_csv(request):
        return _csv(q, series)
    if len(series) == 1:
        return JSON(
            {
                "device": device_id,
                "metric": q.metrics[0],
                **q.header(),
                "buckets": series[0]["buckets"],
            }
        )
    return JSON({"device": device_id, **q.header(), "series": series})


@router.get("/telemetry/aggregate")
async def fleet_aggregate(
    q: AggregateQueryDep,
    request: Request,
    _: OperatorAuth,
    device: Annotated[list[str] | None, Query(description="a device id; repeat; none: all")] = None,
) -> Response:
    """Time buckets of a metric across devices (the named ones, or all that have it)."""
    devices = list(dict.fromkeys(device)) if device else None
    if devices is not None:
        if len(devices) > MAX_SERIES:
            raise BadRequest(f"at most {MAX_SERIES} devices per query", code="too_many_series")
        await registry.require_devices(devices)
    targets = await find_series(q.metrics, devices)
    if len(targets) > MAX_SERIES:
        raise BadRequest(
            f"{len(targets)} series match; at most {MAX_SERIES} per query: name devices",
            code="too_many_series",
        )
    buckets = await _series_buckets(q, targets)
    series: list[dict[str, Any]] = [
        {"device": d, "metric": m, "buckets": buckets[sid]} for sid, d, m in targets
    ]
    if devices is not None:  # named devices without the metric still get a (empty) series
        have = {(d, m) for _, d, m in targets}
        empty = fill_buckets(q, [], None)
        series += [
            {"device": d, "metric": m, "buckets": empty}
            for d in devices
            for m in q.metrics
            if (d, m) not in have
        ]
        order = {d: i for i, d in enumerate(devices)}
        series.sort(key=lambda s: (order[str(s["device"])], q.metrics.index(str(s["metric"]))))
    if _wants_csv(request):
        return _csv(q, series)
    return JSON(
        {
            "metric": q.metrics[0] if len(q.metrics) == 1 else q.metrics,
            **q.header(),
            "series": series,
        }
    )
