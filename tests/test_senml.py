"""devices/senml.py: SenML packs (RFC 8428) into readings; the RFC's own examples (section 5.1)
are the test vectors. The HTTP and MQTT paths, and units kept per series, are tested in
tests/test_senml_ingest.py."""

from __future__ import annotations

import json
from typing import Any

import pytest

from devices.formats import DEFAULT_EARLIEST_US, Code, PayloadError, Readings
from devices.senml import RELATIVE_BELOW_S, SenmlCode, parse_senml

NOW_US = 1_763_892_000_000_000  # 2025-11-23T10:00:00Z
SKEW_US = 300_000_000
URN = "urn:dev:ow:10e2073a01080063"


def parse(body: Any, *, max_messages: int = 100) -> Readings:
    raw = body if isinstance(body, bytes | str) else json.dumps(body)
    return parse_senml(
        raw,
        now_us=NOW_US,
        max_future_us=SKEW_US,
        max_messages=max_messages,
        earliest_us=DEFAULT_EARLIEST_US,
    )


def s_us(seconds: float) -> int:
    return round(seconds * 1_000_000)


def triples(readings: Readings) -> list[tuple[str, int, float]]:
    return list(zip(readings.metrics, readings.ts, readings.values, strict=True))


def codes(readings: Readings) -> list[tuple[int, str | None, str]]:
    return [(r.index, r.metric, r.code) for r in readings.rejected]


class TestRfcExamples:
    """RFC 8428 section 5.1, verbatim."""

    def test_5_1_1_single_datapoint(self) -> None:
        out = parse('[{"n":"urn:dev:ow:10e2073a01080063","u":"Cel","v":23.1}]')
        assert triples(out) == [(URN, NOW_US, 23.1)]  # no time: now
        assert out.units == {URN: "Cel"}
        assert out.rejected == []
        assert out.messages == 1

    def test_5_1_2_multiple_datapoints(self) -> None:
        out = parse(
            """[
             {"bn":"urn:dev:ow:10e2073a01080063:","n":"voltage","u":"V","v":120.1},
             {"n":"current","u":"A","v":1.2}
            ]"""
        )
        assert triples(out) == [
            (f"{URN}:voltage", NOW_US, 120.1),
            (f"{URN}:current", NOW_US, 1.2),
        ]
        assert out.units == {f"{URN}:voltage": "V", f"{URN}:current": "A"}

    def test_5_1_2_multiple_datapoints_relative_to_base_time(self) -> None:
        out = parse(
            """[
             {"bn":"urn:dev:ow:10e2073a0108006:","bt":1.276020076001e+09,
              "bu":"A","bver":5,
              "n":"voltage","u":"V","v":120.1},
             {"n":"current","t":-5,"v":1.2},
             {"n":"current","t":-4,"v":1.3},
             {"n":"current","t":-3,"v":1.4},
             {"n":"current","t":-2,"v":1.5},
             {"n":"current","t":-1,"v":1.6},
             {"n":"current","v":1.7}
            ]"""
        )
        bn, bt = "urn:dev:ow:10e2073a0108006:", 1.276020076001e09
        assert triples(out) == [
            (f"{bn}voltage", s_us(bt), 120.1),
            *[
                (f"{bn}current", s_us(bt + t), v)
                for t, v in ((-5, 1.2), (-4, 1.3), (-3, 1.4), (-2, 1.5), (-1, 1.6), (0, 1.7))
            ],
        ]
        assert triples(out)[0][1] == 1_276_020_076_001_000  # the millisecond is kept
        # "bu" applies where a record names no unit: voltage is in V, current in A
        assert out.units == {f"{bn}voltage": "V", f"{bn}current": "A"}
        assert out.rejected == []

    def test_5_1_2_humidity_every_ten_seconds(self) -> None:
        out = parse(
            """[
             {"bn":"urn:dev:ow:10e2073a01080063","bt":1.320067464e+09,
              "bu":"%RH","v":21.2},
             {"t":10,"v":21.3},
             {"t":20,"v":21.4},
             {"t":30,"v":21.4},
             {"t":40,"v":21.5},
             {"t":50,"v":21.5},
             {"t":60,"v":21.5},
             {"t":70,"v":21.6},
             {"t":80,"v":21.7}
            ]"""
        )
        values = [21.2, 21.3, 21.4, 21.4, 21.5, 21.5, 21.5, 21.6, 21.7]
        assert triples(out) == [
            (URN, s_us(1.320067464e09 + 10 * i), v) for i, v in enumerate(values)
        ]
        assert out.units == {URN: "%RH"}

    MULTIPLE_MEASUREMENTS = """[
         {"bn":"urn:dev:ow:10e2073a01080063","bt":1.320067464e+09,
          "bu":"%RH","v":20.0},
         {"u":"lon","v":24.30621},
         {"u":"lat","v":60.07965},
         {"t":60,"v":20.3},
         {"u":"lon","t":60,"v":24.30622},
         {"u":"lat","t":60,"v":60.07965},
         {"t":120,"v":20.7},
         {"u":"lon","t":120,"v":24.30623},
         {"u":"lat","t":120,"v":60.07966},
         {"u":"%EL","t":150,"v":98.0},
         {"t":180,"v":21.2},
         {"u":"lon","t":180,"v":24.30628},
         {"u":"lat","t":180,"v":60.07967}
        ]"""

    def test_5_1_3_multiple_measurements_keep_one_unit_per_name(self) -> None:
        """One name in four units: fieldgate keeps a metric to one unit, so the humidity (the
        first unit) is stored and each record in another unit is refused with its index."""
        out = parse(self.MULTIPLE_MEASUREMENTS)
        bt = 1.320067464e09
        assert triples(out) == [
            (URN, s_us(bt), 20.0),
            (URN, s_us(bt + 60), 20.3),
            (URN, s_us(bt + 120), 20.7),
            (URN, s_us(bt + 180), 21.2),
        ]
        assert out.units == {URN: "%RH"}
        assert codes(out) == [
            (i, URN, SenmlCode.UNIT_MISMATCH) for i in (1, 2, 4, 5, 7, 8, 9, 11, 12)
        ]
        assert "'%RH'" in out.rejected[0].message
        assert "'lon'" in out.rejected[0].message

    def test_5_1_4_resolved_data_reads_as_the_pack_it_resolves(self) -> None:
        resolved = """[
         {"n":"urn:dev:ow:10e2073a01080063","u":"%RH","t":1.320067464e+09,"v":20},
         {"n":"urn:dev:ow:10e2073a01080063","u":"lon","t":1.320067464e+09,"v":24.30621},
         {"n":"urn:dev:ow:10e2073a01080063","u":"lat","t":1.320067464e+09,"v":60.07965},
         {"n":"urn:dev:ow:10e2073a01080063","u":"%RH","t":1.320067524e+09,"v":20.3},
         {"n":"urn:dev:ow:10e2073a01080063","u":"lon","t":1.320067524e+09,"v":24.30622},
         {"n":"urn:dev:ow:10e2073a01080063","u":"lat","t":1.320067524e+09,"v":60.07965},
         {"n":"urn:dev:ow:10e2073a01080063","u":"%RH","t":1.320067584e+09,"v":20.7},
         {"n":"urn:dev:ow:10e2073a01080063","u":"lon","t":1.320067584e+09,"v":24.30623},
         {"n":"urn:dev:ow:10e2073a01080063","u":"lat","t":1.320067584e+09,"v":60.07966},
         {"n":"urn:dev:ow:10e2073a01080063","u":"%EL","t":1.320067614e+09,"v":98},
         {"n":"urn:dev:ow:10e2073a01080063","u":"%RH","t":1.320067644e+09,"v":21.2},
         {"n":"urn:dev:ow:10e2073a01080063","u":"lon","t":1.320067644e+09,"v":24.30628},
         {"n":"urn:dev:ow:10e2073a01080063","u":"lat","t":1.320067644e+09,"v":60.07967}
        ]"""
        packed, flat = parse(self.MULTIPLE_MEASUREMENTS), parse(resolved)
        assert triples(flat) == triples(packed)
        assert codes(flat) == codes(packed)
        assert flat.units == packed.units

    def test_5_1_5_multiple_data_types_store_the_number(self) -> None:
        out = parse(
            """[
             {"bn":"urn:dev:ow:10e2073a01080063:","n":"temp","u":"Cel","v":23.1},
             {"n":"label","vs":"Machine Room"},
             {"n":"open","vb":false},
             {"n":"nfc-reader","vd":"aGkgCg"}
            ]"""
        )
        assert triples(out) == [(f"{URN}:temp", NOW_US, 23.1)]
        assert codes(out) == [
            (1, f"{URN}:label", SenmlCode.UNSUPPORTED_VALUE),
            (2, f"{URN}:open", SenmlCode.UNSUPPORTED_VALUE),
            (3, f"{URN}:nfc-reader", SenmlCode.UNSUPPORTED_VALUE),
        ]
        assert "vb (a boolean)" in out.rejected[1].message


class TestResolution:
    def test_base_name_changes_midway(self) -> None:
        out = parse(
            [
                {"bn": "room1/", "n": "temp", "v": 1},
                {"n": "hum", "v": 2},
                {"bn": "room2/", "n": "temp", "v": 3},
                {"v": 4, "n": ""},
            ]
        )
        assert out.metrics == ["room1/temp", "room1/hum", "room2/temp", "room2/"]

    def test_base_value_is_added(self) -> None:
        out = parse([{"n": "e", "bv": 1000, "v": 1.5}, {"n": "e", "t": 1, "v": -2}])
        assert out.values == [1001.5, 998.0]

    def test_base_only_record_is_no_reading_and_no_error(self) -> None:
        out = parse([{"bn": "dev:", "bt": 1.7e9}, {"n": "t", "v": 1}])
        assert triples(out) == [("dev:t", s_us(1.7e9), 1.0)]
        assert out.rejected == []

    def test_unknown_fields_are_ignored(self) -> None:
        out = parse([{"n": "t", "v": 1, "ut": 60, "bs": 5, "s": 10, "extra": "x"}])
        assert out.values == [1.0]
        assert out.rejected == []

    def test_a_record_without_a_unit_is_taken_for_a_metric_with_one(self) -> None:
        out = parse([{"n": "t", "u": "Cel", "v": 1}, {"n": "t", "t": -1, "v": 2}])
        assert out.values == [1.0, 2.0]
        assert out.units == {"t": "Cel"}


class TestTime:
    @pytest.mark.parametrize(
        ("record", "expected"),
        [
            ({}, NOW_US),
            ({"t": 0}, NOW_US),
            ({"t": -5}, NOW_US - 5_000_000),
            ({"t": -0.25}, NOW_US - 250_000),
            ({"t": 1.5}, NOW_US + 1_500_000),
            ({"bt": -60, "t": 30}, NOW_US - 30_000_000),
            ({"t": 3600}, None),  # an hour ahead of now: refused
            ({"t": RELATIVE_BELOW_S - 1}, None),  # ~8.5 years ahead of now
            ({"t": 1_700_000_000.123456}, 1_700_000_000_123_456),
            ({"t": 1_700_000_000}, 1_700_000_000_000_000),
        ],
    )
    def test_relative_below_2_28_absolute_from_it(
        self, record: dict[str, Any], expected: int | None
    ) -> None:
        out = parse([{"n": "m", "v": 1, **record}])
        if expected is None:
            assert codes(out) == [(0, "m", Code.TIMESTAMP_IN_FUTURE)]
        else:
            assert out.ts == [expected]

    def test_the_boundary_is_absolute(self) -> None:
        out = parse([{"n": "m", "v": 1, "t": RELATIVE_BELOW_S}])
        # 2**28 s after 1970 is in 1978: absolute, so before the earliest time accepted
        assert codes(out) == [(0, "m", Code.TIMESTAMP_TOO_OLD)]

    @pytest.mark.parametrize(
        ("t", "code"),
        [
            (1e300, Code.TIMESTAMP_IN_FUTURE),
            (10**400, Code.INVALID_TIMESTAMP),
            (-1e300, Code.TIMESTAMP_BEFORE_EPOCH),
            ("now", Code.INVALID_TIMESTAMP),
            (True, Code.INVALID_TIMESTAMP),
            (1_763_892_000 + 3600, Code.TIMESTAMP_IN_FUTURE),
        ],
    )
    def test_unusable_times_are_refused_per_record(self, t: Any, code: str) -> None:
        out = parse([{"n": "ok", "v": 1}, {"n": "m", "v": 1, "t": t}])
        assert out.metrics == ["ok"]
        assert codes(out) == [(1, "m", code)]


class TestMalformedPacks:
    def test_each_bad_record_is_reported_with_its_index_and_the_rest_kept(self) -> None:
        out = parse(
            [
                {"n": "good", "v": 1},
                "not a record",
                {"n": "bad name!", "v": 1},
                {"n": "nan", "v": "NaN"},
                {"n": "bool", "v": True},
                {"n": "nothing", "u": "Cel"},
                {"n": "sum", "s": 10},
                {"n": "two", "v": 1, "vs": "x"},
                {"n": "unit", "u": "", "v": 1},
                {"n": 5, "v": 1},
                {"n": "x" * 65, "v": 1},
                {"n": "good", "t": -1, "v": 2},
            ]
        )
        assert triples(out) == [("good", NOW_US, 1.0), ("good", NOW_US - 1_000_000, 2.0)]
        assert codes(out) == [
            (1, None, SenmlCode.INVALID_RECORD),
            (2, "bad name!", Code.INVALID_METRIC),
            (3, "nan", Code.INVALID_VALUE),
            (4, "bool", Code.INVALID_VALUE),
            (5, "nothing", SenmlCode.MISSING_VALUE),
            (6, "sum", SenmlCode.UNSUPPORTED_VALUE),
            (7, "two", SenmlCode.INVALID_RECORD),
            (8, "unit", SenmlCode.INVALID_UNIT),
            (9, None, SenmlCode.INVALID_RECORD),
            (10, "x" * 65, Code.INVALID_METRIC),
        ]
        assert out.messages == 12

    def test_non_finite_values_are_refused(self) -> None:
        out = parse('[{"n":"a","v":Infinity},{"n":"b","v":1e308,"bv":1e308},{"n":"c","v":1}]')
        assert codes(out) == [(0, "a", Code.NON_FINITE_VALUE), (1, "b", Code.NON_FINITE_VALUE)]
        assert out.metrics == ["c"]

    def test_an_empty_name_is_not_a_metric(self) -> None:
        out = parse([{"v": 1}])
        assert codes(out) == [(0, None, Code.INVALID_METRIC)]

    @pytest.mark.parametrize(
        ("body", "code", "says"),
        [
            (b"not json", Code.INVALID_JSON, "JSON"),
            ({"n": "t", "v": 1}, SenmlCode.INVALID_PACK, "array"),
            ([{"n": "t", "v": 1}] * 101, Code.TOO_MANY_MESSAGES, "101 records"),
            ([{"n": "t", "v": 1}, {"bn": 5}], SenmlCode.INVALID_PACK, "record 1: bn"),
            ([{"bt": "today", "v": 1}], SenmlCode.INVALID_PACK, "bt must be a finite number"),
            ([{"bv": True, "v": 1}], SenmlCode.INVALID_PACK, "bv"),
            ([{"bver": 64, "n": "t", "v": 1}], SenmlCode.INVALID_PACK, "bver 64"),
            ([{"bver": "10", "n": "t", "v": 1}], SenmlCode.INVALID_PACK, "bver"),
            ([{"n": "t", "v": 1, "ct_": "x"}], SenmlCode.INVALID_PACK, "'ct_' must be"),
        ],
    )
    def test_unusable_packs_fail_whole(self, body: Any, code: str, says: str) -> None:
        with pytest.raises(PayloadError) as caught:
            parse(body)
        assert caught.value.code == code
        assert says in caught.value.message

    @pytest.mark.parametrize("version", [10, 5, 26])
    def test_understood_versions(self, version: int) -> None:
        assert parse([{"bver": version, "n": "t", "v": 1}]).values == [1.0]

    def test_an_empty_pack_has_no_records(self) -> None:
        out = parse([])
        assert out.messages == 0
        assert len(out) == 0
