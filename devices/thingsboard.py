"""ThingsBoard's device telemetry bodies, turned into native messages and validated by
devices/formats.py: one set of value rules, rejection codes and limits for every format.

ThingsBoard's own converter (its `JsonConverter`) reads a body as one object or an array of
objects, and so does this module:

- an object with both `ts` and `values` is one timestamped message: `ts` is epoch milliseconds
  (a number, or a string of digits, which ThingsBoard also reads), `values` the readings; its
  other keys are ignored, as ThingsBoard ignores them;
- any other object is key-value pairs timed at receipt (`{"temperature": 42}`); a `ts` key
  without `values` is then one more key, as in ThingsBoard.

Each becomes the native message `{"ts": ts, "values": values}` or `{"values": object}`, and
`parse_telemetry` decides the rest as it does for native payloads: numbers are stored, booleans
as 1.0 / 0.0, while strings, JSON objects, arrays and null (values ThingsBoard would store as
text or JSON) are rejected per reading with `invalid_value`; metric names, the time window and
the message limit are the native ones. A `ts` that is not epoch milliseconds (a date string,
null, a boolean) rejects its message with `invalid_timestamp`: ThingsBoard refuses it too.
Rejections carry the index of the object in the body, as native ones do.
"""

from __future__ import annotations

from dataclasses import replace
from typing import Any

from devices.formats import (
    DEFAULT_EARLIEST_US,
    Code,
    PayloadError,
    Readings,
    Rejection,
    load_json,
    parse_telemetry,
)

# Epoch milliseconds of the latest time stored (9999-12-31) have 15 digits: a longer string of
# digits is no time (and Python refuses to read one of over 4,300 as an int at all).
_MAX_DIGITS = 20


def parse_thingsboard(
    body: bytes | str,
    *,
    now_us: int,
    max_future_us: int,
    max_messages: int,
    earliest_us: int = DEFAULT_EARLIEST_US,
) -> Readings:
    """Validate a ThingsBoard telemetry body (raw JSON) into readings and rejections; raises
    PayloadError only where a native payload would (not JSON, too many messages)."""
    doc = load_json(body)
    items = doc if isinstance(doc, list) else [doc]
    if len(items) > max_messages:
        raise PayloadError(
            Code.TOO_MANY_MESSAGES,
            f"{len(items)} messages in one payload; the limit is {max_messages}",
        )
    messages: list[Any] = []
    positions: list[int] = []  # the body's index of each native message
    refused: list[Rejection] = []
    for index, item in enumerate(items):
        message = _native_message(index, item)
        if isinstance(message, Rejection):
            refused.append(message)
        else:
            messages.append(message)
            positions.append(index)
    readings = parse_telemetry(
        messages,
        decoded=True,
        now_us=now_us,
        max_future_us=max_future_us,
        max_messages=max_messages,
        earliest_us=earliest_us,
    )
    readings.messages = len(items)
    if refused:  # the native indices count only the messages passed on: the body's, again
        moved = [replace(r, index=positions[r.index]) for r in readings.rejected]
        readings.rejected = sorted(refused + moved, key=lambda r: r.index)
    return readings


def _native_message(index: int, item: Any) -> Any:
    """The native message of one ThingsBoard object, or why it is refused. What is not an
    object at all is passed on for the native parser to refuse (`invalid_message`)."""
    if not isinstance(item, dict):
        return item
    if "ts" not in item or "values" not in item:
        return {"values": item}  # key-value pairs, timed at receipt
    ts = item["ts"]
    if type(ts) is str and ts.isascii() and ts.isdigit() and len(ts) <= _MAX_DIGITS:
        ts = int(ts)
    elif type(ts) not in (int, float):  # (not bool: True is no time)
        return Rejection(
            index, None, Code.INVALID_TIMESTAMP, "ts must be epoch milliseconds (a number)"
        )
    if len(item) == 2 and ts is item["ts"]:
        return item  # already the native shape
    return {"ts": ts, "values": item["values"]}
