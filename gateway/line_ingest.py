"""InfluxDB line protocol in: parse (devices/line_protocol.py), decide which devices the token
may write, and hand each device's readings to `Ingestor.store`, the one ingest path (same
validation, limits, writer, guarantees and metrics as the native format).

Who may write which device's lines:

- a device token: its own device's lines (a line without the device tag is its own); a line
  naming another device is rejected with `device_not_allowed`;
- a writer token (a collector such as Telegraf forwarding many devices): any registered,
  enabled device's lines; a line naming no registered device is rejected with
  `unknown_device`, one of a disabled device with `device_disabled`; a line without the device
  tag with `missing_device_tag`.

Lines of the devices that may be written are stored, whatever happens to the others' (each
device's readings are one `store` call; they run together, so they share the writer's commits).
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from dataclasses import dataclass, field
from functools import partial

from devices.formats import Readings, Rejection
from devices.line_protocol import LineBatch, LineCode, parse_lines
from devices.models import Role
from gateway.auth import Principal
from gateway.ingest import Ingestor, IngestResult
from gateway.runtime import Runtime
from gateway.store import registry
from gateway.store.errors import DeviceNotFound
from gateway.timespec import now_us

_PARSE_IN_THREAD_BYTES = 256 * 1024  # as gateway/ingest.py: a big body is parsed off the loop
_TRANSPORT = "http"


@dataclass(slots=True)
class LinesResult:
    """What became of a body's lines: readings stored (new, duplicate) and rejections, by line
    number (index -1: a limit of a device's, such as its series limit)."""

    lines: int = 0
    accepted: int = 0
    duplicates: int = 0
    rejected: list[Rejection] = field(default_factory=list)


async def ingest_lines(
    runtime: Runtime, principal: Principal, body: bytes, *, precision: str
) -> LinesResult:
    """Store the lines `principal` may write; raises PayloadError (too many lines or metrics,
    nothing stored), QueueFull and WriterStopped as the native path does."""
    settings = runtime.settings
    ingestor = runtime.ingestor
    received = now_us()
    own = principal.device_id if principal.role is Role.DEVICE else None
    parse = partial(
        parse_lines,
        precision=precision,
        now_us=received,
        max_future_us=ingestor.max_future_us,
        earliest_us=ingestor.earliest_us,
        max_lines=ingestor.max_messages,
        device_tag=settings.line_protocol_device_tag,
        metric_template=settings.line_protocol_metric,
        default_device=own,
    )
    if len(body) > _PARSE_IN_THREAD_BYTES:
        batch = await asyncio.to_thread(parse, body)
    else:
        batch = parse(body)
    refused = await _refused_devices(principal, batch)
    for device_lines in batch.devices.values():  # every device's limit before anything is stored
        ingestor.check_metrics(device_lines.readings)
    writes = {
        device: lines.readings for device, lines in batch.devices.items() if device not in refused
    }
    unstored = list(batch.rejected)  # rejected here, not by `store` (which counts its own)
    for device, (code, why) in refused.items():
        unstored.extend(Rejection(n, None, code, why) for n in batch.devices[device].lines)
    outcomes: Sequence[IngestResult | BaseException]
    if len(writes) == 1:  # the usual body: not worth a task (gather's costs a small body ~3%)
        ((device, readings),) = writes.items()
        outcomes = [await _store(ingestor, device, readings, received)]
    else:
        outcomes = await asyncio.gather(
            *(_store(ingestor, device, readings, received) for device, readings in writes.items()),
            return_exceptions=True,
        )
    result = LinesResult(lines=batch.lines)
    for device, outcome in zip(writes, outcomes, strict=True):
        if isinstance(outcome, DeviceNotFound):  # deleted since it was looked up
            why = f"device {device!r} is not registered"
            lines = batch.devices[device].lines
            unstored.extend(Rejection(n, None, LineCode.UNKNOWN_DEVICE, why) for n in lines)
        elif isinstance(outcome, BaseException):
            raise outcome
        else:
            result.accepted += outcome.accepted
            result.duplicates += outcome.duplicates
            result.rejected.extend(outcome.rejected)
    if unstored:
        Ingestor.count_rejected(unstored, _TRANSPORT)
        result.rejected.extend(unstored)
    if result.rejected:  # by line; a device's limits (index -1) last
        result.rejected.sort(key=lambda r: (r.index < 0, r.index))
    return result


async def _store(
    ingestor: Ingestor, device: str, readings: Readings, received: int
) -> IngestResult | DeviceNotFound:
    """`store`, its DeviceNotFound returned (the device's lines are then rejected)."""
    try:
        return await ingestor.store(device, readings, received, transport=_TRANSPORT, wait=False)
    except DeviceNotFound as exc:
        return exc


async def _refused_devices(principal: Principal, batch: LineBatch) -> dict[str, tuple[str, str]]:
    """The devices of `batch` that `principal` may not write -> (code, why)."""
    if principal.role is Role.DEVICE:
        return {
            device: (
                LineCode.DEVICE_NOT_ALLOWED,
                f"a device token writes its own device's lines only, not {device!r}'s",
            )
            for device in batch.devices
            if device != principal.device_id
        }
    states = await registry.device_states(list(batch.devices)) if batch.devices else {}
    refused: dict[str, tuple[str, str]] = {}
    for device, enabled in states.items():
        if enabled is None:
            refused[device] = (LineCode.UNKNOWN_DEVICE, f"device {device!r} is not registered")
        elif not enabled:
            refused[device] = (LineCode.DEVICE_DISABLED, f"device {device!r} is disabled")
    return refused
