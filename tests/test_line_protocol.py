"""InfluxDB line protocol (issue 13): the parser, the write endpoints on SQLite and PostgreSQL
(who may write which device, InfluxDB's answers, a Telegraf-shaped request), the writer role,
gzip bodies on every ingest endpoint, and the official `influxdb-client` against `fieldgate
serve`."""

from __future__ import annotations

import asyncio
import gzip
import json
import time
from collections.abc import AsyncIterator, Callable
from typing import Any, ClassVar

import httpx
import pytest
from influxdb_client.client.influxdb_client import InfluxDBClient
from influxdb_client.client.write.point import Point
from influxdb_client.client.write_api import SYNCHRONOUS, WriteOptions
from influxdb_client.domain.write_precision import WritePrecision

from devices.formats import PayloadError, Rejection
from devices.line_protocol import LineBatch, LineCode, parse_lines
from devices.models import Role
from gateway.timespec import parse_instant
from tests.conftest import ADMIN_TOKEN, Gateway, GatewayProcess, make_settings, start_gateway
from tests.harness import (
    bearer,
    new_token,
    read_points,
    sample,
    scrape,
    stored,
    wait_until,
    writes_held,
)

NOW_US = 1_764_000_000_000_000  # 2025-11-24T16:00:00Z
T_NS = 1_700_000_000_123_456_789  # 2023-11-14T22:13:20.123456789Z
T_US = T_NS // 1000
EARLIEST_US = 946_684_800_000_000  # 2000-01-01


def parse(body: str | bytes, **overrides: Any) -> LineBatch:
    kwargs: dict[str, Any] = {
        "now_us": NOW_US,
        "max_future_us": 300_000_000,
        "earliest_us": EARLIEST_US,
        "max_lines": 100,
    }
    kwargs.update(overrides)
    return parse_lines(body, **kwargs)


def readings_of(batch: LineBatch, device: str) -> list[tuple[str, int, float]]:
    r = batch.devices[device].readings
    return list(zip(r.metrics, r.ts, r.values, strict=True))


def codes(rejected: list[Rejection]) -> list[tuple[int, str]]:
    return [(r.index, r.code) for r in rejected]


class TestParser:
    def test_a_line_becomes_readings_of_its_device(self) -> None:
        batch = parse(f"cpu,host=h1,device=d1 usage_idle=93.5,usage_user=2.25 {T_NS}\n")
        assert readings_of(batch, "d1") == [
            ("cpu.usage_idle", T_US, 93.5),
            ("cpu.usage_user", T_US, 2.25),
        ]
        assert batch.rejected == []
        assert batch.lines == 1
        assert batch.devices["d1"].lines == [1]

    @pytest.mark.parametrize(
        ("raw", "value"),
        [
            ("1.5", 1.5),
            ("-1.5", -1.5),
            ("1", 1.0),
            ("-2e3", -2000.0),
            ("1.5E-2", 0.015),
            (".5", 0.5),
            ("12i", 12.0),
            ("-12i", -12.0),
            ("9223372036854775807i", 9223372036854775807.0),
            ("12u", 12.0),
            ("18446744073709551615u", 18446744073709551615.0),
            *((b, 1.0) for b in ("t", "T", "true", "True", "TRUE")),
            *((b, 0.0) for b in ("f", "F", "false", "False", "FALSE")),
        ],
    )
    def test_every_numeric_field_type(self, raw: str, value: float) -> None:
        batch = parse(f"m,device=d v={raw} {T_NS}")
        assert readings_of(batch, "d") == [("m.v", T_US, value)]
        assert batch.devices["d"].readings.rejected == []

    @pytest.mark.parametrize(
        ("raw", "code"),
        [
            ('"text"', LineCode.STRING_FIELD),
            ('"a, b = c \\"quoted\\""', LineCode.STRING_FIELD),
            ("9223372036854775808i", "invalid_value"),
            ("-1u", "invalid_value"),
            ("18446744073709551616u", "invalid_value"),
            ("1.5i", "invalid_value"),
            ("yes", "invalid_value"),
            ("nan", "invalid_value"),
            ("inf", "invalid_value"),
            ("1_000", "invalid_value"),
            ("1e999", "non_finite_value"),
            ("\u0663", "invalid_value"),  # an Arabic-Indic 3: digits are ASCII's
            ("\u0663i", "invalid_value"),
            ("\u0663u", "invalid_value"),
        ],
    )
    def test_values_rejected_per_field_keep_the_others(self, raw: str, code: str) -> None:
        batch = parse(f"m,device=d bad={raw},good=1 {T_NS}")
        assert readings_of(batch, "d") == [("m.good", T_US, 1.0)]
        rejected = batch.devices["d"].readings.rejected
        assert codes(rejected) == [(1, code)]
        assert rejected[0].metric == "m.bad"

    def test_escapes_in_every_part(self) -> None:
        line = (
            r"my\ meas\,x,device=dev\ 1,tag\=k=v\,w"
            r' fi\ eld\,1=1,s="a \"b\" c\\",f\=2=2i'
            f" {T_NS}"
        )
        batch = parse(line, metric_template="{field}")
        assert list(batch.devices) == ["dev 1"]
        r = batch.devices["dev 1"].readings
        # The names are unescaped before the metric rules see them (a space is not allowed).
        assert [x.metric for x in r.rejected] == ["fi eld,1", "s", "f=2"]
        assert [x.code for x in r.rejected] == ["invalid_metric", "string_field", "invalid_metric"]

    def test_escaped_measurement_and_tag_reach_the_metric_and_device(self) -> None:
        batch = parse(r"a\,b,device=d\=1 v\ =1,w=2 " + str(T_NS), metric_template="{field}")
        assert list(batch.devices) == ["d=1"]
        assert [x.metric for x in batch.devices["d=1"].readings.rejected] == ["v "]
        assert readings_of(batch, "d=1") == [("w", T_US, 2.0)]
        batch = parse(r"a\,b\ c,device=d v=1 " + str(T_NS), metric_template="{measurement}")
        assert batch.devices["d"].readings.rejected[0].metric == "a,b c"

    def test_a_backslash_before_another_character_is_kept(self) -> None:
        batch = parse(r"m\x,device=d\y v=1 " + str(T_NS), metric_template="{measurement}.{field}")
        assert list(batch.devices) == ["d\\y"]
        assert batch.devices["d\\y"].readings.rejected[0].metric == "m\\x.v"

    def test_a_string_field_may_hold_separators(self) -> None:
        batch = parse(f'm,device=d s="x y,z=1",v=2 {T_NS}')
        assert readings_of(batch, "d") == [("m.v", T_US, 2.0)]
        assert codes(batch.devices["d"].readings.rejected) == [(1, "string_field")]

    @pytest.mark.parametrize(
        ("precision", "stamp", "us"),
        [
            ("ns", T_NS, T_US),  # truncated to the microsecond
            ("ns", 1_700_000_000_000_000_999, 1_700_000_000_000_000),
            ("us", T_US, T_US),
            ("ms", 1_700_000_000_123, 1_700_000_000_123_000),
            ("s", 1_700_000_000, 1_700_000_000_000_000),
        ],
    )
    def test_precisions(self, precision: str, stamp: int, us: int) -> None:
        batch = parse(f"m,device=d v=1 {stamp}", precision=precision)
        assert readings_of(batch, "d") == [("m.v", us, 1.0)]

    def test_an_unknown_precision_is_a_value_error(self) -> None:
        with pytest.raises(ValueError, match="precision"):
            parse("m,device=d v=1", precision="m")

    def test_no_timestamp_is_the_receive_time(self) -> None:
        assert readings_of(parse("m,device=d v=1"), "d") == [("m.v", NOW_US, 1.0)]

    @pytest.mark.parametrize(
        ("stamp", "code"),
        [
            ("-1", "timestamp_before_epoch"),
            ("1700000000", "timestamp_too_old"),  # seconds sent as nanoseconds
            (str((NOW_US + 3_600_000_000) * 1000), "timestamp_in_future"),
            ("99999999999999999999999", "timestamp_in_future"),
            ("12x", "invalid_timestamp"),
            ("1.5", "invalid_timestamp"),
            ("\u0663" * 19, "invalid_timestamp"),
        ],
    )
    def test_timestamps_meet_the_native_time_rules(self, stamp: str, code: str) -> None:
        batch = parse(f"m,device=d v=1 {stamp}")
        assert readings_of(batch, "d") == []
        assert codes(batch.devices["d"].readings.rejected) == [(1, code)]

    def test_malformed_lines_are_rejected_with_their_line_numbers(self) -> None:
        body = "\n".join(
            [
                "# a comment",
                "",
                f"m,device=d v=1 {T_NS}",
                "m,device=d",  # no fields
                "m,device=d v",  # not key=value
                ",device=d v=1",  # no measurement
                "m,device v=1",  # tag without a value
                f"m,device=d v=1 {T_NS} extra",  # too many parts
                'm,device=d s="open',  # unclosed string
                "m,device=d =1",  # empty field key
                f"m,device=d v=2 {T_NS + 1000}\r",  # CRLF
                "   ",
            ]
        )
        batch = parse(body)
        assert codes(batch.rejected) == [(n, LineCode.INVALID_LINE) for n in range(4, 11)]
        assert readings_of(batch, "d") == [("m.v", T_US, 1.0), ("m.v", T_US + 1, 2.0)]
        assert batch.devices["d"].lines == [3, 11]
        assert batch.lines == 9
        assert all(r.message for r in batch.rejected)

    def test_the_device_tag_is_a_setting_and_other_tags_are_ignored(self) -> None:
        batch = parse(f"m,host=h1,region=eu v=1 {T_NS}", device_tag="host")
        assert readings_of(batch, "h1") == [("m.v", T_US, 1.0)]

    def test_a_line_without_the_device_tag(self) -> None:
        batch = parse(f"m,host=h1 v=1 {T_NS}")
        assert batch.devices == {}
        assert codes(batch.rejected) == [(1, LineCode.MISSING_DEVICE_TAG)]
        batch = parse(f"m,host=h1 v=1 {T_NS}", default_device="own")
        assert readings_of(batch, "own") == [("m.v", T_US, 1.0)]

    def test_lines_of_many_devices(self) -> None:
        batch = parse(f"m,device=a v=1 {T_NS}\nm,device=b v=2 {T_NS}\nm,device=a v=3 {T_NS + 1000}")
        assert batch.devices["a"].lines == [1, 3]
        assert batch.devices["b"].lines == [2]
        assert [v for *_, v in readings_of(batch, "a")] == [1.0, 3.0]

    def test_the_metric_template(self) -> None:
        batch = parse(f"cpu,device=d idle=1 {T_NS}", metric_template="{measurement}_{field}")
        assert readings_of(batch, "d")[0][0] == "cpu_idle"
        batch = parse(f"cpu,device=d idle=1 {T_NS}", metric_template="{field}")
        assert readings_of(batch, "d")[0][0] == "idle"

    def test_the_metric_rules_apply(self) -> None:
        batch = parse(f"{'x' * 60},device=d value=1 {T_NS}")
        assert codes(batch.devices["d"].readings.rejected) == [(1, "invalid_metric")]

    def test_too_many_lines_fail_as_a_whole(self) -> None:
        with pytest.raises(PayloadError) as caught:
            parse("\n".join(f"m,device=d v={i}" for i in range(4)), max_lines=3)
        assert caught.value.code == "too_many_messages"
        # comments and empty lines do not count
        assert parse("#\n\nm,device=d v=1\n#", max_lines=1).lines == 1

    def test_bytes_that_are_not_utf8_do_not_raise(self) -> None:
        batch = parse(b"m\xff,device=d v=1 " + str(T_NS).encode())
        assert codes(batch.devices["d"].readings.rejected) == [(1, "invalid_metric")]


# --- the endpoints, in-process, on SQLite and PostgreSQL ---


@pytest.fixture
def database_url(emptied_database_url: str) -> str:
    return emptied_database_url


def token_header(token: str) -> dict[str, str]:
    return {"Authorization": f"Token {token}"}


async def write(
    gw: Gateway,
    token: str | None,
    body: str | bytes,
    *,
    path: str = "/api/v2/write",
    params: dict[str, str] | None = None,
    headers: dict[str, str] | None = None,
) -> httpx.Response:
    h = {**(token_header(token) if token else {}), **(headers or {})}
    content = body.encode() if isinstance(body, str) else body
    query = params if params is not None else {"org": "o", "bucket": "b"}
    return await gw.client.post(path, params=query, content=content, headers=h)


def influx_error(r: httpx.Response, code: str) -> dict[str, Any]:
    """The body of an error answer, checked for InfluxDB 2's shape."""
    assert r.headers["content-type"].startswith("application/json")
    body: dict[str, Any] = r.json()
    assert body["code"] == code, body
    assert isinstance(body["message"], str)
    assert body["message"]
    return body


class TestWriteEndpoints:
    async def test_a_device_token_writes_its_own_lines(self, gateway: Gateway) -> None:
        token = await gateway.create_device("d1")
        body = f"cpu,device=d1 usage_idle=93.5,busy=t {T_NS}\ncpu usage_idle=90 {T_NS + 10**9}\n"
        r = await write(gateway, token, body)
        assert r.status_code == 204, r.text
        assert r.content == b""
        assert await stored(gateway.settings.database_url, "d1") == [
            ("cpu.busy", T_US, 1.0),
            ("cpu.usage_idle", T_US, 93.5),
            ("cpu.usage_idle", T_US + 1_000_000, 90.0),
        ]
        points = await read_points(gateway, "d1", "cpu.usage_idle")
        assert [p["value"] for p in points] == [93.5, 90.0]

    @pytest.mark.parametrize(
        "how",
        ["bearer", "token", "basic", "query"],
    )
    async def test_the_v1_endpoint_and_every_way_to_give_the_token(
        self, gateway: Gateway, how: str
    ) -> None:
        token = await gateway.create_device("d1")
        params = {"db": "telegraf", "precision": "s"}
        headers: dict[str, str] = {}
        if how == "bearer":
            headers = bearer(token)
        elif how == "token":
            headers = token_header(token)
        elif how == "basic":
            headers = {"Authorization": httpx.BasicAuth("me", token)._auth_header}
        else:
            params.update(u="me", p=token)
        r = await write(
            gateway,
            None,
            "m,device=d1 v=1 1700000000",
            path="/write",
            params=params,
            headers=headers,
        )
        assert r.status_code == 204, r.text
        assert await stored(gateway.settings.database_url, "d1") == [
            ("m.v", 1_700_000_000_000_000, 1.0)
        ]

    async def test_a_partial_write_is_400_naming_the_first_bad_line(self, gateway: Gateway) -> None:
        token = await gateway.create_device("d1")
        labels = {"transport": "http", "code": "invalid_line"}
        before = sample(await scrape(gateway.client), "fieldgate_readings_rejected_total", labels)
        body = f'm,device=d1 v=1 {T_NS}\nm,device=d1 s="x",v=2 {T_NS + 1000}\nbad\n'
        r = await write(gateway, token, body)
        assert r.status_code == 400, r.text
        err = influx_error(r, "invalid")
        assert err["line"] == 2
        assert err["message"].startswith("line 2: ")
        assert err["fieldgate_code"] == "partial_write"
        assert [(x["index"], x["code"]) for x in err["rejected"]] == [
            (2, "string_field"),
            (3, "invalid_line"),
        ]
        assert await stored(gateway.settings.database_url, "d1") == [
            ("m.v", T_US, 1.0),
            ("m.v", T_US + 1, 2.0),
        ]
        after = sample(await scrape(gateway.client), "fieldgate_readings_rejected_total", labels)
        assert after - before == 1

    async def test_a_device_token_may_not_write_another_device(self, gateway: Gateway) -> None:
        token = await gateway.create_device("d1")
        await gateway.create_device("d2")
        body = f"m,device=d2 v=1 {T_NS}\nm,device=d1 v=2 {T_NS}\n"
        r = await write(gateway, token, body)
        assert r.status_code == 400, r.text
        err = influx_error(r, "invalid")
        assert [(x["index"], x["code"]) for x in err["rejected"]] == [
            (1, LineCode.DEVICE_NOT_ALLOWED)
        ]
        assert await stored(gateway.settings.database_url, "d2") == []
        assert await stored(gateway.settings.database_url, "d1") == [("m.v", T_US, 2.0)]

    async def test_a_writer_writes_any_registered_device(self, gateway: Gateway) -> None:
        await gateway.create_device("d1")
        await gateway.create_device("d2")
        await gateway.create_device("off", enabled=False)
        writer = await new_token(Role.WRITER)
        body = "\n".join(
            [
                f"m,device=d1 v=1 {T_NS}",
                f"m,device=d2 v=2 {T_NS}",
                f"m,device=ghost v=3 {T_NS}",
                f"m v=4 {T_NS}",
                f"m,device=off v=5 {T_NS}",
                f"m,device=ghost v=6 {T_NS}",
            ]
        )
        r = await write(gateway, writer, body)
        assert r.status_code == 400, r.text
        err = influx_error(r, "invalid")
        assert [(x["index"], x["code"]) for x in err["rejected"]] == [
            (3, LineCode.UNKNOWN_DEVICE),
            (4, LineCode.MISSING_DEVICE_TAG),
            (5, LineCode.DEVICE_DISABLED),
            (6, LineCode.UNKNOWN_DEVICE),
        ]
        url = gateway.settings.database_url
        assert await stored(url, "d1") == [("m.v", T_US, 1.0)]
        assert await stored(url, "d2") == [("m.v", T_US, 2.0)]
        assert await stored(url, "off") == []
        ok = await write(gateway, writer, f"m,device=d1 v=7 {T_NS + 1000}")
        assert ok.status_code == 204, ok.text

    async def test_the_native_rejections_and_limits_apply(self, database_url: str) -> None:
        settings = make_settings(database_url, max_series_per_device=1, max_metrics_per_request=2)
        async for gw in start_gateway(settings):
            token = await gw.create_device("d1")
            r = await write(gw, token, f"m,device=d1 a=1,b=2 {T_NS}")
            err = influx_error(r, "invalid")
            assert [(x["index"], x["code"]) for x in err["rejected"]] == [(-1, "series_limit")]
            assert await stored(database_url, "d1") == [("m.a", T_US, 1.0)]
            r = await write(gw, token, f"m,device=d1 a=1,b=2,c=3 {T_NS}")
            assert r.status_code == 413, r.text
            assert influx_error(r, "request too large")["fieldgate_code"] == "too_many_metrics"

    async def test_duplicates_are_stored_once_and_answer_204(self, gateway: Gateway) -> None:
        token = await gateway.create_device("d1")
        for _ in range(2):
            r = await write(gateway, token, f"m,device=d1 v=1 {T_NS}")
            assert r.status_code == 204, r.text
        assert await stored(gateway.settings.database_url, "d1") == [("m.v", T_US, 1.0)]

    @pytest.mark.parametrize("path", ["/api/v2/write", "/write"])
    async def test_who_may_not_write(self, gateway: Gateway, path: str) -> None:
        r = await write(gateway, None, "m,device=d v=1", path=path)
        assert r.status_code == 401
        influx_error(r, "unauthorized")
        r = await write(gateway, "fgd_wrong", "m,device=d v=1", path=path)
        assert r.status_code == 401
        influx_error(r, "unauthorized")
        operator = await new_token(Role.OPERATOR)
        r = await write(gateway, operator, "m,device=d v=1", path=path)
        assert r.status_code == 403
        influx_error(r, "forbidden")
        r = await write(gateway, ADMIN_TOKEN, "m,device=d v=1", path=path)
        assert r.status_code == 403
        token = await gateway.create_device("off", enabled=False)
        r = await write(gateway, token, "m,device=off v=1", path=path)
        assert r.status_code == 403
        assert influx_error(r, "forbidden")["fieldgate_code"] == "device_disabled"

    async def test_too_many_wrong_tokens_are_429_with_retry_after(self, database_url: str) -> None:
        settings = make_settings(database_url, auth_failure_limit=2, auth_failure_window_s=60)
        async for gw in start_gateway(settings):
            for i in range(2):  # (each a new token: one known to be wrong is not looked up)
                assert (await write(gw, f"fgw_wrong{i}", "m,device=d v=1")).status_code == 401
            r = await write(gw, "fgw_wrong", "m,device=d v=1")
            assert r.status_code == 429
            assert int(r.headers["retry-after"]) >= 1
            assert influx_error(r, "too many requests")["fieldgate_code"] == (
                "too_many_auth_failures"
            )

    async def test_a_bad_precision_and_an_empty_body_are_400(self, gateway: Gateway) -> None:
        token = await gateway.create_device("d1")
        r = await write(gateway, token, "m v=1", params={"precision": "h"})
        assert r.status_code == 400
        assert "precision" in influx_error(r, "invalid")["message"]
        r = await write(gateway, token, "# nothing\n")
        assert r.status_code == 400
        influx_error(r, "invalid")

    async def test_v1_errors_carry_the_error_field(self, gateway: Gateway) -> None:
        token = await gateway.create_device("d1")
        r = await write(gateway, token, "bad", path="/write", params={"db": "x"})
        assert r.status_code == 400
        body = influx_error(r, "invalid")
        assert body["error"] == body["message"]

    async def test_a_telegraf_shaped_request(self, gateway: Gateway) -> None:
        """What Telegraf's outputs.influxdb_v2 sends: gzip, ns, sorted tags, a Token header."""
        await gateway.create_device("edge-01")
        writer = await new_token(Role.WRITER)
        lines = (
            f"cpu,cpu=cpu-total,device=edge-01,host=edge-01 usage_idle=93.2,usage_user=1.5 {T_NS}\n"
            f"mem,device=edge-01,host=edge-01 available=1024i,used_percent=42.5 {T_NS}\n"
            f"system,device=edge-01,host=edge-01 load1=0.25,n_cpus=4i,uptime=3600u {T_NS}\n"
        )
        r = await gateway.client.post(
            "/api/v2/write",
            params={"bucket": "telegraf", "org": "my-org"},
            content=gzip.compress(lines.encode()),
            headers={
                "Authorization": f"Token {writer}",
                "Content-Encoding": "gzip",
                "Content-Type": "text/plain; charset=utf-8",
                "User-Agent": "Telegraf/1.32.0 Go/1.23.1",
            },
        )
        assert r.status_code == 204, r.text
        assert await stored(gateway.settings.database_url, "edge-01") == [
            ("cpu.usage_idle", T_US, 93.2),
            ("cpu.usage_user", T_US, 1.5),
            ("mem.available", T_US, 1024.0),
            ("mem.used_percent", T_US, 42.5),
            ("system.load1", T_US, 0.25),
            ("system.n_cpus", T_US, 4.0),
            ("system.uptime", T_US, 3600.0),
        ]


class TestWriteLimits:
    async def test_too_big_and_too_many_lines_are_413(self, small_gateway: Gateway) -> None:
        token = await small_gateway.create_device("d1")
        r = await write(small_gateway, token, "m,device=d1 v=1\n" * 100)
        assert r.status_code == 413
        influx_error(r, "request too large")
        r = await write(small_gateway, token, "m,device=d1 v=1\n" * 4)
        assert r.status_code == 413
        assert influx_error(r, "request too large")["fieldgate_code"] == "too_many_messages"
        bomb = gzip.compress(b"m,device=d1 v=1\n" * 10_000)
        assert len(bomb) < 1024
        r = await write(small_gateway, token, bomb, headers={"Content-Encoding": "gzip"})
        assert r.status_code == 413
        influx_error(r, "request too large")
        assert await stored(small_gateway.settings.database_url, "d1") == []

    async def test_an_unknown_encoding_is_415(self, small_gateway: Gateway) -> None:
        token = await small_gateway.create_device("d1")
        r = await write(small_gateway, token, b"xx", headers={"Content-Encoding": "br"})
        assert r.status_code == 415
        assert influx_error(r, "unsupported media type")["fieldgate_code"] == (
            "unsupported_encoding"
        )

    async def test_queue_full_is_503_with_retry_after(self, small_gateway: Gateway) -> None:
        gw = small_gateway
        token = await gw.create_device("d1")
        writer = gw.app.state.runtime.writer
        warm = await write(gw, token, f"m,device=d1 v=0 {T_NS}")
        assert warm.status_code == 204, warm.text
        async with writes_held(gw):
            body = "\n".join(f"m,device=d1 v={i} {T_NS + i * 1000}" for i in range(1, 4))
            first = asyncio.create_task(write(gw, token, body))
            await wait_until(lambda: writer.pending == 3)
            r = await write(gw, token, f"m,device=d1 v=9 {T_NS + 9000}")
            assert r.status_code == 503, r.text
            assert r.headers["retry-after"] == "7"
            assert influx_error(r, "unavailable")["fieldgate_code"] == "queue_full"
        assert (await first).status_code == 204
        assert len(await stored(gw.settings.database_url, "d1")) == 4


class TestWriterRole:
    """A writer token writes line protocol and does nothing else."""

    async def test_a_writer_reads_nothing_and_manages_nothing(self, gateway: Gateway) -> None:
        token = await gateway.create_device("d1")
        writer = await new_token(Role.WRITER)
        h = bearer(writer)
        c = gateway.client
        denied = [
            await c.get("/api/v1/devices", headers=h),
            await c.get("/api/v1/devices/d1", headers=h),
            await c.get("/api/v1/devices/d1/telemetry", params={"metric": "m"}, headers=h),
            await c.get("/api/v1/devices/d1/telemetry/latest", headers=h),
            await c.get("/api/v1/rejected", headers=h),
            await c.get("/api/v1/storage", headers=h),
            await c.get("/api/v1/tokens", headers=h),
            await c.post("/api/v1/tokens", json={"role": "admin"}, headers=h),
            await c.post("/api/v1/devices", json={"id": "new"}, headers=h),
            await c.delete("/api/v1/devices/d1", headers=h),
            await c.post("/api/v1/devices/d1/telemetry", json={"values": {"t": 1}}, headers=h),
            await c.get("/readyz", headers=h),
            await c.get("/query", params={"q": "SHOW MEASUREMENTS", "db": "x"}, headers=h),
        ]
        assert [r.status_code for r in denied] == [403] * len(denied)
        assert (await c.get("/readyz")).status_code in (200, 503)  # without a token: no details
        assert token

    async def test_every_other_operation_refuses_a_writer(self, database_url: str) -> None:
        """Whatever routes are added later: a writer token gets no 2xx but on the two writes."""
        settings = make_settings(database_url, environment="development")
        async for gw in start_gateway(settings):
            await gw.create_device("dev-a")
            writer = await new_token(Role.WRITER)
            paths = gw.app.openapi()["paths"]
            operations = [(m.upper(), p) for p, item in paths.items() for m in item]
            assert len(operations) >= 15
            for method, path in operations:
                if path in ("/api/v2/write", "/write", "/healthz", "/readyz", "/metrics"):
                    continue
                url = path.replace("{device_id}", "dev-a").replace("{token_id}", "1")
                url = url.replace("{device_token}", writer)  # ThingsBoard's: the token in the path
                r = await gw.client.request(
                    method, url, headers=bearer(writer), json={} if method != "GET" else None
                )
                # 403 for the API; 401/404 for the broker hook (its own secret; off here)
                assert r.status_code in (401, 403, 404), (method, path, r.status_code, r.text)
                if path.startswith("/api/v1/") and "/broker/" not in path:
                    assert r.status_code == 403, (method, path, r.text)

    def test_role_may(self) -> None:
        assert Role.WRITER.may(Role.WRITER)
        for needed in (Role.OPERATOR, Role.ADMIN, Role.DEVICE):
            assert not Role.WRITER.may(needed)
        for role in (Role.ADMIN, Role.OPERATOR, Role.DEVICE):
            assert not role.may(Role.WRITER)
        assert Role.ADMIN.may(Role.OPERATOR)
        assert not Role.OPERATOR.may(Role.ADMIN)

    async def test_admin_issues_and_lists_writer_tokens(self, gateway: Gateway) -> None:
        r = await gateway.client.post(
            "/api/v1/tokens", json={"role": "writer", "name": "telegraf"}, headers=gateway.admin
        )
        assert r.status_code == 201, r.text
        token = r.json()["token"]
        assert token.startswith("fgw_")
        assert r.json()["role"] == "writer"
        listed = await gateway.client.get("/api/v1/tokens", headers=gateway.admin)
        assert [t["role"] for t in listed.json()["tokens"]] == ["writer"]
        await gateway.create_device("d1")
        assert (await write(gateway, token, f"m,device=d1 v=1 {T_NS}")).status_code == 204


# --- gzip on the native endpoint ---


class TestWriteLane:
    """`WriteLane` answers the two write endpoints ahead of FastAPI's router: every answer is
    the routes' own (the same status, body and Retry-After), request by request."""

    async def test_lane_and_routes_answer_alike(self, database_url: str) -> None:
        from gateway.app import create_app

        answers: dict[bool, list[tuple[int, str, str | None]]] = {}
        for lane in (True, False):
            settings = make_settings(database_url, max_body_bytes=2048)
            app = create_app(settings, telemetry_lane=lane)
            async with app.router.lifespan_context(app):
                transport = httpx.ASGITransport(app=app)
                async with httpx.AsyncClient(transport=transport, base_url="http://fieldgate") as c:
                    gw = Gateway(c, settings, app)
                    device = f"lane-{lane}"
                    token = await gw.create_device(device)
                    writer = await new_token(Role.WRITER)
                    ts = 1_700_000_000 + (0 if lane else 100)  # each app its own readings
                    gz = gzip.compress(f"m,device={device} v=1 {ts}".encode())
                    requests: list[
                        tuple[str | None, str | bytes, dict[str, str], str | None, dict[str, str]]
                    ] = [
                        (token, f"m,device={device} v=1,w=2i {ts}", {}, None, {}),
                        (token, f'm v=3 {ts + 1}\nbad line\nm s="x" {ts}', {}, None, {}),
                        (writer, f"m,device={device} v=4 {ts + 2}", {}, None, {}),
                        (writer, f"m,device=nobody v=4 {ts}", {}, None, {}),
                        (None, "m v=1", {}, None, {}),
                        ("nope", "m v=1", {}, None, {}),
                        (token, "m v=1", {"precision": "h"}, None, {}),
                        (token, gz, {"precision": "s"}, None, {"Content-Encoding": "gzip"}),
                        (token, "m v=1", {}, None, {"Content-Encoding": "br"}),
                        (token, "m v=1 " + "x" * 3000, {}, None, {}),
                        (None, f"m v=5 {ts + 3}", {"db": "x", "u": "u", "p": token}, "/write", {}),
                        (token, f"m v=6 {ts + 4}", {"precision": "s"}, "/write", {}),
                    ]
                    out = []
                    for who, body, params, path, headers in requests:
                        query = {"org": "o", "bucket": "b", "precision": "s", **params}
                        r = await write(
                            gw, who, body, path=path or "/api/v2/write", params=query,
                            headers=headers,
                        )  # fmt: skip
                        text = r.text.replace(device, "DEVICE")
                        out.append((r.status_code, text, r.headers.get("retry-after")))
                    answers[lane] = out
        assert answers[True] == answers[False]
        assert [status for status, _, _ in answers[True]][:2] == [204, 400]


class TestGzipNative:
    BODY: ClassVar[bytes] = json.dumps({"ts": 1_700_000_000_000, "values": {"t": 21.5}}).encode()

    @pytest.fixture(params=[True, False], ids=["lane", "route"])
    async def gw(self, request: pytest.FixtureRequest, database_url: str) -> AsyncIterator[Gateway]:
        from gateway.app import create_app

        settings = make_settings(database_url, max_body_bytes=1024)
        app = create_app(settings, telemetry_lane=request.param)
        async with app.router.lifespan_context(app):
            transport = httpx.ASGITransport(app=app)
            async with httpx.AsyncClient(transport=transport, base_url="http://fieldgate") as c:
                yield Gateway(c, settings, app)

    async def post(self, gw: Gateway, token: str, body: bytes, encoding: str) -> httpx.Response:
        return await gw.client.post(
            "/api/v1/devices/d1/telemetry",
            content=body,
            headers={
                **bearer(token),
                "Content-Encoding": encoding,
                "Content-Type": "application/json",
            },
        )

    async def test_gzip_and_identity_are_stored(self, gw: Gateway) -> None:
        token = await gw.create_device("d1")
        r = await self.post(gw, token, gzip.compress(self.BODY), "gzip")
        assert r.status_code == 200, r.text
        assert r.json()["accepted"] == 1
        body = json.dumps({"ts": 1_700_000_001_000, "values": {"t": 1}}).encode()
        r = await self.post(gw, token, body, "identity")
        assert r.status_code == 200, r.text
        two_members = gzip.compress(b'[{"ts": 1700000002000, "values": {"t": 2}},') + gzip.compress(
            b'{"ts": 1700000003000, "values": {"t": 3}}]'
        )
        r = await self.post(gw, token, two_members, "GZIP")
        assert r.status_code == 200, r.text
        assert [v for *_, v in await stored(gw.settings.database_url, "d1")] == [21.5, 1, 2, 3]

    async def test_an_admin_json_body_may_be_gzip_too(self, gw: Gateway) -> None:
        r = await gw.client.post(
            "/api/v1/devices",
            content=gzip.compress(b'{"id": "zipped"}'),
            headers={**gw.admin, "Content-Encoding": "gzip", "Content-Type": "application/json"},
        )
        assert r.status_code == 201, r.text
        assert r.json()["id"] == "zipped"

    async def test_a_zip_bomb_is_413(self, gw: Gateway) -> None:
        token = await gw.create_device("d1")
        bomb = gzip.compress(b" " * 50_000_000)
        assert len(bomb) < 100_000
        started = time.perf_counter()
        r = await gw.client.post(
            "/api/v1/devices/d1/telemetry",
            content=bomb,
            headers={**bearer(token), "Content-Encoding": "gzip"},
        )
        assert r.status_code == 413, r.text
        assert r.json()["error"]["code"] == "payload_too_large"
        # inflating the whole 50 MB would take far longer than inflating ~1 KiB
        assert time.perf_counter() - started < 1.0

    async def test_an_unknown_encoding_is_415_and_broken_gzip_400(self, gw: Gateway) -> None:
        token = await gw.create_device("d1")
        r = await self.post(gw, token, self.BODY, "br")
        assert r.status_code == 415
        assert r.json()["error"]["code"] == "unsupported_encoding"
        r = await self.post(gw, token, gzip.compress(self.BODY)[:-6], "gzip")
        assert r.status_code == 400
        assert r.json()["error"]["code"] == "invalid_gzip"
        r = await self.post(gw, token, b"not gzip", "gzip")
        assert r.status_code == 400
        assert r.json()["error"]["code"] == "invalid_gzip"
        assert await stored(gw.settings.database_url, "d1") == []


# --- the official client, against `fieldgate serve` ---


def _points(device: str, i: int, precision: str, base_s: int) -> list[Point]:
    stamp = {
        WritePrecision.NS: (base_s + i) * 10**9 + 123_456_789,
        WritePrecision.US: (base_s + i) * 10**6 + 123_456,
        WritePrecision.MS: (base_s + i) * 10**3 + 123,
        WritePrecision.S: base_s + i,
    }[precision]
    return [
        Point("env")
        .tag("device", device)
        .tag("site", "north")
        .field("temperature", 20.0 + i)
        .field("count", i)
        .field("ok", True)
        .time(stamp, precision)
    ]


@pytest.mark.e2e
class TestInfluxClient:
    @pytest.fixture
    async def served(
        self, serve: Callable[..., GatewayProcess], database_url: str
    ) -> AsyncIterator[tuple[GatewayProcess, str]]:
        gw = serve(database_url)
        await gw.start()
        async with gw.client() as admin:
            r = await admin.post("/api/v1/devices", json={"id": "probe"})
            assert r.status_code == 201, r.text
            r = await admin.post("/api/v1/tokens", json={"role": "writer", "name": "client"})
            assert r.status_code == 201, r.text
            yield gw, r.json()["token"]

    async def readings(self, gw: GatewayProcess, metric: str) -> list[tuple[int, float]]:
        async with gw.client() as admin:
            r = await admin.get(
                "/api/v1/devices/probe/telemetry", params={"metric": metric, "limit": 1000}
            )
            assert r.status_code == 200, r.text
            now = int(time.time() * 1e6)
            return [
                (parse_instant(p["ts"], now, name="ts"), p["value"]) for p in r.json()["points"]
            ]

    async def test_synchronous_writes_in_every_precision_with_gzip(
        self, served: tuple[GatewayProcess, str]
    ) -> None:
        gw, token = served
        precisions = [WritePrecision.NS, WritePrecision.US, WritePrecision.MS, WritePrecision.S]
        base_s = int(time.time()) - 3600

        def run() -> None:
            with InfluxDBClient(url=gw.base_url, token=token, org="o", enable_gzip=True) as client:
                api = client.write_api(write_options=SYNCHRONOUS)
                for k, precision in enumerate(precisions):
                    api.write(
                        bucket="b",
                        record=_points("probe", k, precision, base_s),
                        write_precision=precision,
                    )

        await asyncio.to_thread(run)
        temps = await self.readings(gw, "env.temperature")
        base_us = base_s * 10**6
        assert temps == [
            (base_us + 123_456, 20.0),
            (base_us + 10**6 + 123_456, 21.0),
            (base_us + 2 * 10**6 + 123_000, 22.0),
            (base_us + 3 * 10**6, 23.0),
        ]
        assert [v for _, v in await self.readings(gw, "env.ok")] == [1.0] * 4
        assert [v for _, v in await self.readings(gw, "env.count")] == [0.0, 1.0, 2.0, 3.0]

    async def test_the_batching_api_and_its_errors(
        self, served: tuple[GatewayProcess, str]
    ) -> None:
        gw, token = served
        base_s = int(time.time()) - 3600
        done: list[str] = []
        failed: list[str] = []

        def run() -> None:
            with InfluxDBClient(url=gw.base_url, token=token, org="o", enable_gzip=True) as client:
                options = WriteOptions(batch_size=50, flush_interval=100, max_retries=0)
                with client.write_api(
                    write_options=options,
                    success_callback=lambda conf, data: done.append(data),
                    error_callback=lambda conf, data, exc: failed.append(str(exc)),
                ) as api:
                    for i in range(120):
                        api.write(
                            bucket="b",
                            record=_points("probe", i, WritePrecision.MS, base_s),
                            write_precision=WritePrecision.MS,
                        )
                    api.write(bucket="b", record="env,device=ghost temperature=1")

        await asyncio.to_thread(run)
        temps = await self.readings(gw, "env.temperature")
        assert len(temps) == 120
        assert temps[0] == (base_s * 10**6 + 123_000, 20.0)
        assert len(failed) == 1, failed
        assert "unknown_device" in failed[0]
        assert done
