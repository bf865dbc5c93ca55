"""Raw reads (GET /devices/{id}/telemetry) and the latest values, on both databases."""

from __future__ import annotations

import base64
import time
from collections.abc import AsyncIterator
from typing import Any

import httpx
import pytest

from tests.conftest import Gateway, make_settings, start_gateway
from tests.harness import read_points

T0 = 1_700_000_000_000  # 2023-11-14T22:13:20Z
MINUTE = 60_000


def iso(ms: int) -> str:
    sec, frac = divmod(ms, 1000)
    base = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(sec))
    return f"{base}.{frac:03d}Z" if frac else base + "Z"


async def get(gw: Gateway, device_id: str, **params: Any) -> httpx.Response:
    return await gw.client.get(
        f"/api/v1/devices/{device_id}/telemetry", params=params, headers=gw.admin
    )


async def page(gw: Gateway, device_id: str, **params: Any) -> dict[str, Any]:
    r = await get(gw, device_id, **params)
    assert r.status_code == 200, r.text
    body: dict[str, Any] = r.json()
    return body


def values(points: list[dict[str, Any]]) -> list[float]:
    return [p["value"] for p in points]


def error_code(r: httpx.Response) -> str:
    err = r.json()["error"]
    assert set(err) == {"code", "message", "details"}
    assert err["message"]
    return str(err["code"])


@pytest.fixture
async def dev(gateway: Gateway) -> str:
    """Device "dev-1" with metric t = 0..9 at T0 + i minutes, posted out of order."""
    token = await gateway.create_device("dev-1")
    messages = [{"ts": T0 + i * MINUTE, "values": {"t": i}} for i in (5, 0, 9, 3, 1, 8, 2, 7, 4, 6)]
    r = await gateway.post("dev-1", token, messages)
    assert r.json()["accepted"] == 10
    return token


HALF_OPEN_CASES: list[tuple[dict[str, str], list[int]]] = [
    ({"start": iso(T0 + 3 * MINUTE)}, [3, 4, 5, 6, 7, 8, 9]),
    ({"end": iso(T0 + 3 * MINUTE)}, [0, 1, 2]),
    ({"start": iso(T0 + 3 * MINUTE), "end": iso(T0 + 6 * MINUTE)}, [3, 4, 5]),
    ({"start": iso(T0 + 3 * MINUTE + 1), "end": iso(T0 + 6 * MINUTE + 1)}, [4, 5, 6]),
    ({"start": iso(T0 + 3 * MINUTE), "end": iso(T0 + 3 * MINUTE)}, []),
    ({"start": iso(T0 + 6 * MINUTE), "end": iso(T0 + 3 * MINUTE)}, []),
    ({"start": "2023-11-14T23:16:20+01:00", "end": "2023-11-14T17:19:20-05:00"}, [3, 4, 5]),
    (
        {"start": "2023-11-14T22:16:20.000Z", "end": "2023-11-14T22:19:20.000001Z"},
        [3, 4, 5, 6],
    ),
    ({"start": "now"}, []),
    ({"end": "now"}, list(range(10))),
    ({"start": "-1h"}, []),
    ({"start": "-100000d", "end": "-1d"}, list(range(10))),
]


@pytest.fixture
def database_url(emptied_database_url: str) -> str:
    """PostgreSQL: one database for the module's tests, emptied before each (conftest)."""
    return emptied_database_url


class TestRaw:
    async def test_in_time_order_with_the_answer_shape(self, gateway: Gateway, dev: str) -> None:
        body = await page(gateway, "dev-1", metric="t")
        assert set(body) == {"device", "metric", "unit", "points", "next_cursor"}
        assert (body["device"], body["metric"], body["next_cursor"]) == ("dev-1", "t", None)
        assert body["unit"] is None  # the native format names no unit
        assert body["points"] == [
            {"ts": iso(T0 + i * MINUTE), "value": float(i)} for i in range(10)
        ]

    async def test_microseconds_round_trip(self, gateway: Gateway, dev: str) -> None:
        await gateway.post("dev-1", dev, {"ts": "2023-11-14T22:13:20.000001Z", "values": {"u": 1}})
        await gateway.post("dev-1", dev, {"ts": "2023-11-14T22:13:20.12Z", "values": {"u": 2}})
        assert (await page(gateway, "dev-1", metric="u"))["points"] == [
            {"ts": "2023-11-14T22:13:20.000001Z", "value": 1.0},
            {"ts": "2023-11-14T22:13:20.120Z", "value": 2.0},
        ]

    async def test_start_end_half_open(self, gateway: Gateway, dev: str) -> None:
        for params, expected in HALF_OPEN_CASES:
            body = await page(gateway, "dev-1", metric="t", **params)
            assert values(body["points"]) == [float(i) for i in expected], params

    async def test_relative_times(self, gateway: Gateway, dev: str) -> None:
        now = int(time.time() * 1000)
        messages = [
            {"ts": now - 120 * MINUTE, "values": {"r": 1}},
            {"ts": now - 30 * MINUTE, "values": {"r": 2}},
            {"ts": now - MINUTE, "values": {"r": 3}},
        ]
        assert (await gateway.post("dev-1", dev, messages)).json()["accepted"] == 3
        cases = [
            ({"start": "-1h"}, [2.0, 3.0]),
            ({"start": "-3h", "end": "-1h"}, [1.0]),
            ({"start": "-45m", "end": "-5m"}, [2.0]),
            ({"start": "-2h30m", "end": "now"}, [1.0, 2.0, 3.0]),
            ({"end": "-1d"}, []),
        ]
        for params, expected in cases:
            body = await page(gateway, "dev-1", metric="r", **params)
            assert values(body["points"]) == expected, params

    async def test_bad_parameters_are_400(self, gateway: Gateway, dev: str) -> None:
        bad: list[dict[str, Any]] = [
            {"start": "yesterday"},
            {"end": "2023-11-14T22:13:20"},  # no offset
            {"start": "-1 hour"},
            {"start": "-1y"},
            {"limit": 0},
            {"limit": -5},
            {"limit": "ten"},
        ]
        for params in bad:
            r = await get(gateway, "dev-1", metric="t", **params)
            assert r.status_code == 400, (params, r.text)
            assert error_code(r) == "invalid_parameter"

    @pytest.mark.parametrize(
        "params",
        [{}, {"metric": ""}, {"metric": "m" * 65}, {"metric": "bad metric!"}, {"metric": "t\n"}],
    )
    async def test_missing_or_invalid_metric_is_400(
        self, gateway: Gateway, dev: str, params: dict[str, Any]
    ) -> None:
        r = await get(gateway, "dev-1", **params)
        assert r.status_code == 400, r.text
        assert error_code(r) == "invalid_parameter"
        assert "metric" in r.json()["error"]["message"]

    async def test_unknown_metric_is_empty(self, gateway: Gateway, dev: str) -> None:
        assert await page(gateway, "dev-1", metric="nothing") == {
            "device": "dev-1",
            "metric": "nothing",
            "unit": None,
            "points": [],
            "next_cursor": None,
        }

    async def test_unknown_device_is_404(self, gateway: Gateway) -> None:
        r = await get(gateway, "nope", metric="t")
        assert r.status_code == 404, r.text
        assert error_code(r) == "device_not_found"

    async def test_metrics_and_devices_do_not_mix(self, gateway: Gateway, dev: str) -> None:
        other = await gateway.create_device("dev-2")
        await gateway.post("dev-2", other, {"ts": T0, "values": {"t": 100, "h": 50}})
        await gateway.post("dev-1", dev, {"ts": T0, "values": {"h": 40}})
        assert values((await page(gateway, "dev-2", metric="t"))["points"]) == [100.0]
        assert values((await page(gateway, "dev-1", metric="h"))["points"]) == [40.0]
        assert len((await page(gateway, "dev-1", metric="t"))["points"]) == 10


class TestPaging:
    async def test_limit_and_cursor_return_every_reading_once(
        self, gateway: Gateway, dev: str
    ) -> None:
        first = await page(gateway, "dev-1", metric="t", limit=4)
        assert values(first["points"]) == [0.0, 1.0, 2.0, 3.0]
        assert first["next_cursor"]
        second = await page(gateway, "dev-1", metric="t", limit=4, cursor=first["next_cursor"])
        assert values(second["points"]) == [4.0, 5.0, 6.0, 7.0]
        third = await page(gateway, "dev-1", metric="t", limit=4, cursor=second["next_cursor"])
        assert values(third["points"]) == [8.0, 9.0]
        assert third["next_cursor"] is None

    async def test_exact_multiple_of_the_limit(self, gateway: Gateway, dev: str) -> None:
        pages = []
        cursor = None
        while True:
            params: dict[str, Any] = {"metric": "t", "limit": 5}
            if cursor:
                params["cursor"] = cursor
            body = await page(gateway, "dev-1", **params)
            pages.append(values(body["points"]))
            cursor = body["next_cursor"]
            if not cursor:
                break
        assert pages == [[0.0, 1.0, 2.0, 3.0, 4.0], [5.0, 6.0, 7.0, 8.0, 9.0]]

    async def test_cursor_keeps_start_and_end(self, gateway: Gateway, dev: str) -> None:
        window = {"start": iso(T0 + 2 * MINUTE), "end": iso(T0 + 7 * MINUTE)}
        points = await read_points(gateway, "dev-1", "t", limit=2, **window)
        assert values(points) == [2.0, 3.0, 4.0, 5.0, 6.0]

    @pytest.mark.parametrize("limit", [1, 3, 7, 1000])
    async def test_many_readings_in_pages(self, gateway: Gateway, dev: str, limit: int) -> None:
        messages = [{"ts": T0 + i, "values": {"m": i}} for i in range(50)]
        assert (await gateway.post("dev-1", dev, messages)).json()["accepted"] == 50
        points = await read_points(gateway, "dev-1", "m", limit=limit)
        assert values(points) == [float(i) for i in range(50)]

    async def test_every_reading_once_while_new_ones_arrive(
        self, gateway: Gateway, dev: str
    ) -> None:
        """Newer readings posted between pages show up once; older backfill never repeats one."""
        seen: list[float] = []
        cursor = None
        posted_new = 0
        for step in range(100):
            params: dict[str, Any] = {"metric": "t", "limit": 3}
            if cursor:
                params["cursor"] = cursor
            body = await page(gateway, "dev-1", **params)
            seen += values(body["points"])
            cursor = body["next_cursor"]
            if step < 3:
                # A newer reading, and a late one from before everything read so far.
                newer = {"ts": T0 + (10 + step) * MINUTE, "values": {"t": 10 + step}}
                backfill = {"ts": T0 - (step + 1) * MINUTE, "values": {"t": -1 - step}}
                r = await gateway.post("dev-1", dev, [newer, backfill])
                assert r.json()["accepted"] == 2
                posted_new += 1
            if not cursor:
                break
        assert posted_new == 3
        assert seen == [float(i) for i in range(13)]  # once each, in order, newer ones included
        assert len(set(seen)) == len(seen)
        everything = await read_points(gateway, "dev-1", "t")
        assert len(everything) == 16  # the backfill is stored, just behind the cursor

    async def test_invalid_cursor_is_400(self, gateway: Gateway, dev: str) -> None:
        bad = [
            "garbage!",
            "!!!",
            base64.urlsafe_b64encode(b"ts:abc").decode(),
            base64.urlsafe_b64encode(b"id:12").decode(),
            base64.urlsafe_b64encode(b"\xff\xfe").decode(),
            "dHM6MTIz====x",
        ]
        for cursor in bad:
            r = await get(gateway, "dev-1", metric="t", cursor=cursor)
            assert r.status_code == 400, (cursor, r.text)
            assert error_code(r) == "invalid_cursor"


@pytest.fixture
async def small_pages(database_url: str) -> AsyncIterator[Gateway]:
    async for gw in start_gateway(make_settings(database_url, max_page_size=3)):
        yield gw


async def test_limit_is_capped_at_max_page_size(small_pages: Gateway) -> None:
    token = await small_pages.create_device("dev-1")
    await small_pages.post("dev-1", token, [{"ts": T0 + i, "values": {"t": i}} for i in range(5)])
    body = await page(small_pages, "dev-1", metric="t", limit=1000)
    assert values(body["points"]) == [0.0, 1.0, 2.0]
    assert body["next_cursor"]
    assert values(await read_points(small_pages, "dev-1", "t", limit=1000)) == [
        float(i) for i in range(5)
    ]


class TestLatest:
    async def test_newest_value_of_each_metric(self, gateway: Gateway, dev: str) -> None:
        # An older reading posted last must not count as the latest.
        await gateway.post("dev-1", dev, {"ts": T0 - MINUTE, "values": {"t": -1, "h": 55}})
        await gateway.post("dev-1", dev, {"ts": T0 + 2 * MINUTE, "values": {"h": 45}})
        r = await gateway.client.get(
            "/api/v1/devices/dev-1/telemetry/latest", headers=gateway.admin
        )
        assert r.status_code == 200, r.text
        assert r.json() == {
            "device": "dev-1",
            "values": {
                "h": {"ts": iso(T0 + 2 * MINUTE), "value": 45.0, "unit": None},
                "t": {"ts": iso(T0 + 9 * MINUTE), "value": 9.0, "unit": None},
            },
        }

    async def test_device_without_readings(self, gateway: Gateway) -> None:
        await gateway.create_device("quiet")
        r = await gateway.client.get(
            "/api/v1/devices/quiet/telemetry/latest", headers=gateway.admin
        )
        assert r.status_code == 200, r.text
        assert r.json() == {"device": "quiet", "values": {}}

    async def test_unknown_device_is_404(self, gateway: Gateway) -> None:
        r = await gateway.client.get("/api/v1/devices/nope/telemetry/latest", headers=gateway.admin)
        assert r.status_code == 404, r.text
        assert error_code(r) == "device_not_found"
