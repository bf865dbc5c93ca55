"""Property tests of the payload parser (hypothesis): whatever a client sends, `parse_telemetry`
either refuses the payload as a whole (`PayloadError`) or returns readings that can be stored and
rejections that can be rendered as JSON; it never raises anything else.

Derandomized (a fixed sequence of examples), so CI runs the same cases every time.
"""

from __future__ import annotations

import json
import math
from typing import Any

import orjson
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from devices.formats import (
    DEFAULT_EARLIEST_US,
    TS_MAX_US,
    TS_MIN_US,
    PayloadError,
    Readings,
    parse_telemetry,
)

NOW_US = 1_763_892_000_000_000  # 2025-11-23T10:00:00Z
NOW_MS = NOW_US // 1000

PROPERTIES = settings(
    max_examples=300,
    deadline=None,
    derandomize=True,
    database=None,
    suppress_health_check=[HealthCheck.too_slow],
)

# Text as a hostile client writes it: lone surrogates (through JSON escapes), NUL, other controls.
NASTY_CHARS = st.sampled_from(["\ud800", "\udfff", "\x00", "\n", "\u2028", "\ufeff", "é", "😀"])
TEXT = st.lists(st.one_of(st.characters(), NASTY_CHARS), max_size=12).map("".join)
HUGE_INTS = st.one_of(
    st.integers(),
    st.integers(min_value=-(10**400), max_value=10**400),
    st.sampled_from([2**63, -(2**63) - 1, 2**64, 10**19, TS_MAX_US // 1000 + 1, 10**400]),
)
FLOATS = st.one_of(
    st.floats(allow_nan=True, allow_infinity=True),
    st.sampled_from([1e308, -1e308, 1.7976931348623157e308, 5e-324, -0.0, 2.5e14, 2.6e14]),
)
SCALARS = st.one_of(st.none(), st.booleans(), HUGE_INTS, FLOATS, TEXT)
JSON_VALUES = st.recursive(
    SCALARS,
    lambda inner: st.one_of(st.lists(inner, max_size=4), st.dictionaries(TEXT, inner, max_size=4)),
    max_leaves=10,
)
TIMESTAMPS = st.one_of(
    st.none(),
    HUGE_INTS,
    FLOATS,
    st.integers(min_value=NOW_MS - 10**6, max_value=NOW_MS + 10**6),
    st.sampled_from(
        [
            "2025-11-23T10:00:00Z",
            "9999-12-31T23:59:59.999999Z",
            "9999-12-31T23:59:59.999999-23:59",
            "0001-01-01T00:00:00+23:59",
            "1970-01-01T00:00:00Z",
            "1969-12-31T23:59:59.999999Z",
            "2025-11-23t10:00:00z",
            "2025-11-23T10:00:00",
        ]
    ),
    TEXT,
    JSON_VALUES,
)
METRICS = st.one_of(st.sampled_from(["t", "temperature", "a.b:c/d-e_f", "x" * 64]), TEXT)
MESSAGES = st.fixed_dictionaries(
    {"values": st.one_of(st.dictionaries(METRICS, JSON_VALUES, max_size=5), JSON_VALUES)},
    optional={"ts": TIMESTAMPS, "extra": JSON_VALUES},
)
DOCUMENTS = st.one_of(JSON_VALUES, MESSAGES, st.lists(st.one_of(MESSAGES, JSON_VALUES), max_size=5))
MAX_FUTURE_US = st.sampled_from([0, 300_000_000, 10**30])


def check(body: Any, max_future_us: int, *, decoded: bool = False) -> Readings | None:
    """Parse `body`; assert what must hold of any answer."""
    error: PayloadError | None
    try:
        readings = parse_telemetry(
            body, now_us=NOW_US, max_future_us=max_future_us, max_messages=50, decoded=decoded
        )
    except PayloadError as exc:
        error = exc
    else:
        error = None
    if error is not None:
        orjson.dumps({"code": error.code, "message": error.message})
        assert "\x00" not in error.message
        return None
    # the rejections render as JSON (HTTP answers, MQTT error topics) and store as text
    orjson.dumps([r.as_dict() for r in readings.rejected])
    for r in readings.rejected:
        assert "\x00" not in r.message
        assert r.metric is None or "\x00" not in r.metric
    # the readings fit the storage: int64 microseconds in the documented range, finite floats
    assert len(readings.metrics) == len(readings.ts) == len(readings.values)
    assert all(type(ts) is int and TS_MIN_US <= ts <= TS_MAX_US for ts in readings.ts)
    # and nothing before the earliest time accepted (2000-01-01 by default)
    assert all(ts >= DEFAULT_EARLIEST_US for ts in readings.ts)
    assert all(type(v) is float and math.isfinite(v) for v in readings.values)
    assert all(type(m) is str for m in readings.metrics)
    return readings


@PROPERTIES
@given(doc=DOCUMENTS, max_future_us=MAX_FUTURE_US)
def test_any_json_document_as_bytes(doc: Any, max_future_us: int) -> None:
    # allow_nan: NaN and Infinity are sent as the JSON extensions the parser accepts to reject
    body = json.dumps(doc, allow_nan=True).encode()
    check(body, max_future_us)


@PROPERTIES
@given(doc=DOCUMENTS, max_future_us=MAX_FUTURE_US)
def test_any_json_document_already_decoded(doc: Any, max_future_us: int) -> None:
    check(doc, max_future_us, decoded=True)


@PROPERTIES
@given(body=st.binary(max_size=200), max_future_us=MAX_FUTURE_US)
def test_any_bytes(body: bytes, max_future_us: int) -> None:
    check(body, max_future_us)


@PROPERTIES
@given(
    prefix=st.sampled_from([b'{"ts":', b'[{"values":{"t":1},"ts":', b'{"values":{"t":']),
    middle=st.binary(max_size=40),
    suffix=st.sampled_from([b',"values":{"t":1}}', b"}]", b"}}", b""]),
)
def test_bytes_in_the_middle_of_a_message(prefix: bytes, middle: bytes, suffix: bytes) -> None:
    check(prefix + middle + suffix, 300_000_000)


def test_a_valid_message_passes_the_check() -> None:
    """The check above sees readings: a valid message gives one (the property is not vacuous)."""
    readings = check(orjson.dumps({"ts": NOW_MS, "values": {"t": 1}}), 300_000_000)
    assert readings is not None
    assert (readings.metrics, readings.ts, readings.values) == (["t"], [NOW_US], [1.0])
