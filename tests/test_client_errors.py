"""A client's mistake is a 4xx with a code, never a 5xx, on both databases (issue 8, section 2):
device ids that cannot exist, NUL and lone surrogates in parameters and bodies, numbers and
times beyond 64 bits, and the aggregate that asks only for `count`."""

from __future__ import annotations

from typing import Any

import httpx
import pytest

from tests.conftest import Gateway

T0 = 1_700_000_000_000  # epoch ms
LONG_ID = "a" * 65


@pytest.fixture
def database_url(emptied_database_url: str) -> str:
    return emptied_database_url


def expect(r: httpx.Response, status: int, code: str) -> None:
    assert r.status_code == status, (r.request.method, str(r.request.url)[:200], r.text[:500])
    err = r.json()["error"]
    assert set(err) == {"code", "message", "details"}
    assert err["message"]
    assert err["code"] == code, (str(r.request.url)[:200], r.text[:500])


async def seeded(gw: Gateway) -> str:
    """A device `dev` with readings of `t`; its token."""
    token = await gw.create_device("dev")
    r = await gw.post("dev", token, [{"ts": T0 + i * 1000, "values": {"t": i}} for i in range(5)])
    assert r.status_code == 200, r.text
    return token


class TestDeviceIdsInPaths:
    """One place (the registry) decides that a text which cannot be a device id names no device."""

    @pytest.mark.parametrize("device_id", [LONG_ID, "b" * 1000, "has space", "é"])
    async def test_every_device_route_answers_404(self, gateway: Gateway, device_id: str) -> None:
        await seeded(gateway)
        a = gateway.admin
        c = gateway.client
        base = f"/api/v1/devices/{device_id}"
        for r in [
            await c.get(base, headers=a),
            await c.patch(base, json={"name": "x"}, headers=a),
            await c.delete(base, headers=a),
            await c.post(f"{base}/token", headers=a),
            await c.get(f"{base}/telemetry", params={"metric": "t"}, headers=a),
            await c.get(f"{base}/telemetry/latest", headers=a),
            await c.get(f"{base}/telemetry/aggregate", params={"metric": "t"}, headers=a),
            await c.get(
                "/api/v1/telemetry/aggregate",
                params={"metric": "t", "device": ["dev", device_id]},
                headers=a,
            ),
        ]:
            expect(r, 404, "device_not_found")

    async def test_64_characters_is_a_device_id(self, gateway: Gateway) -> None:
        r = await gateway.client.get(f"/api/v1/devices/{'a' * 64}", headers=gateway.admin)
        expect(r, 404, "device_not_found")
        await gateway.create_device("a" * 64)
        r = await gateway.client.get(f"/api/v1/devices/{'a' * 64}", headers=gateway.admin)
        assert r.status_code == 200, r.text

    async def test_a_device_list_cursor_that_no_page_gave_is_400(self, gateway: Gateway) -> None:
        await seeded(gateway)
        for cursor in [LONG_ID, "has space"]:
            r = await gateway.client.get(
                "/api/v1/devices", params={"cursor": cursor}, headers=gateway.admin
            )
            expect(r, 400, "invalid_cursor")
        r = await gateway.client.get(
            "/api/v1/devices", params={"cursor": "a"}, headers=gateway.admin
        )
        assert [d["id"] for d in r.json()["devices"]] == ["dev"]


class TestNulAndSurrogates:
    """PostgreSQL refuses NUL in text; a lone surrogate has no UTF-8: both are refused up front."""

    async def test_nul_in_any_path_or_query_parameter_is_400(self, gateway: Gateway) -> None:
        await seeded(gateway)
        urls = [
            "/api/v1/devices/%00",
            "/api/v1/devices/dev%00",
            "/api/v1/devices/%00/telemetry?metric=t",
            "/api/v1/devices/%00/telemetry/latest",
            "/api/v1/devices/%00/telemetry/aggregate?metric=t",
            "/api/v1/devices?cursor=%00",
            "/api/v1/rejected?device=%00",
            "/api/v1/rejected?cursor=%00",
            "/api/v1/devices/dev/telemetry?metric=t&cursor=%00",
            "/api/v1/devices/dev/telemetry?metric=t%00",
            "/api/v1/devices/dev/telemetry?metric=t&start=%00",
            "/api/v1/devices/dev/telemetry/aggregate?metric=t&window=1m%00",
            "/api/v1/telemetry/aggregate?metric=t&device=%00",
            "/api/v1/telemetry/aggregate?metric=t&device=dev&device=x%00y",
            "/api/v1/telemetry/aggregate?metric=t&tz=%00",
            "/api/v1/telemetry/aggregate?metric=t&agg=avg%00",
            "/api/v1/telemetry/aggregate?metric=t&%00=1",
        ]
        for url in urls:
            expect(await gateway.client.get(url, headers=gateway.admin), 400, "invalid_parameter")
        r = await gateway.client.delete("/api/v1/devices/dev%00", headers=gateway.admin)
        expect(r, 400, "invalid_parameter")
        r = await gateway.client.get("/api/v1/devices/dev", headers=gateway.admin)
        assert r.status_code == 200

    @pytest.mark.parametrize(
        "body",
        [
            b'{"id": "n1", "name": "a\\u0000b"}',
            b'{"id": "n1", "metadata": {"k": "a\\u0000"}}',
            b'{"id": "n1", "metadata": {"k\\u0000": 1}}',
            b'{"id": "n1", "metadata": {"k": [{"deep": ["\\u0000"]}]}}',
            b'{"id": "n1", "name": "\\ud800"}',
            b'{"id": "n1", "metadata": {"\\udfff": 1}}',
            b'{"id": "n1", "metadata": {"k": ["x\\ud800y"]}}',
            b'{"id": "\\ud800"}',
            b'{"id": "n1", "\\ud800": 1}',
        ],
    )
    async def test_in_a_device_body_is_4xx(self, gateway: Gateway, body: bytes) -> None:
        # A NUL is valid JSON that no database stores: 422 invalid_body. A lone surrogate
        # escape is not text: the JSON reader (pydantic's, as for any body) refuses it: 400.
        status, code = (400, "invalid_json") if b"\\ud" in body else (422, "invalid_body")
        headers = {**gateway.admin, "Content-Type": "application/json"}
        r = await gateway.client.post("/api/v1/devices", content=body, headers=headers)
        expect(r, status, code)
        await gateway.create_device("n2")
        patch = body.replace(b'"id": "n1", ', b"")
        r = await gateway.client.patch("/api/v1/devices/n2", content=patch, headers=headers)
        expect(r, status, code)
        r = await gateway.client.get("/api/v1/devices", headers=gateway.admin)
        assert [(d["id"], d["name"], d["metadata"]) for d in r.json()["devices"]] == [
            ("n2", "", {})
        ]


class TestMetadataNumbers:
    """Metadata is stored as sent on both databases, or refused: integers within 64 bits, finite
    numbers, nesting of at most 32 levels."""

    @pytest.mark.parametrize(
        "metadata",
        [
            b"10" + b"0" * 29,
            b"-1" + b"0" * 30,
            b"9223372036854775808",
            b"-9223372036854775809",
            b"1e400",
            b"-1e400",
            b"NaN",
            b"Infinity",
        ],
    )
    async def test_unstorable_numbers_are_422(self, gateway: Gateway, metadata: bytes) -> None:
        headers = {**gateway.admin, "Content-Type": "application/json"}
        body = b'{"id": "m", "metadata": {"n": [' + metadata + b"]}}"
        r = await gateway.client.post("/api/v1/devices", content=body, headers=headers)
        expect(r, 422, "invalid_body")
        await gateway.create_device("m")
        patch = b'{"metadata": {"n": ' + metadata + b"}}"
        r = await gateway.client.patch("/api/v1/devices/m", content=patch, headers=headers)
        expect(r, 422, "invalid_body")
        r = await gateway.client.get("/api/v1/devices/m", headers=gateway.admin)
        assert r.json()["metadata"] == {}

    async def test_the_extremes_round_trip(self, gateway: Gateway) -> None:
        metadata: dict[str, Any] = {
            "big": 2**63 - 1,
            "small": -(2**63),
            "float": 1.7976931348623157e308,
            "tiny": 5e-324,
            "text": "ünïcødé \U0001f600",
            "deep": [],
        }
        inner: list[Any] = metadata["deep"]
        for _ in range(30):  # the object is level 1, "deep" level 2: 32 levels in all
            inner.append([])
            inner = inner[0]
        await gateway.create_device("x", metadata=metadata)
        r = await gateway.client.get("/api/v1/devices/x", headers=gateway.admin)
        assert r.json()["metadata"] == metadata
        inner.append([])
        r = await gateway.client.patch(
            "/api/v1/devices/x", json={"metadata": metadata}, headers=gateway.admin
        )
        expect(r, 422, "invalid_body")

    async def test_a_number_past_the_json_reader_is_400(self, gateway: Gateway) -> None:
        r = await gateway.client.post(
            "/api/v1/devices",
            content=b'{"id": "m", "metadata": {"n": 1' + b"0" * 5000 + b"}}",
            headers={**gateway.admin, "Content-Type": "application/json"},
        )
        expect(r, 400, "invalid_json")
        assert "number out of range" in r.json()["error"]["details"][0]["message"]

    async def test_a_body_that_is_not_utf8_is_400_invalid_json(self, gateway: Gateway) -> None:
        r = await gateway.client.post(
            "/api/v1/devices",
            content=b'{"id": "\xff"}',
            headers={**gateway.admin, "Content-Type": "application/json"},
        )
        expect(r, 400, "invalid_json")

    async def test_nesting_past_the_json_reader_is_400_invalid_json(self, gateway: Gateway) -> None:
        r = await gateway.client.post(
            "/api/v1/devices",
            content=b'{"id": "d", "metadata": {"k": ' + b"[" * 20_000 + b"]" * 20_000 + b"}}",
            headers={**gateway.admin, "Content-Type": "application/json"},
        )
        expect(r, 400, "invalid_json")
        assert "recursion limit" in r.json()["error"]["details"][0]["message"]


class TestTimesBeyond64Bits:
    """Every time, duration and cursor parses into a bounded range, or is a 400."""

    async def test_times_and_windows(self, gateway: Gateway) -> None:
        await seeded(gateway)
        raw = "/api/v1/devices/dev/telemetry"
        agg = "/api/v1/devices/dev/telemetry/aggregate"
        fleet = "/api/v1/telemetry/aggregate"
        bad: list[tuple[str, dict[str, str], str]] = [
            (raw, {"start": "-99999999999999d"}, "invalid_parameter"),
            (raw, {"end": "+99999999999999d"}, "invalid_parameter"),
            (raw, {"start": "-" + "9" * 24 + "w"}, "invalid_parameter"),
            (raw, {"start": "-" + "9" * 5000 + "s"}, "invalid_parameter"),
            (raw, {"start": "0001-01-01T00:00:00+14:00"}, "invalid_parameter"),
            (raw, {"end": "9999-12-31T23:59:59-14:00"}, "invalid_parameter"),
            (agg, {"window": "99999999999999999w"}, "invalid_parameter"),
            (agg, {"window": "1" + "0" * 30 + "s"}, "invalid_parameter"),
            (agg, {"window": "1" + "0" * 5000 + "s"}, "invalid_parameter"),
            (agg, {"start": "-99999999999999d"}, "invalid_parameter"),
            (fleet, {"end": "+99999999999999d"}, "invalid_parameter"),
            (fleet, {"window": "99999999999999999w"}, "invalid_parameter"),
            (
                agg,
                {
                    "start": "9999-12-01T00:00:00Z",
                    "end": "9999-12-31T23:00:00Z",
                    "window": "7d",
                    "tz": "Pacific/Kiritimati",
                },
                "invalid_range",
            ),
        ]
        for path, params, code in bad:
            r = await gateway.client.get(
                path, params={"metric": "t", **params}, headers=gateway.admin
            )
            expect(r, 400, code)
        good: list[tuple[str, dict[str, str]]] = [
            (raw, {"start": "0001-01-01T00:00:00Z", "end": "9999-12-31T23:59:59Z"}),
            (raw, {"start": "-2000w"}),
            (
                agg,
                {"start": "2023-11-14T00:00:00Z", "end": "9999-12-31T23:59:59Z", "window": "520w"},
            ),
            (agg, {"start": "-100w", "window": "10w", "tz": "Europe/Oslo"}),
        ]
        for path, params in good:
            r = await gateway.client.get(
                path, params={"metric": "t", **params}, headers=gateway.admin
            )
            assert r.status_code == 200, (params, r.text)

    async def test_rejected_cursor_beyond_bigint_is_400(self, gateway: Gateway) -> None:
        for cursor in [str(10**30), str(2**63), "²", "-1", "1.5", ""]:
            r = await gateway.client.get(
                "/api/v1/rejected", params={"cursor": cursor}, headers=gateway.admin
            )
            expect(r, 400, "invalid_cursor")
        r = await gateway.client.get(
            "/api/v1/rejected", params={"cursor": str(2**63 - 1)}, headers=gateway.admin
        )
        assert r.status_code == 200, r.text
        assert r.json() == {"rejected": [], "next_cursor": None}


class TestQueryParameterLimits:
    async def test_a_time_zone_name_too_long_for_a_file_is_400(self, gateway: Gateway) -> None:
        await seeded(gateway)
        for tz in ["a" * 300, "Europe/" + "x" * 5000]:
            r = await gateway.client.get(
                "/api/v1/telemetry/aggregate",
                params={"metric": "t", "tz": tz},
                headers=gateway.admin,
            )
            expect(r, 400, "invalid_tz")

    async def test_more_names_than_series_a_query_may_read_is_400(self, gateway: Gateway) -> None:
        """Beyond 1,000 names a query would also pass PostgreSQL's 32,767 parameters."""
        await seeded(gateway)
        many = [f"d{i}" for i in range(1001)]
        cases: list[tuple[str, dict[str, str | list[str]]]] = [
            ("/api/v1/telemetry/aggregate", {"metric": "t", "device": many}),
            ("/api/v1/telemetry/aggregate", {"metric": many}),
            ("/api/v1/devices/dev/telemetry/aggregate", {"metric": many}),
        ]
        for path, params in cases:
            r = await gateway.client.get(path, params=params, headers=gateway.admin)
            expect(r, 400, "too_many_series")
        r = await gateway.client.get(
            "/api/v1/devices/dev/telemetry/aggregate",
            params={"metric": ["t", *many[:999]], "start": "2023-11-14T00:00:00Z", "window": "1d"},
            headers=gateway.admin,
        )
        assert r.status_code == 200, r.text
        assert len(r.json()["series"]) == 1000


class TestCountAlone:
    async def test_agg_count_alone(self, gateway: Gateway) -> None:
        token = await gateway.create_device("dev")
        await gateway.create_device("other")
        r = await gateway.post(
            "dev", token, [{"ts": T0 + i * 20_000, "values": {"t": i}} for i in range(5)]
        )
        assert r.status_code == 200
        params = {
            "metric": "t",
            "agg": "count",
            "window": "1m",
            "start": "2023-11-14T22:13:00Z",
            "end": "2023-11-14T22:15:00Z",
        }
        want = [
            {"start": "2023-11-14T22:13:00Z", "count": 2},
            {"start": "2023-11-14T22:14:00Z", "count": 3},
        ]
        r = await gateway.client.get(
            "/api/v1/devices/dev/telemetry/aggregate", params=params, headers=gateway.admin
        )
        assert r.status_code == 200, r.text
        assert r.json()["buckets"] == want
        r = await gateway.client.get(
            "/api/v1/telemetry/aggregate",
            params={**params, "device": ["dev", "other"], "fill": "null"},
            headers=gateway.admin,
        )
        assert r.status_code == 200, r.text
        series = {s["device"]: s["buckets"] for s in r.json()["series"]}
        assert series["dev"] == want
        assert [b["count"] for b in series["other"]] == [0, 0]
        r = await gateway.client.get(
            "/api/v1/devices/dev/telemetry/aggregate",
            params=params,
            headers={**gateway.admin, "Accept": "text/csv"},
        )
        assert r.text.splitlines()[1:] == [
            "dev,t,2023-11-14T22:13:00Z,2",
            "dev,t,2023-11-14T22:14:00Z,3",
        ]
