"""Packed history answers exactly as raw rows: aggregates (every agg and fill mode), raw pages,
latest and statistics, before and after packing, on SQLite and PostgreSQL."""

from __future__ import annotations

import random
from typing import Any

from gateway import maintenance
from gateway.timespec import now_us
from tests.conftest import Gateway
from tests.test_aggregate import AGGS, FILLS, assert_buckets, iso, reference

S = 1_000_000
MIN = 60 * S
HOUR = 60 * MIN
BASE = 1_763_596_800 * S  # 2025-11-20T00:00:00Z


def irregular(seed: int, n: int = 3000, span: int = 3 * 24 * HOUR) -> dict[int, float]:
    rng = random.Random(seed)
    ts: set[int] = set()
    while len(ts) < n:
        ts.add(BASE + rng.randrange(span))
    ts |= {BASE + HOUR, BASE + 2 * HOUR - 1, BASE + 24 * HOUR}  # at and just before hour edges
    return {t: round(rng.uniform(-50, 50), 2) for t in sorted(ts)}


async def post_all(gw: Gateway, device: str, readings: dict[int, float]) -> str:
    token = await gw.create_device(device)
    items = list(readings.items())
    for i in range(0, len(items), 500):
        body = [{"ts": iso(t), "values": {"t": v}} for t, v in items[i : i + 500]]
        r = await gw.post(device, token, body)
        assert r.status_code == 200, r.text
    return token


QUERIES: list[dict[str, Any]] = [
    {"start": BASE + 17 * MIN + 3 * S, "end": BASE + 5 * HOUR + 7 * S, "window": 60 * S},
    {"start": BASE, "end": BASE + 3 * 24 * HOUR, "window": HOUR},
    {"start": BASE + 5 * MIN, "end": BASE + 2 * 24 * HOUR + 11 * MIN, "window": HOUR},
    {"start": BASE + 5 * MIN, "end": BASE + 3 * 24 * HOUR, "window": 90 * MIN},
    {"start": BASE + 29 * MIN, "end": BASE + 3 * 24 * HOUR - 1, "window": 24 * HOUR},
    {"start": BASE - HOUR, "end": BASE + 4 * 24 * HOUR, "window": 4 * 24 * HOUR},
]


def window_text(us: int) -> str:
    return f"{us // S}s"


async def answers(gw: Gateway, device: str) -> list[Any]:
    out = []
    for q in QUERIES:
        for fill in FILLS:
            r = await gw.client.get(
                f"/api/v1/devices/{device}/telemetry/aggregate",
                params={
                    "metric": "t",
                    "start": iso(q["start"]),
                    "end": iso(q["end"]),
                    "window": window_text(q["window"]),
                    "agg": ",".join(AGGS),
                    "fill": fill,
                },
                headers=gw.admin,
            )
            assert r.status_code == 200, r.text
            out.append((q, fill, r.json()["buckets"]))
    return out


def check(got: list[Any], readings: dict[int, float], what: str) -> None:
    for q, fill, buckets in got:
        want = reference(readings, q["start"], q["end"], q["window"], AGGS, fill)
        assert_buckets(buckets, want, f"{what} {q} {fill}")


async def test_aggregates_are_the_same_packed(gateway: Gateway) -> None:
    readings = irregular(1)
    await post_all(gateway, "p1", readings)
    check(await answers(gateway, "p1"), readings, "raw")
    report = await maintenance.run_once(now_us=now_us(), compress_after_us=HOUR, retention_days=0)
    assert report.packed.readings == len(readings)
    check(await answers(gateway, "p1"), readings, "packed")
