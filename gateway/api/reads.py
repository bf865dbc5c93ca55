"""Reads over HTTP (operator token): raw readings a page at a time, the latest values, and
aggregated time windows of one device or a fleet; JSON, or CSV with `Accept: text/csv`.

HTTP only: the rules are gateway/history.py's (raw, latest) and gateway/aggregation.py's."""

from __future__ import annotations

import csv
import io
from collections.abc import Iterable, Sequence
from typing import Annotated, Any, Final, Protocol

from fastapi import APIRouter, Depends, Query, Request
from fastapi.responses import Response

from devices.formats import METRIC_PATTERN
from gateway import aggregation, history
from gateway.aggregation import AggregateQuery
from gateway.api.deps import JSON, RuntimeDep
from gateway.api.schemas import (
    DeviceAggregateAnswer,
    FleetAggregateOut,
    LatestOut,
    RawOut,
)
from gateway.auth import OperatorAuth
from gateway.timespec import now_us

router = APIRouter(tags=["reads"])

# OpenAPI: the endpoints that answer CSV too.
_CSV_DOC: Final[dict[int | str, dict[str, Any]]] = {
    200: {"content": {"text/csv": {"schema": {"type": "string"}}}}
}


class Table(Protocol):
    """An answer that can be written as CSV: a header row, then one row per item."""

    def columns(self) -> list[str]: ...

    def rows(self) -> Iterable[Sequence[Any]]: ...


def _wants_csv(request: Request) -> bool:
    return "text/csv" in request.headers.get("accept", "")


def _csv(table: Table, headers: dict[str, str] | None = None) -> Response:
    """The one CSV writer of the read endpoints (None is an empty field, a float its repr)."""
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow(table.columns())
    writer.writerows(table.rows())
    return Response(out.getvalue(), media_type="text/csv; charset=utf-8", headers=headers)


@router.get("/devices/{device_id}/telemetry", response_model=RawOut, responses=_CSV_DOC)
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
    page = await history.read_page(
        runtime.series,
        device_id,
        metric,
        start=start,
        end=end,
        limit=limit,
        max_page_size=runtime.settings.max_page_size,
        cursor=cursor,
    )
    if _wants_csv(request):
        return _csv(page, {"X-Next-Cursor": page.next_cursor} if page.next_cursor else None)
    return JSON(page.body())


@router.get("/devices/{device_id}/telemetry/latest", response_model=LatestOut)
async def get_latest(device_id: str, _: OperatorAuth) -> JSON:
    """The newest reading of each of the device's metrics."""
    return JSON(await history.read_latest(device_id))


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


@router.get(
    "/devices/{device_id}/telemetry/aggregate",
    response_model=DeviceAggregateAnswer,
    responses=_CSV_DOC,
)
async def device_aggregate(
    device_id: str, q: AggregateQueryDep, request: Request, _: OperatorAuth, runtime: RuntimeDep
) -> Response:
    """Time buckets of one device's metrics (one series per metric)."""
    answer = await aggregation.device_aggregate(runtime.series, device_id, q)
    return _csv(answer) if _wants_csv(request) else JSON(answer.body())


@router.get("/telemetry/aggregate", response_model=FleetAggregateOut, responses=_CSV_DOC)
async def fleet_aggregate(
    q: AggregateQueryDep,
    request: Request,
    _: OperatorAuth,
    device: Annotated[list[str] | None, Query(description="a device id; repeat; none: all")] = None,
) -> Response:
    """Time buckets of a metric across devices (the named ones, or all that have it)."""
    answer = await aggregation.fleet_aggregate(q, device)
    return _csv(answer) if _wants_csv(request) else JSON(answer.body())
