"""The one ingest function: both transports (HTTP, MQTT) call `Ingestor.ingest`.

payload -> devices.formats (parse + validate) -> series ids -> writer (group commit) -> counts.

Limits that hold for both transports live here: at most `max_metrics_per_request` distinct
metrics in one payload (PayloadError `too_many_metrics`: the whole payload is refused) and at
most `max_series_per_device` series per device (readings of new metrics past it are rejected
with `series_limit`, one rejection per metric, index -1; the device's other readings are stored).
So is retention: readings timed before the device's retention (its `retention_days`, else
FIELDGATE_RETENTION_DAYS) would be dropped by the next maintenance run, so they are rejected
with `beyond_retention` (one rejection per metric, index -1), as InfluxDB refuses points beyond
its retention policy, instead of being acknowledged and then lost.

Units (SenML's `u`/`bu`, `Readings.units`): a series keeps the first unit a write names
(gateway/store/series.py `claim_units`); readings of a metric whose series has another unit are
rejected with `unit_mismatch` (one rejection per metric, index -1; the device's other readings
are stored), as InfluxDB refuses a field whose type differs from the one it was first written
with: values in two units in one series would make every aggregate wrong. A write without a
unit (the native format) is taken for a series with one.
"""

from __future__ import annotations

import asyncio
from collections import Counter
from collections.abc import Collection
from dataclasses import dataclass, field
from functools import cache
from typing import Protocol

import prometheus_client
from cachetools import TTLCache

from devices.formats import (
    DEFAULT_EARLIEST_US,
    PayloadError,
    Readings,
    Rejection,
    parse_telemetry,
)
from devices.senml import SenmlCode
from gateway import metrics
from gateway.store import registry
from gateway.store.errors import DeviceNotFound, SeriesGone
from gateway.store.readings import Rows
from gateway.store.series import SeriesCache, SeriesLimitReached
from gateway.timespec import format_ts, now_us
from gateway.writer import Writer

# Bodies above this are parsed in a worker thread so one huge request cannot stall the loop.
_PARSE_IN_THREAD_BYTES = 256 * 1024


class Parser(Protocol):
    """A payload format's parser (devices.formats.parse_telemetry, the native one, or another
    format's: devices.senml.parse_senml, devices.thingsboard.parse_thingsboard): validated
    readings, or
    PayloadError when the payload is unusable as a whole."""

    def __call__(
        self,
        body: bytes,
        *,
        now_us: int,
        max_future_us: int,
        max_messages: int,
        earliest_us: int,
    ) -> Readings: ...


class LimitCode:
    """Codes of the limits above (PayloadError codes / Rejection codes)."""

    TOO_MANY_METRICS = "too_many_metrics"
    SERIES_LIMIT = SeriesLimitReached.code
    BEYOND_RETENTION = "beyond_retention"


DAY_US = 86_400_000_000


class Retention:
    """Each device's retention in days (its own, else the global setting; 0: keep all), cached
    for `ttl_s` like the auth cache (a PATCH takes effect within it), at most 100,000 devices."""

    def __init__(self, default_days: float, ttl_s: float) -> None:
        self.default_days = default_days
        self._own: TTLCache[str, float | None] = TTLCache(100_000, ttl=ttl_s)

    async def days(self, device_id: str) -> float:
        try:
            own = self._own[device_id]
        except KeyError:
            own = (await registry.retention_days([device_id])).get(device_id)
            self._own[device_id] = own
        return self.default_days if own is None else own

    def forget(self, device_ids: Collection[str] = ()) -> None:
        for device_id in device_ids:
            self._own.pop(device_id, None)


@dataclass(slots=True)
class IngestResult:
    accepted: int = 0
    duplicates: int = 0
    rejected: list[Rejection] = field(default_factory=list)

    @property
    def valid(self) -> int:
        return self.accepted + self.duplicates


class Ingestor:
    def __init__(
        self,
        writer: Writer,
        series: SeriesCache,
        *,
        max_messages: int,
        max_future_skew_s: float,
        max_metrics_per_request: int = 1_000,
        earliest_us: int = DEFAULT_EARLIEST_US,
        retention: Retention | None = None,
    ) -> None:
        self.writer = writer
        self.series = series
        self.max_messages = max_messages
        self.max_future_us = int(max_future_skew_s * 1_000_000)
        self.max_metrics = max_metrics_per_request
        self.earliest_us = earliest_us
        self.retention = retention or Retention(0.0, 5.0)

    async def parse(
        self, payload: bytes, received_us: int, parser: Parser = parse_telemetry
    ) -> Readings:
        """Validate a raw payload with `parser`, the native one unless another format is named
        (raises devices.formats.PayloadError when unusable whole)."""
        kwargs = {
            "now_us": received_us,
            "max_future_us": self.max_future_us,
            "max_messages": self.max_messages,
            "earliest_us": self.earliest_us,
        }
        if len(payload) > _PARSE_IN_THREAD_BYTES:
            readings = await asyncio.to_thread(parser, payload, **kwargs)
        else:
            readings = parser(payload, **kwargs)
        self.check_metrics(readings)
        return readings

    def check_metrics(self, readings: Readings) -> None:
        """PayloadError `too_many_metrics` when `readings` hold more distinct metrics than one
        payload may (every format's parsed readings meet this, per device)."""
        if len(readings.metrics) > self.max_metrics:
            distinct = len(set(readings.metrics))
            if distinct > self.max_metrics:
                raise PayloadError(
                    LimitCode.TOO_MANY_METRICS,
                    f"the payload holds {distinct} distinct metrics; the limit is "
                    f"{self.max_metrics}",
                )

    @staticmethod
    def count_rejected(rejected: list[Rejection], transport: str) -> None:
        """Count rejections in the metrics: `store` does for the readings it is given; a format
        calls this for what it rejects before a device is known (an unreadable line)."""
        for code, n in Counter(r.code for r in rejected).items():
            metrics.READINGS_REJECTED.labels(transport, code).inc(n)

    async def store(
        self, device_id: str, readings: Readings, received_us: int, *, transport: str, wait: bool
    ) -> IngestResult:
        """Write the valid readings of `device_id`; count what was stored, duplicate, rejected."""
        result = IngestResult(rejected=list(readings.rejected))
        if readings.rejected:
            self.count_rejected(readings.rejected, transport)
        if not len(readings):
            return result
        readings = await self._retained(device_id, readings, received_us, result, transport)
        if not len(readings):
            return result
        try:
            readings, inserted = await self._write(
                device_id, readings, received_us, wait, result, transport
            )
        except SeriesGone:
            # Another instance or the CLI deleted the device since this one cached its series
            # ids (nothing was stored): resolve them again, as the device may exist anew.
            self.series.forget(device_id)
            try:
                readings, inserted = await self._write(
                    device_id, readings, received_us, wait, result, transport
                )
            except SeriesGone:
                raise DeviceNotFound(device_id) from None
        result.accepted = inserted
        result.duplicates = len(readings) - inserted
        _counted(metrics.READINGS_ACCEPTED, transport).inc(inserted)
        if result.duplicates:
            _counted(metrics.READINGS_DUPLICATE, transport).inc(result.duplicates)
        return result

    async def _retained(
        self,
        device_id: str,
        readings: Readings,
        received_us: int,
        result: IngestResult,
        transport: str,
    ) -> Readings:
        """`readings` without those timed before the device's retention (rejected into
        `result`): one C-level min() when none are, the usual case."""
        days = await self.retention.days(device_id)
        if days <= 0:
            return readings
        cutoff = received_us - int(days * DAY_US)
        if min(readings.ts) >= cutoff:
            return readings
        kept = Readings(
            messages=readings.messages, rejected=readings.rejected, units=readings.units
        )
        old: Counter[str] = Counter()
        for metric, ts, value in zip(readings.metrics, readings.ts, readings.values, strict=True):
            if ts < cutoff:
                old[metric] += 1
            else:
                kept.metrics.append(metric)
                kept.ts.append(ts)
                kept.values.append(value)
        for metric, n in old.items():
            result.rejected.append(
                Rejection(
                    -1,
                    metric,
                    LimitCode.BEYOND_RETENTION,
                    f"{n} reading(s) of {metric!r} are timed before {format_ts(cutoff)}: device "
                    f"{device_id!r} keeps {days:g} days of readings; they were not stored",
                )
            )
        metrics.READINGS_REJECTED.labels(transport, LimitCode.BEYOND_RETENTION).inc(old.total())
        return kept

    async def _write(
        self,
        device_id: str,
        readings: Readings,
        received_us: int,
        wait: bool,
        result: IngestResult,
        transport: str,
    ) -> tuple[Readings, int]:
        """Resolve the series and write; the readings written (without those of metrics past the
        device's series limit or in another unit than their series', refused into `result`)
        and how many were new."""
        try:
            series_ids = await self.series.resolve(device_id, readings.metrics)
        except SeriesLimitReached as exc:
            offered = len(readings)
            readings = _refuse_metrics(readings, exc, result.rejected)
            metrics.READINGS_REJECTED.labels(transport, LimitCode.SERIES_LIMIT).inc(
                offered - len(readings)
            )
            if not len(readings):
                return readings, 0
            series_ids = await self.series.resolve(device_id, readings.metrics)
        if readings.units:
            before = len(readings)
            readings = await self._in_their_units(device_id, readings, result, transport)
            if len(readings) < before:
                if not len(readings):
                    return readings, 0
                series_ids = await self.series.resolve(device_id, readings.metrics)  # cached
        rows = Rows(series_ids, readings.ts, readings.values)
        return readings, await self.writer.write(rows, device_id, received_us, wait=wait)

    async def _in_their_units(
        self, device_id: str, readings: Readings, result: IngestResult, transport: str
    ) -> Readings:
        """`readings` without those of metrics whose series has another unit than the one the
        payload names (rejected into `result`); series without a unit get the payload's."""
        present = set(readings.metrics)
        units = {m: u for m, u in readings.units.items() if m in present}
        wrong = await self.series.claim_units(device_id, units)
        if not wrong:
            return readings
        counts = Counter(m for m in readings.metrics if m in wrong)
        for metric, unit in wrong.items():
            result.rejected.append(
                Rejection(
                    -1,
                    metric,
                    SenmlCode.UNIT_MISMATCH,
                    f"metric {metric!r} of device {device_id!r} is in {unit!r}; its "
                    f"{counts[metric]} reading(s) in {units[metric]!r} were not stored (a "
                    "series keeps the unit it was first written with)",
                )
            )
        metrics.READINGS_REJECTED.labels(transport, SenmlCode.UNIT_MISMATCH).inc(counts.total())
        return _without(readings, set(wrong))

    async def ingest(
        self,
        device_id: str,
        payload: bytes,
        *,
        transport: str,
        wait: bool,
        parser: Parser = parse_telemetry,
    ) -> IngestResult:
        received = now_us()
        readings = await self.parse(payload, received, parser)
        return await self.store(device_id, readings, received, transport=transport, wait=wait)


@cache
def _counted(counter: prometheus_client.Counter, transport: str) -> prometheus_client.Counter:
    """`counter`'s child for `transport`, looked up once: `labels()` costs more than the
    increment, on every request."""
    return counter.labels(transport)


def _refuse_metrics(
    readings: Readings, exc: SeriesLimitReached, rejected: list[Rejection]
) -> Readings:
    """`readings` without the metrics `exc` refused; one rejection per refused metric."""
    refused = set(exc.refused)
    counts = Counter(m for m in readings.metrics if m in refused)
    for metric in exc.refused:
        rejected.append(
            Rejection(
                -1,
                metric,
                exc.code,
                f"device {exc.device_id!r} has reached its limit of {exc.limit} series: "
                f"metric {metric!r} is new; its {counts[metric]} reading(s) were not stored",
            )
        )
    return _without(readings, refused)


def _without(readings: Readings, dropped: set[str]) -> Readings:
    """`readings` without those of the metrics `dropped`."""
    kept = Readings(messages=readings.messages, rejected=readings.rejected, units=readings.units)
    for metric, ts, value in zip(readings.metrics, readings.ts, readings.values, strict=True):
        if metric not in dropped:
            kept.metrics.append(metric)
            kept.ts.append(ts)
            kept.values.append(value)
    return kept
