"""POST /devices/{id}/telemetry over HTTP, on SQLite and PostgreSQL: what is stored, what is
rejected and why, duplicates, size limits, backpressure, and group commit."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, ClassVar

import httpx
import pytest
from pydantic import ValidationError

from tests.conftest import Gateway, make_settings
from tests.harness import read_points, running, sample, scrape, stored, wait_until, writes_held

T0 = 1_700_000_000_000  # epoch ms, 2023-11-14T22:13:20Z
T0_ISO = "2023-11-14T22:13:20Z"
T1_ISO = "2023-11-14T22:13:21Z"


@dataclass
class Dev:
    gw: Gateway
    id: str
    token: str

    async def post(self, body: Any) -> httpx.Response:
        return await self.gw.post(self.id, self.token, body)

    async def points(self, metric: str) -> list[dict[str, Any]]:
        return await read_points(self.gw, self.id, metric)

    async def stored(self) -> list[tuple[str, int, float]]:
        return await stored(self.gw.settings.database_url, self.id)


async def new_dev(gw: Gateway, device_id: str = "dev-1") -> Dev:
    return Dev(gw, device_id, await gw.create_device(device_id))


@pytest.fixture
async def dev(gateway: Gateway) -> Dev:
    return await new_dev(gateway)


def error_of(r: httpx.Response) -> dict[str, Any]:
    """The error object of an error answer, checked for our shape."""
    assert r.headers["content-type"].startswith("application/json")
    err = r.json()["error"]
    assert set(err) == {"code", "message", "details"}
    assert isinstance(err["message"], str)
    assert err["message"]
    assert isinstance(err["details"], list)
    return dict(err)


def now_ms() -> int:
    return int(time.time() * 1000)


@pytest.fixture
def database_url(emptied_database_url: str) -> str:
    """PostgreSQL: one database for the module's tests, emptied before each (conftest)."""
    return emptied_database_url


class TestRejectionCodes:
    # (the bad message as raw JSON, its code, the metric the rejection names); every variant of
    # each code is in test_formats.py, here each code once or twice, through HTTP into both stores.
    CASES: ClassVar[list[tuple[bytes, str, str | None]]] = [
        (b"42", "invalid_message", None),
        (b"[]", "invalid_message", None),
        (b'{"values": {"x": 1}, "unit": "C"}', "unknown_field", None),
        (b'{"ts": 1700000001000, "values": [1, 2]}', "invalid_values", None),
        (b'{"ts": 1700000001000, "values": {}}', "empty_values", None),
        (b'{"ts": "last tuesday", "values": {"x": 1}}', "invalid_timestamp", None),
        (b'{"ts": "2023-11-14T22:13:21", "values": {"x": 1}}', "invalid_timestamp", None),
        (b'{"ts": -1000, "values": {"x": 1}}', "timestamp_before_epoch", None),
        (b'{"ts": 1700000001, "values": {"x": 1}}', "timestamp_too_old", None),  # epoch seconds
        (b'{"ts": "2999-01-01T00:00:00Z", "values": {"x": 1}}', "timestamp_in_future", None),
        (b'{"ts": 1700000001000, "values": {"bad name": 1}}', "invalid_metric", "bad name"),
        (b'{"ts": 1700000001000, "values": {"x": "21.5"}}', "invalid_value", "x"),
        (b'{"ts": 1700000001000, "values": {"x": NaN}}', "non_finite_value", "x"),
        (b'{"ts": 1700000001000, "values": {"x": Infinity}}', "non_finite_value", "x"),
        (b'{"ts": 1700000001000, "values": {"x": 1e999}}', "non_finite_value", "x"),
    ]

    @pytest.mark.parametrize(("bad", "code", "metric"), CASES)
    async def test_rejected_beside_stored_neighbours(
        self, dev: Dev, bad: bytes, code: str, metric: str | None
    ) -> None:
        before = json.dumps({"ts": T0, "values": {"good": 1.5}}).encode()
        after = json.dumps({"ts": T0 + 1000, "values": {"good": 2.5, "other": 3}}).encode()
        r = await dev.post(b"[" + before + b", " + bad + b", " + after + b"]")
        assert r.status_code == 200, r.text
        answer = r.json()
        assert answer["accepted"] == 3
        assert answer["duplicates"] == 0
        assert len(answer["rejected"]) == 1
        rejection = answer["rejected"][0]
        assert set(rejection) == {"index", "metric", "code", "message"}
        assert rejection["index"] == 1
        assert rejection["code"] == code
        assert rejection["metric"] == metric
        assert rejection["message"]
        assert await dev.points("good") == [
            {"ts": T0_ISO, "value": 1.5},
            {"ts": T1_ISO, "value": 2.5},
        ]
        assert await dev.points("other") == [{"ts": T1_ISO, "value": 3.0}]
        assert await dev.points("x") == []
        assert len(await dev.stored()) == 3  # the rejected message stored nothing

    async def test_bad_readings_beside_a_good_one_in_the_same_message(self, dev: Dev) -> None:
        r = await dev.post(b'{"ts": 1700000000000, "values": {"good": 1.5, "n": NaN, "b c": 1}}')
        assert r.status_code == 200, r.text
        answer = r.json()
        assert answer["accepted"] == 1
        assert [(x["index"], x["metric"], x["code"]) for x in answer["rejected"]] == [
            (0, "n", "non_finite_value"),
            (0, "b c", "invalid_metric"),
        ]
        assert await dev.points("good") == [{"ts": T0_ISO, "value": 1.5}]
        assert await dev.stored() == [("good", T0 * 1000, 1.5)]

    async def test_booleans_are_stored_as_one_and_zero(self, dev: Dev) -> None:
        r = await dev.post(
            [{"ts": T0, "values": {"door": True}}, {"ts": T0 + 1, "values": {"door": False}}]
        )
        assert r.json()["accepted"] == 2
        assert [p["value"] for p in await dev.points("door")] == [1.0, 0.0]

    async def test_rfc3339_offsets_and_fractions_are_stored_in_utc(self, dev: Dev) -> None:
        r = await dev.post(
            [
                {"ts": "2023-11-15T00:13:20.5+02:00", "values": {"t": 1}},
                {"ts": "2023-11-14T22:13:20.123456Z", "values": {"t": 2}},
                {"ts": 1_700_000_000_000.25, "values": {"t": 3}},
            ]
        )
        assert r.json()["accepted"] == 3
        assert await dev.points("t") == [
            {"ts": "2023-11-14T22:13:20.000250Z", "value": 3.0},
            {"ts": "2023-11-14T22:13:20.123456Z", "value": 2.0},
            {"ts": "2023-11-14T22:13:20.500Z", "value": 1.0},
        ]

    async def test_missing_ts_is_the_receive_time(self, dev: Dev) -> None:
        before = now_ms()
        r = await dev.post({"values": {"t": 20.0}})
        after = now_ms()
        assert r.status_code == 200, r.text
        rows = await dev.stored()
        assert len(rows) == 1
        assert before * 1000 <= rows[0][1] <= (after + 1) * 1000

    async def test_rejections_are_counted_in_metrics(self, dev: Dev) -> None:
        labels = {"transport": "http", "code": "empty_values"}
        before = sample(await scrape(dev.gw.client), "fieldgate_readings_rejected_total", labels)
        await dev.post([{"values": {}}, {"values": {}}, {"values": {"ok": 1}}])
        after = sample(await scrape(dev.gw.client), "fieldgate_readings_rejected_total", labels)
        assert after - before == 2


class TestWholeRequest:
    @pytest.mark.parametrize(
        "body", [b"{oops", b"", b"temperature=21.5", b"\xff\xfe", b"[{}", b"[" * 50_000]
    )
    async def test_not_json_is_400(self, dev: Dev, body: bytes) -> None:
        r = await dev.post(body)
        assert r.status_code == 400, r.text
        assert error_of(r)["code"] == "invalid_json"
        assert await dev.stored() == []

    async def test_nothing_valid_is_422_with_the_rejections_as_details(self, dev: Dev) -> None:
        r = await dev.post(
            [{"ts": T0, "values": {"t": "warm"}}, {"ts": -5, "values": {"t": 1}}, {"values": {}}]
        )
        assert r.status_code == 422, r.text
        err = error_of(r)
        assert err["code"] == "no_valid_readings"
        assert [(d["index"], d["metric"], d["code"]) for d in err["details"]] == [
            (0, "t", "invalid_value"),
            (1, None, "timestamp_before_epoch"),
            (2, None, "empty_values"),
        ]
        assert all(d["message"] for d in err["details"])
        assert await dev.stored() == []

    @pytest.mark.parametrize("body", [[], b"[]"])
    async def test_no_messages_is_422(self, dev: Dev, body: Any) -> None:
        r = await dev.post(body)
        assert r.status_code == 422, r.text
        assert error_of(r)["code"] == "no_valid_readings"

    async def test_a_single_message_and_an_array_both_work(self, dev: Dev) -> None:
        r1 = await dev.post({"ts": T0, "values": {"a": 1, "b": 2}})
        r2 = await dev.post([{"ts": T0 + 1000, "values": {"a": 3}}])
        assert r1.status_code == r2.status_code == 200
        assert r1.json() == {"accepted": 2, "duplicates": 0, "rejected": []}
        assert r2.json() == {"accepted": 1, "duplicates": 0, "rejected": []}
        assert await dev.stored() == [
            ("a", T0 * 1000, 1.0),
            ("a", (T0 + 1000) * 1000, 3.0),
            ("b", T0 * 1000, 2.0),
        ]

    async def test_two_xx_means_committed(self, dev: Dev) -> None:
        """A fresh connection (which sees committed rows only) finds them right after the 200."""
        for i in range(5):
            r = await dev.post({"ts": T0 + i, "values": {"t": i}})
            assert r.status_code == 200, r.text
            rows = await dev.stored()
            assert len(rows) == i + 1
            assert rows[-1] == ("t", (T0 + i) * 1000, float(i))

    async def test_large_request_parsed_off_the_loop(self, dev: Dev) -> None:
        messages = [{"ts": T0 + i, "values": {"a": i, "b": -i}} for i in range(5_000)]
        body = json.dumps(messages).encode()
        assert len(body) > 256 * 1024  # parsed in a worker thread
        r = await dev.post(body)
        assert r.status_code == 200, r.text
        assert r.json() == {"accepted": 10_000, "duplicates": 0, "rejected": []}
        rows = await dev.stored()
        assert len(rows) == 10_000
        assert rows[4_999] == ("a", (T0 + 4_999) * 1000, 4_999.0)
        assert rows[5_000] == ("b", T0 * 1000, 0.0)


class TestDuplicates:
    async def test_within_one_request(self, dev: Dev) -> None:
        r = await dev.post(
            [
                {"ts": T0, "values": {"t": 1, "h": 50}},
                {"ts": T0, "values": {"t": 2}},
                {"ts": T0, "values": {"t": 3}},
                {"ts": T0 + 1, "values": {"t": 4}},
            ]
        )
        assert r.status_code == 200, r.text
        assert r.json() == {"accepted": 3, "duplicates": 2, "rejected": []}
        assert await dev.stored() == [
            ("h", T0 * 1000, 50.0),
            ("t", T0 * 1000, 1.0),
            ("t", (T0 + 1) * 1000, 4.0),
        ]

    async def test_across_requests_the_first_value_stays(self, dev: Dev) -> None:
        first = await dev.post({"ts": T0, "values": {"t": 1, "h": 50}})
        assert first.json() == {"accepted": 2, "duplicates": 0, "rejected": []}
        again = await dev.post({"ts": T0, "values": {"t": 99, "h": 50}})
        assert again.status_code == 200, again.text
        assert again.json() == {"accepted": 0, "duplicates": 2, "rejected": []}
        mixed = await dev.post({"ts": T0, "values": {"t": 1, "new": 7}})
        assert mixed.json() == {"accepted": 1, "duplicates": 1, "rejected": []}
        assert await dev.stored() == [
            ("h", T0 * 1000, 50.0),
            ("new", T0 * 1000, 7.0),
            ("t", T0 * 1000, 1.0),
        ]

    async def test_same_reading_of_two_devices_is_no_duplicate(self, dev: Dev) -> None:
        other = await new_dev(dev.gw, "dev-2")
        assert (await dev.post({"ts": T0, "values": {"t": 1}})).json()["accepted"] == 1
        assert (await other.post({"ts": T0, "values": {"t": 1}})).json()["accepted"] == 1

    async def test_duplicates_are_counted_in_metrics(self, dev: Dev) -> None:
        name = "fieldgate_readings_duplicate_total"
        before = sample(await scrape(dev.gw.client), name, {"transport": "http"})
        await dev.post({"ts": T0, "values": {"t": 1, "u": 2}})
        await dev.post({"ts": T0, "values": {"t": 1, "u": 2}})
        after = sample(await scrape(dev.gw.client), name, {"transport": "http"})
        assert after - before == 2


class TestLimits:
    async def test_body_over_the_limit_is_413(self, small_gateway: Gateway) -> None:
        dev = await new_dev(small_gateway)
        body = json.dumps({"ts": T0, "values": {f"m{i:04d}": i for i in range(100)}}).encode()
        assert len(body) > 1024
        r = await dev.post(body)
        assert r.status_code == 413, r.text
        assert error_of(r)["code"] == "payload_too_large"
        assert await dev.stored() == []

    async def test_streamed_body_over_the_limit_is_413(self, small_gateway: Gateway) -> None:
        """No Content-Length (chunked): the limit holds while reading."""
        dev = await new_dev(small_gateway)

        async def chunks() -> AsyncIterator[bytes]:
            yield b'{"ts": 1700000000000, "values": {'
            for i in range(100):
                yield f'"m{i:04d}": {i}, '.encode()
            yield b'"last": 1}}'

        r = await small_gateway.client.post(
            f"/api/v1/devices/{dev.id}/telemetry",
            content=chunks(),
            headers={"Authorization": f"Bearer {dev.token}"},
        )
        assert "content-length" not in r.request.headers
        assert r.status_code == 413, r.text
        assert error_of(r)["code"] == "payload_too_large"
        assert await dev.stored() == []

    async def test_body_at_the_limit_is_fine(self, small_gateway: Gateway) -> None:
        dev = await new_dev(small_gateway)
        body = json.dumps({"ts": T0, "values": {"t": 1}}).encode()
        body = body + b" " * (1024 - len(body))
        assert len(body) == 1024
        r = await dev.post(body)
        assert r.status_code == 200, r.text

    async def test_too_many_messages_is_413(self, small_gateway: Gateway) -> None:
        dev = await new_dev(small_gateway)
        r = await dev.post([{"ts": T0 + i, "values": {"t": i}} for i in range(4)])
        assert r.status_code == 413, r.text
        assert error_of(r)["code"] == "too_many_messages"
        assert await dev.stored() == []
        r = await dev.post([{"ts": T0 + i, "values": {"t": i}} for i in range(3)])
        assert r.status_code == 200, r.text
        assert r.json()["accepted"] == 3

    async def test_future_skew_is_a_setting(self, database_url: str) -> None:
        async with running(make_settings(database_url, max_future_skew_s=10)) as gw:
            dev = await new_dev(gw)
            now = now_ms()
            r = await dev.post(
                [
                    {"ts": now + 60_000, "values": {"t": 1}},  # inside the default 5 min
                    {"ts": now + 5_000, "values": {"t": 2}},
                ]
            )
            assert r.status_code == 200, r.text
            assert r.json()["accepted"] == 1
            assert [(x["index"], x["code"]) for x in r.json()["rejected"]] == [
                (0, "timestamp_in_future")
            ]
            assert [v for _, _, v in await dev.stored()] == [2.0]

    async def test_epoch_seconds_are_refused_and_named(self, dev: Dev) -> None:
        seconds = now_ms() // 1000
        r = await dev.post([{"ts": seconds, "values": {"t": 1}}, {"ts": T0, "values": {"t": 2}}])
        assert r.status_code == 200, r.text
        [rejection] = r.json()["rejected"]
        assert (rejection["index"], rejection["code"]) == (0, "timestamp_too_old")
        assert (
            f"{seconds} looks like epoch seconds (x1000 for milliseconds)" in (rejection["message"])
        )
        assert await dev.stored() == [("t", T0 * 1000, 2.0)]

        r = await dev.post({"ts": seconds, "values": {"t": 1}})
        assert r.status_code == 422, r.text
        assert [d["code"] for d in error_of(r)["details"]] == ["timestamp_too_old"]

    async def test_the_earliest_time_is_a_setting(self, database_url: str) -> None:
        settings = make_settings(database_url, min_timestamp="2023-11-14")
        assert settings.min_timestamp == datetime(2023, 11, 14, tzinfo=UTC)
        async with running(settings) as gw:
            dev = await new_dev(gw)
            r = await dev.post(
                [
                    {"ts": "2023-11-13T23:59:59.999Z", "values": {"t": 1}},
                    {"ts": "2023-11-14T00:00:00Z", "values": {"t": 2}},
                ]
            )
            assert r.status_code == 200, r.text
            assert [(x["index"], x["code"]) for x in r.json()["rejected"]] == [
                (0, "timestamp_too_old")
            ]
            assert "before 2023-11-14T00:00:00Z" in r.json()["rejected"][0]["message"]
            assert [v for _, _, v in await dev.stored()] == [2.0]

    @pytest.mark.parametrize("value", ["1969-12-31T23:59:59Z", "2000-01-01T00:00:00", "soon"])
    def test_an_unusable_earliest_time_is_refused(self, value: str) -> None:
        with pytest.raises(ValidationError, match=r"(?i)min_timestamp"):
            make_settings("sqlite://:memory:", min_timestamp=value)

    async def test_queue_full_is_503_with_retry_after(self, small_gateway: Gateway) -> None:
        gw = small_gateway
        dev = await new_dev(gw)
        writer = gw.app.state.runtime.writer
        warm = await dev.post({"ts": T0, "values": {"t": 0}})  # caches the token and series
        assert warm.status_code == 200, warm.text
        async with writes_held(gw):
            first = asyncio.create_task(
                dev.post([{"ts": T0 + i, "values": {"t": i}} for i in range(1, 4)])
            )
            await wait_until(lambda: writer.pending == 3)  # the queue is full, nothing commits
            r = await dev.post({"ts": T0 + 10, "values": {"t": 10}})
            assert r.status_code == 503, r.text
            assert r.headers["retry-after"] == "7"
            assert error_of(r)["code"] == "queue_full"
            assert not first.done()  # still waiting for its commit
        answer = await first
        assert answer.status_code == 200, answer.text
        assert answer.json()["accepted"] == 3
        assert [ts for _, ts, _ in await dev.stored()] == [(T0 + i) * 1000 for i in range(4)]
        assert writer.pending == 0
        retry = await dev.post({"ts": T0 + 10, "values": {"t": 10}})
        assert retry.status_code == 200, retry.text
        assert len(await dev.stored()) == 5


class TestGroupCommit:
    async def test_concurrent_requests_are_all_committed(self, dev: Dev) -> None:
        async def post(i: int) -> httpx.Response:
            return await dev.post(
                [{"ts": T0 + i * 10 + j, "values": {"t": i, "u": j}} for j in range(10)]
            )

        answers = await asyncio.gather(*(post(i) for i in range(50)))
        assert [r.status_code for r in answers] == [200] * 50
        assert sum(r.json()["accepted"] for r in answers) == 1_000
        assert len(await dev.points("t")) == 500
        assert len(await dev.stored()) == 1_000

    async def test_concurrent_requests_share_commits(self, dev: Dev) -> None:
        gw = dev.gw
        writer = gw.app.state.runtime.writer
        assert (await dev.post({"ts": T0, "values": {"t": 0}})).status_code == 200
        text = await scrape(gw.client)
        commits_before = sample(text, "fieldgate_writer_batch_requests_count")
        requests_before = sample(text, "fieldgate_writer_batch_requests_sum")
        n = 40
        async with writes_held(gw):
            posts = asyncio.gather(
                *(dev.post({"ts": T0 + 1 + i, "values": {"t": i}}) for i in range(n))
            )
            await wait_until(lambda: writer.pending == n)
        answers = await posts
        assert [r.status_code for r in answers] == [200] * n
        assert all(r.json()["accepted"] == 1 for r in answers)
        text = await scrape(gw.client)
        commits = sample(text, "fieldgate_writer_batch_requests_count") - commits_before
        requests = sample(text, "fieldgate_writer_batch_requests_sum") - requests_before
        assert requests == n
        assert 1 <= commits <= 2  # the commit that was waiting, then all the rest in one
        assert len(await dev.stored()) == n + 1

    async def test_same_reading_in_two_requests_of_one_commit(self, dev: Dev) -> None:
        gw = dev.gw
        writer = gw.app.state.runtime.writer
        assert (await dev.post({"ts": T0, "values": {"t": 0}})).status_code == 200
        async with writes_held(gw):
            posts = asyncio.gather(
                *(dev.post({"ts": T0 + 1, "values": {"t": 5}}) for _ in range(3))
            )
            await wait_until(lambda: writer.pending == 3)
        answers = [r.json() for r in await posts]
        assert sorted(a["accepted"] for a in answers) == [0, 0, 1]
        assert sum(a["duplicates"] for a in answers) == 2
        assert await dev.stored() == [("t", T0 * 1000, 0.0), ("t", (T0 + 1) * 1000, 5.0)]
