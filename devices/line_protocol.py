"""InfluxDB line protocol: parse and validate into the native parser's `Readings`, per device.

    <measurement>[,<tag>=<value>...] <field>=<value>[,<field>=<value>...] [<timestamp>]

One point a line (`\\n`; a trailing `\\r` is dropped); empty lines and lines starting with `#`
are skipped. Escapes follow InfluxDB's line protocol reference: in a measurement `\\,` and
`\\ `; in tag keys, tag values and field keys `\\,` `\\=` and `\\ `; in a string field value
`\\"` and `\\\\`. A backslash before any other character is kept as it is.

What becomes of a point:

- its device is the value of one tag (`device_tag`, FIELDGATE_LINE_PROTOCOL_DEVICE_TAG, default
  `device`); a line without it belongs to `default_device` (the token's own device, for a device
  token), or is rejected with `missing_device_tag`. Every other tag is ignored: a series is one
  (device, metric) pair, and tags beyond the device do not name one.
- each field is one reading whose metric is `metric_template` with `{measurement}` and `{field}`
  filled in (FIELDGATE_LINE_PROTOCOL_METRIC, default `{measurement}.{field}`: `cpu,device=d1
  usage_idle=93` is metric `cpu.usage_idle`), checked by the native metric name rules
  (`invalid_metric`).
- float (`1.5`, `1`, `-2e3`), integer (`12i`) and unsigned (`12u`) fields are stored as floats
  (an integer beyond 2**53 loses its low digits, as in the native format); a boolean (`t`, `T`,
  `true`, `True`, `TRUE`, and the same for false) is 1.0 or 0.0, as in the native format; a
  string field (`"..."`) is rejected with `string_field`: fieldgate stores numbers only.
- the timestamp is an integer in the request's precision (`ns`, the default, `us`, `ms` or `s`);
  stored timestamps are epoch microseconds, so nanoseconds are truncated (floored) to the
  microsecond. No timestamp means the receive time. The native time rules apply
  (`timestamp_before_epoch`, `timestamp_too_old`, `timestamp_in_future`).

Every problem is a `Rejection` whose `index` is the 1-based line number (as editors and
InfluxDB's own error messages count); a line's valid fields are kept beside its rejected ones,
like a native message's readings. Only too many lines fail as a whole (`PayloadError`).
"""

from __future__ import annotations

import functools
import math
import operator
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from itertools import chain, repeat
from typing import Final, TypeVar

import orjson

from devices.formats import (
    TS_MAX_US,
    TS_MIN_US,
    Code,
    PayloadError,
    Readings,
    Rejection,
    _known_metrics,
    _metric_ok,
    _rfc3339,
)

DEFAULT_DEVICE_TAG: Final = "device"
DEFAULT_METRIC_TEMPLATE: Final = "{measurement}.{field}"
# Epoch microseconds per timestamp unit, as a divisor (ns) or a multiplier (the others).
PRECISIONS: Final = ("ns", "us", "ms", "s")
_SCALE: Final = {"us": 1, "ms": 1_000, "s": 1_000_000}
_FLOAT_RE: Final = re.compile(r"[+-]?(?:\d+\.?\d*|\.\d+)(?:[eE][+-]?\d+)?", re.ASCII)
_INT_RE: Final = re.compile(r"[+-]?\d+", re.ASCII)
_UINT_RE: Final = re.compile(r"\d+", re.ASCII)
_TIMESTAMP_RE: Final = re.compile(r"-?\d+", re.ASCII)
_DIGITS: Final = frozenset("0123456789.")
_TRUE: Final = frozenset(("t", "T", "true", "True", "TRUE"))
_FALSE: Final = frozenset(("f", "F", "false", "False", "FALSE"))
_INT64_MAX: Final = 2**63 - 1
_UINT64_MAX: Final = 2**64 - 1
_T = TypeVar("_T")
_METRIC_RULE: Final = "a metric name is 1-64 characters of A-Z a-z 0-9 _ . : / -"


class LineCode:
    """Rejection codes of line protocol, beside the native ones (`devices.formats.Code`) it
    shares: `invalid_metric`, `invalid_value`, `non_finite_value`, `invalid_timestamp`,
    `timestamp_*`, `too_many_messages` (too many lines)."""

    INVALID_LINE = "invalid_line"
    STRING_FIELD = "string_field"
    MISSING_DEVICE_TAG = "missing_device_tag"
    # Decided by the gateway (it knows the token and the registry), per line:
    UNKNOWN_DEVICE = "unknown_device"
    DEVICE_NOT_ALLOWED = "device_not_allowed"
    DEVICE_DISABLED = "device_disabled"


@dataclass(slots=True)
class DeviceLines:
    """One device's valid readings (`readings`, with its lines' rejections) and the numbers of
    its lines, in order (for rejecting them all, if the device may not be written)."""

    readings: Readings = field(default_factory=Readings)
    lines: list[int] = field(default_factory=list)


@dataclass(slots=True)
class LineBatch:
    """A parsed body: each device's lines, and the rejections of lines that name no device
    (unreadable, or without the device tag)."""

    devices: dict[str, DeviceLines] = field(default_factory=dict)
    rejected: list[Rejection] = field(default_factory=list)
    lines: int = 0  # lines holding a point (not empty, not a comment)


class _Line(Exception):
    """A line that cannot be read at all (turned into one `invalid_line` rejection)."""


def parse_lines(
    body: bytes | str,
    *,
    precision: str = "ns",
    now_us: int,
    max_future_us: int,
    earliest_us: int,
    max_lines: int,
    device_tag: str = DEFAULT_DEVICE_TAG,
    metric_template: str = DEFAULT_METRIC_TEMPLATE,
    default_device: str | None = None,
    line_by_line: bool = False,
) -> LineBatch:
    """Parse a line protocol body (`precision`: one of PRECISIONS; ValueError otherwise).

    A body whose every line is plain (`_parse_columns`: nothing escaped or quoted, and nothing
    to reject) is read whole, column by column; any other body line by line
    (`_parse_line_by_line`, which words every rejection). Both give the same result for every
    body (tests/test_line_protocol_properties.py); `line_by_line=True` skips the first, for those
    tests and bench/parse_formats.py."""
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {', '.join(PRECISIONS)}, not {precision!r}")
    text = body.decode("utf-8", "replace") if isinstance(body, bytes) else body
    window = (earliest_us, min(now_us + max_future_us, TS_MAX_US), now_us, max_future_us)
    if not line_by_line:
        batch = _parse_columns(
            text, precision, window, max_lines, device_tag, metric_template, default_device
        )
        if batch is not None:
            return batch
    return _parse_line_by_line(
        text, precision, window, max_lines, device_tag, metric_template, default_device
    )


_Window = tuple[int, int, int, int]  # earliest, latest, now (epoch us), the future allowed (us)


def _parse_line_by_line(
    text: str,
    precision: str,
    window: _Window,
    max_lines: int,
    device_tag: str,
    metric_template: str,
    default_device: str | None,
) -> LineBatch:
    """`parse_lines` one line at a time: any body, every rejection worded."""
    rows = text.split("\n")
    out = LineBatch()
    metric_of = (
        None if metric_template == DEFAULT_METRIC_TEMPLATE else _MetricNames(metric_template)
    )
    heads: dict[str, tuple[str, dict[str, str]]] = {}
    count = 0
    for number, raw in enumerate(rows, 1):
        stripped = raw.rstrip("\r").lstrip(" \t")
        if not stripped or stripped[0] == "#":
            continue
        count += 1
        if count > max_lines:
            raise PayloadError(
                Code.TOO_MANY_MESSAGES,
                f"more than {max_lines} lines in one body; the limit is {max_lines}",
            )
        try:
            measurement, tags, fields, stamp = _split_line(stripped, heads)
        except _Line as exc:
            out.rejected.append(Rejection(number, None, LineCode.INVALID_LINE, f"{exc}"))
            continue
        device = tags.get(device_tag, default_device)
        if device is None:
            out.rejected.append(
                Rejection(
                    number,
                    None,
                    LineCode.MISSING_DEVICE_TAG,
                    f"the line has no {device_tag!r} tag naming its device",
                )
            )
            continue
        ts = _timestamp(number, stamp, precision, window)
        lines = out.devices.get(device)
        if lines is None:
            lines = out.devices[device] = DeviceLines()
        readings = lines.readings
        lines.lines.append(number)
        readings.messages += 1
        if isinstance(ts, Rejection):
            readings.rejected.append(ts)
            continue
        _add_fields(readings, number, measurement, fields, ts, metric_of)
    out.lines = count
    return out


def _add_fields(
    readings: Readings,
    number: int,
    measurement: str,
    fields: list[tuple[str, str]],
    ts: int,
    metric_of: _MetricNames | None,
) -> None:
    """One reading per valid field of line `number`; a rejection per other."""
    metrics, tss, values, known = readings.metrics, readings.ts, readings.values, _known_metrics
    for key, raw in fields:
        metric = f"{measurement}.{key}" if metric_of is None else metric_of(measurement, key)
        # The common case first, as `_value` would take it: a known metric and a plain float.
        if metric in known and raw[-1] in _DIGITS and raw.isascii() and "_" not in raw:
            try:
                value = float(raw)
            except ValueError:
                pass
            else:
                if value - value == 0.0:
                    metrics.append(metric)
                    tss.append(ts)
                    values.append(value)
                    continue
        checked = _value(number, metric, raw)
        if isinstance(checked, Rejection):
            readings.rejected.append(checked)
        else:
            metrics.append(metric)
            tss.append(ts)
            values.append(checked)


class _MetricNames:
    """Metric names from a template other than the default, each made once per body."""

    __slots__ = ("_seen", "_template")

    def __init__(self, template: str) -> None:
        self._template = template
        self._seen: dict[tuple[str, str], str] = {}

    def __call__(self, measurement: str, key: str) -> str:
        name = self._seen.get((measurement, key))
        if name is None:
            name = self._template.replace("{measurement}", measurement).replace("{field}", key)
            self._seen[(measurement, key)] = name
        return name


def _plain_heads(
    heads: Sequence[str], device_tag: str, default_device: str | None
) -> tuple[dict[str, str], dict[str, str]] | None:
    """head -> measurement and head -> device of each distinct plain head, in order of first
    appearance (devices come in the order of their first line); None if one is not plain or
    names no device."""
    measurement_of: dict[str, str] = {}
    device_of: dict[str, str] = {}
    for head in dict.fromkeys(heads):
        if head[:1] in ("", "#"):
            return None
        try:
            measurement, tags = _plain_head(head)
        except _Line:
            return None
        device = tags.get(device_tag, default_device)
        if device is None:
            return None
        measurement_of[head] = measurement
        device_of[head] = device
    return measurement_of, device_of


def _parse_columns(
    text: str,
    precision: str,
    window: _Window,
    max_lines: int,
    device_tag: str,
    metric_template: str,
    default_device: str | None,
) -> LineBatch | None:
    """`parse_lines` of a body whose every line is plain, or None (the body is then read line by
    line). Plain: no escape or quote, none of the characters the line-by-line parser or float()
    strip (`\\r \\t \\x0b \\x0c`), no empty line or comment, every line
    `<head> <fields>[ <timestamp>]` with one space between (all with a timestamp or all
    without), and nothing to reject: every head names a device, every metric name is valid,
    every value is a number, every timestamp is within the window.

    The body is taken as columns (heads, field sets, timestamps; then field keys and values)
    made by C-level passes (str.split, zip, map, orjson) rather than a Python loop over lines
    and fields: Python's work per reading is what made line protocol slower than native JSON
    (bench/README.md). Python works once per head, device and metric name of the body."""
    if "\\" in text or '"' in text or "\r" in text or "\t" in text or "\x0b" in text:
        return None
    if "\x0c" in text:
        return None
    rows = text.split("\n")
    if rows[-1] == "":
        rows.pop()  # the final newline
    if not rows or len(rows) > max_lines:
        return None
    try:  # lines of different widths raise
        columns = list(zip(*map(str.split, rows, repeat(" ")), strict=True))
    except ValueError:
        return None
    if len(columns) == 3:
        heads, fields, stamps = columns
        line_ts = _plain_timestamps(stamps, precision, window)
    elif len(columns) == 2:
        heads, fields = columns
        line_ts = [window[2]] * len(rows)  # no timestamps: the receive time
    else:
        return None
    if line_ts is None:
        return None
    named = _plain_heads(heads, device_tag, default_device)
    if named is None:
        return None
    measurement_of, device_of = named
    devices = dict.fromkeys(device_of.values())
    groups: list[tuple[str, Sequence[str], Sequence[str], list[int], list[int]]]
    if len(devices) == 1:  # the usual body: one device's lines
        groups = [(next(iter(devices)), heads, fields, line_ts, list(range(1, len(rows) + 1)))]
    else:
        at: dict[str, list[int]] = {device: [] for device in devices}
        for i, head in enumerate(heads):
            at[device_of[head]].append(i)
        groups = [
            (
                device,
                [heads[i] for i in lines],
                [fields[i] for i in lines],
                [line_ts[i] for i in lines],
                [i + 1 for i in lines],
            )
            for device, lines in at.items()
        ]
    out = LineBatch(lines=len(rows))
    for device, group_heads, group_fields, group_ts, numbers in groups:
        readings = _plain_readings(
            group_heads, group_fields, group_ts, measurement_of, metric_template
        )
        if readings is None:
            return None
        readings.messages = len(numbers)
        out.devices[device] = DeviceLines(readings, numbers)
    return out


def _plain_timestamps(stamps: Sequence[str], precision: str, window: _Window) -> list[int] | None:
    """Each line's timestamp in epoch us, or None when one is not a plain integer within the
    window (the line-by-line parser words its rejection)."""
    digits = "".join(stamps)
    if not (digits.isdigit() and digits.isascii()):
        return None
    try:
        raw = list(map(int, stamps))
    except ValueError:  # an empty one (a space after the fields), or over 4300 digits
        return None
    if precision == "ns":
        us = list(map(operator.floordiv, raw, repeat(1000)))
    elif precision == "us":
        us = raw
    else:
        us = list(map(operator.mul, raw, repeat(_SCALE[precision])))
    if min(us) < window[0] or max(us) > window[1]:
        return None
    return us


def _plain_readings(
    heads: Sequence[str],
    fields: Sequence[str],
    line_ts: list[int],
    measurement_of: dict[str, str],
    metric_template: str,
) -> Readings | None:
    """One device's readings from its plain lines (`line_ts`: a time per line); None when a
    field is not `key=<number>` or a metric name is not valid."""
    numbers = _json_fields(fields)
    raws: Sequence[str] = ()
    if numbers is None:  # not JSON numbers (12i, 1., +1): one `partition` per field
        pairs = ",".join(fields).split(",")
        split_keys, _, raws = zip(*map(str.partition, pairs, repeat("=")), strict=True)
        if "" in raws:
            return None
        keys = list(split_keys)
    else:
        keys, values = numbers
    if "" in keys:
        return None
    # Pairs a line: every pair holds one `=` now (keys have none, numbers have none).
    counts = list(map(str.count, fields, repeat("=")))
    metrics = _metric_column(heads, keys, counts, measurement_of, metric_template)
    if metrics is None:
        return None
    if numbers is None:
        plain = _plain_values(metrics, raws)
        if plain is None:
            return None
        values = plain
    return Readings(metrics, _repeated(line_ts, counts), values)


def _json_fields(fields: Sequence[str]) -> tuple[list[str], list[float]] | None:
    """Keys and values of fields that are all `<key>=<a JSON number>` (how floats are written,
    and integers without `i`), as orjson reads them from one JSON array (`"k",v,"k",v`):
    float() costs several times what orjson takes to read a number. None for anything else."""
    joined = ",".join(fields)
    if "=-0," in joined or joined.endswith("=-0"):  # JSON's -0 is the integer 0, not -0.0
        return None
    try:
        flat = orjson.loads('["' + joined.replace(",", ',"').replace("=", '",') + "]")
    except orjson.JSONDecodeError:
        return None
    if len(flat) != 2 * (joined.count(",") + 1):
        return None
    keys, numbers = flat[0::2], flat[1::2]
    try:
        "".join(keys)  # a TypeError unless every key is a string
        total = sum(numbers)  # and unless every value is a number (true and false are 1 and 0)
    except TypeError:
        return None
    if total - total != 0:  # orjson refuses infinities; finite values can overflow a sum
        return None
    return keys, list(map(float, numbers))


def _plain_values(metrics: list[str], raws: Sequence[str]) -> list[float] | None:
    """The values of fields that are not all JSON numbers, as floats; None when one would be
    rejected. float() in one C-level pass when it reads each as `_value` would (it takes more:
    underscores, non-ASCII digits, nan and inf, which are looked for first); one by one through
    `_value` itself otherwise (12i, 12u, true)."""
    joined = ",".join(raws)
    if joined.isascii() and "_" not in joined:
        try:
            values = list(map(float, raws))
        except ValueError:
            pass
        else:
            total = sum(values)
            if total - total == 0.0:  # finite: no value is inf or nan
                return values
    out: list[float] = []
    for metric, raw in zip(metrics, raws, strict=True):
        value = _value(0, metric, raw)
        if isinstance(value, Rejection):
            return None
        out.append(value)
    return out


def _metric_column(
    heads: Sequence[str],
    keys: list[str],
    counts: list[int],
    measurement_of: dict[str, str],
    template: str,
) -> list[str] | None:
    """Each reading's metric name (`counts`: fields a line); None if one is not valid."""
    measurements = {measurement_of[head] for head in set(heads)}
    if len(measurements) == 1:
        (measurement,) = measurements
        first = keys[: counts[0]]
        if keys == first * len(counts):  # every line has the same fields: the usual body
            line = _line_metrics(template, measurement, tuple(first))
            return None if line is None else list(line) * len(counts)
        names = {key: _metric_name(template, measurement, key) for key in set(keys)}
        if not all(map(_metric_ok, names.values())):
            return None
        return list(map(names.__getitem__, keys))
    per_reading = _repeated(list(map(measurement_of.__getitem__, heads)), counts)
    both = list(zip(per_reading, keys, strict=True))
    pair_names = {pair: _metric_name(template, *pair) for pair in set(both)}
    if not all(map(_metric_ok, pair_names.values())):
        return None
    return list(map(pair_names.__getitem__, both))


def _repeated(items: list[_T], counts: list[int]) -> list[_T]:
    """Each item `counts[i]` times, in order."""
    every = counts[0]
    if counts.count(every) == len(counts):  # the usual body: as many fields on every line
        out = items * every
        for j in range(every):
            out[j::every] = items
        return out
    return list(chain.from_iterable(map(repeat, items, counts)))


@functools.lru_cache(maxsize=1024)
def _line_metrics(template: str, measurement: str, keys: tuple[str, ...]) -> tuple[str, ...] | None:
    """The metric names of a line's fields, or None if one is not valid: the same for most
    bodies a client sends, so kept (a body of 100 readings spends ~10% of its parse here)."""
    names = tuple(_metric_name(template, measurement, key) for key in keys)
    return names if all(map(_metric_ok, names)) else None


def _metric_name(template: str, measurement: str, key: str) -> str:
    if template == DEFAULT_METRIC_TEMPLATE:
        return f"{measurement}.{key}"
    return template.replace("{measurement}", measurement).replace("{field}", key)


_Parts = tuple[str, dict[str, str], list[tuple[str, str]], str | None]


def _split_line(line: str, heads: dict[str, tuple[str, dict[str, str]]]) -> _Parts:
    """(measurement, tags, [(field key, raw value)], raw timestamp or None) of a line; `heads`
    holds the plain heads (measurement and tags) met so far in the body: a series' lines repeat
    theirs, which is then split once."""
    if "\\" not in line and '"' not in line:
        return _split_plain(line, heads)
    return _split_escaped(line)


def _split_plain(line: str, heads: dict[str, tuple[str, dict[str, str]]]) -> _Parts:
    """`_split_line` of the common line: nothing escaped, no string field; plain splits, and
    each pair split at its first `=`."""
    parts = line.split(" ")
    if "" in parts:
        parts = [p for p in parts if p]
    if len(parts) not in (2, 3):
        raise _Line(_shape_problem(len(parts)))
    head = heads.get(parts[0])
    if head is None:
        head = heads[parts[0]] = _plain_head(parts[0])
    measurement, tags = head
    fields: list[tuple[str, str]] = []
    for pair in parts[1].split(","):
        key, _, value = pair.partition("=")
        if not (key and value):
            raise _Line(f"field {pair[:64]!r} is not key=value")
        fields.append((key, value))
    return measurement, tags, fields, parts[2] if len(parts) == 3 else None


def _plain_head(text: str) -> tuple[str, dict[str, str]]:
    """The measurement and tags of a plain line's head."""
    head = text.split(",")
    measurement = head[0]
    if not measurement:
        raise _Line("the measurement is empty")
    tags: dict[str, str] = {}
    for pair in head[1:]:
        key, _, value = pair.partition("=")
        if not (key and value):
            raise _Line(f"tag {pair[:64]!r} is not key=value")
        tags[key] = value
    return measurement, tags


def _split_escaped(line: str) -> _Parts:
    """`_split_line` of a line with escapes or a string field."""
    head_text, rest = _cut(line, " ", quoted=False)
    if rest is None:
        raise _Line(_shape_problem(1))
    parts = [p for p in _split(rest.lstrip(" "), " ", quoted=True) if p]
    if len(parts) not in (1, 2):
        raise _Line(_shape_problem(len(parts) + 1))
    head = _split(head_text, ",", quoted=False)
    measurement = _unescape(head[0], ", ")
    if not measurement:
        raise _Line("the measurement is empty")
    tags: dict[str, str] = {}
    for pair in head[1:]:
        key, eq, value = _pair(pair)
        if not (eq and key and value):
            raise _Line(f"tag {_unescape(pair, ',= ')[:64]!r} is not key=value")
        tags[_unescape(key, ",= ")] = _unescape(value, ",= ")
    fields: list[tuple[str, str]] = []
    for pair in _split(parts[0], ",", quoted=True):
        key, eq, value = _pair(pair)
        if not (eq and key and value):
            raise _Line(f"field {_unescape(pair, ',= ')[:64]!r} is not key=value")
        fields.append((_unescape(key, ",= "), value))
    return measurement, tags, fields, parts[1] if len(parts) == 2 else None


def _shape_problem(parts: int) -> str:
    if parts < 2:
        return "a line is '<measurement>[,<tags>] <fields> [<timestamp>]': no fields"
    return "a line is '<measurement>[,<tags>] <fields> [<timestamp>]': unescaped space"


def _pair(text: str) -> tuple[str, bool, str]:
    """`key=value` split at its first unescaped `=`."""
    if "\\" not in text:
        key, eq, value = text.partition("=")
        return key, bool(eq), value
    key, rest = _cut(text, "=", quoted=False)
    return key, rest is not None, rest or ""


def _cut(text: str, sep: str, *, quoted: bool) -> tuple[str, str | None]:
    """`text` split at its first unescaped `sep` (outside a quoted string, if `quoted`)."""
    pieces = _split(text, sep, quoted=quoted, limit=1)
    return (pieces[0], pieces[1]) if len(pieces) == 2 else (pieces[0], None)


def _split(text: str, sep: str, *, quoted: bool, limit: int = -1) -> list[str]:
    """`text` split at each unescaped `sep` (outside "..." if `quoted`); escapes are kept."""
    pieces: list[str] = []
    start = 0
    i = 0
    in_quotes = False
    n = len(text)
    while i < n:
        c = text[i]
        if c == "\\":
            i += 2
            continue
        if quoted and c == '"':
            in_quotes = not in_quotes
        elif c == sep and not in_quotes:
            pieces.append(text[start:i])
            start = i + 1
            if len(pieces) == limit:
                break
        i += 1
    if in_quotes:
        raise _Line("a string field value has no closing quote")
    pieces.append(text[start:])
    return pieces


def _unescape(text: str, specials: str) -> str:
    """`text` with `\\<c>` made `<c>` for each `c` of `specials` (other backslashes kept)."""
    if "\\" not in text:
        return text
    out: list[str] = []
    i = 0
    n = len(text)
    while i < n:
        c = text[i]
        if c == "\\" and i + 1 < n and text[i + 1] in specials:
            out.append(text[i + 1])
            i += 2
            continue
        out.append(c)
        i += 1
    return "".join(out)


def _timestamp(
    number: int, stamp: str | None, precision: str, window: tuple[int, int, int, int]
) -> int | Rejection:
    """Epoch microseconds of a line's timestamp (the receive time when it has none)."""
    earliest_us, latest_us, now_us, max_future_us = window
    if stamp is None:
        return now_us
    if stamp.isdigit() and stamp.isascii():  # the common case, without the regex
        raw = _int(stamp)
        us = raw // 1000 if precision == "ns" else raw * _SCALE[precision]
        if earliest_us <= us <= latest_us:
            return us
    if _TIMESTAMP_RE.fullmatch(stamp) is None:
        return Rejection(
            number,
            None,
            Code.INVALID_TIMESTAMP,
            f"timestamp {stamp[:64]!r} is not an integer ({precision})",
        )
    raw = _int(stamp)
    us = raw // 1000 if precision == "ns" else raw * _SCALE[precision]
    if us < TS_MIN_US:
        return Rejection(number, None, Code.TIMESTAMP_BEFORE_EPOCH, "timestamp is before 1970")
    if us > latest_us:
        if us > TS_MAX_US:
            text = "after 9999-12-31T23:59:59.999999Z, the latest time stored"
        else:
            text = (
                f"{(us - now_us) / 1e6:.0f} s ahead of the gateway's clock (at most "
                f"{max_future_us / 1e6:.0f} s allowed)"
            )
        return Rejection(
            number,
            None,
            Code.TIMESTAMP_IN_FUTURE,
            f"timestamp {stamp[:64]} ({precision}) is {text}",
        )
    if us < earliest_us:
        return Rejection(
            number,
            None,
            Code.TIMESTAMP_TOO_OLD,
            f"timestamp {_rfc3339(us)} is before {_rfc3339(earliest_us)}, the earliest time "
            f"accepted; is the precision ({precision}) the one the client writes?",
        )
    return us


_HUGE: Final = 10**40  # past every range a line's integer is checked against


def _int(digits: str) -> int:
    """int() of an optionally signed run of ASCII digits, beyond `_HUGE` taken as `_HUGE`: of
    more than 4300 digits int() raises ValueError (CPython's guard against slow conversion),
    and every one of them is out of range anyway."""
    if len(digits) < 40:
        return int(digits)
    sign = -1 if digits[0] == "-" else 1
    significant = digits.lstrip("+-").lstrip("0")
    return sign * (_HUGE if len(significant) > 40 else int(significant or "0"))


def _value(number: int, metric: str, raw: str) -> float | Rejection:
    """A field's value as a float, or why it is rejected."""
    # The common case first: a float of ASCII digits (float() alone would also take "nan",
    # "1_000" and other digits than ASCII's), of a known metric.
    if raw[-1] in _DIGITS and raw.isascii() and "_" not in raw and _metric_ok(metric):
        try:
            value = float(raw)
        except ValueError:
            pass
        else:
            if value - value == 0.0:  # finite
                return value
    if not _metric_ok(metric):
        return Rejection(number, metric[:80], Code.INVALID_METRIC, _METRIC_RULE)
    last = raw[-1]
    if last == '"':
        if len(raw) < 2 or raw[0] != '"':
            return Rejection(number, metric, Code.INVALID_VALUE, f"{raw[:64]!r} is not a value")
        return Rejection(
            number,
            metric,
            LineCode.STRING_FIELD,
            "string fields are not stored: fieldgate keeps numbers (float, integer, unsigned, "
            "boolean)",
        )
    if (
        last == "i"
        and raw.isascii()
        and (raw[:-1].isdigit() or _INT_RE.fullmatch(raw, 0, len(raw) - 1))
    ):
        n = _int(raw[:-1])
        if not -_INT64_MAX - 1 <= n <= _INT64_MAX:
            return Rejection(number, metric, Code.INVALID_VALUE, f"{raw[:64]} is not an int64")
        return float(n)
    if last == "u" and _UINT_RE.fullmatch(raw, 0, len(raw) - 1):
        n = _int(raw[:-1])
        if n > _UINT64_MAX:
            return Rejection(number, metric, Code.INVALID_VALUE, f"{raw[:64]} is not a uint64")
        return float(n)
    if raw in _TRUE:
        return 1.0
    if raw in _FALSE:
        return 0.0
    if _FLOAT_RE.fullmatch(raw) is None:
        return Rejection(
            number,
            metric,
            Code.INVALID_VALUE,
            f"{raw[:64]!r} is not a float, integer (12i), unsigned (12u), boolean or string",
        )
    value = float(raw)
    if not math.isfinite(value):
        return Rejection(number, metric, Code.NON_FINITE_VALUE, f"{raw[:64]} is out of range")
    return value
