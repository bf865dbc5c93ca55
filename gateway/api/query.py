"""Aggregated time windows over HTTP: one device, or a fleet; JSON or CSV."""

from __future__ import annotations

import csv
import io
from typing import Annotated, Any

from fastapi import APIRouter, Depends, Query, Request
from fastapi.responses import Response

from gateway.api.deps import JSON, RuntimeDep
from gateway.auth import OperatorAuth
from gateway.errors import BadRequest, NotFound
from gateway.query import MAX_SERIES, AggregateQuery, fill_buckets
from gateway.store import registry
from gateway.store.aggregate import Fill, aggregate_windows, values_before
from gateway.store.database import connection
from gateway.store.series import find_series
from gateway.timespec import now_us

router = APIRouter(tags=["query"])

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
    if len(ids) < len(q.metrics) and not await registry.device_exists(device_id):
        raise NotFound(f"device {device_id!r} does not exist", code="device_not_found")
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
        known = await registry.existing_device_ids(devices)
        missing = [d for d in devices if d not in known]
        if missing:
            raise NotFound(f"no such device(s): {', '.join(missing)}", code="device_not_found")
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
