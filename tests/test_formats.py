"""devices/formats.py: parsing and validating native telemetry payloads, no storage involved."""

from __future__ import annotations

import json
from datetime import UTC, datetime
from typing import Any

import orjson
import pytest

from devices.formats import (
    DEFAULT_EARLIEST_US,
    TS_MAX_US,
    TS_MIN_US,
    Code,
    PayloadError,
    Readings,
    parse_telemetry,
    safe_text,
)
from gateway.timespec import format_ts

NOW_US = 1_763_892_000_000_000  # 2025-11-23T10:00:00Z
SKEW_US = 300_000_000
NOW_MS = NOW_US // 1000


def parse(
    body: Any,
    *,
    now_us: int = NOW_US,
    max_messages: int = 100,
    earliest_us: int = DEFAULT_EARLIEST_US,
) -> Readings:
    raw = body if isinstance(body, bytes | str) else json.dumps(body)
    return parse_telemetry(
        raw,
        now_us=now_us,
        max_future_us=SKEW_US,
        max_messages=max_messages,
        earliest_us=earliest_us,
    )


def triples(readings: Readings) -> list[tuple[str, int, float]]:
    return list(zip(readings.metrics, readings.ts, readings.values, strict=True))


def codes(readings: Readings) -> list[tuple[int, str | None, str]]:
    return [(r.index, r.metric, r.code) for r in readings.rejected]


def us(text: str) -> int:
    dt = datetime.fromisoformat(text)
    return int(dt.timestamp()) * 1_000_000 + dt.microsecond


class TestValidMessages:
    def test_one_object_gives_one_reading_per_metric(self) -> None:
        r = parse({"ts": NOW_MS, "values": {"temperature": 21.5, "humidity": 40}})
        assert triples(r) == [("temperature", NOW_US, 21.5), ("humidity", NOW_US, 40.0)]
        assert r.rejected == []
        assert r.messages == 1
        assert all(type(v) is float for v in r.values)

    def test_array_of_messages(self) -> None:
        r = parse([{"ts": NOW_MS - 1000, "values": {"a": 1}}, {"ts": NOW_MS, "values": {"b": 2}}])
        assert triples(r) == [("a", NOW_US - 1_000_000, 1.0), ("b", NOW_US, 2.0)]
        assert r.messages == 2

    def test_empty_array_is_no_readings_and_no_rejections(self) -> None:
        r = parse([])
        assert len(r) == 0
        assert r.rejected == []
        assert r.messages == 0

    @pytest.mark.parametrize(("raw", "expected"), [(True, 1.0), (False, 0.0)])
    def test_booleans_become_one_and_zero(self, raw: bool, expected: float) -> None:
        r = parse({"ts": NOW_MS, "values": {"door_open": raw}})
        assert r.values == [expected]
        assert type(r.values[0]) is float

    @pytest.mark.parametrize(
        ("raw", "expected"),
        [(0, 0.0), (-7, -7.0), (2**53, float(2**53)), (1.5e300, 1.5e300), (-0.25, -0.25)],
    )
    def test_numbers_become_floats(self, raw: float, expected: float) -> None:
        assert parse({"ts": NOW_MS, "values": {"m": raw}}).values == [expected]

    @pytest.mark.parametrize(
        "metric", ["t", "a" * 64, "temp_1", "room.temp", "site:a/b-c", "A-Z.0_9:/"]
    )
    def test_valid_metric_names(self, metric: str) -> None:
        r = parse({"ts": NOW_MS, "values": {metric: 1}})
        assert r.metrics == [metric]
        assert r.rejected == []


class TestTimestamps:
    @pytest.mark.parametrize(
        ("ts", "expected_us"),
        [
            ("2025-11-23T10:00:00Z", us("2025-11-23T10:00:00+00:00")),
            ("2025-11-23T09:59:59.123Z", us("2025-11-23T09:59:59.123+00:00")),
            ("2025-11-23T09:59:59.123456Z", us("2025-11-23T09:59:59.123456+00:00")),
            ("2025-11-23T09:59:59.1Z", us("2025-11-23T09:59:59.100+00:00")),
            ("2025-11-23T11:30:00+02:00", us("2025-11-23T09:30:00+00:00")),
            ("2025-11-23T04:00:00-05:00", us("2025-11-23T09:00:00+00:00")),
            ("2025-11-23T15:30:00.5+05:30", us("2025-11-23T10:00:00.5+00:00")),
            ("2025-11-23T10:00:00+00:00", NOW_US),
            ("2025-11-23T10:00:00-00:00", NOW_US),
            ("2000-01-01T00:00:00Z", DEFAULT_EARLIEST_US),
            ("2025-11-23t10:00:00z", NOW_US),  # RFC 3339 allows lower case t and z
            ("2025-11-23T09:59:59.123456789Z", us("2025-11-23T09:59:59.123456+00:00")),
        ],
    )
    def test_rfc3339_with_offsets_and_fractions(self, ts: str, expected_us: int) -> None:
        r = parse({"ts": ts, "values": {"m": 1}})
        assert r.rejected == []
        assert r.ts == [expected_us]

    @pytest.mark.parametrize(
        ("ts", "expected_us"),
        [
            (NOW_MS, NOW_US),
            (946_684_800_000, DEFAULT_EARLIEST_US),  # 2000-01-01: the earliest accepted
            (946_684_800_000.001, DEFAULT_EARLIEST_US + 1),
            (NOW_MS - 0.5, NOW_US - 500),
            (1_700_000_000_123.25, 1_700_000_000_123_250),
            (float(NOW_MS), NOW_US),
        ],
    )
    def test_epoch_milliseconds_int_and_float(self, ts: float, expected_us: int) -> None:
        r = parse({"ts": ts, "values": {"m": 1}})
        assert r.rejected == []
        assert r.ts == [expected_us]

    @pytest.mark.parametrize("message", [{"values": {"m": 1}}, {"ts": None, "values": {"m": 1}}])
    def test_missing_ts_is_the_receive_time(self, message: dict[str, Any]) -> None:
        now = NOW_US + 123_456
        assert parse(message, now_us=now).ts == [now]

    def test_future_within_skew_is_accepted(self) -> None:
        r = parse({"ts": (NOW_US + SKEW_US) // 1000, "values": {"m": 1}})
        assert r.rejected == []
        assert r.ts == [NOW_US + SKEW_US]

    @pytest.mark.parametrize(
        "ts",
        [
            (NOW_US + SKEW_US) // 1000 + 1,
            "2025-11-23T10:05:00.001Z",
            "2030-01-01T00:00:00Z",
            "9999-12-31T23:59:59Z",
            1e300,
        ],
    )
    def test_timestamp_in_future(self, ts: Any) -> None:
        r = parse([{"ts": ts, "values": {"m": 1}}, {"ts": NOW_MS, "values": {"ok": 2}}])
        assert codes(r) == [(0, None, Code.TIMESTAMP_IN_FUTURE)]
        assert "ahead" in r.rejected[0].message
        assert triples(r) == [("ok", NOW_US, 2.0)]

    @pytest.mark.parametrize(
        "ts", [-1, -0.001, "1969-12-31T23:59:59.999999Z", "1900-01-01T00:00:00Z"]
    )
    def test_timestamp_before_epoch(self, ts: Any) -> None:
        r = parse([{"ts": ts, "values": {"m": 1}}, {"ts": NOW_MS, "values": {"ok": 2}}])
        assert codes(r) == [(0, None, Code.TIMESTAMP_BEFORE_EPOCH)]
        assert triples(r) == [("ok", NOW_US, 2.0)]

    @pytest.mark.parametrize(
        "ts",
        [
            "yesterday",
            "",
            "2025-11-23T10:00:00",  # no offset
            "2025-11-23",  # a date, no time or offset
            "2025-13-01T00:00:00Z",
            "2025-11-23T10:00:00\x00Z",  # fromisoformat alone took these three
            "2025-11-23T10:00:00\x00+05:00",
            "2025-11-23\x0010:00:00Z",
            True,
            False,
            [NOW_MS],
            {"ms": NOW_MS},
        ],
    )
    def test_invalid_timestamp(self, ts: Any) -> None:
        r = parse([{"ts": ts, "values": {"m": 1}}, {"ts": NOW_MS, "values": {"ok": 2}}])
        assert codes(r) == [(0, None, Code.INVALID_TIMESTAMP)]
        assert r.rejected[0].message
        assert triples(r) == [("ok", NOW_US, 2.0)]

    @pytest.mark.parametrize("raw", [b"NaN", b"Infinity", b"-Infinity", b"1e999"])
    def test_non_finite_timestamp_is_invalid(self, raw: bytes) -> None:
        body = b'[{"ts": ' + raw + b', "values": {"m": 1}}, {"values": {"ok": 2}}]'
        r = parse(body)
        assert codes(r) == [(0, None, Code.INVALID_TIMESTAMP)]
        assert r.metrics == ["ok"]


class TestEarliestTime:
    """A `ts` before the earliest time accepted (2000-01-01 unless configured) is refused:
    epoch seconds where milliseconds are meant would otherwise be stored in January 1970."""

    @pytest.mark.parametrize("seconds", [NOW_MS // 1000, NOW_MS / 1000, 1_000_000_000])
    def test_epoch_seconds_are_refused_and_named(self, seconds: float) -> None:
        r = parse([{"ts": seconds, "values": {"m": 1}}, {"ts": NOW_MS, "values": {"ok": 2}}])
        assert codes(r) == [(0, None, Code.TIMESTAMP_TOO_OLD)]
        assert "before 2000-01-01T00:00:00Z" in r.rejected[0].message
        assert "looks like epoch seconds (x1000 for milliseconds)" in r.rejected[0].message
        assert triples(r) == [("ok", NOW_US, 2.0)]

    @pytest.mark.parametrize(
        "ts",
        [
            0,
            5,
            946_684_799_999,  # 1999-12-31T23:59:59.999Z: as seconds, a time past 9999
            NOW_MS // 1000 + SKEW_US // 1_000_000 + 1,  # as seconds: past the allowed skew
            "1970-01-01T00:00:00Z",
            "1999-12-31T23:59:59.999999Z",
        ],
    )
    def test_other_old_times_are_refused_without_the_guess(self, ts: Any) -> None:
        r = parse({"ts": ts, "values": {"m": 1}})
        assert codes(r) == [(0, None, Code.TIMESTAMP_TOO_OLD)]
        assert "before 2000-01-01T00:00:00Z, the earliest time accepted" in r.rejected[0].message
        assert "epoch seconds" not in r.rejected[0].message

    def test_before_1970_keeps_its_own_code(self) -> None:
        r = parse([{"ts": -1, "values": {"m": 1}}, {"ts": "1969-01-01T00:00:00Z", "values": {}}])
        assert codes(r) == [
            (0, None, Code.TIMESTAMP_BEFORE_EPOCH),
            (1, None, Code.TIMESTAMP_BEFORE_EPOCH),
        ]

    def test_the_earliest_time_is_configurable(self) -> None:
        earliest = us("2025-01-01T00:00:00+00:00")
        body = [
            {"ts": "2024-12-31T23:59:59.999999Z", "values": {"m": 1}},
            {"ts": earliest // 1000, "values": {"m": 2}},
        ]
        r = parse(body, earliest_us=earliest)
        assert codes(r) == [(0, None, Code.TIMESTAMP_TOO_OLD)]
        assert "before 2025-01-01T00:00:00Z" in r.rejected[0].message
        assert triples(r) == [("m", earliest, 2.0)]

    @pytest.mark.parametrize(
        ("ts", "expected_us"), [(0, 0), (1, 1000), ("1970-01-01T00:00:00Z", 0)]
    )
    def test_down_to_1970_when_configured(self, ts: Any, expected_us: int) -> None:
        r = parse({"ts": ts, "values": {"m": 1}}, earliest_us=TS_MIN_US)
        assert r.rejected == []
        assert r.ts == [expected_us]

    def test_the_receive_time_is_never_too_old(self) -> None:
        # Only a time the client names is checked; the gateway's clock is not the client's fault.
        assert parse({"values": {"m": 1}}, now_us=1_000_000).ts == [1_000_000]


class TestMessageRejections:
    @pytest.mark.parametrize("message", [5, "text", None, [], [{"values": {"m": 1}}], True])
    def test_invalid_message(self, message: Any) -> None:
        r = parse([message, {"ts": NOW_MS, "values": {"ok": 1}}])
        assert codes(r) == [(0, None, Code.INVALID_MESSAGE)]
        assert triples(r) == [("ok", NOW_US, 1.0)]

    @pytest.mark.parametrize("body", [b"5", b'"text"', b"null", b"true"])
    def test_top_level_scalar_is_one_invalid_message(self, body: bytes) -> None:
        r = parse(body)
        assert codes(r) == [(0, None, Code.INVALID_MESSAGE)]
        assert len(r) == 0

    @pytest.mark.parametrize(
        ("message", "named"),
        [
            ({"ts": NOW_MS, "values": {"m": 1}, "device": "x"}, "device"),
            ({"values": {"m": 1}, "timestamp": NOW_MS}, "timestamp"),
            ({"value": 1}, "value"),
            ({"ts": NOW_MS, "values": {"m": 1}, "b": 1, "a": 2}, "a, b"),
        ],
    )
    def test_unknown_field_rejects_the_message(self, message: dict[str, Any], named: str) -> None:
        r = parse([message, {"ts": NOW_MS, "values": {"ok": 1}}])
        assert codes(r) == [(0, None, Code.UNKNOWN_FIELD)]
        assert named in r.rejected[0].message
        assert r.metrics == ["ok"]

    @pytest.mark.parametrize(
        "message",
        [
            {"ts": NOW_MS},
            {"ts": NOW_MS, "values": None},
            {"ts": NOW_MS, "values": [1, 2]},
            {"ts": NOW_MS, "values": 21.5},
            {"ts": NOW_MS, "values": "temperature"},
            {},
        ],
    )
    def test_invalid_values(self, message: dict[str, Any]) -> None:
        r = parse([message, {"ts": NOW_MS, "values": {"ok": 1}}])
        assert codes(r) == [(0, None, Code.INVALID_VALUES)]
        assert r.metrics == ["ok"]

    def test_empty_values(self) -> None:
        r = parse([{"ts": NOW_MS, "values": {}}, {"ts": NOW_MS, "values": {"ok": 1}}])
        assert codes(r) == [(0, None, Code.EMPTY_VALUES)]
        assert r.metrics == ["ok"]

    def test_rejections_keep_their_message_index(self) -> None:
        r = parse(
            [
                {"ts": NOW_MS, "values": {"a": 1}},
                7,
                {"ts": NOW_MS, "values": {"b": 2}},
                {"ts": -5, "values": {"c": 3}},
                {"ts": NOW_MS, "values": {"d": "x", "e": 5}},
            ]
        )
        assert codes(r) == [
            (1, None, Code.INVALID_MESSAGE),
            (3, None, Code.TIMESTAMP_BEFORE_EPOCH),
            (4, "d", Code.INVALID_VALUE),
        ]
        assert r.metrics == ["a", "b", "e"]
        assert r.rejected[0].as_dict() == {
            "index": 1,
            "metric": None,
            "code": Code.INVALID_MESSAGE,
            "message": r.rejected[0].message,
        }


class TestReadingRejections:
    @pytest.mark.parametrize(
        "metric",
        [
            "",
            "a" * 65,
            "has space",
            "temp\n",
            "\ntemp",
            "température",
            "semi;colon",
            "quote'",
            "star*",
            "a,b",
        ],
    )
    def test_invalid_metric(self, metric: str) -> None:
        r = parse({"ts": NOW_MS, "values": {metric: 1, "ok": 2}})
        assert codes(r) == [(0, metric[:80], Code.INVALID_METRIC)]
        assert triples(r) == [("ok", NOW_US, 2.0)]

    def test_invalid_metric_name_is_truncated_in_the_rejection(self) -> None:
        metric = "x" * 500
        r = parse({"ts": NOW_MS, "values": {metric: 1}})
        assert codes(r) == [(0, "x" * 80, Code.INVALID_METRIC)]

    @pytest.mark.parametrize(
        ("value", "kind"),
        [
            ("21.5", "a string"),
            (None, "null"),
            ([1], "an array"),
            ({"v": 1}, "an object"),
        ],
    )
    def test_invalid_value(self, value: Any, kind: str) -> None:
        r = parse({"ts": NOW_MS, "values": {"bad": value, "ok": 2}})
        assert codes(r) == [(0, "bad", Code.INVALID_VALUE)]
        assert kind in r.rejected[0].message
        assert triples(r) == [("ok", NOW_US, 2.0)]

    @pytest.mark.parametrize(
        "raw", [b"NaN", b"Infinity", b"-Infinity", b"1e999", b"-1e999", b"1" + b"0" * 400]
    )
    def test_non_finite_value_in_raw_json(self, raw: bytes) -> None:
        body = b'{"ts": ' + str(NOW_MS).encode() + b', "values": {"bad": ' + raw + b', "ok": 2}}'
        r = parse(body)
        assert codes(r) == [(0, "bad", Code.NON_FINITE_VALUE)]
        assert triples(r) == [("ok", NOW_US, 2.0)]

    def test_every_bad_reading_of_a_message_is_listed(self) -> None:
        body = b'{"values": {"a": NaN, "b": "x", "c d": 1, "e": 1.5}}'
        r = parse(body)
        assert codes(r) == [
            (0, "a", Code.NON_FINITE_VALUE),
            (0, "b", Code.INVALID_VALUE),
            (0, "c d", Code.INVALID_METRIC),
        ]
        assert r.metrics == ["e"]


class TestWholePayload:
    @pytest.mark.parametrize(
        "body",
        [b"", b"{oops", b"[1, 2", b"\xff\xfe\x00", b"{'ts': 1}", b"values=1", b"[" * 100_000],
    )
    def test_invalid_json(self, body: bytes) -> None:
        with pytest.raises(PayloadError) as caught:
            parse(body)
        assert caught.value.code == Code.INVALID_JSON
        assert "JSON" in caught.value.message

    @pytest.mark.parametrize(("count", "limit"), [(4, 3), (101, 100), (2, 1)])
    def test_too_many_messages(self, count: int, limit: int) -> None:
        body = [{"values": {"m": i}} for i in range(count)]
        with pytest.raises(PayloadError) as caught:
            parse(body, max_messages=limit)
        assert caught.value.code == Code.TOO_MANY_MESSAGES
        assert str(limit) in caught.value.message

    @pytest.mark.parametrize("count", [1, 3])
    def test_exactly_max_messages_is_fine(self, count: int) -> None:
        body = [{"ts": NOW_MS - i, "values": {"m": i}} for i in range(count)]
        assert len(parse(body, max_messages=count)) == count

    def test_one_object_counts_as_one_message(self) -> None:
        assert len(parse({"values": {"m": 1, "n": 2}}, max_messages=1)) == 2

    def test_already_decoded_payload(self) -> None:
        r = parse_telemetry(
            [{"ts": NOW_MS, "values": {"m": 1}}],
            now_us=NOW_US,
            max_future_us=SKEW_US,
            max_messages=10,
            decoded=True,
        )
        assert triples(r) == [("m", NOW_US, 1.0)]

    def test_str_body(self) -> None:
        assert parse(json.dumps({"ts": NOW_MS, "values": {"m": 1}})).ts == [NOW_US]


def test_now_constant_is_what_the_tests_think() -> None:
    assert datetime.fromtimestamp(NOW_US / 1e6, UTC) == datetime(2025, 11, 23, 10, tzinfo=UTC)


class TestWhatCannotBeStored:
    """Timestamps outside the storage range and texts JSON or PostgreSQL cannot carry are
    rejections with a code, never exceptions (issue 8: they stalled the MQTT bridge)."""

    @pytest.mark.parametrize(
        ("raw", "code"),
        [
            (b'{"ts": 1e308, "values": {"a": 1}}', Code.TIMESTAMP_IN_FUTURE),
            (b'{"ts": -1e308, "values": {"a": 1}}', Code.TIMESTAMP_BEFORE_EPOCH),
            (b'{"ts": 1' + b"0" * 400 + b', "values": {"a": 1}}', Code.TIMESTAMP_IN_FUTURE),
            (b'{"ts": -1' + b"0" * 400 + b', "values": {"a": 1}}', Code.TIMESTAMP_BEFORE_EPOCH),
            (b'{"ts": 9223372036854775807, "values": {"a": 1}}', Code.TIMESTAMP_IN_FUTURE),
            (b'{"ts": 1e400, "values": {"a": 1}}', Code.INVALID_TIMESTAMP),
            (b'{"ts": "0001-01-01T00:00:00Z", "values": {"a": 1}}', Code.TIMESTAMP_BEFORE_EPOCH),
        ],
    )
    def test_timestamps_outside_the_storage_range(self, raw: bytes, code: str) -> None:
        r = parse(b"[" + raw + b', {"ts": %d, "values": {"ok": 1}}]' % NOW_MS)
        assert codes(r) == [(0, None, code)]
        assert triples(r) == [("ok", NOW_US, 1.0)]

    def test_the_range_ends_in_year_9999_whatever_the_skew_allows(self) -> None:
        last_ms = TS_MAX_US // 1000
        r = parse_telemetry(
            orjson.dumps(
                [{"ts": last_ms, "values": {"a": 1}}, {"ts": last_ms + 1, "values": {"a": 2}}]
            ),
            now_us=NOW_US,
            max_future_us=10**30,
            max_messages=10,
        )
        assert triples(r) == [("a", last_ms * 1000, 1.0)]
        assert codes(r) == [(1, None, Code.TIMESTAMP_IN_FUTURE)]
        assert format_ts(TS_MAX_US) == "9999-12-31T23:59:59.999999Z"

    def test_client_text_in_rejections_is_escaped(self) -> None:
        body = b'[{"values": {"\\ud800": 1, "a\\u0000b": 2, "ok": 3}}, {"\\udfff\\u0000": 1}]'
        r = parse(body)
        assert codes(r) == [
            (0, "\\ud800", Code.INVALID_METRIC),
            (0, "a\\x00b", Code.INVALID_METRIC),
            (1, None, Code.UNKNOWN_FIELD),
        ]
        assert "\\udfff\\x00" in r.rejected[2].message
        assert [m for m, _, _ in triples(r)] == ["ok"]
        orjson.dumps([x.as_dict() for x in r.rejected])  # raised before: surrogates not allowed

    @pytest.mark.parametrize(
        ("text", "safe"),
        [
            ("plain é 😀", "plain é 😀"),
            ("\x00", "\\x00"),
            ("a\ud800b", "a\\ud800b"),
            ("\udfff\x00", "\\udfff\\x00"),
        ],
    )
    def test_safe_text(self, text: str, safe: str) -> None:
        assert safe_text(text) == safe
        safe_text(text).encode("utf-8")
