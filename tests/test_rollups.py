"""The 1-minute rollup of dense chunks: answers from minute partials equal raw answers, on
SQLite and PostgreSQL; sparse chunks keep none."""

from __future__ import annotations

import random
from typing import Any

from gateway import maintenance
from tests.conftest import Gateway
from tests.harness import committed
from tests.test_aggregate import AGGS, FILLS, assert_buckets, iso, reference
from tests.test_packed import BASE, HOUR, MIN, S, post_all

WINDOWS = [S, 7 * S, MIN, 90 * S, 5 * MIN, 15 * MIN, HOUR]


def dense(seed: int) -> dict[int, float]:
    """About 1 reading a second for 3 hours, jittered, with a gap and readings on minute and
    hour boundaries."""
    rng = random.Random(seed)
    out: dict[int, float] = {}
    for second in range(3 * 3600):
        if 4000 <= second < 4300:  # a 5-minute gap
            continue
        out[BASE + second * S + rng.randrange(S)] = round(rng.uniform(-10, 10), 2)
    for edge in (BASE + 2 * HOUR, BASE + 90 * MIN, BASE + 2 * HOUR - 1):
        out[edge] = 1.25
    return dict(sorted(out.items()))


async def answers(gw: Gateway, device: str, start: int, end: int) -> list[tuple[int, str, Any]]:
    got = []
    for window in WINDOWS:
        for fill in FILLS if window >= MIN else ["none"]:
            r = await gw.client.get(
                f"/api/v1/devices/{device}/telemetry/aggregate",
                params={
                    "metric": "t",
                    "start": iso(start),
                    "end": iso(end),
                    "window": f"{window // S}s",
                    "agg": ",".join(AGGS),
                    "fill": fill,
                },
                headers=gw.admin,
            )
            assert r.status_code == 200, r.text
            got.append((window, fill, r.json()["buckets"]))
    return got


async def test_minute_rollups_answer_as_raw_rows(gateway: Gateway) -> None:
    readings = dense(3)
    await post_all(gateway, "dense", readings)
    start, end = BASE + 17 * MIN + 13 * S, BASE + 2 * HOUR + 41 * MIN + 7 * S
    report = await maintenance.run_once(
        now_us=BASE + 5 * HOUR, compress_after_us=0, retention_days=0
    )
    assert report.packed.readings == len(readings)
    rows = await committed(
        gateway.settings.database_url,
        "SELECT n, minutes IS NOT NULL FROM chunk c JOIN series s ON s.id = c.series_id"
        " WHERE s.device_id = ?",
        "dense",
    )
    # ~60 readings a minute: every chunk of a few minutes or more keeps minute partials
    big = [bool(has) for n, has in rows if n >= 5 * 60]
    assert big
    assert all(big)
    for window, fill, buckets in await answers(gateway, "dense", start, end):
        want = reference(readings, start, end, window, AGGS, fill)
        assert_buckets(buckets, want, f"window={window // S}s fill={fill}")


async def test_sparse_chunks_keep_no_minute_rollup(gateway: Gateway) -> None:
    readings = {BASE + i * 10 * S: float(i % 7) for i in range(3000)}  # one every 10 s
    await post_all(gateway, "sparse", readings)
    await maintenance.run_once(
        now_us=BASE + 10 * 24 * HOUR, compress_after_us=HOUR, retention_days=0
    )
    rows = await committed(
        gateway.settings.database_url,
        "SELECT count(*), count(minutes) FROM chunk c JOIN series s ON s.id = c.series_id"
        " WHERE s.device_id = ?",
        "sparse",
    )
    assert rows[0][0] >= 1  # chunks, 6 readings a minute (< MINUTE_ROLLUP_DENSITY)
    assert rows[0][1] == 0  # none with minute partials


async def test_values_near_the_double_limit_answer_without_error(gateway: Gateway) -> None:
    """A bucket whose sum passes the double range (PostgreSQL's float sum raises there) answers
    200, the same before and after packing: min/max/count/first/last exact, an infinite sum and
    average as null."""
    big = 1.7e308
    readings = {BASE + i * MIN: big for i in range(4)}
    readings[BASE + 10 * MIN] = 1.0
    await post_all(gateway, "huge", readings)
    params = {
        "metric": "t",
        "start": iso(BASE),
        "end": iso(BASE + HOUR),
        "window": "1h",
        "agg": "sum,avg,min,max,count,first,last",
    }
    answers = []
    for packed in (False, True):
        if packed:
            await maintenance.run_once(
                now_us=BASE + 5 * HOUR, compress_after_us=HOUR, retention_days=0
            )
        r = await gateway.client.get(
            "/api/v1/devices/huge/telemetry/aggregate", params=params, headers=gateway.admin
        )
        assert r.status_code == 200, r.text
        (bucket,) = r.json()["buckets"]
        assert (bucket["min"], bucket["max"], bucket["count"]) == (1.0, big, 5)
        assert (bucket["first"], bucket["last"]) == (big, 1.0)
        answers.append(bucket)
    assert answers[0] == answers[1]
