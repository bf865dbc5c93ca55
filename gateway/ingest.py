"""The one ingest function: both transports (HTTP, MQTT) call `Ingestor.ingest`.

payload -> devices.formats (parse + validate) -> series ids -> writer (group commit) -> counts.
"""

from __future__ import annotations

import asyncio
from collections import Counter
from dataclasses import dataclass, field

from devices.formats import Readings, Rejection, parse_telemetry
from gateway import metrics
from gateway.pipeline import Writer
from gateway.store.readings import Rows
from gateway.store.series import SeriesCache
from gateway.timespec import now_us

# Bodies above this are parsed in a worker thread so one huge request cannot stall the loop.
_PARSE_IN_THREAD_BYTES = 256 * 1024


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
        self, writer: Writer, series: SeriesCache, *, max_messages: int, max_future_skew_s: float
    ) -> None:
        self.writer = writer
        self.series = series
        self.max_messages = max_messages
        self.max_future_us = int(max_future_skew_s * 1_000_000)

    async def parse(self, payload: bytes, received_us: int) -> Readings:
        """Validate a raw payload (raises devices.formats.PayloadError when unusable whole)."""
        kwargs = {
            "now_us": received_us,
            "max_future_us": self.max_future_us,
            "max_messages": self.max_messages,
        }
        if len(payload) > _PARSE_IN_THREAD_BYTES:
            return await asyncio.to_thread(parse_telemetry, payload, **kwargs)  # type: ignore[arg-type]
        return parse_telemetry(payload, **kwargs)  # type: ignore[arg-type]

    async def store(
        self, device_id: str, readings: Readings, received_us: int, *, transport: str, wait: bool
    ) -> IngestResult:
        """Write the valid readings of `device_id`; count what was stored, duplicate, rejected."""
        result = IngestResult(rejected=readings.rejected)
        if readings.rejected:
            for code, n in Counter(r.code for r in readings.rejected).items():
                metrics.READINGS_REJECTED.labels(transport, code).inc(n)
        if not len(readings):
            return result
        series_ids = await self.series.resolve(device_id, readings.metrics)
        rows = Rows(series_ids, readings.ts, readings.values)
        inserted = await self.writer.write(rows, device_id, received_us, wait=wait)
        result.accepted = inserted
        result.duplicates = len(rows) - inserted
        metrics.READINGS_ACCEPTED.labels(transport).inc(inserted)
        if result.duplicates:
            metrics.READINGS_DUPLICATE.labels(transport).inc(result.duplicates)
        return result

    async def ingest(
        self, device_id: str, payload: bytes, *, transport: str, wait: bool
    ) -> IngestResult:
        received = now_us()
        readings = await self.parse(payload, received)
        return await self.store(device_id, readings, received, transport=transport, wait=wait)
