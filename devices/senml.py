"""SenML packs (RFC 8428, `application/senml+json`): parse and validate into the same `Readings`
as the native format (devices/formats.py), knowing nothing of storage or transport.

A pack is a JSON array of records. Base fields (`bn bt bu bv bs bver`) apply to their record and
to every later one, until another record sets them again; each record is resolved as RFC 8428
section 4.6 says:

- name = `bn` + `n`: the metric name stored, checked against the metric name rules
  (devices.formats.METRIC_PATTERN: 1-64 characters of A-Z a-z 0-9 _ . : / -), so
  `urn:dev:ow:10e2073a01080063:temp` is a metric; a name outside them is `invalid_metric`.
- time = `bt` + `t`, in seconds (a float: fractions are kept to the microsecond). A resolved
  time below 2**28 (about 8.5 years: no device clock is that wrong) is relative to the receive
  time: 0 or absent is now, -5 five seconds ago (section 4.5.3); from 2**28 on it is seconds
  since 1970. The time then passes the native format's checks (`timestamp_too_old`,
  `timestamp_in_future`, ...). `ut` (update time) is not used.
- value = `bv` + `v`, a finite number. Records whose value is `vs` (string), `vb` (boolean),
  `vd` (data) or only a sum `s` are not stored: `unsupported_value` (fieldgate stores numbers;
  where a record has `v` and `s`, the sum is not stored). A record with a name or a time but
  no value is `missing_value`; one with base fields only (some senders put `bn`/`bt` alone in
  the first record) is no reading and no error.
- unit = `u`, else `bu`: kept per metric (`Readings.units`) and stored with its series. One
  metric has one unit: a later record of the pack giving the same name another unit is
  `unit_mismatch` (RFC 8428's own 5.1.3 example puts %RH, lon and lat under one name: only the
  first unit's values are kept, the others are refused, each with its record's index). The
  store then holds a series to the first unit it was given (gateway/ingest.py).

Every problem with a record is a `Rejection` with the record's index (its position in the
array) and, where known, its resolved name; the valid records beside it are kept. What makes
the whole pack unusable is a PayloadError: not JSON, not an array, more records than
`max_messages`, a base field of the wrong type (every later record would be misread), a
`bver` this parser does not understand, or a field ending in `_` (RFC 8428 section 4.4: such
"must-understand" fields must not be ignored, and fieldgate understands none).
"""

from __future__ import annotations

import math
from itertools import repeat
from operator import add, mul
from typing import Any, Final

from devices.formats import (
    DEFAULT_EARLIEST_US,
    KNOWN_METRICS,
    TS_MAX_US,
    TS_MIN_US,
    Code,
    PayloadError,
    Readings,
    Rejection,
    load_json,
    metric_ok,
    safe_text,
)

MEDIA_TYPE: Final = "application/senml+json"
# Resolved times below this are relative to now (RFC 8428 section 4.5.3).
RELATIVE_BELOW_S: Final = 2**28
# bver: RFC 8428 is version 10 (its own examples send 5, a draft's); RFC 9100 reads a version
# as feature bits, bit 4 being secondary units, which need nothing here (a unit is text).
_UNDERSTOOD_VERSION_BITS: Final = 0b11111
UNIT_MAX: Final = 32
_BASE_FIELDS: Final = frozenset(("bn", "bt", "bu", "bv", "bs", "bver"))
_OTHER_VALUES: Final = ("vs", "vb", "vd")
_US_PER_S: Final = 1_000_000
# The fast path's bounds: integers a float holds exactly, times (in s) far inside what fits.
_PLAIN: Final = frozenset(("n", "v", "t", "u"))
# `read_columns`: what the records after the first may hold, and what the first may.
_COLUMNS: Final = frozenset(("n", "v", "t"))
_FIRST_COLUMNS: Final = _COLUMNS | {"bn", "bt", "bv", "bver"}
_INT_FAST: Final = 2**53
_SECONDS_FAST: Final = 1e12


class SenmlCode:
    """Rejection and PayloadError codes of SenML packs (beside devices.formats.Code's, which
    name the problems both formats share: metric names, values, times)."""

    INVALID_PACK = "invalid_pack"  # the whole pack (PayloadError)
    INVALID_RECORD = "invalid_record"
    MISSING_VALUE = "missing_value"
    UNSUPPORTED_VALUE = "unsupported_value"
    INVALID_UNIT = "invalid_unit"
    UNIT_MISMATCH = "unit_mismatch"


def parse_senml(
    body: bytes | str | Any,
    *,
    now_us: int,
    max_future_us: int,
    max_messages: int,
    earliest_us: int = DEFAULT_EARLIEST_US,
    decoded: bool = False,
) -> Readings:
    """Validate a SenML pack (raw JSON bytes, or already decoded with `decoded=True`); one
    reading per valid record, a rejection per other (`messages` counts the records)."""
    records = body if decoded else load_json(body)
    if not isinstance(records, list):
        raise PayloadError(
            SenmlCode.INVALID_PACK, "a SenML pack is a JSON array of records (RFC 8428)"
        )
    if len(records) > max_messages:
        raise PayloadError(
            Code.TOO_MANY_MESSAGES,
            f"{len(records)} records in one pack; the limit is {max_messages}",
        )
    out = Readings(messages=len(records))
    pack = _Pack(out, now_us, earliest_us, now_us + max_future_us)
    if not pack.read_columns(records):
        pack.read(records)
    return out


class _Pack:
    """The base values in force while reading a pack's records in order."""

    __slots__ = ("bn", "bt", "bu", "bv", "earliest_us", "latest_us", "now_us", "out")

    def __init__(self, out: Readings, now_us: int, earliest_us: int, latest_us: int) -> None:
        self.out = out
        self.now_us = now_us
        self.earliest_us = earliest_us
        self.latest_us = latest_us
        self.bn = ""
        self.bt = 0.0
        self.bu: str | None = None
        self.bv = 0.0

    def read_columns(self, records: list[Any]) -> bool:
        """The common pack at C speed, a column at a time: the first record may set base
        values (as packers start a pack), every record after it is n, v and maybe t, each a
        valid reading (a known metric name, a finite float, a time in the window), no units.
        True when the pack was read so (all of it stored); False, with nothing read, for any
        other pack, which `read` then takes record by record. `read`'s rules, in bulk: the
        property tests (tests/test_senml_properties.py) hold the two to the same answers."""
        if not records or set(map(type, records)) != {dict}:
            return False
        first = records[0]
        if not first.keys() <= _FIRST_COLUMNS or not set().union(*records[1:]) <= _COLUMNS:
            return False
        if not _BASE_FIELDS.isdisjoint(first):
            self.take_base(0, first)  # (a PayloadError here is `read`'s too)
            if self.bu is not None:
                return False
        names: list[Any] = list(map(dict.get, records, repeat("n", len(records)), repeat("")))
        values: list[Any] = list(map(dict.get, records, repeat("v", len(records))))
        times: list[Any] = list(map(dict.get, records, repeat("t", len(records)), repeat(0)))
        if set(map(type, values)) != {float} or set(map(type, names)) != {str}:
            return False
        time_types = set(map(type, times))
        if not time_types <= {float, int}:
            return False
        # bv + v, as `read` adds them (so -0.0 + 0.0 is 0.0 there too); a finite sum: all are
        # finite (an overflow only sends a valid pack the slow way)
        values = list(map(add, values, repeat(self.bv, len(values))))
        if not math.isfinite(sum(values)):
            return False
        if self.bn:
            names = list(map(add, repeat(self.bn, len(names)), names))
        known = KNOWN_METRICS
        if not all(name in known or metric_ok(name) for name in set(names)):
            return False
        if int in time_types and not all(
            -_INT_FAST < t < _INT_FAST for t in times if type(t) is int
        ):
            return False
        seconds = list(map(add, repeat(self.bt, len(times)), times))
        low, high = min(seconds), max(seconds)
        if not -_SECONDS_FAST < low <= high < _SECONDS_FAST:
            return False
        ts = list(map(round, map(mul, seconds, repeat(1e6, len(seconds)))))
        if high < RELATIVE_BELOW_S:
            ts = list(map(add, ts, repeat(self.now_us, len(ts))))
        elif low < RELATIVE_BELOW_S:
            return False  # relative and absolute times in one pack: record by record
        if not self.earliest_us <= min(ts) <= max(ts) <= self.latest_us:
            return False
        self.out.metrics.extend(names)
        self.out.ts.extend(ts)
        self.out.values.extend(values)
        return True

    def read(self, records: list[Any]) -> None:
        out = self.out
        metrics, tss, values, units = out.metrics, out.ts, out.values, out.units
        # (locals: this loop runs once per record; the base values change only in `take_base`)
        plain, int_fast, seconds_fast, relative, known = (
            _PLAIN,
            _INT_FAST,
            _SECONDS_FAST,
            RELATIVE_BELOW_S,
            KNOWN_METRICS,
        )
        now, earliest, latest = self.now_us, self.earliest_us, self.latest_us
        bn, bt, bu, bv = self.bn, self.bt, self.bu, self.bv
        for index, record in enumerate(records):
            # The common record first (n, v and maybe t, and u as before; a known metric, a
            # finite float or small integer, a time in the window), answered without the checks
            # below; anything else takes them.
            if type(record) is dict and record.keys() <= plain:
                n = record.get("n", "")
                v = record.get("v")
                t = record.get("t", 0)
                u = record.get("u", bu)
                if (
                    type(n) is str
                    and (type(v) is float or (type(v) is int and -int_fast < v < int_fast))
                    and (type(t) is float or (type(t) is int and -int_fast < t < int_fast))
                    and -seconds_fast < (seconds := bt + t) < seconds_fast
                ):
                    name = bn + n
                    value = v + bv  # a float: bv is one
                    ts = round(seconds * 1_000_000)
                    if seconds < relative:
                        ts += now
                    if (
                        value - value == 0.0
                        and earliest <= ts <= latest
                        and (u is None or units.get(name) == u)
                        and (name in known or metric_ok(name))
                    ):
                        metrics.append(name)
                        tss.append(ts)
                        values.append(value)
                        continue
            if type(record) is not dict:
                self.reject(index, None, SenmlCode.INVALID_RECORD, "a record is a JSON object")
                continue
            self.take_base(index, record)
            bn, bt, bu, bv = self.bn, self.bt, self.bu, self.bv
            checked = self.check(index, record)
            if isinstance(checked, Rejection):
                self.out.rejected.append(checked)
            elif checked is not None:
                name, ts, value, unit = checked
                self.out.metrics.append(name)
                self.out.ts.append(ts)
                self.out.values.append(value)
                if unit is not None:
                    self.out.units.setdefault(name, unit)

    def reject(self, index: int, name: str | None, code: str, message: str) -> None:
        self.out.rejected.append(Rejection(index, name, code, message))

    def take_base(self, index: int, record: dict[str, Any]) -> None:
        """Set the base values `record` gives; PayloadError for one that is unusable (every
        later record would be misread) or a field this parser must understand and does not."""
        for key in record:
            if type(key) is str and key.endswith("_"):
                raise PayloadError(
                    SenmlCode.INVALID_PACK,
                    f"record {index}: field {safe_text(key[:40])!r} must be understood "
                    "(RFC 8428 section 4.4), and fieldgate does not know it",
                )
        if _BASE_FIELDS.isdisjoint(record):
            return
        if "bn" in record:
            self.bn = _base(index, record, "bn", str)
        if "bt" in record:
            self.bt = _base_number(index, record, "bt")
        if "bu" in record:
            self.bu = _base(index, record, "bu", str)
        if "bv" in record:
            self.bv = _base_number(index, record, "bv")
        if "bs" in record:
            _base_number(index, record, "bs")  # checked, not used: sums are not stored
        if "bver" in record:
            version = record["bver"]
            if type(version) is not int or version < 1 or version & ~_UNDERSTOOD_VERSION_BITS:
                raise PayloadError(
                    SenmlCode.INVALID_PACK,
                    f"record {index}: bver {safe_text(repr(version)[:40])} is not a SenML "
                    "version fieldgate understands (RFC 8428's is 10)",
                )

    def check(
        self, index: int, record: dict[str, Any]
    ) -> tuple[str, int, float, str | None] | Rejection | None:
        """(name, ts, value, unit) of a record to store, why it is refused, or None for a
        record of base fields only."""
        n = record.get("n", "")
        if type(n) is not str:
            return Rejection(index, None, SenmlCode.INVALID_RECORD, "n must be a string")
        name = self.bn + n
        shown = name[:80] or None
        if "v" not in record:
            return self.valueless(index, record, shown)
        if any(k in record for k in _OTHER_VALUES):
            return Rejection(
                index, shown, SenmlCode.INVALID_RECORD, "a record has one of v, vs, vb, vd"
            )
        if not metric_ok(name):
            return Rejection(
                index,
                shown,
                Code.INVALID_METRIC,
                f"the name {name[:80]!r} (bn + n) is not a metric name: 1-64 characters of "
                "A-Z a-z 0-9 _ . : / -",
            )
        raw = record["v"]
        if type(raw) is not float and type(raw) is not int:
            return Rejection(
                index, name, Code.INVALID_VALUE, f"v must be a number, not {type(raw).__name__}"
            )
        value = _add(self.bv, raw)
        if not math.isfinite(value):
            return Rejection(index, name, Code.NON_FINITE_VALUE, "the value (bv + v) is not finite")
        ts = self.time(index, name, record)
        if isinstance(ts, Rejection):
            return ts
        unit = record.get("u", self.bu)
        if unit is not None:
            wrong = _unit_problem(unit)
            if wrong:
                return Rejection(index, name, SenmlCode.INVALID_UNIT, wrong)
            first = self.out.units.get(name)
            if first is not None and first != unit:
                return Rejection(
                    index,
                    name,
                    SenmlCode.UNIT_MISMATCH,
                    f"{name!r} is in {first!r} in this pack (an earlier record); a metric has "
                    f"one unit, so this {unit!r} value is not stored",
                )
        return name, ts, value, unit

    def valueless(self, index: int, record: dict[str, Any], shown: str | None) -> Rejection | None:
        if any(k in record for k in _OTHER_VALUES) or "s" in record:
            kind = next((k for k in _OTHER_VALUES if k in record), "s")
            return Rejection(
                index,
                shown,
                SenmlCode.UNSUPPORTED_VALUE,
                f"fieldgate stores numeric values (v); a record with {kind} "
                f"({_KINDS[kind]}) and no v is not stored",
            )
        if all(type(k) is str and k in _BASE_FIELDS for k in record):
            return None  # base fields only: no reading
        return Rejection(index, shown, SenmlCode.MISSING_VALUE, "the record has no value (v)")

    def time(self, index: int, name: str, record: dict[str, Any]) -> int | Rejection:
        """The record's time in epoch microseconds (bt + t; relative below 2**28 seconds)."""
        t = record.get("t", 0)
        if type(t) is not float and type(t) is not int:
            return Rejection(index, name, Code.INVALID_TIMESTAMP, "t must be a number (seconds)")
        seconds = _add(self.bt, t)
        if not math.isfinite(seconds):
            return Rejection(index, name, Code.INVALID_TIMESTAMP, "the time (bt + t) is not finite")
        if seconds < RELATIVE_BELOW_S:
            ts = self.now_us + round(seconds * _US_PER_S)
        elif seconds * _US_PER_S > TS_MAX_US:
            return Rejection(
                index,
                name,
                Code.TIMESTAMP_IN_FUTURE,
                "the time is after 9999-12-31T23:59:59.999999Z, the latest time stored",
            )
        else:
            ts = round(seconds * _US_PER_S)
        if ts < TS_MIN_US:
            return Rejection(
                index, name, Code.TIMESTAMP_BEFORE_EPOCH, "the time is before 1970-01-01"
            )
        if ts > self.latest_us:
            return Rejection(
                index,
                name,
                Code.TIMESTAMP_IN_FUTURE,
                f"the time is {(ts - self.now_us) / 1e6:.0f} s ahead of the gateway's clock "
                f"(at most {(self.latest_us - self.now_us) / 1e6:.0f} s allowed)",
            )
        if ts < self.earliest_us:
            return Rejection(
                index,
                name,
                Code.TIMESTAMP_TOO_OLD,
                f"the time ({seconds:.6g} s since 1970) is before the earliest time accepted",
            )
        return ts


_KINDS: Final = {"vs": "a string", "vb": "a boolean", "vd": "data", "s": "a sum"}


def _add(base: float, number: float) -> float:
    """`base + number` as a float; inf when either is an integer past the float range."""
    try:
        return float(base) + float(number)
    except OverflowError:
        return math.inf


def _base(index: int, record: dict[str, Any], key: str, kind: type) -> Any:
    value = record[key]
    if type(value) is not kind:
        raise PayloadError(
            SenmlCode.INVALID_PACK,
            f"record {index}: {key} must be a {'string' if kind is str else 'number'}",
        )
    return value


def _base_number(index: int, record: dict[str, Any], key: str) -> float:
    value = record[key]
    number = _add(0.0, value) if type(value) is float or type(value) is int else math.nan
    if not math.isfinite(number):
        raise PayloadError(SenmlCode.INVALID_PACK, f"record {index}: {key} must be a finite number")
    return number


def _unit_problem(unit: object) -> str:
    """Why `unit` cannot be stored ('' when it can): text of 1-UNIT_MAX printable characters
    (RFC 8428's units are short ASCII symbols: Cel, %RH, m/s2)."""
    if type(unit) is not str:
        return "u and bu must be strings"
    if not 1 <= len(unit) <= UNIT_MAX or not unit.isprintable():
        return f"a unit is 1-{UNIT_MAX} printable characters"
    return ""
