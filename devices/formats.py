"""Telemetry payloads: parse and validate, knowing nothing of storage or transport.

The native format is one message or an array of messages:

    {"ts": "2026-11-23T10:00:00.123Z" | 1763892000123, "values": {"temperature": 21.5}}

`ts` is RFC 3339 with an offset, or epoch milliseconds (int or float); absent means the receive
time. A stored timestamp is UTC epoch microseconds from 1970-01-01 to 9999-12-31T23:59:59.999999Z
(`TS_MIN_US`..`TS_MAX_US`: it fits a 64-bit integer and every one can be written as RFC 3339);
anything outside is rejected (`timestamp_before_epoch`, `timestamp_in_future`), whatever its
size. Each (metric, value) pair becomes one reading; a value is a finite float. Booleans are
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
        us: int = (dt - _EPOCH) // _US
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
    decoded: bool = False,
) -> Readings:
    """Validate a telemetry payload (raw JSON bytes, or already decoded with `decoded=True`)."""
    doc = body if decoded else load_json(body)
    messages = doc if isinstance(doc, list) else [doc]
    if len(messages) > max_messages:
        raise PayloadError(
            Code.TOO_MANY_MESSAGES,
            f"{len(messages)} messages in one payload; the limit is {max_messages}",
        )
    out = Readings(messages=len(messages))
    latest_us = now_us + max_future_us
    metrics, tss, values, rejected = out.metrics, out.ts, out.values, out.rejected
    for index, msg in enumerate(messages):
        if not isinstance(msg, dict):
            rejected.append(
                Rejection(index, None, Code.INVALID_MESSAGE, "a message must be a JSON object")
            )
            continue
        if msg.keys() - _MESSAGE_FIELDS:
            unknown = ", ".join(sorted(str(k) for k in msg.keys() - _MESSAGE_FIELDS))
            rejected.append(
                Rejection(
                    index,
                    None,
                    Code.UNKNOWN_FIELD,
                    f"unknown field(s): {unknown}; a message has only ts and values",
                )
            )
            continue
        ts = parse_timestamp(msg.get("ts"), now_us)
        if isinstance(ts, Rejection):
            rejected.append(Rejection(index, None, ts.code, ts.message))
            continue
        if ts > latest_us:
            rejected.append(
                Rejection(
                    index,
                    None,
                    Code.TIMESTAMP_IN_FUTURE,
                    f"ts is {(ts - now_us) / 1e6:.0f} s ahead of the gateway's clock "
                    f"(at most {max_future_us / 1e6:.0f} s allowed)",
                )
            )
            continue
        vals = msg.get("values")
        if not isinstance(vals, dict):
            rejected.append(
                Rejection(index, None, Code.INVALID_VALUES, "values must be an object of metrics")
            )
            continue
        if not vals:
            rejected.append(Rejection(index, None, Code.EMPTY_VALUES, "values is empty"))
            continue
        for metric, value in vals.items():
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
    return out


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
