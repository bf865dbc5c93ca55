"""Invalid messages sent on purpose, each with the rejection code the gateway must answer.

Every bad message carries exactly one fault and one value, so "one bad message sent" is "one
rejection expected", whether the gateway rejects a reading (NaN, wrong type, invalid metric
name) or the whole message (future timestamp, broken JSON). Broken JSON spoils a whole body, so
it always travels alone; the others ride inside ordinary batches next to valid messages (which
the gateway must keep).

JSON has no NaN: orjson would write `null`. The NaN kind writes the bare token `NaN` (or
`Infinity`), which lenient decoders (Python's json, JavaScript's eval-era parsers, many device
SDKs) emit; the gateway decodes it and rejects the reading as non_finite_value.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from enum import StrEnum
from typing import Final

import orjson


class FaultKind(StrEnum):
    NAN = "nan"
    WRONG_TYPE = "wrong_type"
    INVALID_METRIC = "invalid_metric"
    FUTURE_TIMESTAMP = "future_timestamp"
    BROKEN_JSON = "broken_json"


# The gateway's codes (devices/formats.py `Code`), restated: the simulator is an outside client.
EXPECTED_CODE: Final = {
    FaultKind.NAN: "non_finite_value",
    FaultKind.WRONG_TYPE: "invalid_value",
    FaultKind.INVALID_METRIC: "invalid_metric",
    FaultKind.FUTURE_TIMESTAMP: "timestamp_in_future",
    FaultKind.BROKEN_JSON: "invalid_json",
}
ALL_KINDS: Final = tuple(FaultKind)

_NON_FINITE: Final = (b"NaN", b"Infinity", b"-Infinity")
_WRONG_VALUES: Final = ('"21.5"', "null", "[21.5]", '{"v": 21.5}', '"on"')
_BAD_METRICS: Final = ("temp erature", "", "x" * 65, "temp\n", "température", "a;b")
# A day ahead: far beyond any sane clock-skew allowance (the gateway's default is 5 minutes).
FUTURE_MS: Final = 86_400_000


@dataclass(frozen=True, slots=True)
class BadMessage:
    kind: FaultKind
    raw: bytes  # one JSON message (or, for BROKEN_JSON, a whole unusable body)

    @property
    def code(self) -> str:
        return EXPECTED_CODE[self.kind]

    @property
    def alone(self) -> bool:
        """Must be sent as a body of its own (it would spoil the others)."""
        return self.kind is FaultKind.BROKEN_JSON


def bad_message(kind: FaultKind, ts_ms: int, metric: str, rng: random.Random) -> BadMessage:
    """One message with exactly one fault of `kind`, timestamped `ts_ms`."""
    if kind is FaultKind.NAN:
        token = rng.choice(_NON_FINITE)
        raw = b'{"ts":%d,"values":{%s:%s}}' % (ts_ms, orjson.dumps(metric), token)
    elif kind is FaultKind.WRONG_TYPE:
        value = rng.choice(_WRONG_VALUES).encode()
        raw = b'{"ts":%d,"values":{%s:%s}}' % (ts_ms, orjson.dumps(metric), value)
    elif kind is FaultKind.INVALID_METRIC:
        name = rng.choice(_BAD_METRICS)
        raw = orjson.dumps({"ts": ts_ms, "values": {name: 1.0}})
    elif kind is FaultKind.FUTURE_TIMESTAMP:
        raw = orjson.dumps({"ts": ts_ms + FUTURE_MS, "values": {metric: 1.0}})
    else:
        whole = orjson.dumps({"ts": ts_ms, "values": {metric: 1.0}})
        raw = whole[: rng.randint(1, len(whole) - 1)]  # cut short: never valid JSON
    return BadMessage(kind, raw)
