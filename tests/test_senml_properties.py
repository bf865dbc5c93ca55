"""SenML's column-at-a-time path (`_Pack.read_columns`) gives exactly what reading the pack
record by record (`_Pack.read`) gives: the same readings (values compared by repr, so -0.0
counts), rejections, units and errors, on generated packs near and far from the plain shape."""

from __future__ import annotations

import json
from typing import Any

from hypothesis import given, settings
from hypothesis import strategies as st

from devices.formats import PayloadError, Readings, load_json
from devices.senml import _Pack, parse_senml

NOW_US = 1_764_000_000_000_000
LIMITS: dict[str, Any] = {"now_us": NOW_US, "max_future_us": 300_000_000, "earliest_us": 0}

names = st.sampled_from(["t", "h", "a.b", "", "bad name", "x" * 70, "m0"])
floats = st.one_of(
    st.floats(allow_nan=True, allow_infinity=True),
    st.sampled_from([0.0, -0.0, 1.5, 1e308, -1e308, 2.0**53, 5e-324]),
)
numbers = st.one_of(floats, st.integers(min_value=-(2**60), max_value=2**60), st.booleans())
times = st.one_of(
    st.sampled_from([0, 0.5, -1.0, 1.0, 2**28, 2**28 - 1, 1.764e9, 1.764e9 + 0.001, 1e12, 2**53]),
    st.floats(min_value=-1e13, max_value=1e13),
    st.integers(min_value=-(2**54), max_value=2**54),
)
plain_record = st.fixed_dictionaries(
    {"n": names, "v": floats}, optional={"t": times, "u": st.sampled_from(["Cel", "%RH"])}
)
base = st.fixed_dictionaries(
    {},
    optional={
        "bn": st.sampled_from(["", "dev:", "bad name:"]),
        "bt": st.one_of(times, st.just("x")),
        "bv": st.one_of(st.sampled_from([0.0, 1.0, -0.0, 1e308]), st.integers(-5, 5)),
        "bver": st.sampled_from([10, 1, 0, 99]),
        "n": names,
        "v": numbers,
        "t": times,
    },
)
packs = st.builds(
    lambda first, rest, odd: [first, *rest, *odd],
    base,
    st.lists(plain_record, max_size=30),
    st.lists(
        st.one_of(
            st.fixed_dictionaries({"n": names, "v": numbers, "t": times}),
            st.just([]),
            st.just({"n": "t", "vs": "x"}),
        ),
        max_size=1,
    ),
)

# Packs of the plain shape, most of them valid: the column path's own ground, and its edges
# (a value that overflows bv + v, -0.0, relative and absolute times, integer times).
good_names = st.sampled_from(["t", "h", "m0", "a.b"])
good_floats = st.one_of(
    st.floats(allow_nan=False, allow_infinity=False, min_value=-1e300, max_value=1e300),
    st.sampled_from([-0.0, 0.0, 1e308]),
)
near_times = st.one_of(
    st.sampled_from([0, 0.001, 1.5, -3.0, 2**28]),
    st.floats(min_value=-1000, max_value=1000),
    st.integers(min_value=-1000, max_value=1000),
)
near_first = st.fixed_dictionaries(
    {"n": good_names, "v": good_floats},
    optional={
        "bt": st.sampled_from([1.764e9, 1.7e9, 0, 100.5, 2**28 - 10, 4e9, 1.764e9 + 1e6]),
        "bn": st.sampled_from(["", "dev:"]),
        "bv": st.sampled_from([0.0, 1.0, -0.0, 1e308]),
        "bver": st.just(10),
        "t": near_times,
    },
)
near_record = st.fixed_dictionaries({"n": good_names, "v": good_floats}, optional={"t": near_times})
near_plain = st.builds(lambda first, rest: [first, *rest], near_first, st.lists(near_record))


def record_by_record(body: bytes) -> Readings | tuple[str, str]:
    try:
        records = load_json(body)
        out = Readings(messages=len(records))
        _Pack(out, NOW_US, 0, NOW_US + 300_000_000).read(records)
        return out
    except PayloadError as exc:
        return (exc.code, str(exc))


def columns_first(body: bytes) -> Readings | tuple[str, str]:
    try:
        return parse_senml(body, max_messages=10_000, **LIMITS)
    except PayloadError as exc:
        return (exc.code, str(exc))


def shown(result: Readings | tuple[str, str]) -> Any:
    if isinstance(result, tuple):
        return result
    return (
        result.metrics,
        result.ts,
        [repr(v) for v in result.values],
        [(r.index, r.metric, r.code) for r in result.rejected],
        result.units,
        result.messages,
    )


@settings(max_examples=400, deadline=None)
@given(st.one_of(packs, near_plain, near_plain))
def test_columns_and_records_agree(pack: list[Any]) -> None:
    body = _dumps(pack)
    if body is None:
        return
    assert shown(columns_first(body)) == shown(record_by_record(body))


def _dumps(pack: list[Any]) -> bytes | None:
    """The pack as JSON (NaN and Infinity as Python's json writes them, as a client could)."""
    try:
        return json.dumps(pack).encode()
    except ValueError:
        return None


def test_the_common_pack_takes_the_column_path() -> None:
    pack = [{"bt": 1.764e9, "n": "t", "t": 0, "v": 1.5}] + [
        {"n": "t", "t": k / 10, "v": float(k)} for k in range(1, 50)
    ]
    out = Readings(messages=len(pack))
    assert _Pack(out, NOW_US, 0, NOW_US + 300_000_000).read_columns(pack)
    assert len(out) == 50
    assert out.ts[1] == round((1.764e9 + 0.1) * 1e6)
