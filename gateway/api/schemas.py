"""Request and answer shapes of the HTTP API (pydantic; the answers document OpenAPI)."""

from __future__ import annotations

import math
from typing import Annotated, Any, Final, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, RootModel, Strict

from devices.models import DEVICE_ID_PATTERN, IssuedRole, Role
from gateway.api.text_guard import UNSTORABLE

INT64_MIN: Final = -(2**63)
INT64_MAX: Final = 2**63 - 1
MAX_METADATA_DEPTH: Final = 32
METADATA_DESCRIPTION: Final = (
    "any JSON object: integers within 64 bits, finite numbers, no NUL characters, "
    f"nested at most {MAX_METADATA_DEPTH} levels"
)
MAX_RETENTION_DAYS: Final = 100_000  # ~274 years: the cutoff stays far inside 64-bit microseconds
RETENTION_DESCRIPTION: Final = (
    "days of readings kept for this device (whole packed chunks expire); "
    "null: FIELDGATE_RETENTION_DAYS; 0: keep all"
)
# A number of days, not a string or a boolean JSON parsers would take for one.
RetentionDays = Annotated[float, Strict()] | None


def storable_text(text: str) -> str:
    """`text`, if both databases can store it (PostgreSQL refuses NUL in text and jsonb; a lone
    surrogate has no UTF-8 encoding)."""
    if UNSTORABLE.search(text):
        raise ValueError("holds a NUL character or a lone surrogate, which cannot be stored")
    return text


def storable_metadata(metadata: dict[str, Any]) -> dict[str, Any]:
    """`metadata`, if both databases store it as sent: every key and string storable, integers
    within 64 bits (what the JSON encoder writes; PostgreSQL's jsonb would take more, SQLite's
    JSON functions not), numbers finite (JSON has no Infinity or NaN), and not nested past
    MAX_METADATA_DEPTH (the encoder stops at 255). Walked with a stack, not recursion."""
    stack: list[tuple[Any, int]] = [(metadata, 1)]
    while stack:
        value, depth = stack.pop()
        if isinstance(value, dict | list):
            if depth > MAX_METADATA_DEPTH:
                raise ValueError(f"is nested deeper than {MAX_METADATA_DEPTH} levels")
            if isinstance(value, dict):
                for key, item in value.items():
                    storable_text(key)
                    stack.append((item, depth + 1))
            else:
                stack.extend((item, depth + 1) for item in value)
        elif isinstance(value, str):
            storable_text(value)
        elif isinstance(value, bool) or value is None:
            continue
        elif isinstance(value, int):
            if not INT64_MIN <= value <= INT64_MAX:
                raise ValueError("holds an integer beyond 64 bits, which cannot be stored")
        elif isinstance(value, float) and not math.isfinite(value):
            raise ValueError("holds Infinity or NaN, which JSON cannot store")
    return metadata


class DeviceCreate(BaseModel):
    model_config = ConfigDict(extra="forbid")

    id: str = Field(pattern=DEVICE_ID_PATTERN, description="1-64 characters of A-Z a-z 0-9 _ . -")
    name: Annotated[str, AfterValidator(storable_text)] = Field(default="", max_length=200)
    metadata: Annotated[dict[str, Any], AfterValidator(storable_metadata)] = Field(
        default_factory=dict, description=METADATA_DESCRIPTION
    )
    enabled: bool = True
    retention_days: RetentionDays = Field(
        default=None,
        ge=0,
        le=MAX_RETENTION_DAYS,
        allow_inf_nan=False,
        description=RETENTION_DESCRIPTION,
    )


class DeviceUpdate(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: Annotated[str, AfterValidator(storable_text)] | None = Field(default=None, max_length=200)
    metadata: Annotated[dict[str, Any], AfterValidator(storable_metadata)] | None = Field(
        default=None, description=METADATA_DESCRIPTION
    )
    enabled: bool | None = None
    retention_days: RetentionDays = Field(
        default=None,
        ge=0,
        le=MAX_RETENTION_DAYS,
        allow_inf_nan=False,
        description=RETENTION_DESCRIPTION + " (sent as null: back to the global setting)",
    )


UNIT_DESCRIPTION: Final = (
    "the unit the metric's values are in, as the first write naming one gave it (SenML u/bu, "
    "e.g. Cel); null: none given"
)


class MetricStats(BaseModel):
    count: int
    first_ts: str | None
    last_ts: str | None
    unit: str | None = Field(description=UNIT_DESCRIPTION)


class DeviceOut(BaseModel):
    id: str
    name: str
    metadata: dict[str, Any]
    enabled: bool
    created_at: str
    updated_at: str
    last_seen: str | None = Field(description="when the gateway last stored a write from it")
    retention_days: float | None = Field(description=RETENTION_DESCRIPTION)
    readings: int = Field(description="readings stored, all metrics")
    metrics: dict[str, MetricStats]
    readings_24h: int = Field(
        description="readings timed in the last 24 hours (from the start of the UTC minute"
        " 24 h ago; a reading timed ahead of the gateway's clock counts too), all metrics"
    )
    rejected_24h: int = Field(
        description="messages of this device rejected in the last 24 hours (the same window):"
        " the dead letters GET /rejected?device= lists"
    )


class DeviceCreated(DeviceOut):
    token: str = Field(description="the device's bearer token; shown only this once")


class DeviceList(BaseModel):
    devices: list[DeviceOut]
    next_cursor: str | None


class TokenOut(BaseModel):
    token: str
    role: Role


class TokenCreate(BaseModel):
    model_config = ConfigDict(extra="forbid")

    # A Literal, not IssuedRole: the body's schema is inlined (gateway.api.deps.json_body_doc)
    role: Literal["operator", "admin", "writer"] = Field(
        description="operator (reads everything), admin (also manages devices and tokens) or"
        " writer (writes line protocol for any registered device; reads nothing)"
    )
    name: Annotated[str, AfterValidator(storable_text)] = Field(
        default="", max_length=200, description="who or what the token is for"
    )
    expires_at: str | None = Field(
        default=None,
        max_length=64,
        description="when it stops working, RFC 3339 (2027-01-01T00:00:00Z); not with"
        " expires_in; neither: never",
    )
    expires_in: str | None = Field(
        default=None,
        max_length=64,
        description="how long it works from now: 30d, 12h, 1w, 1h30m; not with expires_at",
    )


class TokenInfo(BaseModel):
    """An operator or admin token, never its value nor its hash."""

    id: int
    role: IssuedRole
    name: str
    created_at: str
    last_used_at: str | None = Field(
        description="its latest use, as written by the gateways every"
        " FIELDGATE_TOKEN_LAST_USED_INTERVAL_S (60 s): it may lag by that; null: never used"
    )
    expires_at: str | None = Field(description="when it stops working; null: never")


class TokenList(BaseModel):
    tokens: list[TokenInfo]


class TokenCreated(TokenInfo):
    token: str = Field(description="the bearer token; shown only this once")


class Rejected(BaseModel):
    index: int
    metric: str | None
    code: str
    message: str


class IngestOut(BaseModel):
    accepted: int = Field(description="readings stored")
    duplicates: int = Field(description="readings already stored before (ignored)")
    rejected: list[Rejected]


class Point(BaseModel):
    ts: str
    value: float


class RawOut(BaseModel):
    device: str
    metric: str
    unit: str | None = Field(description=UNIT_DESCRIPTION)
    points: list[Point]
    next_cursor: str | None


class LatestValue(BaseModel):
    ts: str
    value: float
    unit: str | None = Field(description=UNIT_DESCRIPTION)


class LatestOut(BaseModel):
    device: str
    values: dict[str, LatestValue]


# The aggregate answers. They are documented here and rendered by orjson from the dicts of
# gateway/aggregation.py (a 10,000-bucket answer through pydantic would cost more than its SQL);
# tests/test_read_schemas.py checks real answers against these models' OpenAPI schema.


class AggregateBucket(BaseModel):
    """One time bucket: only the aggs asked for are present; a value is null where it has none
    (an empty bucket, stddev of one reading, or linear fill past the known buckets)."""

    start: str = Field(
        description="the bucket's start (RFC 3339, UTC); it ends where the next starts"
    )
    avg: float | None = None
    min: float | None = None
    max: float | None = None
    sum: float | None = None
    first: float | None = None
    last: float | None = None
    stddev: float | None = Field(default=None, description="sample standard deviation")
    count: int = Field(description="readings in the bucket (0: a bucket filled by `fill`)")


class AggregateSeries(BaseModel):
    device: str
    metric: str
    unit: str | None = Field(description=UNIT_DESCRIPTION)
    buckets: list[AggregateBucket]


class AggregateWindow(BaseModel):
    """The window and range an aggregate answer covers (as resolved: `auto`, defaults)."""

    window: str = Field(description="the bucket width, e.g. 1m, 2h, 1d")
    start: str = Field(description="the range's start (RFC 3339, UTC)")
    end: str = Field(description="the range's end, exclusive (RFC 3339, UTC)")
    tz: str | None = Field(default=None, description="the zone of day buckets, when given")


class DeviceAggregateOut(AggregateWindow):
    """One device, one metric."""

    device: str
    metric: str
    unit: str | None = Field(description=UNIT_DESCRIPTION)
    buckets: list[AggregateBucket]


class DeviceAggregateSeriesOut(AggregateWindow):
    """One device, several metrics: one series each, in the order asked."""

    device: str
    series: list[AggregateSeries]


class DeviceAggregateAnswer(RootModel[DeviceAggregateOut | DeviceAggregateSeriesOut]):
    """A device aggregate: one metric asked answers `buckets`, several answer `series`."""


class FleetAggregateOut(AggregateWindow):
    """Several devices: one series per (device, metric)."""

    metric: str | list[str] = Field(description="the metric asked, or the list of them")
    series: list[AggregateSeries]


class ErrorBody(BaseModel):
    code: str = Field(description="stable and machine-readable, e.g. device_not_found")
    message: str
    details: list[Any] = Field(description="per item (e.g. per reading), where it applies")


class ErrorOut(BaseModel):
    """Every refusal of the API (docs/api.md lists the codes)."""

    error: ErrorBody
