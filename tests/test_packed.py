"""Packed history answers exactly as raw rows: aggregates (every agg and fill mode), raw pages,
latest and statistics, before and after packing, on SQLite and PostgreSQL.

The data is irregular on purpose: jittered timestamps, gaps, readings exactly at hour and bucket
edges, -0.0, subnormals, 17-digit values, integers past 2**53; one series that the codec keeps
as decimals and one that needs its XOR fallback. Each is checked unpacked, partly packed (a
bucket mixing packed and unpacked readings), fully packed, with late readings stored into a
packed range, and after those are packed too."""

from __future__ import annotations

import asyncio
import csv
import io
import itertools
import json
import math
import random
import struct
from collections.abc import AsyncIterator
from datetime import datetime, timedelta
from typing import Any
from zoneinfo import ZoneInfo

import aiomqtt
import asyncpg
import pytest

from gateway import maintenance
from gateway.mqtt.client import BrokerAddress
from gateway.store import packed, readings
from gateway.store.database import connection
from gateway.timespec import format_ts, now_us
from tests.conftest import Gateway, poll_until, start_mqtt_gateway
from tests.harness import commit_log_readings, committed, is_sqlite, read_points, sample, scrape
from tests.test_aggregate import AGGS, FILLS, assert_buckets, iso, reference

S = 1_000_000
MIN = 60 * S
HOUR = 60 * MIN
DAY = 24 * HOUR
BASE = 1_763_596_800 * S  # 2025-11-20T00:00:00Z
T0 = 1_761_782_400 * S  # 2025-10-30T00:00:00Z: New York leaves summer time on 2025-11-02
SPAN = 6 * DAY
MID = T0 + 2 * DAY + 7 * HOUR + 13 * MIN + 5 * S + 321  # a partial pack's cut: aligned to nothing
LATER = T0 + 60 * DAY  # "now" for a run that packs everything
SPECIAL = [-0.0, 5e-324, 2.5e-310, 0.30000000000000004, 1 / 3, 12345678.901234567, -1e-5]
Series = dict[int, float]


def irregular(seed: int, n: int = 3000, span: int = 3 * 24 * HOUR) -> dict[int, float]:
    rng = random.Random(seed)
    ts: set[int] = set()
    while len(ts) < n:
        ts.add(BASE + rng.randrange(span))
    ts |= {BASE + HOUR, BASE + 2 * HOUR - 1, BASE + 24 * HOUR}  # at and just before hour edges
    return {t: round(rng.uniform(-50, 50), 2) for t in sorted(ts)}


def edges() -> set[int]:
    """Readings exactly at (and just before) hour, 90 s, 90 min, UTC day and local midnights."""
    out: set[int] = set()
    for h in range(0, SPAN // HOUR, 5):
        out |= {T0 + h * HOUR, T0 + h * HOUR - 1}
    for k in range(0, 4 * HOUR // (90 * S), 7):
        out.add(MID - MID % (90 * S) + k * 90 * S)
    for k in range(0, SPAN // (90 * MIN), 3):
        out.add(T0 + k * 90 * MIN)
    for zone in (ZoneInfo("Asia/Kolkata"), ZoneInfo("America/New_York")):
        for d in range(-1, 7):
            midnight = datetime.combine(
                (datetime(2025, 10, 30) + timedelta(days=d)).date(), datetime.min.time(), zone
            )
            us = int(midnight.timestamp()) * S
            out |= {us, us - 1, us + 1}
    return {t for t in out if T0 <= t < T0 + SPAN}


def times(seed: int) -> list[int]:
    """Jittered 10 s readings for 2 hours around MID (a burst of 0.3 s within), a few an hour
    elsewhere, a day with none, and the edges."""
    rng = random.Random(seed)
    ts = set(edges())
    t = MID - HOUR
    while t < MID + HOUR:
        ts.add(t + rng.randrange(-3 * S, 3 * S))
        t += 10 * S
    ts |= {MID - 20 * S + k * 300_000 + rng.randrange(1000) for k in range(100)}
    for _ in range(600):
        ts.add(T0 + rng.randrange(SPAN))
    gap = (T0 + 3 * DAY + 12 * HOUR, T0 + 4 * DAY + 10 * HOUR)
    return sorted(t for t in ts if not gap[0] <= t < gap[1])


def history(seed: int) -> dict[str, Series]:
    """Three metrics: `dec` (two decimals; a few -0.0), `xor` (full-precision values of every
    magnitude and the special ones: the codec's XOR fallback), `big` (integers past 2**53)."""
    rng = random.Random(seed)
    dec = {t: round(rng.uniform(-50, 50), 2) for t in times(seed)}
    for t in rng.sample(sorted(dec), 5):
        dec[t] = -0.0
    xor = {
        t: rng.choice((-1, 1)) * rng.random() * 10 ** rng.randint(-5, 5) for t in times(seed + 1)
    }
    for i, t in enumerate(rng.sample(sorted(xor), 70)):
        xor[t] = SPECIAL[i % len(SPECIAL)]
    big = {
        # (spread far wider than a float's step there: stddev stays well conditioned)
        t: float(rng.choice((2**53 + rng.randrange(1, 2**24), 2**62 + rng.randrange(1, 2**44))))
        for t in times(seed + 2)
    }
    return {"dec": dec, "xor": xor, "big": big}


def late_readings(seed: int, have: dict[str, Series]) -> dict[str, Series]:
    """New readings for packed ranges: between and inside chunks, at edges, before the first."""
    rng = random.Random(seed)
    out: dict[str, Series] = {}
    for metric, series in have.items():
        new: Series = {}
        candidates = [T0 + rng.randrange(SPAN) for _ in range(150)]
        candidates += [T0 - 5 * MIN, T0 + 2 * DAY + 1, MID, MID + 1, T0 + 5 * DAY + HOUR]
        candidates += [MID - HOUR + k * 10 * S + 5 * S for k in range(0, 700, 13)]
        for t in candidates:
            if t not in series:
                new[t] = rng.choice([*SPECIAL, round(rng.uniform(-9, 9), 2)])
        out[metric] = new
    return out


def message(metric: str, t: int, v: float) -> dict[str, Any]:
    # An integer past 2**53 goes as a JSON integer (the gateway stores it as the nearest float).
    value: Any = int(v) if abs(v) >= 2**53 else v
    return {"ts": iso(t), "values": {metric: value}}


async def post_series(
    gw: Gateway, device: str, token: str, data: dict[str, Series], *, seed: int = 3
) -> tuple[int, int]:
    """Post every reading (shuffled, 400 a request); (accepted, duplicates) summed."""
    items = [(m, t, v) for m, series in data.items() for t, v in series.items()]
    random.Random(seed).shuffle(items)
    accepted = duplicates = 0
    for i in range(0, len(items), 400):
        r = await gw.post(device, token, [message(*x) for x in items[i : i + 400]])
        assert r.status_code == 200, r.text
        accepted += r.json()["accepted"]
        duplicates += r.json()["duplicates"]
    return accepted, duplicates


async def post_all(gw: Gateway, device: str, readings: dict[int, float]) -> str:
    token = await gw.create_device(device)
    items = list(readings.items())
    for i in range(0, len(items), 500):
        body = [{"ts": iso(t), "values": {"t": v}} for t, v in items[i : i + 500]]
        r = await gw.post(device, token, body)
        assert r.status_code == 200, r.text
    return token


async def pack_everything() -> maintenance.Report:
    return await maintenance.run_once(now_us=LATER, compress_after_us=HOUR, retention_days=0)


@pytest.fixture
def small_chunks(monkeypatch: pytest.MonkeyPatch) -> None:
    """Chunks of ~100 readings: many chunks a series, full ones, pages and buckets across them."""
    monkeypatch.setattr(packed, "TARGET", 100)


def as_stored(data: dict[str, Series], gw: Gateway) -> dict[str, Series]:
    """What the database holds: SQLite's REAL keeps -0.0 as 0.0 (it stores an integral REAL as
    an integer), in `reading` and so in the chunks packed from it; PostgreSQL keeps the sign."""
    if not is_sqlite(gw.settings.database_url):
        return data
    return {m: {t: v if v else 0.0 for t, v in s.items()} for m, s in data.items()}


async def phases(gw: Gateway, device: str, seed: int) -> AsyncIterator[tuple[str, Any]]:
    """Load a device's history and walk it through packing; at each phase, what it holds."""
    data = as_stored(history(seed), gw)
    token = await gw.create_device(device)
    n = sum(len(s) for s in data.values())
    assert await post_series(gw, device, token, data) == (n, 0)
    yield "unpacked", data
    step, _ = await maintenance.pack(MID, max_rows=700)
    assert step.readings == sum(1 for s in data.values() for t in s if t < MID)
    yield "packed before MID", data
    report = await pack_everything()
    assert report.packed.readings == n - step.readings
    yield "packed", data
    late = as_stored(late_readings(seed, data), gw)
    dups = {m: {t: v + 1 for t, v in list(s.items())[::97]} for m, s in data.items()}
    fresh = sum(len(s) for s in late.values())
    body = {m: late[m] | dups[m] for m in data}  # redelivered with another value: ignored
    assert await post_series(gw, device, token, body, seed=4) == (
        fresh,
        sum(len(s) for s in dups.values()),
    )
    data = {m: dict(sorted((data[m] | late[m]).items())) for m in data}
    yield "late into packed", data
    report = await pack_everything()
    assert report.packed.readings == fresh
    yield "late packed again", data


# Aggregates.

# (window, start, end, tz): ends aligned to nothing; windows from 1 s to 7 days; local days.
QUERIES: list[tuple[str, int, int, str | None]] = [
    ("1s", MID - 97 * S - 123, MID + 3 * MIN + 11 * S + 7, None),
    ("7s", MID - 11 * MIN - 5, MID + 9 * MIN + 3, None),
    ("1m", MID - 2 * HOUR - 17 * S, MID + 2 * HOUR + 5 * MIN + 1, None),
    ("90s", MID - 5 * HOUR - 1, MID + 3 * HOUR + 7, None),
    ("5m", T0 + DAY + 13 * S, T0 + 2 * DAY + 12 * HOUR + 7, None),
    ("1h", T0 - 3 * HOUR - 5, T0 + SPAN + 7 * S, None),
    ("1h", T0 + 2 * HOUR + 1, MID + 1, None),
    ("90m", T0 + 17 * MIN, T0 + SPAN - 1, None),
    ("1d", T0 + 5 * HOUR + 3, T0 + SPAN - 11 * MIN, None),
    ("7d", T0 - 9 * DAY - 1, T0 + 12 * DAY + 1, None),
    ("1d", T0 + 7 * HOUR + 1, T0 + SPAN, "Asia/Kolkata"),
    ("1d", T0 + 1, T0 + 5 * DAY + 3, "America/New_York"),
    ("2d", T0 - 2 * DAY, T0 + SPAN + DAY, "America/New_York"),
]
EXACT = ("count", "min", "max", "first", "last")


def window_us(text: str) -> int:
    return int(text[:-1]) * {"s": S, "m": MIN, "h": HOUR, "d": DAY}[text[-1]]


def local_bounds(start: int, end: int, days: int, tz: str) -> list[tuple[int, int]]:
    """[lo, hi) of `days`-day buckets from local midnights (days counted from 1970-01-01)."""
    zone = ZoneInfo(tz)

    def midnight(d: Any) -> int:
        return int(datetime.combine(d, datetime.min.time(), zone).timestamp()) * S

    day = datetime.fromtimestamp(start / S, zone).date()
    day -= timedelta(days=(day - datetime(1970, 1, 1).date()).days % days)
    out = []
    while midnight(day) < end:
        out.append((midnight(day), midnight(day + timedelta(days=days))))
        day += timedelta(days=days)
    return out


def trimmed(series: Series, start: int, end: int) -> Series:
    """The readings `reference` needs: those in range and the last one before it."""
    before = [t for t in series if t < start]
    keep = {t: v for t, v in series.items() if start <= t < end}
    return ({before[-1]: series[before[-1]]} if before else {}) | keep


_references: dict[tuple[Any, ...], list[dict[str, Any]]] = {}


def expected(
    series: Series, q: tuple[str, int, int, str | None], fill: str, aggs: list[str] = AGGS
) -> Any:
    window, start, end, tz = q
    # (by bits: -0.0 == 0.0, and SQLite's data holds 0.0 where PostgreSQL's holds -0.0)
    key = (hash(tuple(series)), hash(tuple(map(bits, series.values()))), q, fill, tuple(aggs))
    if key not in _references:
        bounds = local_bounds(start, end, window_us(window) // DAY, tz) if tz else None
        _references[key] = reference(
            trimmed(series, start, end), start, end, window_us(window), aggs, fill, bounds=bounds
        )
    return _references[key]


def close(g: dict[str, Any], w: dict[str, Any]) -> bool:
    if g.keys() != w.keys():
        return False
    return all(
        math.isclose(g[k], v, rel_tol=1e-9, abs_tol=1e-9)
        if isinstance(v, float) and k not in EXACT and g[k] is not None
        else g[k] == v
        for k, v in w.items()
    ) and all(bits(g[k]) == bits(w[k]) for k in ("first", "last") if same_kind(g.get(k), w.get(k)))


def same_kind(a: Any, b: Any) -> bool:
    return isinstance(a, float) and isinstance(b, float)


def assert_same(got: list[dict[str, Any]], want: list[dict[str, Any]], what: str) -> None:
    """As `assert_buckets` (called to tell what differs), and count/min/max/first/last
    exactly: no rounding there. (A first pass with math.isclose: pytest.approx is slow.)"""
    if len(got) == len(want) and all(close(g, w) for g, w in zip(got, want, strict=True)):
        return
    assert_buckets(got, want, what)
    for g, w in zip(got, want, strict=True):
        assert all(g[k] == w[k] for k in EXACT if k in w), f"{what} {g} != {w}"
        assert close(g, w), f"{what}: first/last not bit-identical: {g} != {w}"


async def aggregate(gw: Gateway, path: str, q: Any, fill: str, **params: Any) -> Any:
    window, start, end, tz = q
    query = {"start": iso(start), "end": iso(end), "window": window, "agg": ",".join(AGGS)}
    query |= {"fill": fill, **params} | ({"tz": tz} if tz else {})
    r = await gw.client.get(path, params=query, headers=gw.admin)
    assert r.status_code == 200, r.text
    return r.json()


async def check_aggregates(gw: Gateway, device: str, data: dict[str, Series], what: str) -> None:
    metrics = sorted(data)
    for q in QUERIES:
        for fill in FILLS:
            path = f"/api/v1/devices/{device}/telemetry/aggregate"
            body = await aggregate(gw, path, q, fill, metric=metrics)
            assert [s["metric"] for s in body["series"]] == metrics
            for s in body["series"]:
                want = expected(data[s["metric"]], q, fill)
                assert_same(s["buckets"], want, f"{what} {s['metric']} {q} {fill}")
    # Fewer aggs select fewer SQL columns: each alone, and pairs, where packed and unpacked
    # readings share buckets.
    for aggs in [[a] for a in AGGS] + [["first", "last"], ["stddev", "count"], ["max", "avg"]]:
        for q, fill in ((QUERIES[2], "linear"), (QUERIES[10], "previous")):
            path = f"/api/v1/devices/{device}/telemetry/aggregate"
            body = await aggregate(gw, path, q, fill, metric="xor", agg=",".join(aggs))
            want = expected(data["xor"], q, fill, aggs)
            assert_same(body["buckets"], want, f"{what} {aggs} {q} {fill}")


@pytest.mark.usefixtures("small_chunks")
async def test_aggregates_through_every_phase(gateway: Gateway) -> None:
    async for what, data in phases(gateway, "agg", seed=11):
        await check_aggregates(gateway, "agg", data, what)


async def test_aggregates_with_chunks_of_the_usual_size(gateway: Gateway) -> None:
    readings = irregular(1)
    await post_all(gateway, "p1", readings)
    q = [
        ("1m", BASE + 17 * MIN + 3 * S, BASE + 5 * HOUR + 7 * S, None),
        ("1h", BASE + 5 * MIN, BASE + 2 * DAY + 11 * MIN, None),
        ("90m", BASE + 5 * MIN, BASE + 3 * DAY, None),
        ("4d", BASE - HOUR, BASE + 4 * DAY, None),
    ]
    for packed_yet in (False, True):
        if packed_yet:
            report = await maintenance.run_once(
                now_us=now_us(), compress_after_us=HOUR, retention_days=0
            )
            assert report.packed.readings == len(readings)
        for query in q:
            for fill in FILLS:
                path = "/api/v1/devices/p1/telemetry/aggregate"
                body = await aggregate(gateway, path, query, fill, metric="t")
                assert_same(body["buckets"], expected(readings, query, fill), f"{query} {fill}")


@pytest.mark.usefixtures("small_chunks")
async def test_fleet_aggregate_over_packed_and_unpacked_devices(gateway: Gateway) -> None:
    fleet = {f"fl-{i}": as_stored(history(20 + i), gateway)["dec"] for i in range(3)}
    tokens = {d: await gateway.create_device(d) for d in fleet}
    for d in ("fl-0", "fl-1"):
        await post_series(gateway, d, tokens[d], {"dec": fleet[d]})
    await pack_everything()
    # fl-0 all packed; fl-1 packed with late readings in its packed range; fl-2 not packed.
    late = as_stored(late_readings(5, {"dec": fleet["fl-1"]}), gateway)["dec"]
    await post_series(gateway, "fl-1", tokens["fl-1"], {"dec": late})
    fleet["fl-1"] = dict(sorted((fleet["fl-1"] | late).items()))
    await post_series(gateway, "fl-2", tokens["fl-2"], {"dec": fleet["fl-2"]})
    for q in QUERIES[2:]:
        for fill in FILLS:
            for devices in ([], ["fl-2", "fl-0"]):
                body = await aggregate(
                    gateway, "/api/v1/telemetry/aggregate", q, fill, metric="dec", device=devices
                )
                assert [s["device"] for s in body["series"]] == (devices or sorted(fleet))
                for s in body["series"]:
                    want = expected(fleet[s["device"]], q, fill)
                    assert_same(s["buckets"], want, f"{s['device']} {q} {fill}")


# Raw reads, latest, statistics.


def bits(v: float) -> bytes:
    return struct.pack("<d", v)


def assert_points(got: list[tuple[str, float]], want: Series, what: str) -> None:
    """Every reading once, in order, identical ts and bit-identical values."""
    assert [ts for ts, _ in got] == [format_ts(t) for t in want], what
    assert [bits(v) for _, v in got] == [bits(v) for v in want.values()], what


async def read_csv(gw: Gateway, device: str, metric: str, **params: Any) -> list[tuple[str, float]]:
    """Every reading through CSV pages (the next cursor in X-Next-Cursor)."""
    out: list[tuple[str, float]] = []
    query: dict[str, Any] = {"metric": metric, **params}
    while True:
        r = await gw.client.get(
            f"/api/v1/devices/{device}/telemetry",
            params=query,
            headers={**gw.admin, "Accept": "text/csv"},
        )
        assert r.status_code == 200, r.text
        rows = list(csv.reader(io.StringIO(r.text)))
        assert rows[0] == ["device", "metric", "ts", "value"]
        out += [(ts, float(v)) for d, m, ts, v in rows[1:] if (d, m) == (device, metric)]
        assert len(out) == sum(1 for _ in out)
        if "x-next-cursor" not in r.headers:
            return out
        query["cursor"] = r.headers["x-next-cursor"]


def in_range(series: Series, start: int, end: int) -> Series:
    return {t: v for t, v in series.items() if start <= t < end}


@pytest.mark.usefixtures("small_chunks")
async def test_raw_pages_through_every_phase(gateway: Gateway) -> None:
    async for what, data in phases(gateway, "raw", seed=12):
        for metric, limit in (("dec", 1000), ("xor", 37), ("big", 500)):
            points = await read_points(gateway, "raw", metric, limit=limit)
            assert_points([(p["ts"], p["value"]) for p in points], data[metric], f"{what} {metric}")
        got = await read_csv(gateway, "raw", "xor", limit=300)
        assert_points(got, data["xor"], f"{what} csv")
        start, end = MID - 7 * MIN - 3, MID + 5 * MIN + 1
        points = await read_points(gateway, "raw", "big", start=iso(start), end=iso(end), limit=7)
        want = in_range(data["big"], start, end)
        assert_points([(p["ts"], p["value"]) for p in points], want, f"{what} range")
        got = await read_csv(gateway, "raw", "dec", start=iso(T0 - 1), end=iso(MID), limit=99)
        assert_points(got, in_range(data["dec"], T0 - 1, MID), f"{what} csv range")


async def test_latest_and_statistics_through_every_phase(gateway: Gateway) -> None:
    seen: list[Any] = []
    async for what, data in phases(gateway, "st", seed=13):
        r = await gateway.client.get("/api/v1/devices/st/telemetry/latest", headers=gateway.admin)
        assert r.status_code == 200, r.text
        last = {m: max(s) for m, s in data.items()}
        assert r.json()["values"] == {
            m: {"ts": format_ts(t), "value": data[m][t], "unit": None} for m, t in last.items()
        }, what
        assert {m: bits(v["value"]) for m, v in r.json()["values"].items()} == {
            m: bits(data[m][t]) for m, t in last.items()
        }
        want = {
            m: {
                "count": len(s),
                "first_ts": format_ts(min(s)),
                "last_ts": format_ts(max(s)),
                "unit": None,
            }
            for m, s in data.items()
        }
        one = (await gateway.client.get("/api/v1/devices/st", headers=gateway.admin)).json()
        listed = (await gateway.client.get("/api/v1/devices", headers=gateway.admin)).json()
        assert one["metrics"] == want, what
        assert one["readings"] == sum(len(s) for s in data.values())
        (entry,) = [d for d in listed["devices"] if d["id"] == "st"]
        assert entry["metrics"] == want, what
        seen.append(one["metrics"])
    assert seen[0] == seen[1] == seen[2]  # packing alone changes nothing
    assert seen[3] == seen[4]


# Idempotency across packing.


async def ingest(gw: Gateway, device: str, token: str, msgs: list[dict[str, Any]]) -> Any:
    r = await gw.post(device, token, msgs)
    assert r.status_code == 200, r.text
    assert r.json()["rejected"] == []
    return r.json()["accepted"], r.json()["duplicates"]


async def held(gw: Gateway, device: str) -> tuple[int, int]:
    """(readings in chunks, readings in `reading`) of a device, as committed."""
    url = gw.settings.database_url
    (packed_n,) = await committed(
        url,
        "SELECT coalesce(sum(c.n), 0) FROM chunk c JOIN series s ON s.id = c.series_id"
        " WHERE s.device_id = ?",
        device,
    )
    (raw_n,) = await committed(
        url,
        "SELECT count(*) FROM reading r JOIN series s ON s.id = r.series_id WHERE s.device_id = ?",
        device,
    )
    return int(packed_n[0]), int(raw_n[0])


@pytest.mark.usefixtures("small_chunks")
async def test_redelivered_readings_stay_duplicates_once_packed(gateway: Gateway) -> None:
    full = history(15)
    data = as_stored({"dec": full["dec"], "xor": full["xor"]}, gateway)
    n = sum(len(s) for s in data.values())
    token = await gateway.create_device("idem")
    assert await post_series(gateway, "idem", token, data) == (n, 0)
    await pack_everything()
    assert await held(gateway, "idem") == (n, 0)
    assert await post_series(gateway, "idem", token, data, seed=9) == (0, n)
    changed = {m: {t: v + 1 for t, v in s.items()} for m, s in data.items()}
    assert await post_series(gateway, "idem", token, changed, seed=10) == (0, n)
    assert await held(gateway, "idem") == (n, 0)

    # One request: packed duplicates, late new readings (some twice), fresh ones (some twice),
    # and messages carrying a packed reading of one metric and a new one of the other.
    dec = sorted(data["dec"])
    late = [t + 1 for t in dec[5::211] if t + 1 not in data["dec"]]
    fresh = [T0 + SPAN + k * 7 * S for k in range(25)]
    both = [t for t in dec[::301] if t not in data["xor"]]
    msgs = [message("dec", t, 1.5) for t in dec[::53]]  # packed: duplicates
    msgs += [message("dec", t, 2.5) for t in late + late[:4]]
    msgs += [message("xor", t, 3.5) for t in fresh + fresh[-3:]]
    msgs += [{"ts": iso(t), "values": {"dec": 4.5, "xor": 5.5}} for t in both]
    random.Random(1).shuffle(msgs)
    new = len(late) + len(fresh) + len(both)
    total = sum(len(m["values"]) for m in msgs)
    assert await ingest(gateway, "idem", token, msgs) == (new, total - new)
    assert await held(gateway, "idem") == (n, new)
    assert await ingest(gateway, "idem", token, msgs) == (0, total)
    await pack_everything()
    assert await held(gateway, "idem") == (n + new, 0)
    assert await ingest(gateway, "idem", token, msgs) == (0, total)
    data["dec"] |= dict.fromkeys(late, 2.5)  # (`both` are packed dec readings: duplicates)
    data["xor"] |= dict.fromkeys(fresh, 3.5) | dict.fromkeys(both, 5.5)
    for metric, series in data.items():
        points = await read_points(gateway, "idem", metric, limit=2000)
        want = dict(sorted(series.items()))
        assert_points([(p["ts"], p["value"]) for p in points], want, metric)
    body = (await gateway.client.get("/api/v1/devices/idem", headers=gateway.admin)).json()
    assert body["readings"] == n + new
    # The commit log (live streams) has each stored reading once: no duplicate, packed or not.
    keys = [(s, t) for s, t, _ in await commit_log_readings(gateway.settings.database_url)]
    assert len(keys) == len(set(keys)) == n + new


# Deletion.


async def series_of(gw: Gateway, device: str) -> dict[str, int]:
    rows = await committed(
        gw.settings.database_url, "SELECT metric, id FROM series WHERE device_id = ?", device
    )
    return {str(m): int(i) for m, i in rows}


async def rows_of(gw: Gateway, series_id: int) -> tuple[int, int]:
    """(chunks, readings in `reading`) of a series, as committed."""
    url = gw.settings.database_url
    (chunks,) = await committed(url, "SELECT count(*) FROM chunk WHERE series_id = ?", series_id)
    (rows,) = await committed(url, "SELECT count(*) FROM reading WHERE series_id = ?", series_id)
    return int(chunks[0]), int(rows[0])


@pytest.mark.usefixtures("small_chunks")
async def test_deleting_a_series_or_a_device_deletes_its_packed_readings(
    gateway: Gateway,
) -> None:
    full = history(16)
    data = as_stored({"dec": full["dec"], "big": full["big"]}, gateway)
    token = await gateway.create_device("del")
    await post_series(gateway, "del", token, data)
    await maintenance.pack(MID)
    ids = await series_of(gateway, "del")
    assert all(c > 1 and r > 0 for c, r in [await rows_of(gateway, i) for i in ids.values()])

    # A series: its chunks and rows go; the other series keeps all of its own.
    deleted = await readings.delete_series_readings(connection(), [ids["dec"]])
    assert deleted == len(data["dec"])
    assert await rows_of(gateway, ids["dec"]) == (0, 0)
    assert await read_points(gateway, "del", "dec") == []
    points = await read_points(gateway, "del", "big")
    assert_points([(p["ts"], p["value"]) for p in points], data["big"], "big")
    # Posted again, the deleted series' readings are new (no chunk holds them any more).
    assert await post_series(gateway, "del", token, {"dec": data["dec"]}) == (len(data["dec"]), 0)
    await pack_everything()

    # The device: every chunk and row of its series goes; a new device of the same id is empty.
    r = await gateway.client.delete("/api/v1/devices/del", headers=gateway.admin)
    assert r.status_code == 204, r.text
    for series_id in ids.values():
        assert await rows_of(gateway, series_id) == (0, 0)
    token = await gateway.create_device("del")
    body = (await gateway.client.get("/api/v1/devices/del", headers=gateway.admin)).json()
    assert (body["readings"], body["metrics"]) == (0, {})
    assert await read_points(gateway, "del", "big") == []
    latest = await gateway.client.get("/api/v1/devices/del/telemetry/latest", headers=gateway.admin)
    assert latest.json()["values"] == {}
    q = QUERIES[5]
    path = "/api/v1/devices/del/telemetry/aggregate"
    assert (await aggregate(gateway, path, q, "none", metric="big"))["buckets"] == []
    n = sum(len(s) for s in data.values())
    assert await post_series(gateway, "del", token, data) == (n, 0)
    points = await read_points(gateway, "del", "dec")
    assert_points([(p["ts"], p["value"]) for p in points], data["dec"], "dec again")


# Packing while readings arrive.


async def test_packing_while_ingest_runs_loses_and_doubles_nothing(gateway: Gateway) -> None:
    """The packer moves ranges into chunks while requests store new readings into those ranges
    and redeliver stored ones: what is read at the end is everything acknowledged, each once,
    and every reading was counted accepted exactly once."""
    rng = random.Random(17)
    token = await gateway.create_device("cc")
    span = 3 * DAY
    # Disjoint timestamps per writer (ts % 8), so no two writers send one reading two values.
    first = {
        T0 + rng.randrange(span // 8) * 8: round(rng.uniform(-9, 9), 2) + 0.0 for _ in range(1500)
    }
    sent: dict[int, float] = dict(first)
    accepted = [len(first)]
    assert await post_series(gateway, "cc", token, {"t": first}) == (len(first), 0)
    old = sorted(first)

    async def writer(k: int) -> None:
        mine: list[int] = []
        w = random.Random(k)
        for _ in range(16):
            new = {T0 + w.randrange(span // 8) * 8 + k: w.uniform(-1e3, 1e3) for _ in range(60)}
            new |= {T0 + span + w.randrange(HOUR // 8) * 8 + k: w.uniform(-1, 1) for _ in range(20)}
            again = w.sample(old, 30) + w.sample(mine, min(len(mine), 30))
            body = {**new, **{t: sent[t] for t in again}}
            items = list(body.items())
            w.shuffle(items)
            got, dups = await ingest(gateway, "cc", token, [message("t", t, v) for t, v in items])
            assert got + dups == len(items)
            accepted.append(got)
            sent.update(new)
            mine += list(new)
            await asyncio.sleep(0)

    async def packer(step: int) -> None:
        for cut in range(T0 + 6 * HOUR + 7, T0 + span + HOUR, step):
            await maintenance.pack(cut, max_rows=97)
            await asyncio.sleep(0)

    async with asyncio.TaskGroup() as group:
        group.create_task(packer(9 * HOUR))
        group.create_task(packer(13 * HOUR + 1))  # two maintenance runs at once
        for k in range(1, 5):
            group.create_task(writer(k))
    assert sum(accepted) == len(sent)
    for step in ("mixed", "packed"):
        points = await read_points(gateway, "cc", "t", limit=997)
        want = dict(sorted(sent.items()))
        assert_points([(p["ts"], p["value"]) for p in points], want, step)
        assert sum(await held(gateway, "cc")) == len(sent)
        await pack_everything()
    assert await held(gateway, "cc") == (len(sent), 0)


async def test_redelivered_over_mqtt_once_packed(
    database_url: str, machine_broker: str, topic_prefix: str
) -> None:
    """The same over MQTT: packed readings published again are counted duplicates, stored once;
    a late and a fresh one beside them are stored."""
    series = {T0 + k * 37 * S + k % 5: round(k * 0.25, 2) for k in range(300)}
    async for gw in start_mqtt_gateway(database_url, machine_broker, topic_prefix):
        token = await gw.create_device("mq")
        await post_series(gw, "mq", token, {"t": series})
        await pack_everything()
        assert await held(gw, "mq") == (300, 0)
        before = sample(await scrape(gw.client), *DUPLICATES)
        extra = {T0 + 5 * S + 1: 7.0, LATER: 8.0}  # one late into the packed range, one fresh
        body = [message("t", t, v) for t, v in (series | extra).items()]
        address = BrokerAddress.from_url(machine_broker)
        async with aiomqtt.Client(
            address.host, address.port, protocol=aiomqtt.ProtocolVersion.V5
        ) as client:
            await client.publish(f"{topic_prefix}/devices/mq/telemetry", json.dumps(body), qos=1)

        async def counted(gw: Gateway = gw, before: float = before) -> bool:
            return sample(await scrape(gw.client), *DUPLICATES) >= before + 300

        await poll_until(counted, within=20, what="300 duplicates counted")
        assert sample(await scrape(gw.client), *DUPLICATES) == before + 300
        assert await held(gw, "mq") == (300, 2)
        points = await read_points(gw, "mq", "t")
        assert_points(
            [(p["ts"], p["value"]) for p in points], dict(sorted((series | extra).items())), "mqtt"
        )


DUPLICATES = ("fieldgate_readings_duplicate_total", {"transport": "mqtt"})


@pytest.mark.usefixtures("small_chunks")
async def test_ranges_that_begin_and_end_at_chunk_edges(gateway: Gateway) -> None:
    """Raw pages and aggregates over ranges starting or ending exactly at a chunk's first or
    last reading (and one microsecond either side), with unpacked readings between chunks."""
    rng = random.Random(18)
    series = {T0 + rng.randrange(DAY): rng.uniform(-1, 1) for _ in range(1000)}
    token = await gateway.create_device("ce")
    await post_series(gateway, "ce", token, {"t": series})
    await pack_everything()
    (sid,) = (await series_of(gateway, "ce")).values()
    chunks = await committed(
        gateway.settings.database_url,
        "SELECT first_ts, last_ts FROM chunk WHERE series_id = ? ORDER BY first_ts",
        sid,
    )
    assert len(chunks) >= 8
    between = {int(f) - 1: 0.5 for f, _ in chunks[1:]} | {int(last) + 1: -0.5 for _, last in chunks}
    between = {t: v for t, v in between.items() if t not in series}
    assert await post_series(gateway, "ce", token, {"t": between}) == (len(between), 0)
    series = dict(sorted((series | between).items()))
    for (f, last), (next_f, _) in itertools.pairwise(chunks[:5]):
        f, last, next_f = int(f), int(last), int(next_f)
        for start, end in (
            (f, last),
            (f, last + 1),
            (f - 1, last),
            (f + 1, last + 2),
            (last, next_f),
            (last + 1, next_f + 1),
            (f, next_f),
        ):
            points = await read_points(gateway, "ce", "t", start=iso(start), end=iso(end), limit=9)
            got = [(p["ts"], p["value"]) for p in points]
            assert_points(got, in_range(series, start, end), f"{start} {end}")
            q = ("1h", start, end, None)
            path = "/api/v1/devices/ce/telemetry/aggregate"
            body = await aggregate(gateway, path, q, "previous", metric="t")
            assert_same(body["buckets"], expected(series, q, "previous"), f"{q}")


async def test_reads_while_packing_see_every_reading_once(gateway: Gateway) -> None:
    """Raw pages, aggregates, latest and device counts asked while the packer moves readings
    from rows into chunks (many small steps): each answer holds every reading exactly once,
    never a reading both as a row and in a chunk, nor one in neither."""
    rng = random.Random(23)
    series = {T0 + rng.randrange(2 * DAY): round(rng.uniform(-9, 9), 2) for _ in range(3000)}
    await post_all(gateway, "rw", series)
    n = len(series)
    newest = max(series)
    done = asyncio.Event()
    answers: list[tuple[str, int]] = []

    async def packer() -> None:
        try:
            for cut in range(T0 + HOUR, T0 + 3 * DAY, 5 * HOUR):
                await maintenance.pack(cut, max_rows=37)
        finally:
            done.set()

    async def reader() -> None:
        path = "/api/v1/devices/rw/telemetry"
        while not done.is_set():
            r = await gateway.client.get(
                path, params={"metric": "t", "limit": 5000}, headers=gateway.admin
            )
            answers.append(("raw", len(r.json()["points"])))
            r = await gateway.client.get(
                path + "/aggregate",
                params={"metric": "t", "start": iso(T0), "end": iso(T0 + 3 * DAY),
                        "window": "1d", "agg": "count"},
                headers=gateway.admin,
            )  # fmt: skip
            answers.append(("aggregate", sum(b["count"] for b in r.json()["buckets"])))
            r = await gateway.client.get("/api/v1/devices/rw", headers=gateway.admin)
            answers.append(("count", r.json()["metrics"]["t"]["count"]))
            r = await gateway.client.get(path + "/latest", headers=gateway.admin)
            answers.append(("latest", int(r.json()["values"]["t"]["ts"] == iso(newest)) * n))

    async with asyncio.TaskGroup() as group:
        group.create_task(packer())
        group.create_task(reader())
    assert await held(gateway, "rw") == (n, 0)
    assert len(answers) >= 8
    wrong = [a for a in answers if a[1] != n]
    assert not wrong, f"{len(wrong)} of {len(answers)} answers wrong: {wrong[:8]}"


async def test_a_redelivery_racing_another_writer_and_the_packer_is_stored_once(
    gateway: Gateway,
) -> None:
    """PostgreSQL's insert falls back to ON CONFLICT DO NOTHING when another session commits
    one of its keys first. A stored reading `x` redelivered in such a commit, while the packer
    moves `x` into a chunk, is a duplicate and stays stored once: the fallback waits on
    another writer (uncommitted `y2`) after locking the series, the packer runs in between."""
    url = gateway.settings.database_url
    if is_sqlite(url):
        pytest.skip("needs two sessions interleaving within one statement: PostgreSQL only")
    token = await gateway.create_device("fb")
    x, y1, y2 = T0 + 5 * HOUR, T0 + 2 * HOUR, T0 + 3 * HOUR
    assert await post_series(gateway, "fb", token, {"t": {T0 + HOUR: 1.0, x: 2.0}}) == (2, 0)
    (sid,) = (await series_of(gateway, "fb")).values()
    t1, t2, watch = [await asyncpg.connect(url, timeout=10) for _ in range(3)]
    try:
        xids = []
        for conn, ts in ((t1, y1), (t2, y2)):
            await conn.execute("BEGIN")
            await conn.execute("INSERT INTO reading VALUES ($1, $2, 0.5)", sid, ts)
            xids.append(str(await conn.fetchval("SELECT pg_current_xact_id()::text")))

        async def waiting_on(xid: str | None) -> bool:
            sql = "SELECT count(*) FROM pg_locks WHERE NOT granted AND pid <> pg_backend_pid()"
            if xid is None:  # on anything but the writers' transactions
                sql += " AND (transactionid IS NULL OR transactionid::text <> ALL($1::text[]))"
                return bool(await watch.fetchval(sql, xids))
            sql += " AND locktype = 'transactionid' AND transactionid::text = $1"
            return bool(await watch.fetchval(sql, xid))

        rows = readings.Rows([sid] * 3, [y1, y2, x], [0.5, 0.5, 2.0])
        write = asyncio.create_task(readings.insert_batch(connection(), [("fb", rows)], {}))
        await poll_until(lambda: waiting_on(xids[0]), within=10, what="the insert waits on y1")
        await t1.execute("COMMIT")  # the insert fails on y1 and falls back
        await poll_until(lambda: waiting_on(xids[1]), within=10, what="the fallback waits on y2")
        pack = asyncio.create_task(packed.pack_series(connection(), sid, x + 1))

        async def pack_done_or_waiting() -> bool:
            return pack.done() or await waiting_on(None)

        await poll_until(pack_done_or_waiting, within=10, what="the packer runs or waits")
        await t2.execute("ROLLBACK")
        assert await write == [1]  # y2 new; y1 (the other writer's) and x duplicates
        await pack
    finally:
        for conn in (t1, t2, watch):
            await conn.close()
    await pack_everything()
    assert await held(gateway, "fb") == (4, 0)
    points = await read_points(gateway, "fb", "t")
    assert [p["ts"] for p in points] == [format_ts(t) for t in (T0 + HOUR, y1, y2, x)]


async def test_an_empty_partition_is_not_dropped_under_a_chunk_being_written(
    gateway: Gateway,
) -> None:
    """Retention drops a partition of `chunk` once it holds no chunk; one that a packing step
    (of another instance whose advisory lock was lost with its connection) is writing a chunk
    into at that moment keeps it: the partition is locked before it is found empty."""
    url = gateway.settings.database_url
    if is_sqlite(url):
        pytest.skip("partitions of `chunk` are PostgreSQL's")
    await post_all(gateway, "pe", {T0 + k * MIN: k / 4 for k in range(50)})
    await pack_everything()
    (row,) = await committed(url, "SELECT * FROM chunk")
    writer, watch = [await asyncpg.connect(url, timeout=10) for _ in range(2)]
    try:
        await writer.execute("DELETE FROM chunk")  # the partition is empty, committed
        await writer.execute("BEGIN")
        marks = ", ".join(f"${i}" for i in range(1, len(row) + 1))
        await writer.execute(f"INSERT INTO chunk VALUES ({marks})", *row)
        drop = asyncio.create_task(packed.expire(connection(), LATER, 0))

        async def drop_waits() -> bool:
            sql = "SELECT count(*) FROM pg_locks WHERE NOT granted AND pid <> pg_backend_pid()"
            return drop.done() or bool(await watch.fetchval(sql))

        await poll_until(drop_waits, within=10, what="retention reaches the partition")
        await writer.execute("COMMIT")
        await drop
    finally:
        await writer.close()
        await watch.close()
    assert await held(gateway, "pe") == (50, 0)


@pytest.mark.usefixtures("small_chunks")
async def test_late_readings_scattered_over_many_chunks_are_packed_a_few_chunks_a_step(
    gateway: Gateway, monkeypatch: pytest.MonkeyPatch
) -> None:
    """One late reading in each of 30 packed chunks: a packing step rewrites at most
    MAX_REWRITES of them (each decoded and encoded again inside its transaction), and the run
    goes on with the rest; every reading is kept."""
    monkeypatch.setattr(packed, "MAX_REWRITES", 4)
    series = {T0 + k * 10 * S: float(k) for k in range(3000)}
    token = await post_all(gateway, "sc", series)
    await pack_everything()
    (sid,) = (await series_of(gateway, "sc")).values()
    assert (await rows_of(gateway, sid))[0] == 30
    late = {T0 + k * 1000 * S + 5 * S: -1.0 for k in range(30)}  # one inside each chunk
    assert await post_series(gateway, "sc", token, {"t": late}) == (30, 0)
    step = await packed.pack_series(connection(), sid, LATER)
    assert step.chunks_replaced == 4
    assert step.readings == 4
    assert step.more(10_000)
    report = await pack_everything()
    assert report.packed.readings == 26
    assert report.series_packed == 1
    assert await held(gateway, "sc") == (3030, 0)
    points = await read_points(gateway, "sc", "t", limit=1000)
    assert_points(
        [(p["ts"], p["value"]) for p in points], dict(sorted((series | late).items())), ""
    )
