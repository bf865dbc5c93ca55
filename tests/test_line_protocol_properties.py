"""Property tests of the line protocol parser (hypothesis): the columnar fast path
(`_parse_columns`, taken for a body whose every line is plain) gives exactly what the
line-by-line parser gives, for any body: the same devices in the same order, the same readings
(metric, time, value to the bit, -0.0 included), the same rejections and line numbers, the same
`PayloadError`. Bodies are built from line protocol's parts, plain and otherwise: escapes,
quoted strings, every field type, bad values, timestamps in and out of the window, comments,
empty lines, stray spaces and tabs, several devices and measurements.

Derandomized (a fixed sequence of examples), so CI runs the same cases every time.
"""

from __future__ import annotations

import math
import re
from typing import Any
from urllib.parse import parse_qsl

import orjson
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from devices.formats import PayloadError
from devices.line_protocol import (
    DEFAULT_METRIC_TEMPLATE,
    PRECISIONS,
    LineBatch,
    _parse_columns,
    parse_lines,
)
from gateway.api.influx_write import query_parameters
from gateway.api.text_guard import UNSTORABLE, unstorable_parameter

NOW_US = 1_764_000_000_000_000  # 2025-11-24T16:00:00Z
EARLIEST_US = 946_684_800_000_000  # 2000-01-01
MAX_FUTURE_US = 300_000_000
UNIT_US = {"ns": 0.001, "us": 1, "ms": 1000, "s": 1_000_000}

PROPERTIES = settings(
    max_examples=400,
    deadline=None,
    derandomize=True,
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)

# Each part of a line from a plain pool (what the fast path takes) or, at a rate drawn per
# body, from an odd one (what it must leave to the line-by-line parser, or take alike): bodies
# of plain lines with one odd part are where a fast path goes wrong.
MEASUREMENTS = (
    st.sampled_from(["cpu", "weather", "m", "a.b", "disk/io"]),
    st.sampled_from(["bad!", "é", "#c", "c\\,pu", "c\\ pu", "c\\=pu", "", "c,"]),
)
TAG_KEYS = (
    st.sampled_from(["host", "region"]),
    st.sampled_from(["k\\ 1", "k\\,2", "x=", "", "é"]),
)
TAG_VALUES = (
    st.sampled_from(["a", "b", "west", "é"]),
    st.sampled_from(["v=w", "v\\ w", "v\\,w", "", "#"]),
)
DEVICES = (st.sampled_from(["d1", "d2", "d-3", "é"]), st.sampled_from(["d\\ 4", "", "d\\,5"]))
FIELD_KEYS = (
    st.sampled_from(["t", "m0", "m1", "usage_idle", "a/b", "t"]),
    st.sampled_from(["k\\ 1", "k\\=2", "k\\,3", "bad key!", "é", "", "[", '"']),
)
PLAIN_FLOATS = st.floats(allow_nan=False, allow_infinity=False).map(repr)
# Decimal texts as clients write them: digits, a point, an exponent, leading zeros, signs.
DECIMALS = st.from_regex(r"[+-]?[0-9]{0,25}(\.[0-9]{0,25})?([eE][+-]?[0-9]{1,3})?", fullmatch=True)
ODD_TEXTS = [
    "-0",
    "-0.0",
    "0",
    "-0e5",
    "1.",
    ".5",
    "+1",
    "01",
    "1e308",
    "1e309",
    "-1e400",
    "1e-400",
    "18446744073709551616",
    "1" * 5000,
    "nan",
    "NaN",
    "inf",
    "-Infinity",
    "1_0",
    "\u0661",
    "1\x0b",
    "\x0b1",
    "\x1c1",
    "12i",
    "-12i",
    "9223372036854775808i",
    "12u",
    "-1u",
    "18446744073709551616u",
    "1" * 5000 + "i",
    "t",
    "T",
    "true",
    "True",
    "TRUE",
    "f",
    "false",
    "FALSE",
    "null",
    "[1]",
    "[1",
    "]",
    "{}",
    '"str"',
    '"a b,c=d"',
    '"esc\\"aped"',
    '"open',
    "1=2",
    "1,2",
    "",
]
ODD_VALUES = st.sampled_from(ODD_TEXTS)
VALUES = (
    st.one_of(
        PLAIN_FLOATS,
        st.integers(min_value=-(2**70), max_value=2**70).map(str),
        st.integers(min_value=-(2**63), max_value=2**63 - 1).map(lambda n: f"{n}i"),
    ),
    st.one_of(DECIMALS, ODD_VALUES, st.integers().map(lambda n: f"{n}u")),
)
ODD_STAMPS = ["", "abc", "1.5", "-1", "0", "1", "00" + str(NOW_US * 1000), "1" * 5000, "9" * 30]
SEPARATORS = (st.just(" "), st.sampled_from(["  ", "\t", " \t", "\x0b"]))


def part(
    draw: st.DrawFn, pools: tuple[st.SearchStrategy[str], st.SearchStrategy[str]], odd: int
) -> str:
    """A part from the plain pool, or from the odd one `odd` times in 100."""
    plain, other = pools
    return draw(other if draw(st.integers(0, 99)) < odd else plain)


@st.composite
def timestamps(draw: st.DrawFn, precision: str, odd: int) -> str | None:
    """A line's timestamp in `precision`: within the window, or (`odd` in 100) anything."""
    unit = UNIT_US[precision]
    if draw(st.integers(0, 99)) >= odd:
        us = draw(st.integers(EARLIEST_US, NOW_US + MAX_FUTURE_US))
        return str(int(us // unit) if unit >= 1 else us * 1000 + draw(st.integers(0, 999)))
    return draw(
        st.one_of(
            st.none(),
            st.integers(min_value=-(10**22), max_value=10**22).map(str),
            st.sampled_from(ODD_STAMPS),
        )
    )


@st.composite
def lines(draw: st.DrawFn, precision: str, device_tag: str, odd: int) -> str:
    """One line, its parts plain or (`odd` in 100) odd."""
    head = part(draw, MEASUREMENTS, odd)
    tags = [
        (part(draw, TAG_KEYS, odd), part(draw, TAG_VALUES, odd))
        for _ in range(draw(st.integers(0, 2)))
    ]
    if draw(st.integers(0, 99)) >= odd:
        tags.insert(draw(st.integers(0, len(tags))), (device_tag, part(draw, DEVICES, odd)))
    head += "".join(f",{k}={v}" for k, v in tags)
    fields = [
        f"{part(draw, FIELD_KEYS, odd)}={part(draw, VALUES, odd)}"
        for _ in range(draw(st.integers(1, 4)))
    ]
    text = head + part(draw, SEPARATORS, odd) + ",".join(fields)
    stamp = draw(timestamps(precision, odd))
    if stamp is not None:
        text += part(draw, SEPARATORS, odd) + stamp
    if draw(st.integers(0, 99)) < odd:
        text = draw(st.sampled_from(["", "# " + text, " " + text, text + " ", text + "\r"]))
    return text


# One character more, anywhere: those the parsers treat apart, and their neighbours.
CHARACTERS = [
    *'\\"\r\t\x0b\x0c\x1c\x85\xa0 \n#=,[]{}_-+.eEiu0:',
    *("\u0661", "é", "\u2003", "\x00"),
]
INSERTED: st.SearchStrategy[str] = st.sampled_from(CHARACTERS)


@st.composite
def mutants(draw: st.DrawFn, body: str, precision: str) -> str:
    """`body` with one change: a character inserted or deleted, or a value or timestamp made
    odd (in a body of plain lines, a line with one odd part)."""
    kind = draw(st.integers(0, 3))
    if kind == 0:
        at = draw(st.integers(0, len(body)))
        return body[:at] + draw(INSERTED) + body[at:]
    if kind == 1 and body:
        at = draw(st.integers(0, len(body) - 1))
        return body[:at] + body[at + 1 :]
    pattern = r"=([^,= \n]+)" if kind == 2 else r" ([0-9]+)$"
    spans = [m.span(1) for m in re.finditer(pattern, body, re.MULTILINE)]
    if not spans:
        return body
    start, end = draw(st.sampled_from(spans))
    new = part(draw, VALUES, 100) if kind == 2 else draw(timestamps(precision, 100))
    return body[:start] + (new or "") + body[end:]


@st.composite
def bodies(draw: st.DrawFn) -> dict[str, Any]:
    """A body and the settings it is parsed with."""
    precision = draw(st.sampled_from(PRECISIONS))
    device_tag = draw(st.sampled_from(["device", "host"]))
    odd = draw(st.sampled_from([0, 0, 2, 5, 20, 60]))
    # Bodies of a few line shapes repeated (as clients send them), or of lines all different.
    shapes = draw(st.lists(lines(precision, device_tag, odd), min_size=1, max_size=4))
    body = "\n".join(draw(st.lists(st.sampled_from(shapes), min_size=1, max_size=12)))
    for _ in range(draw(st.sampled_from([0, 0, 1, 1, 2]))):
        body = draw(mutants(body, precision))
    return {
        "body": body + draw(st.sampled_from(["", "\n", "\n\n"])),
        "precision": precision,
        "device_tag": device_tag,
        "metric_template": draw(
            st.sampled_from(
                [
                    DEFAULT_METRIC_TEMPLATE,
                    "{field}",
                    "{measurement}_{field}",
                    "x.{field}.{measurement}",
                ]
            )
        ),
        "default_device": draw(st.sampled_from([None, "own"])),
        "max_lines": draw(st.sampled_from([100, 100, 5])),
    }


@st.composite
def plain_bodies(draw: st.DrawFn) -> dict[str, Any]:
    """Bodies the fast path must take: plain lines of valid numbers, in the window."""
    precision = draw(st.sampled_from(PRECISIONS))
    stamped = draw(st.booleans())
    measurements = draw(st.lists(st.sampled_from(["cpu", "mem", "m.x"]), min_size=1, max_size=2))
    keys = draw(st.lists(st.sampled_from(["m0", "m1", "usage_idle", "a/b"]), min_size=1))
    value = st.one_of(
        PLAIN_FLOATS,
        st.integers(-(2**70), 2**70).map(str),
        st.integers(-(2**63), 2**63 - 1).map(lambda n: f"{n}i"),
        st.sampled_from(["true", "f", "-0", "1.", "+.5", "7u"]),
    )
    rows = []
    for _ in range(draw(st.integers(1, 12))):
        head = (
            draw(st.sampled_from(measurements)) + f",device={draw(st.sampled_from(['d1', 'd2']))}"
        )
        fields = ",".join(
            f"{k}={draw(value)}" for k in draw(st.lists(st.sampled_from(keys), min_size=1))
        )
        row = f"{head} {fields}"
        if stamped:
            unit = UNIT_US[precision]
            us = draw(st.integers(EARLIEST_US, NOW_US))
            row += f" {int(us // unit) if unit >= 1 else us * 1000}"
        rows.append(row)
    return {
        "body": "\n".join(rows),
        "precision": precision,
        "device_tag": "device",
        "metric_template": DEFAULT_METRIC_TEMPLATE,
        "default_device": None,
        "max_lines": 100,
    }


def outcome(case: dict[str, Any], *, line_by_line: bool) -> Any:
    """What `parse_lines` makes of `case`, comparable with ==: values as their reprs (-0.0 is
    not 0.0), devices in order."""
    try:
        batch = parse_lines(
            case["body"],
            now_us=NOW_US,
            max_future_us=MAX_FUTURE_US,
            earliest_us=EARLIEST_US,
            line_by_line=line_by_line,
            **{k: v for k, v in case.items() if k != "body"},
        )
    except PayloadError as exc:
        return ("PayloadError", exc.code, exc.message)
    return snapshot(batch)


def snapshot(batch: LineBatch) -> Any:
    return (
        batch.lines,
        batch.rejected,
        [
            (
                device,
                lines.lines,
                lines.readings.messages,
                lines.readings.metrics,
                lines.readings.ts,
                [repr(v) for v in lines.readings.values],
                lines.readings.rejected,
                lines.readings.units,
            )
            for device, lines in batch.devices.items()
        ],
    )


class TestFastPathIsTheParser:
    @PROPERTIES
    @given(bodies())
    def test_any_body_parses_alike_both_ways(self, case: dict[str, Any]) -> None:
        assert outcome(case, line_by_line=False) == outcome(case, line_by_line=True)

    @PROPERTIES
    @given(plain_bodies())
    def test_plain_bodies_take_the_fast_path(self, case: dict[str, Any]) -> None:
        fast = _parse_columns(
            case["body"],
            case["precision"],
            (EARLIEST_US, NOW_US + MAX_FUTURE_US, NOW_US, MAX_FUTURE_US),
            case["max_lines"],
            case["device_tag"],
            case["metric_template"],
            case["default_device"],
        )
        assert fast is not None
        assert snapshot(fast) == outcome(case, line_by_line=True)
        assert not any(lines.readings.rejected for lines in fast.devices.values())

    @settings(max_examples=2000, deadline=None, derandomize=True, database=None)
    @given(st.one_of(DECIMALS, PLAIN_FLOATS, st.integers().map(str)))
    def test_orjson_reads_a_number_as_float_does(self, text: str) -> None:
        """The fast path reads values with orjson (`_json_fields`): of every JSON number it
        must make the float that float() makes of the text, to the bit."""
        try:
            number = orjson.loads(text)
        except orjson.JSONDecodeError:
            return  # not JSON: such values take float() or `_value`
        if text.lstrip("-").strip("0") == "" and "." not in text and "e" not in text.lower():
            return  # the integer -0: `_json_fields` leaves it to float()
        expected = float(text)
        assert float(number) == expected
        assert math.copysign(1.0, float(number)) == math.copysign(1.0, expected)

    @pytest.mark.parametrize(
        ("base", "precision"),
        [
            (
                "cpu,device=d1,host=a usage_idle=1.5,m0=-2e3 1764000000000000000\n"
                "cpu,device=d1,host=a usage_idle=2,m0=3 1764000000000000001",
                "ns",
            ),
            ("cpu,device=d1 t=1 1764000000000\nmem,device=d2 t=2,u=3i 1764000000001", "ms"),
            ("m,device=d1 a=1,b=0.5\nm,device=d1 a=2,b=1e5\n", "s"),
        ],
    )
    @pytest.mark.parametrize("template", [DEFAULT_METRIC_TEMPLATE, "{field}"])
    def test_every_small_edit_of_a_plain_body(
        self, base: str, precision: str, template: str
    ) -> None:
        """Each body one edit away from a plain one (a character inserted or deleted anywhere,
        a value or a timestamp made odd), every one: deterministic, beside the random bodies
        above, for the edits a fast path is most likely to take wrongly."""
        edits = [base[:at] + c + base[at:] for at in range(len(base) + 1) for c in CHARACTERS]
        edits += [base[:at] + base[at + 1 :] for at in range(len(base))]
        for pattern, odd in ((r"=([^,= \n]+)", ODD_TEXTS), (r" ([0-9]+)$", ODD_STAMPS)):
            for m in re.finditer(pattern, base, re.MULTILINE):
                edits += [base[: m.start(1)] + o + base[m.end(1) :] for o in odd]
        assert (
            _parse_columns(
                base,
                precision,
                (EARLIEST_US, NOW_US + MAX_FUTURE_US, NOW_US, MAX_FUTURE_US),
                100,
                "device",
                template,
                None,
            )
            is not None
        )
        for body in edits:
            for default_device in (None, "own"):
                case = {"body": body, "precision": precision, "device_tag": "device"}
                case.update(max_lines=100, metric_template=template, default_device=default_device)
                assert outcome(case, line_by_line=False) == outcome(case, line_by_line=True), body

    def test_examples(self) -> None:
        """A few bodies of each kind, parsed both ways, to see the cases the properties cover."""
        cases = [
            "cpu,device=d1 a=1,b=2 1764000000000000000\ncpu,device=d2 a=-0,b=1e308 1764000000000",
            "cpu,device=d1 a=1 1764000000000000000\ncpu,device=d1 a=1",
            "cpu,device=d1 a=1,a=2\nmem,device=d1 b=true,c=12i\n",
            "cpu,device=d1 x,1=y=2 1764000000000000000",
            "cpu,device=d1 a=[1],b=2",
            "cpu,device=d1 a=1,,b=2",
            "cpu,device=d1 a=1e999",
            "cpu,device=d1 a=1 " + "1" * 5000,
            'cpu,device=d1 s="x y"',
            "cpu,device=d\\ 1 a=1",
            "cpu a=1",
            "# comment\ncpu,device=d1 a=1",
        ]
        for body in cases:
            case = {"body": body, "precision": "ns", "device_tag": "device", "max_lines": 100}
            case.update(metric_template=DEFAULT_METRIC_TEMPLATE, default_device=None)
            assert outcome(case, line_by_line=False) == outcome(case, line_by_line=True), body


QUERY_BYTES = st.lists(
    st.one_of(
        st.sampled_from([b"%", b"%00", b"%ed%a0%80", b"%zz", b"+", b"&", b"=", b"\x00"]),
        st.binary(max_size=4),
    ),
    max_size=12,
).map(b"".join)


class TestQueryShortcuts:
    """A line protocol write's query (`?org=..&bucket=..&precision=..`) is read without
    parse_qsl when nothing in it is encoded: the same parameters, the same refusals."""

    @PROPERTIES
    @given(QUERY_BYTES)
    def test_query_parameters_are_parse_qsl_s(self, query: bytes) -> None:
        text = query.decode("latin-1")
        assert query_parameters(text) == dict(parse_qsl(text, keep_blank_values=True))

    @PROPERTIES
    @given(QUERY_BYTES)
    def test_unstorable_text_is_found_in_any_query(self, query: bytes) -> None:
        expected = None
        for name, value in parse_qsl(query.decode("latin-1"), keep_blank_values=True):
            if UNSTORABLE.search(name) or UNSTORABLE.search(value):
                expected = ["query", UNSTORABLE.sub("?", name)]
                break
        assert unstorable_parameter({"path": "/write", "query_string": query}) == expected
