"""ThingsBoard's device HTTP API (`POST /api/v1/{device_token}/telemetry`): its bodies, parsed by
devices/thingsboard.py and stored through the one ingest path on SQLite and PostgreSQL; its
answers; the token in the path, which never reaches a log or a metric label."""

from __future__ import annotations

import logging
import signal
from collections.abc import Callable
from typing import Any

import httpx
import orjson
import pytest

from devices.credentials import hash_token
from devices.formats import Code, PayloadError
from devices.models import Role
from devices.thingsboard import parse_thingsboard
from gateway.api.thingsboard import loggable_path
from gateway.store import registry
from tests.conftest import ADMIN_TOKEN, Gateway, GatewayProcess, make_settings
from tests.harness import new_token, running, sample, scrape, stored

T0 = 1_700_000_000_000  # epoch ms, 2023-11-14T22:13:20Z
NOW_US = (T0 + 60_000) * 1000
LIMITS: dict[str, Any] = {"now_us": NOW_US, "max_future_us": 300_000_000, "max_messages": 100}


def parse(body: Any) -> Any:
    return parse_thingsboard(body if isinstance(body, bytes) else orjson.dumps(body), **LIMITS)


def rows(readings: Any) -> list[tuple[str, int, float]]:
    return list(zip(readings.metrics, readings.ts, readings.values, strict=True))


def codes(readings: Any) -> list[tuple[int, str | None, str]]:
    return [(r.index, r.metric, r.code) for r in readings.rejected]


class TestShapes:
    """The four bodies ThingsBoard documents, and its converter's rules for the rest."""

    def test_key_values_are_timed_at_receipt(self) -> None:
        readings = parse({"temperature": 42, "humidity": 73.5})
        assert rows(readings) == [("temperature", NOW_US, 42.0), ("humidity", NOW_US, 73.5)]
        assert readings.messages == 1
        assert not readings.rejected

    def test_an_array_of_key_values(self) -> None:
        readings = parse([{"temperature": 42}, {"humidity": 73}])
        assert rows(readings) == [("temperature", NOW_US, 42.0), ("humidity", NOW_US, 73.0)]
        assert readings.messages == 2

    def test_ts_and_values(self) -> None:
        readings = parse({"ts": T0, "values": {"temperature": 42, "on": True, "off": False}})
        ts = T0 * 1000
        assert rows(readings) == [("temperature", ts, 42.0), ("on", ts, 1.0), ("off", ts, 0.0)]

    def test_an_array_of_ts_and_values(self) -> None:
        readings = parse([{"ts": T0, "values": {"t": 1}}, {"ts": T0 + 1000, "values": {"t": 2}}])
        assert rows(readings) == [("t", T0 * 1000, 1.0), ("t", (T0 + 1000) * 1000, 2.0)]

    def test_other_keys_beside_ts_and_values_are_ignored(self) -> None:
        readings = parse({"ts": T0, "values": {"t": 1}, "deviceName": "x"})
        assert rows(readings) == [("t", T0 * 1000, 1.0)]
        assert not readings.rejected

    def test_ts_without_values_is_one_more_key(self) -> None:
        # ThingsBoard's converter: the timestamped shape needs both keys.
        readings = parse({"ts": T0, "t": 1})
        assert rows(readings) == [("ts", NOW_US, float(T0)), ("t", NOW_US, 1.0)]

    def test_ts_as_a_string_of_digits(self) -> None:
        assert rows(parse({"ts": str(T0), "values": {"t": 1}})) == [("t", T0 * 1000, 1.0)]

    @pytest.mark.parametrize("ts", ["2023-11-14T22:13:20Z", None, True, [T0], "1" * 5000])
    def test_ts_that_is_no_epoch_ms_rejects_its_message(self, ts: Any) -> None:
        readings = parse([{"ts": T0, "values": {"a": 1}}, {"ts": ts, "values": {"b": 2}}])
        assert rows(readings) == [("a", T0 * 1000, 1.0)]
        assert codes(readings) == [(1, None, Code.INVALID_TIMESTAMP)]

    def test_values_are_decided_by_the_native_rules(self) -> None:
        readings = parse(
            {"n": 1, "s": "high", "j": {"x": 1}, "a": [1], "z": None, "bad name": 2, "b": False}
        )
        assert rows(readings) == [("n", NOW_US, 1.0), ("b", NOW_US, 0.0)]
        assert codes(readings) == [
            (0, "s", Code.INVALID_VALUE),
            (0, "j", Code.INVALID_VALUE),
            (0, "a", Code.INVALID_VALUE),
            (0, "z", Code.INVALID_VALUE),
            (0, "bad name", Code.INVALID_METRIC),
        ]

    def test_rejections_keep_the_bodys_indices(self) -> None:
        readings = parse(
            [
                {"ts": "yesterday", "values": {"a": 1}},  # refused here
                42,  # refused by the native parser
                {"ts": T0, "values": {"b": "x"}},
                {"ts": 1_000, "values": {"c": 1}},  # 1970: too old
                {},
                {"ts": T0, "values": {"d": 4}},
            ]
        )
        assert rows(readings) == [("d", T0 * 1000, 4.0)]
        assert codes(readings) == [
            (0, None, Code.INVALID_TIMESTAMP),
            (1, None, Code.INVALID_MESSAGE),
            (2, "b", Code.INVALID_VALUE),
            (3, None, Code.TIMESTAMP_TOO_OLD),
            (4, None, Code.EMPTY_VALUES),
        ]
        assert readings.messages == 6

    def test_not_json_and_too_many_messages_fail_whole(self) -> None:
        with pytest.raises(PayloadError) as not_json:
            parse(b"temperature=42")
        assert not_json.value.code == Code.INVALID_JSON
        with pytest.raises(PayloadError) as too_many:
            parse([{"t": 1}] * 101)
        assert too_many.value.code == Code.TOO_MANY_MESSAGES


def test_loggable_path_hides_the_token_only() -> None:
    assert loggable_path("/api/v1/fgd_secret/telemetry") == "/api/v1/***/telemetry"
    assert loggable_path("/mount/api/v1/fgd_secret/telemetry/") == "/mount/api/v1/***/telemetry/"
    for path in ("/api/v1/devices/d-1/telemetry", "/api/v1/telemetry/aggregate", "/api/v1/tokens"):
        assert loggable_path(path) == path


# --- over HTTP, on SQLite and PostgreSQL ---


def tb_url(token: str) -> str:
    return f"/api/v1/{token}/telemetry"


async def tb_post(gw: Gateway, token: str, body: Any) -> httpx.Response:
    kwargs: dict[str, Any] = {"content": body} if isinstance(body, bytes) else {"json": body}
    return await gw.client.post(tb_url(token), **kwargs)


def error_code(r: httpx.Response) -> str:
    return str(r.json()["error"]["code"])


class TestApi:
    async def test_each_shape_is_stored_and_answered_200_empty(self, gateway: Gateway) -> None:
        token = await gateway.create_device("tb-1")
        bodies = [
            {"ts": T0, "values": {"temperature": 42, "humidity": 73}},
            [{"ts": T0 + 1, "values": {"temperature": 43}}, {"ts": T0 + 2, "values": {"on": True}}],
            {"pressure": 1013.25},
            [{"pressure": 1014}],
        ]
        for body in bodies:
            r = await tb_post(gateway, token, body)
            assert r.status_code == 200, r.text
            assert r.content == b""
        got = await stored(gateway.settings.database_url, "tb-1")
        timed = [g for g in got if g[0] != "pressure"]
        assert timed == [
            ("humidity", T0 * 1000, 73.0),
            ("on", (T0 + 2) * 1000, 1.0),
            ("temperature", T0 * 1000, 42.0),
            ("temperature", (T0 + 1) * 1000, 43.0),
        ]
        # Both key-value posts are timed at receipt: two readings (different receive times).
        assert sorted(v for m, _, v in got if m == "pressure") == [1013.25, 1014.0]

    async def test_partly_valid_is_200_and_stores_the_valid(self, gateway: Gateway) -> None:
        token = await gateway.create_device("tb-1")
        before = sample(
            await scrape(gateway.client),
            "fieldgate_readings_rejected_total",
            {"transport": "http", "code": "invalid_value"},
        )
        r = await tb_post(gateway, token, {"ts": T0, "values": {"t": 1, "label": "ok"}})
        assert r.status_code == 200, r.text
        assert r.content == b""
        assert await stored(gateway.settings.database_url, "tb-1") == [("t", T0 * 1000, 1.0)]
        after = sample(
            await scrape(gateway.client),
            "fieldgate_readings_rejected_total",
            {"transport": "http", "code": "invalid_value"},
        )
        assert after == before + 1

    async def test_key_values_of_one_body_share_one_time(self, gateway: Gateway) -> None:
        token = await gateway.create_device("tb-1")
        r = await tb_post(gateway, token, [{"t": 1, "u": 5}, {"t": 2}])
        assert r.status_code == 200, r.text
        got = await stored(gateway.settings.database_url, "tb-1")
        assert [(m, v) for m, _, v in got] == [("t", 1.0), ("u", 5.0)]  # the first t kept
        assert got[0][1] == got[1][1]

    async def test_a_resent_body_is_stored_once(self, gateway: Gateway) -> None:
        token = await gateway.create_device("tb-1")
        body = {"ts": T0, "values": {"t": 1}}
        assert (await tb_post(gateway, token, body)).status_code == 200
        assert (await tb_post(gateway, token, body)).status_code == 200  # a duplicate: 200
        assert await stored(gateway.settings.database_url, "tb-1") == [("t", T0 * 1000, 1.0)]

    @pytest.mark.parametrize(
        ("body", "code"),
        [
            ({"ts": T0, "values": {"label": "on"}}, "no_valid_readings"),
            ([], "no_valid_readings"),
            ({}, "no_valid_readings"),
            (b"temperature=42", "invalid_json"),
        ],
    )
    async def test_nothing_valid_is_400(self, gateway: Gateway, body: Any, code: str) -> None:
        token = await gateway.create_device("tb-1")
        r = await tb_post(gateway, token, body)
        assert r.status_code == 400, r.text
        assert error_code(r) == code
        assert await stored(gateway.settings.database_url, "tb-1") == []

    async def test_rejections_are_in_the_400s_details(self, gateway: Gateway) -> None:
        token = await gateway.create_device("tb-1")
        r = await tb_post(gateway, token, [{"t": "x"}, {"ts": "never", "values": {"t": 1}}])
        assert r.status_code == 400, r.text
        details = r.json()["error"]["details"]
        assert [(d["index"], d["metric"], d["code"]) for d in details] == [
            (0, "t", "invalid_value"),
            (1, None, "invalid_timestamp"),
        ]

    async def test_too_many_messages_is_413(self, database_url: str) -> None:
        async with running(make_settings(database_url, max_messages=2)) as gw:
            token = await gw.create_device("tb-1")
            r = await tb_post(gw, token, [{"t": 1}, {"t": 2}, {"t": 3}])
            assert r.status_code == 413, r.text
            assert error_code(r) == "too_many_messages"

    async def test_a_wrong_token_is_401_and_throttled(self, database_url: str) -> None:
        settings = make_settings(database_url, auth_failure_limit=3, auth_failure_window_s=60)
        async with running(settings) as gw:
            token = await gw.create_device("tb-1")
            assert (await tb_post(gw, token, {"ts": T0, "values": {"t": 1}})).status_code == 200
            for i in range(3):
                r = await tb_post(gw, f"fgd_wrong{i}", {"t": 1})
                assert r.status_code == 401, r.text
                assert error_code(r) == "unauthorized"
            r = await tb_post(gw, "fgd_wrong3", {"t": 1})
            assert r.status_code == 429, r.text
            assert error_code(r) == "too_many_auth_failures"
            assert "Retry-After" in r.headers
            # The bearer header of the same address is locked out as well: one throttle.
            r = await gw.post("tb-1", "fgd_wrong4", {"t": 1})
            assert r.status_code == 429, r.text
            # The device's own token, known (cached), goes on from behind the same address.
            r = await tb_post(gw, token, {"ts": T0 + 1, "values": {"t": 2}})
            assert r.status_code == 200, r.text

    async def test_the_device_token_is_looked_up_once(
        self, gateway: Gateway, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        token = await gateway.create_device("tb-1")
        lookups: list[str] = []
        find_token = registry.find_token

        async def counted(token_hash: str) -> Any:
            lookups.append(token_hash)
            return await find_token(token_hash)

        monkeypatch.setattr(registry, "find_token", counted)
        for i in range(3):
            r = await tb_post(gateway, token, {"ts": T0 + i, "values": {"t": i}})
            assert r.status_code == 200, r.text
        # The Authenticator's cache, shared with the bearer header of the native route.
        assert (await gateway.post("tb-1", token, {"ts": T0 + 9, "values": {"t": 9}})).is_success
        assert lookups == [hash_token(token)]

    @pytest.mark.parametrize("role", [Role.OPERATOR, Role.ADMIN])
    async def test_operator_and_admin_tokens_are_refused(
        self, gateway: Gateway, role: Role
    ) -> None:
        await gateway.create_device("tb-1")
        token = ADMIN_TOKEN if role is Role.ADMIN else await new_token(role)
        r = await tb_post(gateway, token, {"t": 1})
        assert r.status_code == 403, r.text
        assert error_code(r) == "forbidden"
        assert await stored(gateway.settings.database_url, "tb-1") == []

    async def test_a_disabled_device_is_403(self, gateway: Gateway) -> None:
        token = await gateway.create_device("tb-1")
        assert (await tb_post(gateway, token, {"t": 1})).status_code == 200  # cached now
        r = await gateway.client.patch(
            "/api/v1/devices/tb-1", json={"enabled": False}, headers=gateway.admin
        )
        assert r.status_code == 200, r.text
        r = await tb_post(gateway, token, {"ts": T0, "values": {"t": 2}})
        assert r.status_code == 403, r.text
        assert error_code(r) == "device_disabled"

    async def test_the_routes_beside_it_are_not_shadowed(self, gateway: Gateway) -> None:
        token = await gateway.create_device("tb-1")
        # The native endpoint still answers in its own words.
        r = await gateway.post("tb-1", token, {"ts": T0, "values": {"t": 1}})
        assert r.status_code == 200, r.text
        assert r.json()["accepted"] == 1
        r = await gateway.client.get("/api/v1/devices/tb-1", headers=gateway.admin)
        assert r.status_code == 200, r.text
        r = await gateway.client.post(
            "/api/v1/tokens", json={"role": "operator", "name": "x"}, headers=gateway.admin
        )
        assert r.status_code == 201, r.text
        r = await gateway.client.get("/api/v1/telemetry/aggregate", headers=gateway.admin)
        assert r.status_code == 400, r.text  # its own parameter check, not this route
        # No method but POST here; a longer path is not this route.
        assert (await gateway.client.get(tb_url(token))).status_code == 405
        assert (await gateway.client.post(f"/api/v1/x/{token}/telemetry")).status_code == 404

    async def test_the_telemetry_body_limit_applies(self, database_url: str) -> None:
        settings = make_settings(database_url, max_request_body_bytes=4096, max_metadata_bytes=1024)
        async with running(settings) as gw:
            token = await gw.create_device("tb-1")
            body = [{"ts": T0 + i, "values": {"temperature": 20.5}} for i in range(400)]
            content = httpx.Request("POST", "/", json=body).content
            assert len(content) > 4096  # over the admin limit, under the telemetry one
            r = await tb_post(gw, token, content)
            assert r.status_code == 200, r.text
            assert len(await stored(database_url, "tb-1")) == 400
            too_big = b" " * (settings.max_body_bytes + 1)
            r = await tb_post(gw, token, too_big)
            assert r.status_code == 413, r.text

    async def test_counted_by_route_template(self, gateway: Gateway) -> None:
        token = await gateway.create_device("tb-1")
        labels = {"method": "POST", "route": "/api/v1/{device_token}/telemetry"}

        def counts(text: str) -> tuple[float, float, float]:
            return (
                sample(text, "fieldgate_http_requests_total", {**labels, "status": "200"}),
                sample(text, "fieldgate_http_requests_total", {**labels, "status": "401"}),
                sample(text, "fieldgate_readings_accepted_total", {"transport": "http"}),
            )

        before = counts(await scrape(gateway.client))
        assert (await tb_post(gateway, token, {"t": 1, "u": 2})).status_code == 200
        assert (await tb_post(gateway, "fgd_wrong", {"t": 1})).status_code == 401
        text = await scrape(gateway.client)
        assert counts(text) == (before[0] + 1, before[1] + 1, before[2] + 2)
        assert token not in text
        assert "fgd_wrong" not in text

    async def test_a_failure_is_logged_without_the_token(
        self, gateway: Gateway, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        token = await gateway.create_device("tb-1")

        async def broken(*args: Any, **kwargs: Any) -> None:
            raise RuntimeError("a bug")

        monkeypatch.setattr(gateway.app.state.runtime.ingestor, "store", broken)
        with caplog.at_level(logging.ERROR):
            r = await tb_post(gateway, token, {"t": 1})
        assert r.status_code == 500, r.text
        logged = [rec for rec in caplog.records if rec.exc_info]
        assert len(logged) == 1
        assert logged[0].getMessage() == "POST /api/v1/***/telemetry failed"
        assert token not in caplog.text


# --- `fieldgate serve`, as a user runs it: the token is in neither its log nor /metrics ---


async def test_serve_keeps_the_token_out_of_logs_and_metrics(
    serve: Callable[..., GatewayProcess], tmp_path: Any
) -> None:
    gw = serve(f"sqlite://{tmp_path / 'tb.sqlite3'}", max_body_bytes="2048")
    gw.args = ("--log-level", "debug")
    await gw.start()
    async with gw.client() as admin:
        r = await admin.post("/api/v1/devices", json={"id": "tb-1"})
        assert r.status_code == 201, r.text
        token = r.json()["token"]
        wrong = "fgd_" + "w" * 43
        async with httpx.AsyncClient(base_url=gw.base_url, timeout=30) as device:
            assert (await device.post(tb_url(token), json={"t": 1})).status_code == 200
            assert (await device.post(tb_url(token), json={"t": "x"})).status_code == 400
            assert (await device.post(tb_url(wrong), json={"t": 1})).status_code == 401
            assert (await device.get(tb_url(token))).status_code == 405
            r = await device.post(tb_url(token), content=b"[" + b" " * 4096 + b"]")
            assert r.status_code == 413
        r = await admin.get("/api/v1/devices/tb-1/telemetry", params={"metric": "t"})
        assert [p["value"] for p in r.json()["points"]] == [1.0]
        metrics = (await admin.get("/metrics")).text
    assert 'route="/api/v1/{device_token}/telemetry"' in metrics
    assert gw.terminate() in (0, -signal.SIGTERM)  # uvicorn re-raises the signal once stopped
    log = gw.log_path.read_text()
    assert "serving on" in log  # the log is the server's (debug level)
    for secret in (token, wrong):
        assert secret not in metrics
        assert secret not in log
