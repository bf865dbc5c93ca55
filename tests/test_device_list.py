"""The device list as the console uses it (issue 14): `q=` search with the cursor, and each
device's readings and rejected messages of the last 24 hours, exact over rows, chunks and
rollups, checked against counts made here from what was posted."""

from __future__ import annotations

import random
from typing import Any, ClassVar

import pytest

from gateway import maintenance
from gateway.device_views import describe_devices, recent_since
from gateway.store import packed, readings, registry
from gateway.store.database import connection
from gateway.store.dead_letters import Letter, insert_letters
from gateway.store.raw_sql import fetch
from gateway.timespec import now_us
from tests.conftest import Gateway
from tests.test_aggregate import iso

S = 1_000_000
MIN = 60 * S
HOUR = 60 * MIN
DAY = 24 * HOUR
# "now" for the 24-hour counts: on no minute, so the window's start (the minute 24 h before)
# is not 24 h before it.
NOW = 1_764_000_000 * S + 17 * MIN + 37 * S + 123_457  # 2025-11-24T16:17:37.123457Z
SINCE = recent_since(NOW)


def test_the_window_starts_on_the_minute_24_hours_before() -> None:
    assert SINCE == NOW - 37 * S - 123_457 - DAY
    assert recent_since(SINCE + DAY) == SINCE


async def page_ids(gw: Gateway, **params: Any) -> list[str]:
    """Every device id the list gives for `params`, page by page (asserting each page's size)."""
    out: list[str] = []
    cursor = None
    while True:
        query = {**params, **({"cursor": cursor} if cursor else {})}
        r = await gw.client.get("/api/v1/devices", params=query, headers=gw.admin)
        assert r.status_code == 200, r.text
        body = r.json()
        out += [d["id"] for d in body["devices"]]
        cursor = body["next_cursor"]
        if cursor is None:
            return out
        assert len(body["devices"]) == params["limit"]


class TestSearch:
    DEVICES: ClassVar[dict[str, str]] = {
        "pump-01": "Boiler room",
        "pump-02": "boiler ROOM annex",
        "PUMP-03": "",
        "fan-1": "Pump house",
        "fan_2": "50% duty",
        "fanx2": "fifty percent",
        "valve.a": "Backslash \\ here",
        "valve.b": "Kühlraum",
    }

    @pytest.mark.parametrize(
        ("q", "expected"),
        [
            ("pump", ["PUMP-03", "fan-1", "pump-01", "pump-02"]),  # id or name, any case
            ("BOILER room", ["pump-01", "pump-02"]),
            ("fan_", ["fan_2"]),  # "_" is itself, not any character
            ("%", ["fan_2"]),
            ("\\", ["valve.a"]),
            ("kühl", ["valve.b"]),
            ("nothing like it", []),
            ("", list(DEVICES)),  # empty: no filter
        ],
    )
    async def test_id_or_name_contains_q_paged_in_id_order(
        self, gateway: Gateway, q: str, expected: list[str]
    ) -> None:
        for device_id, name in self.DEVICES.items():
            await gateway.create_device(device_id, name=name)
        want = sorted(expected)
        for limit in (1, 2, 100):
            assert await page_ids(gateway, q=q, limit=limit) == want

    @pytest.mark.parametrize("q", ["d\x00", "x" * 201])
    async def test_a_nul_or_an_overlong_q_is_400(self, gateway: Gateway, q: str) -> None:
        r = await gateway.client.get("/api/v1/devices", params={"q": q}, headers=gateway.admin)
        assert r.status_code == 400, r.text
        assert r.json()["error"]["code"] == "invalid_parameter"


def dense(seed: int) -> dict[int, float]:
    """A reading every 2 s from 3 h before SINCE to 2 h after (dense: chunks keep minute
    rollups), plus readings just around SINCE."""
    rng = random.Random(seed)
    out = {
        t: round(rng.uniform(-5, 5), 2) for t in range(SINCE - 3 * HOUR, SINCE + 2 * HOUR, 2 * S)
    }
    out |= dict.fromkeys((SINCE - 1, SINCE + 1, SINCE + HOUR - 1, SINCE + HOUR), 1.5)
    return out


def sparse(seed: int) -> dict[int, float]:
    """Irregular readings ~40 s apart over 30 hours to a little after NOW (no minute rollups:
    the chunk across SINCE is decoded), plus one at SINCE itself."""
    rng = random.Random(seed)
    out: dict[int, float] = {}
    t = NOW - 30 * HOUR
    while t < NOW + 2 * MIN:
        out[t] = round(rng.uniform(0, 100), 3)
        t += rng.randrange(1, 80 * S)
    out[SINCE] = 7.0
    return out


async def post(gw: Gateway, device: str, token: str, data: dict[str, dict[int, float]]) -> None:
    items = [(m, t, v) for m, series in data.items() for t, v in series.items()]
    random.Random(5).shuffle(items)
    for i in range(0, len(items), 1000):
        body = [{"ts": iso(t), "values": {m: v}} for m, t, v in items[i : i + 1000]]
        r = await gw.post(device, token, body)
        assert r.status_code == 200, r.text
        assert r.json()["accepted"] == len(body)


def expected(data: dict[str, dict[int, float]]) -> tuple[int, int]:
    """(readings, readings timed at or after SINCE), counted here."""
    every = [t for series in data.values() for t in series]
    return len(every), sum(t >= SINCE for t in every)


class TestRecentCounts:
    @pytest.mark.parametrize("target", [100, packed.TARGET])
    async def test_exact_over_rows_chunks_and_rollups(
        self, gateway: Gateway, monkeypatch: pytest.MonkeyPatch, target: int
    ) -> None:
        monkeypatch.setattr(packed, "TARGET", target)
        data = {
            "a": {"t": dense(1), "h": sparse(2)},
            "b": {"t": sparse(3)},
            "c": {"p": dense(4)},
        }
        for device, series in data.items():
            await post(gateway, device, await gateway.create_device(device), series)
        await gateway.create_device("empty")
        # Readings the 24 h window does not reach, only for the total.
        old = {"t": {SINCE - 5 * DAY + k * S for k in range(50)}}
        await post(
            gateway,
            "b",
            await rotate(gateway, "b"),
            {m: dict.fromkeys(ts, 0.0) for m, ts in old.items()},
        )
        data["b"]["t"] |= dict.fromkeys(old["t"], 0.0)

        async def check(phase: str) -> None:
            views = {
                v["id"]: v
                for v in await describe_devices(
                    await registry.list_devices(after=None, limit=10), now=NOW
                )
            }
            for device, series in data.items():
                total, recent = expected(series)
                assert (views[device]["readings"], views[device]["readings_24h"]) == (
                    total,
                    recent,
                ), (phase, device)
            assert (views["empty"]["readings"], views["empty"]["readings_24h"]) == (0, 0)

        await check("rows")
        # Packed up to an hour edge inside the window, then everything up to an hour ago.
        await maintenance.pack(SINCE - SINCE % HOUR + HOUR)
        await check("packed across the window's start")
        await maintenance.run_once(now_us=NOW + 3 * HOUR, compress_after_us=HOUR, retention_days=0)
        await check("packed but the last hours")
        # Late readings into the packed range, around the window's start: rows beside chunks.
        late = {SINCE + 2 * S * k + 3 for k in range(-20, 20)}
        late_data = dict.fromkeys(late, 9.0)
        await post(gateway, "a", await rotate(gateway, "a"), {"t": late_data})
        data["a"]["t"] |= late_data
        assert late_data
        await check("late rows beside chunks")
        await maintenance.run_once(now_us=NOW + 3 * HOUR, compress_after_us=HOUR, retention_days=0)
        await check("late rows packed")
        # From any microsecond: a minute across it makes the chunk decoded.
        for since in (SINCE + 7, SINCE - 2 * S - 1, SINCE + HOUR + 1):
            stats = await readings.series_stats(connection(), list(data), since)
            for device, series in data.items():
                got = {m: s["since"] for m, s in stats[device].items()}
                assert got == {m: sum(t >= since for t in ts) for m, ts in series.items()}
        # More series than one statement takes (500 a statement), with the real ones last.
        ids = [int(r[0]) for r in await fetch(connection(), "SELECT id FROM series")]
        alone = await packed.packed_counts_since(connection(), ids, SINCE + 7)
        assert sum(alone.values()) > 0
        padded = [*range(10**6, 10**6 + 1200), *ids]
        assert await packed.packed_counts_since(connection(), padded, SINCE + 7) == alone

    async def test_the_api_answers_them_on_the_list_and_the_device(self, gateway: Gateway) -> None:
        token = await gateway.create_device("dev")
        await gateway.create_device("other")
        now = now_us()
        ts = [now - 30 * HOUR, now - 25 * HOUR, now - 23 * HOUR, now - HOUR, now - 5 * S]
        r = await gateway.post(
            "dev", token, [{"ts": iso(t), "values": {"t": 1.0, "h": 2.0}} for t in ts]
        )
        assert r.json()["accepted"] == 10
        letters = [
            letter("dev", now - 25 * HOUR),
            letter("dev", now - 23 * HOUR),
            letter("dev", now - 5 * S),
            letter("other", now - 5 * S),
            letter(None, now - 5 * S),
        ]
        await insert_letters(letters, payload_limit=100)
        r = await gateway.client.get("/api/v1/devices", headers=gateway.admin)
        views = {d["id"]: d for d in r.json()["devices"]}
        assert (views["dev"]["readings"], views["dev"]["readings_24h"]) == (10, 6)
        assert views["dev"]["rejected_24h"] == 2
        assert (views["other"]["readings_24h"], views["other"]["rejected_24h"]) == (0, 1)
        one = await gateway.client.get("/api/v1/devices/dev", headers=gateway.admin)
        assert one.json() == views["dev"]
        created = await gateway.client.post(
            "/api/v1/devices", json={"id": "new"}, headers=gateway.admin
        )
        assert (created.json()["readings_24h"], created.json()["rejected_24h"]) == (0, 0)

    async def test_rejected_24h_counts_from_the_window_start(self, gateway: Gateway) -> None:
        for device in ("x", "y"):
            await gateway.create_device(device)
        times = {"x": [SINCE - 1, SINCE, SINCE + 1, NOW, NOW + HOUR], "y": [SINCE - 2 * DAY]}
        await insert_letters(
            [letter(d, t) for d, ts in times.items() for t in ts], payload_limit=100
        )
        views = await describe_devices(await registry.list_devices(after=None, limit=10), now=NOW)
        assert [(v["id"], v["rejected_24h"]) for v in views] == [("x", 4), ("y", 0)]


def letter(device: str | None, received_us: int) -> Letter:
    return Letter(
        received_us, "mqtt", device, f"devices/{device}/telemetry", "invalid_json", "bad", b"{"
    )


async def rotate(gw: Gateway, device: str) -> str:
    r = await gw.client.post(f"/api/v1/devices/{device}/token", headers=gw.admin)
    assert r.status_code == 200, r.text
    return str(r.json()["token"])
