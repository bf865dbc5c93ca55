"""Telemetry payloads: parse and validate, knowing nothing of storage or transport.

The native format is one message or an array of messages:

    {"ts": "2026-11-23T10:00:00.123Z" | 1763892000123, "values": {"temperature": 21.5}}

`ts` is RFC 3339 with an offset, or epoch milliseconds (int or float); absent means the receive
time. A stored timestamp is UTC epoch microseconds from 1970-01-01 to 9999-12-31T23:59:59.999999Z
(`TS_MIN_US`..`TS_MAX_US`: it fits a 64-bit integer and every one can be written as RFC 3339);
anything outside is rejected (`timestamp_before_epoch`, `timestamp_in_future`), whatever its
size. So is a `ts` before the earliest time accepted (`earliest_us`, 2000-01-01 unless
configured: `timestamp_too_old`): epoch seconds sent as milliseconds would name January 1970,
and the message says so.

Each (metric, value) pair becomes one reading; a value is a finite float. Booleans are
stored as 1.0 / 0.0. Every problem is reported per message (`metric` None) or per reading, with a
stable code; valid readings beside rejected ones are kept. Only a body that is not JSON at all, or
holds too many messages, fails as a whole (`PayloadError`): nothing a client sends makes the parser
raise anything else.

Rejections echo what the client sent (metric names, field names), so every text in a `Rejection`
goes through `safe_text`: it can always be encoded as UTF-8 JSON and stored as PostgreSQL text.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any, Final

import orjson

# Match with `fullmatch`: Python's `$` also matches before a trailing newline ("temp\n").
METRIC_PATTERN: Final = r"^[A-Za-z0-9_.:/\-]{1,64}$"
_METRIC_RE: Final = re.compile(METRIC_PATTERN)
_EPOCH: Final = datetime(1970, 1, 1, tzinfo=UTC)
_US: Final = timedelta(microseconds=1)
_MESSAGE_FIELDS: Final = frozenset(("ts", "values"))
TS_MIN_US: Final = 0
TS_MAX_US: Final = 253_402_300_799_999_999  # 9999-12-31T23:59:59.999999Z
_TS_MAX_MS: Final = TS_MAX_US // 1000
# The default earliest `ts` accepted: a device that sends epoch seconds where milliseconds are
# meant names a time in January 1970, and one with an unset clock a time in 1970 too.
DEFAULT_EARLIEST: Final = datetime(2000, 1, 1, tzinfo=UTC)


def epoch_us(dt: datetime) -> int:
    """UTC epoch microseconds of an aware datetime."""
    return (dt - _EPOCH) // _US


DEFAULT_EARLIEST_US: Final = epoch_us(DEFAULT_EARLIEST)
# Metric names already found valid: a bounded set, never evicted (a name's validity never
# changes), checked per reading on the hot path; a set lookup is all it needs, not a cache type.
_KNOWN_METRICS_MAX: Final = 100_000
_known_metrics: set[str] = set()


class Code:
    """The machine-readable rejection codes (stable: clients and dashboards key on them)."""

    INVALID_JSON = "invalid_json"
    TOO_MANY_MESSAGES = "too_many_messages"
    INVALID_MESSAGE = "invalid_message"
    UNKNOWN_FIELD = "unknown_field"
    INVALID_VALUES = "invalid_values"
    EMPTY_VALUES = "empty_values"
    INVALID_TIMESTAMP = "invalid_timestamp"
    TIMESTAMP_BEFORE_EPOCH = "timestamp_before_epoch"
    TIMESTAMP_TOO_OLD = "timestamp_too_old"  # after 1970 but before the configured earliest time
    TIMESTAMP_IN_FUTURE = "timestamp_in_future"  # also: after TS_MAX_US, whatever the skew allows
    INVALID_METRIC = "invalid_metric"
    INVALID_VALUE = "invalid_value"
    NON_FINITE_VALUE = "non_finite_value"


class PayloadError(Exception):
    """The payload as a whole cannot be used (not JSON, too many messages)."""

    def __init__(self, code: str, message: str) -> None:
        message = safe_text(message)
        super().__init__(message)
        self.code = code
        self.message = message


def safe_text(text: str) -> str:
    """`text` with what JSON and databases cannot carry written out as escapes: a lone surrogate
    (from a JSON escape like "\\ud800") as `\\ud800`, a NUL as `\\x00` (PostgreSQL text and
    jsonb refuse NUL). Any other text is returned as it is."""
    if "\x00" in text:
        text = text.replace("\x00", "\\x00")
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return text.encode("utf-8", "backslashreplace").decode("utf-8")
    return text


def safe_json(value: Any) -> Any:
    """`value` (decoded JSON) with every string, keys included, made safe by `safe_text`."""
    if isinstance(value, str):
        return safe_text(value)
    if isinstance(value, list | tuple):
        return [safe_json(v) for v in value]
    if isinstance(value, dict):
        return {safe_text(str(k)): safe_json(v) for k, v in value.items()}
    return value


@dataclass(slots=True, frozen=True)
class Rejection:
    """One rejected message (`metric` None) or reading; its texts are made safe (`safe_text`)."""

    index: int
    metric: str | None
    code: str
    message: str

    def __post_init__(self) -> None:
        if self.metric is not None:
            object.__setattr__(self, "metric", safe_text(self.metric))
        object.__setattr__(self, "message", safe_text(self.message))

    def as_dict(self) -> dict[str, Any]:
        return {
            "index": self.index,
            "metric": self.metric,
            "code": self.code,
            "message": self.message,
        }


@dataclass(slots=True)
class Readings:
    """Valid readings as parallel columns, plus what was rejected and why."""

    metrics: list[str] = field(default_factory=list)
    ts: list[int] = field(default_factory=list)
    values: list[float] = field(default_factory=list)
    rejected: list[Rejection] = field(default_factory=list)
    messages: int = 0
    # metric -> the unit the payload gives it (SenML's `u`/`bu`; the native format has none)
    units: dict[str, str] = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.values)


def load_json(body: bytes | str) -> Any:
    """Decode JSON; NaN and Infinity are let through so they can be rejected per reading."""
    try:
        return orjson.loads(body)
    except orjson.JSONDecodeError as exc:
        try:
            return json.loads(body)  # accepts NaN / Infinity, which orjson refuses
        except (ValueError, RecursionError):
            raise PayloadError(Code.INVALID_JSON, f"body is not valid JSON: {exc}") from None


def parse_timestamp(raw: object, now_us: int) -> int | Rejection:
    """Epoch microseconds for a message's `ts` (a Rejection with index -1 if it is unusable)."""
    if raw is None:
        return now_us
    if isinstance(raw, bool):
        return Rejection(-1, None, Code.INVALID_TIMESTAMP, "ts must be RFC 3339 or epoch ms")
    if isinstance(raw, int | float):
        # (math.isfinite of an int converts it to a float, which overflows past ~1.8e308)
        if isinstance(raw, float) and not math.isfinite(raw):
            return Rejection(-1, None, Code.INVALID_TIMESTAMP, "ts must be finite")
        # Compared before scaling: 1e308 * 1000 is inf, and round(inf) raises.
        if raw < 0:
            return Rejection(-1, None, Code.TIMESTAMP_BEFORE_EPOCH, "ts is before 1970-01-01")
        if raw > _TS_MAX_MS:
            return _past_the_end()
        return round(raw * 1000) if isinstance(raw, float) else raw * 1000
    if isinstance(raw, str):
        try:
            # RFC 3339 is printable ASCII. CPython's fromisoformat reads a NUL as the end of a
            # part: "10:00:00\x00Z" parsed as 10:00:00Z.
            if not (raw.isascii() and raw.isprintable()):
                raise ValueError(raw)
            # RFC 3339 allows a lower-case "t" and "z", which fromisoformat refuses.
            dt = datetime.fromisoformat(raw.upper())
        except ValueError:
            return Rejection(-1, None, Code.INVALID_TIMESTAMP, f"ts {raw[:64]!r} is not RFC 3339")
        if dt.tzinfo is None:
            return Rejection(
                -1, None, Code.INVALID_TIMESTAMP, f"ts {raw[:64]!r} has no UTC offset (add Z)"
            )
        us = epoch_us(dt)
        if us < TS_MIN_US:
            return Rejection(-1, None, Code.TIMESTAMP_BEFORE_EPOCH, "ts is before 1970-01-01")
        return _past_the_end() if us > TS_MAX_US else us
    return Rejection(-1, None, Code.INVALID_TIMESTAMP, "ts must be RFC 3339 or epoch ms")


def _past_the_end() -> Rejection:
    return Rejection(
        -1,
        None,
        Code.TIMESTAMP_IN_FUTURE,
        "ts is too far ahead: after 9999-12-31T23:59:59.999999Z, the latest time stored",
    )


def metric_ok(metric: str) -> bool:
    """Whether `metric` is a valid metric name (METRIC_PATTERN). A hot loop asks
    `KNOWN_METRICS` first, as `_add_readings` does: a set lookup, no call."""
    return _metric_ok(metric)


KNOWN_METRICS: Final = _known_metrics  # names found valid (read it; `metric_ok` adds to it)


def _metric_ok(metric: str) -> bool:
    if metric in _known_metrics:
        return True
    if _METRIC_RE.fullmatch(metric) is None:
        return False
    if len(_known_metrics) < _KNOWN_METRICS_MAX:
        _known_metrics.add(metric)
    return True


def parse_telemetry(
    body: bytes | str | Any,
    *,
    now_us: int,
    max_future_us: int,
    max_messages: int,
    earliest_us: int = DEFAULT_EARLIEST_US,
    decoded: bool = False,
) -> Readings:
    """Validate a telemetry payload (raw JSON bytes, or already decoded with `decoded=True`).

    A `ts` from 1970 up to `earliest_us` is rejected with `timestamp_too_old`, one after
    `now_us + max_future_us` with `timestamp_in_future`."""
    messages = _messages(body if decoded else load_json(body), max_messages)
    out = Readings(messages=len(messages))
    window = _Window(now_us, earliest_us, max_future_us)
    for index, msg in enumerate(messages):
        checked = _check_message(index, msg, window)
        if isinstance(checked, Rejection):
            out.rejected.append(checked)
        else:
            _add_readings(out, index, checked[0], checked[1])
    return out


def _messages(doc: Any, max_messages: int) -> list[Any]:
    """The messages of a decoded payload (one object, or an array); PayloadError past the limit."""
    messages = doc if isinstance(doc, list) else [doc]
    if len(messages) > max_messages:
        raise PayloadError(
            Code.TOO_MANY_MESSAGES,
            f"{len(messages)} messages in one payload; the limit is {max_messages}",
        )
    return messages


class _Window:
    """The times a message's `ts` may name: from `earliest_us` to `max_future_us` past now
    (and the same bounds in epoch milliseconds, for the common case of an integer `ts`)."""

    __slots__ = ("earliest_ms", "earliest_us", "latest_ms", "latest_us", "max_future_us", "now_us")

    def __init__(self, now_us: int, earliest_us: int, max_future_us: int) -> None:
        self.now_us = now_us
        self.earliest_us = earliest_us
        self.max_future_us = max_future_us
        self.latest_us = now_us + max_future_us
        # (clamped to what can be stored: outside it, the full checks name the reason)
        self.earliest_ms = -(-max(earliest_us, TS_MIN_US) // 1000)
        self.latest_ms = min(self.latest_us, TS_MAX_US) // 1000


def _check_message(index: int, msg: Any, window: _Window) -> tuple[int, dict[Any, Any]] | Rejection:
    """(ts, values) of a well-formed message, or why it is rejected as a whole."""
    if type(msg) is dict and len(msg) == 2:  # the common shape, answered without set arithmetic
        raw, vals = msg.get("ts"), msg.get("values")
        if (
            type(raw) is int
            and window.earliest_ms <= raw <= window.latest_ms
            and type(vals) is dict
            and vals
        ):
            return raw * 1000, vals
    if not isinstance(msg, dict):
        return Rejection(index, None, Code.INVALID_MESSAGE, "a message must be a JSON object")
    if msg.keys() - _MESSAGE_FIELDS:
        unknown = ", ".join(sorted(str(k) for k in msg.keys() - _MESSAGE_FIELDS))
        return Rejection(
            index,
            None,
            Code.UNKNOWN_FIELD,
            f"unknown field(s): {unknown}; a message has only ts and values",
        )
    raw = msg.get("ts")
    if type(raw) is int and window.earliest_ms <= raw <= window.latest_ms:
        ts = raw * 1000  # the common case, answered without the checks below
    else:
        checked = _message_time(index, raw, window)
        if isinstance(checked, Rejection):
            return checked
        ts = checked
    vals = msg.get("values")
    if not isinstance(vals, dict):
        return Rejection(index, None, Code.INVALID_VALUES, "values must be an object of metrics")
    if not vals:
        return Rejection(index, None, Code.EMPTY_VALUES, "values is empty")
    return ts, vals


def _message_time(index: int, raw: object, window: _Window) -> int | Rejection:
    """The message's time in epoch microseconds (the receive time when `ts` is absent)."""
    ts = parse_timestamp(raw, window.now_us)
    if isinstance(ts, Rejection):
        return Rejection(index, None, ts.code, ts.message)
    if ts > window.latest_us:
        return Rejection(
            index,
            None,
            Code.TIMESTAMP_IN_FUTURE,
            f"ts is {(ts - window.now_us) / 1e6:.0f} s ahead of the gateway's clock "
            f"(at most {window.max_future_us / 1e6:.0f} s allowed)",
        )
    if ts < window.earliest_us and raw is not None:
        return Rejection(index, None, Code.TIMESTAMP_TOO_OLD, _too_old(raw, ts, window))
    return ts


def _too_old(raw: object, ts: int, window: _Window) -> str:
    """Why a `ts` before the earliest accepted time is refused; a number that would be a time in
    the accepted window if it were epoch seconds is most likely that."""
    text = f"ts {_rfc3339(ts)} is before {_rfc3339(window.earliest_us)}, the earliest time accepted"
    if isinstance(raw, int | float) and window.earliest_ms <= raw * 1000 <= window.latest_ms:
        text += f"; {raw} looks like epoch seconds (x1000 for milliseconds)"
    return text


def _rfc3339(us: int) -> str:
    return (_EPOCH + us * _US).isoformat().replace("+00:00", "Z")


def _add_readings(out: Readings, index: int, ts: int, vals: dict[Any, Any]) -> None:
    """One reading per valid (metric, value) pair of message `index`; a rejection per other."""
    metrics, tss, values, rejected = out.metrics, out.ts, out.values, out.rejected
    known = _known_metrics
    for metric, value in vals.items():
        # The common case first: a known metric and a finite float (x - x is 0.0 for those, NaN
        # for an infinity or NaN); anything else takes the full checks below.
        if type(value) is float and metric in known and value - value == 0.0:
            metrics.append(metric)
            tss.append(ts)
            values.append(value)
            continue
        if not _metric_ok(metric):
            rejected.append(
                Rejection(
                    index,
                    metric[:80],
                    Code.INVALID_METRIC,
                    "a metric name is 1-64 characters of A-Z a-z 0-9 _ . : / -",
                )
            )
            continue
        kind = type(value)
        if kind is float:
            if not math.isfinite(value):
                rejected.append(
                    Rejection(index, metric, Code.NON_FINITE_VALUE, f"{value} is not finite")
                )
                continue
        elif kind is int:
            try:
                value = float(value)
            except OverflowError:
                rejected.append(
                    Rejection(index, metric, Code.NON_FINITE_VALUE, "value is out of range")
                )
                continue
        elif kind is bool:
            value = 1.0 if value else 0.0
        else:
            rejected.append(
                Rejection(
                    index,
                    metric,
                    Code.INVALID_VALUE,
                    f"value must be a number, not {_json_type(value)}",
                )
            )
            continue
        metrics.append(metric)
        tss.append(ts)
        values.append(value)


def _json_type(value: object) -> str:
    if value is None:
        return "null"
    if isinstance(value, str):
        return "a string"
    if isinstance(value, list):
        return "an array"
    if isinstance(value, dict):
        return "an object"
    return type(value).__name__
