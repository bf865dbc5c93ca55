"""InfluxQL statements (gateway/influxql.py) answered from fieldgate's series, in InfluxDB 1.x's
JSON result format, so Grafana's built-in InfluxDB data source charts fieldgate unchanged.

The mapping between InfluxDB's words and fieldgate's (README, "Grafana"):

- measurement and field: a metric `cpu.usage_idle` is measurement `cpu`, field `usage_idle`
  (split at the first '.', as line protocol writes `{measurement}.{field}`); a metric without a
  '.' (`temperature`) is measurement `temperature`, field `value`. Reading field `value` of
  measurement `m` reads metric `m`, or `m.value` when no series has `m`.
- tags: one, `device`. A condition on any other tag compares the empty string (InfluxDB's rule
  for a tag a series does not have).
- aggregates: mean -> avg; min, max, sum, count, first, last, stddev as named. Computed by the
  aggregate service (gateway/aggregation.py), the one behind GET /api/v1/telemetry/aggregate.
- fill: none, null, previous, linear are fieldgate's fills (previous carries the last reading
  before the range into leading empty buckets); fill(<number>) is null with the number written
  in. Windows under 1s are read as 1s.

Without GROUP BY "device" a statement answers one series over every device it matches: mean,
sum, count, min and max are combined exactly from each device's buckets (sum, count, min, max);
first, last and stddev need one device (GROUP BY "device", or a WHERE naming one). Combined,
fill(previous) carries values within the range only (the readings before it belong to
different devices).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any, Final

from gateway import aggregation
from gateway.aggregation import AggregateQuery, Fill, fill_buckets, format_start
from gateway.buckets import Agg, Bucket
from gateway.errors import FieldgateError
from gateway.influxql import (
    TAG_KEY,
    Cond,
    InfluxQLError,
    Select,
    ShowDatabases,
    ShowFieldKeys,
    ShowMeasurements,
    ShowRetentionPolicies,
    ShowTagKeys,
    ShowTagValues,
    Source,
    Statement,
)
from gateway.store.errors import StoreError
from gateway.store.series import find_series, series_names
from gateway.timespec import format_duration, format_ts

TAG: Final = "device"
DEFAULT_FIELD: Final = "value"
DATABASE: Final = "fieldgate"
_AGG_OF: Final = {
    "mean": Agg.AVG,
    "min": Agg.MIN,
    "max": Agg.MAX,
    "sum": Agg.SUM,
    "count": Agg.COUNT,
    "first": Agg.FIRST,
    "last": Agg.LAST,
    "stddev": Agg.STDDEV,
}
# Aggregates that combine exactly across devices from each device's sum, count, min and max.
_MERGEABLE: Final = {"mean", "sum", "count", "min", "max"}
# `epoch` query parameter -> microseconds per unit (absent: RFC 3339 strings).
EPOCH_US: Final[dict[str, float]] = {
    "ns": 0.001,
    "n": 0.001,
    "u": 1,
    "µ": 1,
    "us": 1,
    "ms": 1_000,
    "s": 1_000_000,
    "m": 60_000_000,
    "h": 3_600_000_000,
}
NOT_EXECUTED: Final = "not executed"


def split_metric(metric: str) -> tuple[str, str]:
    """(measurement, field) of a metric: split at the first '.', else (metric, "value")."""
    measurement, dot, fld = metric.partition(".")
    if dot and measurement and fld:
        return measurement, fld
    return metric, DEFAULT_FIELD


def metric_candidates(measurement: str, fld: str) -> list[str]:
    """The metrics (measurement, field) may name, the preferred first."""
    if fld == DEFAULT_FIELD:
        return [measurement, f"{measurement}.{fld}"]
    return [f"{measurement}.{fld}"]


def time_renderer(epoch: str | None) -> Callable[[int], Any]:
    """Bucket start (epoch microseconds) -> the `time` value InfluxDB answers for `epoch`."""
    if not epoch:
        return format_ts
    per = EPOCH_US.get(epoch)
    if per is None:
        raise InfluxQLError(f"epoch={epoch!r} is unknown; use one of: {', '.join(EPOCH_US)}")
    if per < 1:
        return lambda us: us * 1000
    unit = int(per)
    return lambda us: us // unit


async def execute(
    statements: list[Statement], *, now_us: int, epoch: str | None
) -> list[dict[str, Any]]:
    """The `results` of InfluxDB's answer: one per statement, in order. As InfluxDB does, the
    first statement that fails carries its error and the ones after it are not executed."""
    render = time_renderer(epoch)
    results: list[dict[str, Any]] = []
    for i, st in enumerate(statements):
        try:
            series = await _run(st, now_us, render)
        except (InfluxQLError, FieldgateError, StoreError) as exc:
            message = exc.message if isinstance(exc, FieldgateError | StoreError) else str(exc)
            results.append({"statement_id": i, "error": message})
            results.extend(
                {"statement_id": j, "error": NOT_EXECUTED} for j in range(i + 1, len(statements))
            )
            break
        result: dict[str, Any] = {"statement_id": i}
        if series:
            result["series"] = series
        results.append(result)
    return results


async def _run(st: Statement, now_us: int, render: Callable[[int], Any]) -> list[dict[str, Any]]:
    if isinstance(st, Select):
        return await _select(st, now_us, render)
    if isinstance(st, ShowRetentionPolicies):
        return [
            {
                "columns": ["name", "duration", "shardGroupDuration", "replicaN", "default"],
                "values": [["autogen", "0s", "168h0m0s", 1, True]],
            }
        ]
    if isinstance(st, ShowDatabases):
        return [{"name": "databases", "columns": ["name"], "values": [[DATABASE]]}]
    catalog = _Catalog(await series_names())
    if isinstance(st, ShowMeasurements):
        names = catalog.measurements(st.name_filter, st.where)
        return _listing("measurements", ["name"], [[m] for m in names], st.limit, st.offset)
    if isinstance(st, ShowTagKeys):
        return [
            *_per_measurement(
                catalog.measurements(st.source, st.where), ["tagKey"], lambda _: [[TAG]], st
            )
        ]
    if isinstance(st, ShowTagValues):
        if not st.key.holds({TAG_KEY: TAG}):
            return []
        return [
            *_per_measurement(
                catalog.measurements(st.source, st.where),
                ["key", "value"],
                lambda m: [[TAG, d] for d in catalog.devices(m, st.where)],
                st,
            )
        ]
    assert isinstance(st, ShowFieldKeys)
    return [
        *_per_measurement(
            catalog.measurements(st.source, None),
            ["fieldKey", "fieldType"],
            lambda m: [[f, "float"] for f in catalog.fields(m)],
            st,
        )
    ]


def _listing(
    name: str, columns: list[str], values: list[list[Any]], limit: int | None, offset: int
) -> list[dict[str, Any]]:
    values = values[offset:] if limit is None else values[offset : offset + limit]
    return [{"name": name, "columns": columns, "values": values}] if values else []


def _per_measurement(
    measurements: list[str],
    columns: list[str],
    values_of: Callable[[str], list[list[Any]]],
    st: ShowTagKeys | ShowTagValues | ShowFieldKeys,
) -> Iterable[dict[str, Any]]:
    for m in measurements:
        yield from _listing(m, columns, values_of(m), st.limit, st.offset)


class _Catalog:
    """Every series as measurement -> field -> devices, for the SHOW statements."""

    def __init__(self, rows: list[tuple[str, str]]) -> None:
        self._tree: dict[str, dict[str, set[str]]] = {}
        for device, metric in rows:
            m, f = split_metric(metric)
            self._tree.setdefault(m, {}).setdefault(f, set()).add(device)

    def measurements(self, source: Source | None, where: Cond | None) -> list[str]:
        return sorted(
            m
            for m in self._tree
            if (source is None or source.matches(m)) and (where is None or self.devices(m, where))
        )

    def devices(self, measurement: str, where: Cond | None) -> list[str]:
        found = set().union(*self._tree.get(measurement, {}).values())
        return sorted(d for d in found if where is None or where.holds({TAG: d}))

    def fields(self, measurement: str) -> list[str]:
        return sorted(self._tree.get(measurement, {}))


# SELECT


def _range_us(st: Select, now_us: int) -> tuple[int, int]:
    """[start, end) in epoch microseconds from the statement's time bounds."""
    now_ns = now_us * 1000
    start: int | None = None
    end: int | None = None
    for b in st.times:
        ns = b.at(now_ns)
        if b.op in (">=", ">", "="):
            lo = -(-ns // 1000) if b.op != ">" else ns // 1000 + 1
            start = lo if start is None else max(start, lo)
        if b.op in ("<=", "<", "="):
            hi = -(-ns // 1000) if b.op == "<" else ns // 1000 + 1
            end = hi if end is None else min(end, hi)
    if start is None:
        raise InfluxQLError(
            "a SELECT needs a lower time bound, e.g. WHERE time >= now() - 6h "
            "(Grafana's $timeFilter)"
        )
    return max(start, 0), now_us if end is None else end


@dataclass(slots=True)
class _Column:
    name: str
    agg: str  # the InfluxQL aggregate
    metric: str | None  # None: no series has the field


def _columns(st: Select, present: set[str]) -> list[_Column]:
    """The answer's columns: the alias, or the function's name (`mean`, then `mean_1` ...)."""
    out: list[_Column] = []
    used: set[str] = set()
    for sel in st.selectors:
        name = sel.alias or sel.agg
        if sel.alias is None:
            n = 0
            while name in used:
                n += 1
                name = f"{sel.agg}_{n}"
        used.add(name)
        metric = next(
            (m for m in metric_candidates(_name(st.source), sel.field) if m in present), None
        )
        out.append(_Column(name, sel.agg, metric))
    return out


def _name(source: Source) -> str:
    assert source.name is not None  # the parser refuses a regex source in SELECT
    return source.name


async def _targets(st: Select) -> tuple[list[_Column], list[str], list[str]]:
    """The answer's columns, the metrics they read, and the devices (having one of those
    metrics) that the WHERE clause matches."""
    measurement = _name(st.source)
    candidates = sorted(
        {m for sel in st.selectors for m in metric_candidates(measurement, sel.field)}
    )
    targets = await find_series(candidates, None)
    columns = _columns(st, {m for _, _, m in targets})
    metrics = list(dict.fromkeys(c.metric for c in columns if c.metric is not None))
    devices = {
        d for _, d, m in targets if m in metrics and (st.where is None or st.where.holds({TAG: d}))
    }
    return columns, metrics, sorted(devices)


async def _select(st: Select, now_us: int, render: Callable[[int], Any]) -> list[dict[str, Any]]:
    start_us, end_us = _range_us(st, now_us)
    measurement = _name(st.source)
    columns, metrics, devices = await _targets(st)
    if not devices:
        return []
    window = format_duration(max(1_000_000, -(-st.interval_ns // 1000)))
    fill = st.fill if isinstance(st.fill, str) else Fill.NULL.value
    per_device = st.group_by_device or len(devices) == 1
    if not per_device:
        refused = sorted({c.agg for c in columns} - _MERGEABLE)
        if refused:
            raise InfluxQLError(
                f"{', '.join(refused)}() across devices is not supported: add "
                f'GROUP BY "{TAG}", or WHERE "{TAG}" = \'...\''
            )
    aggs = {_AGG_OF[c.agg] for c in columns} if per_device else {Agg.SUM, Agg.MIN, Agg.MAX}

    def query(aggs: Iterable[Agg], fill: str) -> AggregateQuery:
        return AggregateQuery.parse(
            metrics=metrics,
            start=format_ts(start_us),
            end=format_ts(end_us),
            window=window,
            agg=",".join(sorted(a.value for a in aggs)),
            fill=fill,
            tz=st.tz,
            now_us=now_us,
        )

    q = query(aggs, fill if per_device else Fill.NONE.value)
    answer = await aggregation.fleet_aggregate(q, devices)
    # device -> metric -> the answered buckets (dicts keyed by "start", the aggs, "count")
    found: dict[str, dict[str, list[dict[str, Any]]]] = {}
    for s in answer.series:
        found.setdefault(s["device"], {})[s["metric"]] = s["buckets"]
    starts = {format_start(s): s for s in q.bucket_starts()}
    out: list[dict[str, Any]] = []
    if per_device:
        for d in devices:
            rows = _rows(columns, found.get(d, {}), starts, st.fill, render)
            if rows:
                series: dict[str, Any] = {"name": measurement}
                if st.group_by_device:
                    series["tags"] = {TAG: d}
                out.append({**series, "columns": ["time", *(c.name for c in columns)], **rows})
        return out
    fq = query({_AGG_OF[c.agg] for c in columns}, fill)
    merged = {
        m: _merge(fq, [found.get(d, {}).get(m, []) for d in devices], starts) for m in metrics
    }
    rows = _rows(columns, merged, starts, st.fill, render)
    if rows:
        out.append({"name": measurement, "columns": ["time", *(c.name for c in columns)], **rows})
    return out


def _merge(
    q: AggregateQuery, per_device: list[list[dict[str, Any]]], starts: dict[str, int]
) -> list[dict[str, Any]]:
    """One metric's buckets across devices, combined (sum, count, min, max, and mean from sum
    and count), then filled as `q` asks."""
    acc: dict[int, list[Any]] = {}
    for buckets in per_device:
        for b in buckets:
            s = starts[b["start"]]
            n, total, lo, hi = b["count"], b["sum"], b["min"], b["max"]
            cur = acc.get(s)
            if cur is None:
                acc[s] = [n, total, lo, hi]
            else:
                cur[0] += n
                cur[1] += total
                cur[2] = min(cur[2], lo)
                cur[3] = max(cur[3], hi)
    value_of = {
        Agg.AVG: lambda c: c[1] / c[0],
        Agg.SUM: lambda c: c[1],
        Agg.MIN: lambda c: c[2],
        Agg.MAX: lambda c: c[3],
    }
    aggs = [a for a in q.aggs if a is not Agg.COUNT]
    combined: list[Bucket] = [
        (s, c[0], tuple(value_of[a](c) for a in aggs)) for s, c in sorted(acc.items())
    ]
    return fill_buckets(q, combined, None)


def _rows(
    columns: list[_Column],
    by_metric: dict[str, list[dict[str, Any]]],
    starts: dict[str, int],
    fill: str | float,
    render: Callable[[int], Any],
) -> dict[str, Any]:
    """{"values": [[time, v, ...], ...]} joining the columns' buckets on their start; {} when
    there is none."""
    table: dict[int, list[Any]] = {}
    for i, col in enumerate(columns):
        if col.metric is None:
            continue
        key = "count" if col.agg == "count" else _AGG_OF[col.agg].value
        for b in by_metric.get(col.metric, []):
            row = table.setdefault(starts[b["start"]], [None] * len(columns))
            value = b[key]
            if isinstance(fill, float) and (value is None or (key == "count" and value == 0)):
                # fill(<number>); InfluxDB fills count's empty buckets too
                value = int(fill) if fill.is_integer() else fill
            row[i] = value
    if not table:
        return {}
    return {"values": [[render(s), *table[s]] for s in sorted(table)]}
