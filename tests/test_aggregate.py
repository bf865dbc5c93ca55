"""The aggregate read API against an independent computation, on SQLite and PostgreSQL."""

from __future__ import annotations

import csv
import io
import math
import random
import statistics
from collections import defaultdict
from datetime import UTC, datetime, timedelta
from typing import Any
from zoneinfo import ZoneInfo

import pytest

from gateway.timespec import format_ts
from tests.conftest import Gateway

S = 1_000_000
BASE = 1_763_596_800 * S  # 2025-11-20T00:00:00Z: far enough in the past for any skew check
AGGS = ["avg", "min", "max", "sum", "count", "first", "last", "stddev"]
FILLS = ["none", "null", "previous", "linear"]


def iso(us: int) -> str:
    sec, frac = divmod(us, S)
    return datetime.fromtimestamp(sec, UTC).strftime("%Y-%m-%dT%H:%M:%S") + f".{frac:06d}Z"


def make_readings(seed: int) -> tuple[dict[int, float], int, int]:
    """Irregular readings over ~20 minutes with edges and gaps; (readings, start, end)."""
    rng = random.Random(seed)
    start, end = BASE + 30 * S, BASE + 20 * 60 * S
    ts: set[int] = set()
    for minute in range(21):
        if minute in (4, 5, 11):  # empty buckets for 1m windows
            continue
        for _ in range(rng.choice([1, 1, 2, 5, 9])):
            ts.add(BASE + minute * 60 * S + rng.randrange(60 * S))
    ts |= {
        BASE + 60 * S,  # exactly at a bucket start
        BASE + 7 * 60 * S,
        start - 1,  # just before the range: excluded, but the "previous" value
        start,  # exactly at start
        end - 1,  # just before end: included
        end,  # exactly at end: excluded
    }
    readings = {t: round(rng.uniform(-50, 50), 3) for t in sorted(ts)}
    readings[BASE + 13 * 60 * S + 5 * S] = -273.15  # a negative outlier
    return readings, start, end


def reference(
    readings: dict[int, float],
    start: int,
    end: int,
    window: int,
    aggs: list[str],
    fill: str,
    *,
    bounds: list[tuple[int, int]] | None = None,
) -> list[dict[str, Any]]:
    """The buckets the API should answer, computed here without SQL."""
    if bounds is None:
        first = start - start % window
        bounds = [(b, b + window) for b in range(first, end, window)]
    groups: dict[int, list[tuple[int, float]]] = defaultdict(list)
    for t in sorted(readings):
        if start <= t < end:
            lo = next(lo for lo, hi in bounds if lo <= t < hi)
            groups[lo].append((t, readings[t]))
    value_aggs = [a for a in aggs if a != "count"]

    def compute(points: list[tuple[int, float]]) -> dict[str, Any]:
        vals = [v for _, v in points]
        return {
            "avg": sum(vals) / len(vals),
            "min": min(vals),
            "max": max(vals),
            "sum": sum(vals),
            "first": points[0][1],
            "last": points[-1][1],
            "stddev": statistics.stdev(vals) if len(vals) > 1 else None,
        }

    computed = {lo: compute(p) for lo, p in groups.items()}
    out = []
    before = [readings[t] for t in sorted(readings) if t < start]
    last: dict[str, Any] | None = (
        {a: before[-1] for a in value_aggs if a != "stddev"} if before else None
    )
    known = sorted(computed)
    for lo, _ in bounds:
        if lo in computed:
            row = {a: computed[lo][a] for a in value_aggs}
            row["count"] = len(groups[lo])
            last = row
        elif fill == "none":
            continue
        elif fill == "null":
            row = dict.fromkeys(value_aggs) | {"count": 0}
        elif fill == "previous":
            row = {a: (last or {}).get(a) for a in value_aggs} | {"count": 0}
        else:  # linear
            left = [k for k in known if k < lo]
            right = [k for k in known if k > lo]
            row = {"count": 0}
            for a in value_aggs:
                if not left or not right:
                    row[a] = None
                    continue
                lv, rv = computed[left[-1]][a], computed[right[0]][a]
                frac = (lo - left[-1]) / (right[0] - left[-1])
                row[a] = None if lv is None or rv is None else lv + (rv - lv) * frac
        out.append({"start": format_ts(lo), **row})
    return out


def assert_buckets(got: list[dict[str, Any]], want: list[dict[str, Any]], what: str) -> None:
    assert [b["start"] for b in got] == [b["start"] for b in want], what
    for g, w in zip(got, want, strict=True):
        assert set(g) == set(w), what
        for key, value in w.items():
            if isinstance(value, float):
                assert g[key] == pytest.approx(value, rel=1e-9, abs=1e-9), (
                    f"{what} {g['start']} {key}"
                )
            else:
                assert g[key] == value, f"{what} {g['start']} {key}"


async def load(gateway: Gateway, device: str, readings: dict[int, float], metric: str = "t") -> str:
    """Post readings out of order in several requests, then resend some with other values."""
    token = await gateway.create_device(device)
    items = list(readings.items())
    random.Random(7).shuffle(items)
    for i in range(0, len(items), 25):
        chunk = items[i : i + 25]
        r = await gateway.post(
            device, token, [{"ts": iso(t), "values": {metric: v}} for t, v in chunk]
        )
        assert r.status_code == 200, r.text
        assert r.json()["accepted"] == len(chunk)
    resend = items[:10]
    r = await gateway.post(
        device, token, [{"ts": iso(t), "values": {metric: v + 1000}} for t, v in resend]
    )
    assert r.json() == {"accepted": 0, "duplicates": 10, "rejected": []}
    return token


async def aggregate(gateway: Gateway, device: str, **params: Any) -> Any:
    r = await gateway.client.get(
        f"/api/v1/devices/{device}/telemetry/aggregate", params=params, headers=gateway.admin
    )
    assert r.status_code == 200, r.text
    return r.json()


class TestAgainstReference:
    async def test_every_agg_and_fill(self, gateway: Gateway) -> None:
        readings, start, end = make_readings(seed=1)
        await load(gateway, "agg-1", readings)
        for window_s in (1, 7, 60, 90, 300):
            for fill in FILLS:
                if window_s == 1 and fill != "none":
                    continue  # 1,170 mostly empty buckets: covered by the wider windows
                body = await aggregate(
                    gateway,
                    "agg-1",
                    metric="t",
                    start=iso(start),
                    end=iso(end),
                    window=f"{window_s}s",
                    agg=",".join(AGGS),
                    fill=fill,
                )
                want = reference(readings, start, end, window_s * S, AGGS, fill)
                assert_buckets(body["buckets"], want, f"window={window_s}s fill={fill}")
                assert body["device"] == "agg-1"
                assert body["metric"] == "t"

    async def test_single_agg_answers_only_it_and_count(self, gateway: Gateway) -> None:
        readings, start, end = make_readings(seed=2)
        await load(gateway, "agg-2", readings)
        body = await aggregate(
            gateway, "agg-2", metric="t", start=iso(start), end=iso(end), window="1m", agg="max"
        )
        assert all(set(b) == {"start", "max", "count"} for b in body["buckets"])
        assert_buckets(
            body["buckets"], reference(readings, start, end, 60 * S, ["max"], "none"), "max"
        )
        assert body["window"] == "1m"
        assert body["start"] == format_ts(start)
        assert body["end"] == format_ts(end)

    async def test_bucket_edges(self, gateway: Gateway) -> None:
        token = await gateway.create_device("edges")
        pts = {BASE: 1.0, BASE + 60 * S - 1: 2.0, BASE + 60 * S: 3.0, BASE + 120 * S - 1: 4.0}
        r = await gateway.post(
            "edges", token, [{"ts": iso(t), "values": {"t": v}} for t, v in pts.items()]
        )
        assert r.json()["accepted"] == 4
        body = await aggregate(
            gateway,
            "edges",
            metric="t",
            start=iso(BASE),
            end=iso(BASE + 120 * S - 1),
            window="1m",
            agg="first,last,count",
        )
        assert body["buckets"] == [
            {"start": format_ts(BASE), "first": 1.0, "last": 2.0, "count": 2},
            {"start": format_ts(BASE + 60 * S), "first": 3.0, "last": 3.0, "count": 1},
        ]

    async def test_day_buckets_in_a_time_zone_across_dst(self, gateway: Gateway) -> None:
        oslo = ZoneInfo("Europe/Oslo")
        # Europe switched to summer time on 2025-03-30: that local day has 23 hours.
        t0 = datetime(2025, 3, 27, tzinfo=oslo)
        readings = {}
        for hour in range(0, 24 * 6, 5):
            local = t0 + timedelta(hours=hour)
            readings[int(local.timestamp()) * S] = float(hour)
        await load(gateway, "oslo", readings)
        start, end = int(t0.timestamp()) * S, int((t0 + timedelta(days=6)).timestamp()) * S
        body = await aggregate(
            gateway,
            "oslo",
            metric="t",
            start=iso(start),
            end=iso(end),
            window="1d",
            agg="count,min",
            tz="Europe/Oslo",
            fill="null",
        )
        bounds = []
        for d in range(7):
            lo = datetime.combine((t0 + timedelta(days=d)).date(), datetime.min.time(), oslo)
            hi = datetime.combine((t0 + timedelta(days=d + 1)).date(), datetime.min.time(), oslo)
            if int(lo.timestamp()) * S < end:
                bounds.append((int(lo.timestamp()) * S, int(hi.timestamp()) * S))
        want = reference(readings, start, end, 0, ["count", "min"], "null", bounds=bounds)
        assert_buckets(body["buckets"], want, "tz")
        # local midnight: 23:00Z in winter, 22:00Z in summer
        assert body["buckets"][0]["start"] == "2025-03-26T23:00:00Z"
        assert body["buckets"][-1]["start"] == "2025-03-31T22:00:00Z"
        assert len(body["buckets"]) == 6
        assert body["tz"] == "Europe/Oslo"


class TestShapes:
    async def test_several_metrics_one_series_each(self, gateway: Gateway) -> None:
        token = await gateway.create_device("multi")
        msgs = [{"ts": iso(BASE + i * 10 * S), "values": {"a": i, "b": -i}} for i in range(12)]
        assert (await gateway.post("multi", token, msgs)).status_code == 200
        body = await aggregate(
            gateway,
            "multi",
            metric=["a", "b", "never"],
            start=iso(BASE),
            end=iso(BASE + 120 * S),
            window="1m",
            agg="sum",
        )
        assert [s["metric"] for s in body["series"]] == ["a", "b", "never"]
        assert [b["sum"] for b in body["series"][0]["buckets"]] == [15.0, 51.0]
        assert [b["sum"] for b in body["series"][1]["buckets"]] == [-15.0, -51.0]
        assert body["series"][2]["buckets"] == []

    async def test_fleet(self, gateway: Gateway) -> None:
        for dev, metric in (("f-1", "temp"), ("f-2", "temp"), ("f-3", "hum")):
            token = await gateway.create_device(dev)
            msgs = [{"ts": iso(BASE + i * 30 * S), "values": {metric: i}} for i in range(4)]
            assert (await gateway.post(dev, token, msgs)).status_code == 200
        params = {
            "metric": "temp",
            "start": iso(BASE),
            "end": iso(BASE + 120 * S),
            "window": "1m",
            "agg": "avg,count",
        }
        r = await gateway.client.get(
            "/api/v1/telemetry/aggregate", params=params, headers=gateway.admin
        )
        assert r.status_code == 200, r.text
        body = r.json()
        assert [(s["device"], s["metric"]) for s in body["series"]] == [
            ("f-1", "temp"),
            ("f-2", "temp"),
        ]
        assert body["series"][0]["buckets"] == [
            {"start": format_ts(BASE), "avg": 0.5, "count": 2},
            {"start": format_ts(BASE + 60 * S), "avg": 2.5, "count": 2},
        ]
        r = await gateway.client.get(
            "/api/v1/telemetry/aggregate",
            params={**params, "device": ["f-3", "f-1"]},
            headers=gateway.admin,
        )
        assert [(s["device"], len(s["buckets"])) for s in r.json()["series"]] == [
            ("f-3", 0),
            ("f-1", 2),
        ]
        r = await gateway.client.get(
            "/api/v1/telemetry/aggregate",
            params={**params, "device": ["f-1", "nope"]},
            headers=gateway.admin,
        )
        assert r.status_code == 404
        assert r.json()["error"]["code"] == "device_not_found"

    async def test_csv(self, gateway: Gateway) -> None:
        token = await gateway.create_device("csv-1")
        msgs = [{"ts": iso(BASE + i * 30 * S), "values": {"t": i}} for i in range(4)]
        assert (await gateway.post("csv-1", token, msgs)).status_code == 200
        r = await gateway.client.get(
            "/api/v1/devices/csv-1/telemetry/aggregate",
            params={
                "metric": "t",
                "start": iso(BASE),
                "end": iso(BASE + 180 * S),
                "window": "1m",
                "agg": "avg,max",
                "fill": "null",
            },
            headers={**gateway.admin, "Accept": "text/csv"},
        )
        assert r.status_code == 200
        assert r.headers["content-type"].startswith("text/csv")
        rows = list(csv.reader(io.StringIO(r.text)))
        assert rows == [
            ["device", "metric", "start", "avg", "max", "count"],
            ["csv-1", "t", format_ts(BASE), "0.5", "1.0", "2"],
            ["csv-1", "t", format_ts(BASE + 60 * S), "2.5", "3.0", "2"],
            ["csv-1", "t", format_ts(BASE + 120 * S), "", "", "0"],
        ]

    async def test_auto_window_and_defaults(self, gateway: Gateway) -> None:
        await gateway.create_device("auto")
        body = await aggregate(
            gateway, "auto", metric="t", start="-30d", window="auto", fill="null"
        )
        assert body["window"] == "2h"  # 30 days / 2h = 360 buckets (1h would be 720 > 500)
        assert 360 <= len(body["buckets"]) <= 361
        body = await aggregate(gateway, "auto", metric="t")  # defaults: last 24h, auto, avg, none
        assert body["buckets"] == []
        span = datetime.fromisoformat(body["end"]) - datetime.fromisoformat(body["start"])
        assert span == timedelta(hours=24)


class TestRefusals:
    @pytest.mark.parametrize(
        ("params", "code", "says"),
        [
            ({"agg": "median"}, "invalid_agg", "median"),
            ({"fill": "sideways"}, "invalid_fill", "sideways"),
            ({"start": "yesterday"}, "invalid_parameter", "yesterday"),
            ({"start": "-1h", "end": "-2h"}, "invalid_range", "after start"),
            ({"window": "500ms"}, "invalid_window", "under 1s"),
            ({"window": "ten"}, "invalid_parameter", "ten"),
            ({"start": "-7d", "window": "1s"}, "too_many_buckets", "window=2m"),
            ({"tz": "Mars/Olympus"}, "invalid_tz", "Mars/Olympus"),
            ({"metric": "bad metric!"}, "invalid_parameter", "bad metric"),
            ({"metric": "t\n"}, "invalid_parameter", "not a metric name"),
        ],
    )
    async def test_bad_parameters_are_400(
        self, gateway: Gateway, params: dict[str, str], code: str, says: str
    ) -> None:
        await gateway.create_device("refuse")
        r = await gateway.client.get(
            "/api/v1/devices/refuse/telemetry/aggregate",
            params={"metric": "t", **params},
            headers=gateway.admin,
        )
        assert r.status_code == 400, r.text
        error = r.json()["error"]
        assert error["code"] == code
        assert says in error["message"]

    async def test_unknown_device_is_404(self, gateway: Gateway) -> None:
        r = await gateway.client.get(
            "/api/v1/devices/ghost/telemetry/aggregate",
            params={"metric": "t"},
            headers=gateway.admin,
        )
        assert r.status_code == 404
        assert r.json()["error"]["code"] == "device_not_found"

    async def test_needs_an_operator_token(self, gateway: Gateway) -> None:
        token = await gateway.create_device("dev-tok")
        r = await gateway.client.get(
            "/api/v1/devices/dev-tok/telemetry/aggregate",
            params={"metric": "t"},
            headers={"Authorization": f"Bearer {token}"},
        )
        assert r.status_code == 403


def test_reference_stddev_sanity() -> None:
    """The test's own reference agrees with a hand computation."""
    got = reference({0: 1.0, 1: 3.0}, 0, 10, 10, ["stddev"], "none")
    assert got[0]["stddev"] == pytest.approx(math.sqrt(2))


async def test_raw_read_as_csv(gateway: Gateway) -> None:
    token = await gateway.create_device("raw-csv")
    msgs = [{"ts": iso(BASE + i * S), "values": {"t": i / 2}} for i in range(3)]
    assert (await gateway.post("raw-csv", token, msgs)).status_code == 200
    r = await gateway.client.get(
        "/api/v1/devices/raw-csv/telemetry",
        params={"metric": "t", "limit": 2},
        headers={**gateway.admin, "Accept": "text/csv"},
    )
    assert r.headers["content-type"].startswith("text/csv")
    assert list(csv.reader(io.StringIO(r.text))) == [
        ["device", "metric", "ts", "value"],
        ["raw-csv", "t", format_ts(BASE), "0.0"],
        ["raw-csv", "t", format_ts(BASE + S), "0.5"],
    ]
    r = await gateway.client.get(
        "/api/v1/devices/raw-csv/telemetry",
        params={"metric": "t", "cursor": r.headers["x-next-cursor"]},
        headers={**gateway.admin, "Accept": "text/csv"},
    )
    assert r.text.splitlines()[1:] == [f"raw-csv,t,{format_ts(BASE + 2 * S)},1.0"]
    assert "x-next-cursor" not in r.headers


async def test_postgres_sessions_run_without_jit(gateway: Gateway) -> None:
    """JIT compilation of short aggregates costs more than it saves: the gateway turns it off."""
    from gateway.store.database import connection
    from gateway.store.raw_sql import fetch

    if gateway.settings.database_url.startswith("sqlite://"):
        pytest.skip("PostgreSQL setting")
    assert [tuple(r) for r in await fetch(connection(), "SHOW jit")] == [("off",)]
