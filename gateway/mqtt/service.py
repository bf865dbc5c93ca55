"""MQTT telemetry a batch at a time: topic -> device, the shared ingest path, dead letters.

Every message goes through the same `Ingestor` as HTTP (`parse`, then `store(..., transport="mqtt",
wait=True)`). The messages of one device in a batch are merged into one write, and the writes of a
batch are queued together, so the writer commits a whole batch in one transaction. What cannot be
stored (bad topic, payload or readings; unknown or disabled device) becomes a dead letter: counted
by reason, logged at most once a minute per device (once for all unknown ones), and kept in the
`dead_letter` table.

`handle` raises when the database refuses the batch; the bridge then tells a transient failure
(retry the batch later) from a permanent one (find the message that can never be stored and put it
aside with `put_aside`: a dead letter with reason `unstorable`).
"""

from __future__ import annotations

import asyncio
import logging
from collections import Counter, defaultdict
from dataclasses import dataclass, field

from cachetools import TTLCache

from devices.formats import PayloadError, Readings, Rejection, parse_telemetry
from devices.models import DEVICE_ID_RE
from devices.senml import SenmlCode, parse_senml
from gateway import metrics
from gateway.ingest import Ingestor, IngestResult, LimitCode, Parser
from gateway.store import registry
from gateway.store.dead_letters import Letter, insert_letters
from gateway.store.errors import DeviceNotFound
from gateway.timespec import now_us

log = logging.getLogger("fieldgate.mqtt")

TRANSPORT = "mqtt"
_LOG_EVERY_S = 60.0
_LOG_KEYS_MAX = 10_000
_DETAILS_MAX = 100
_DEVICE_CACHE_MAX = 10_000


class Reason:
    """Why a whole message was refused (per-reading codes come from devices.formats.Code)."""

    INVALID_TOPIC = "invalid_topic"
    PAYLOAD_TOO_LARGE = "payload_too_large"
    UNKNOWN_DEVICE = "unknown_device"
    DEVICE_DISABLED = "device_disabled"
    NO_MESSAGES = "no_messages"
    INVALID_READINGS = "invalid_readings"  # several rejection codes in one message
    UNSTORABLE = "unstorable"  # storing it failed for good (the error is in the letter's message)


# The last level of a device's topics that carry readings, and the format of each.
PARSERS: dict[str, Parser] = {"telemetry": parse_telemetry, "senml": parse_senml}


@dataclass(frozen=True, slots=True)
class Topics:
    """The topic layout: `{prefix}/devices/{device_id}/telemetry` (the native format),
    `.../senml` (SenML packs, RFC 8428) and `.../errors`."""

    prefix: str = ""

    @classmethod
    def with_prefix(cls, prefix: str) -> Topics:
        prefix = prefix.strip("/")
        return cls(f"{prefix}/" if prefix else "")

    def subscription(self, shared_group: str = "", kind: str = "telemetry") -> str:
        topic = f"{self.prefix}devices/+/{kind}"
        return f"$share/{shared_group}/{topic}" if shared_group else topic

    def subscriptions(self, shared_group: str = "") -> tuple[str, ...]:
        """The filters the gateway takes readings from: one per format. Not one
        `devices/+/+`: it would match the errors topics the gateway publishes to, and a shared
        subscription cannot leave out its own messages (MQTT 5 forbids No Local on one)."""
        return tuple(self.subscription(shared_group, kind) for kind in PARSERS)

    def device_of(self, topic: str) -> str | None:
        """The device id in a telemetry or SenML topic; None when the topic does not match."""
        found = self.address_of(topic)
        return found[0] if found else None

    def address_of(self, topic: str) -> tuple[str, str] | None:
        """(device id, `telemetry` or `senml`) of a topic that carries readings, else None."""
        if not topic.startswith(self.prefix):
            return None
        parts = topic[len(self.prefix) :].split("/")
        if len(parts) != 3 or parts[0] != "devices" or parts[2] not in PARSERS:
            return None
        return (parts[1], parts[2]) if DEVICE_ID_RE.fullmatch(parts[1]) else None

    def telemetry(self, device_id: str) -> str:
        return f"{self.prefix}devices/{device_id}/telemetry"

    def senml(self, device_id: str) -> str:
        return f"{self.prefix}devices/{device_id}/senml"

    def errors(self, device_id: str) -> str:
        return f"{self.prefix}devices/{device_id}/errors"

    # Who may use which topics at the broker: the one statement of it, which the broker's
    # access control is made from (gateway/broker). Topic filters, as a broker's ACLs take them.

    def device_publishes(self, device_id: str) -> tuple[str, ...]:
        """A device publishes its own telemetry (native or SenML), nothing else."""
        return (self.telemetry(device_id), self.senml(device_id))

    def device_subscribes(self, device_id: str) -> tuple[str, ...]:
        """A device hears what the gateway says about its own messages, nothing else."""
        return (self.errors(device_id),)

    def gateway_subscribes(self) -> tuple[str, ...]:
        """The gateway takes every device's telemetry (native and SenML), alone or in any
        shared group."""
        return (*self.subscriptions(), *self.subscriptions("+"))

    def gateway_publishes(self) -> tuple[str, ...]:
        """The gateway describes refused messages to any device."""
        return (self.errors("+"),)


@dataclass(frozen=True, slots=True)
class Incoming:
    """One received message, as the handler needs it."""

    topic: str
    payload: bytes


class DeviceStates:
    """Whether devices exist and are enabled (the registry decides), cached for `ttl_s`: one
    query per batch on a miss. At most `_DEVICE_CACHE_MAX` devices are kept, the least recently
    used going first, so made-up device ids cannot grow it."""

    def __init__(self, ttl_s: float) -> None:
        self._known: TTLCache[str, bool | None] = TTLCache(_DEVICE_CACHE_MAX, ttl=ttl_s)

    async def lookup(self, device_ids: set[str]) -> dict[str, bool | None]:
        """device id -> enabled (True/False), or None when there is no such device."""
        out: dict[str, bool | None] = {}
        missing: list[str] = []
        for device_id in device_ids:
            try:
                out[device_id] = self._known[device_id]
            except KeyError:  # never asked, or expired
                missing.append(device_id)
        if missing:
            found = await registry.device_states(missing)
            self._known.update(found)
            out.update(found)
        return out

    def forget(self, device_id: str) -> None:
        self._known.pop(device_id, None)

    def clear(self) -> None:
        """Forget every device: a credential was taken away (Runtime.forget_credentials)."""
        self._known.clear()


def _writes(
    groups: dict[str, list[tuple[Incoming, Readings]]],
) -> list[tuple[str, list[tuple[Incoming, Readings]]]]:
    """The writes of a batch: per device, its messages that name units (SenML) and those that
    do not, apart. Merged, a unit would be taken for the readings of the same metric that came
    without one, and those refused with them when their series has another unit."""
    writes: list[tuple[str, list[tuple[Incoming, Readings]]]] = []
    for device, group in groups.items():
        with_units = [(msg, r) for msg, r in group if r.units]
        if with_units and len(with_units) < len(group):
            writes.append((device, with_units))
            writes.append((device, [(msg, r) for msg, r in group if not r.units]))
        else:
            writes.append((device, group))
    return writes


def _merge(parts: list[Readings]) -> Readings:
    """One device's messages of a batch as one write. A metric keeps one unit: the readings of
    a message that gives a metric another unit than an earlier message of the batch are
    refused into that message (`unit_mismatch`), as they would be if it came alone after."""
    if len(parts) == 1:
        return parts[0]
    out = Readings()
    for part in parts:
        clash = {m: out.units[m] for m, u in part.units.items() if out.units.get(m, u) != u}
        if clash:
            _refuse_units(part, clash)
        out.metrics += part.metrics
        out.ts += part.ts
        out.values += part.values
        out.rejected += part.rejected
        out.messages += part.messages
        for metric, unit in part.units.items():
            out.units.setdefault(metric, unit)
    return out


def _refuse_units(part: Readings, clash: dict[str, str]) -> None:
    """Take the readings of the metrics of `clash` (metric -> the unit of an earlier message)
    out of `part`, with one rejection each."""
    keep = [i for i, m in enumerate(part.metrics) if m not in clash]
    for metric, unit in clash.items():
        part.rejected.append(
            Rejection(
                -1,
                metric,
                SenmlCode.UNIT_MISMATCH,
                f"an earlier message of this batch gives {metric!r} the unit {unit!r}, this "
                f"one {part.units[metric]!r}; a metric has one unit, so these were not stored",
            )
        )
    part.metrics = [part.metrics[i] for i in keep]
    part.ts = [part.ts[i] for i in keep]
    part.values = [part.values[i] for i in keep]
    part.units = {m: u for m, u in part.units.items() if m not in clash}


def _explain(rejected: list[Rejection], stored: int) -> tuple[str, str]:
    """(reason, message) for a message with rejected readings."""
    codes = {r.code for r in rejected}
    reason = codes.pop() if len(codes) == 1 else Reason.INVALID_READINGS
    first = rejected[0]
    where = f"message {first.index}" + (f", metric {first.metric!r}" if first.metric else "")
    return reason, (
        f"{len(rejected)} rejected, {stored} reading(s) kept; first: {where}: {first.message}"
    )


def _no_such_device(device: str) -> str:
    return f"device {device!r} does not exist"


# Rejections the store makes per metric (index -1), after the parser: each is told to the
# messages that held readings of that metric.
_REFUSED_BY_THE_STORE = frozenset((LimitCode.SERIES_LIMIT, SenmlCode.UNIT_MISMATCH))


def _explain_rejections(
    device: str,
    group: list[tuple[Incoming, Readings]],
    result: IngestResult,
    refusals: _Refusals,
) -> None:
    """Refuse each stored message of `device` that had readings rejected (by the parser, or by
    the store: a new metric past the device's series limit, a unit other than its series') or
    held no messages at all."""
    # The store's own come after the messages' (IngestResult.rejected starts with the write's)
    made_by_the_store = result.rejected[sum(len(r.rejected) for _, r in group) :]
    refused = {r.metric: r for r in made_by_the_store if r.code in _REFUSED_BY_THE_STORE}
    for msg, readings in group:
        rejected = readings.rejected
        stored = len(readings)
        if refused:
            mine = [m for m in readings.metrics if m in refused]
            rejected = rejected + [refused[m] for m in dict.fromkeys(mine)]
            stored -= len(mine)
        if rejected:
            reason, text = _explain(rejected, stored)
            details = [r.as_dict() for r in rejected[:_DETAILS_MAX]]
            refusals.add(msg, device, reason, text, details=details)
        elif not readings.messages:
            refusals.add(msg, device, Reason.NO_MESSAGES, "the payload holds no messages")


@dataclass(slots=True)
class _Refusals:
    """The dead letters of one batch, all stamped with the batch's receive time."""

    received: int
    letters: list[Letter] = field(default_factory=list)

    def add(
        self,
        msg: Incoming,
        device: str | None,
        reason: str,
        text: str,
        details: list[dict[str, object]] | None = None,
    ) -> None:
        self.letters.append(
            Letter(
                self.received,
                TRANSPORT,
                device,
                msg.topic,
                reason,
                text,
                msg.payload,
                details or [],
            )
        )


class BatchHandler:
    def __init__(
        self,
        ingestor: Ingestor,
        topics: Topics,
        *,
        max_payload_bytes: int,
        dead_letter_payload_bytes: int,
        device_cache_ttl_s: float,
        dead_letter_max_rows: int = 0,
    ) -> None:
        self.ingestor = ingestor
        self.topics = topics
        self.max_payload_bytes = max_payload_bytes
        self.dead_letter_payload_bytes = dead_letter_payload_bytes
        self.dead_letter_max_rows = dead_letter_max_rows
        self.devices = DeviceStates(device_cache_ttl_s)
        self.rejected_by_reason: Counter[str] = Counter()
        # The keys logged within the last minute (a key lapses a minute after its line).
        self._logged: TTLCache[str, bool] = TTLCache(_LOG_KEYS_MAX, ttl=_LOG_EVERY_S)

    async def handle(self, batch: list[Incoming]) -> list[Letter]:
        """Store the readings of `batch` (committed on return) and its dead letters; the letters.

        Raises when the database refuses a write: nothing of the batch may be acknowledged then.
        """
        refusals = _Refusals(now_us())
        parsed = await self._parse(batch, refusals)
        groups = await self._group_by_device(parsed, refusals)
        writes = _writes(groups)
        results = await self._store(writes, refusals.received)
        for (device, group), result in zip(writes, results, strict=True):
            if isinstance(result, DeviceNotFound):  # deleted since the lookup
                self.devices.forget(device)
                for msg, _ in group:
                    refusals.add(msg, device, Reason.UNKNOWN_DEVICE, _no_such_device(device))
            elif isinstance(result, BaseException):
                raise result
            else:
                _explain_rejections(device, group, result, refusals)
        if refusals.letters:
            await self._keep(refusals.letters)
        return refusals.letters

    async def _parse(
        self, batch: list[Incoming], refusals: _Refusals
    ) -> list[tuple[Incoming, str, Readings]]:
        """(message, device id, readings) of each message with a telemetry topic, a payload
        within the limit and a usable body; the others are refused."""
        parsed: list[tuple[Incoming, str, Readings]] = []
        for msg in batch:
            address = self.topics.address_of(msg.topic)
            if address is None:
                refusals.add(
                    msg,
                    None,
                    Reason.INVALID_TOPIC,
                    f"the topic is not {self.topics.prefix}devices/<device id>/telemetry or "
                    ".../senml (a device id is 1-64 characters of A-Z a-z 0-9 _ . -)",
                )
            elif len(msg.payload) > self.max_payload_bytes:
                refusals.add(
                    msg,
                    address[0],
                    Reason.PAYLOAD_TOO_LARGE,
                    f"the payload is {len(msg.payload)} bytes; the limit is "
                    f"{self.max_payload_bytes}",
                )
            else:
                try:
                    readings = await self.ingestor.parse(
                        msg.payload, refusals.received, PARSERS[address[1]]
                    )
                except PayloadError as exc:
                    refusals.add(msg, address[0], exc.code, exc.message)
                else:
                    parsed.append((msg, address[0], readings))
        return parsed

    async def _group_by_device(
        self, parsed: list[tuple[Incoming, str, Readings]], refusals: _Refusals
    ) -> dict[str, list[tuple[Incoming, Readings]]]:
        """The messages of each enabled device; those of unknown or disabled devices are refused."""
        states = await self.devices.lookup({device for _, device, _ in parsed})
        groups: defaultdict[str, list[tuple[Incoming, Readings]]] = defaultdict(list)
        for msg, device, readings in parsed:
            state = states[device]
            if state is None:
                refusals.add(msg, device, Reason.UNKNOWN_DEVICE, _no_such_device(device))
            elif not state:
                refusals.add(msg, device, Reason.DEVICE_DISABLED, f"device {device!r} is disabled")
            else:
                groups[device].append((msg, readings))
        return groups

    async def _store(
        self, writes: list[tuple[str, list[tuple[Incoming, Readings]]]], received: int
    ) -> list[IngestResult | BaseException]:
        """Each write (a device's messages merged), all queued together so the writer commits
        them in one transaction; each one's result, or the exception it raised."""
        return await asyncio.gather(
            *(
                self.ingestor.store(
                    device,
                    _merge([readings for _, readings in group]),
                    received,
                    transport=TRANSPORT,
                    wait=True,
                )
                for device, group in writes
            ),
            return_exceptions=True,
        )

    async def put_aside(self, msg: Incoming, error: BaseException) -> Letter:
        """Keep `msg`, whose storing failed for good (`error`: not a transient database failure),
        as an `unstorable` dead letter; the letter. Raises when that cannot be stored either."""
        letter = Letter(
            now_us(),
            TRANSPORT,
            self.topics.device_of(msg.topic),
            msg.topic,
            Reason.UNSTORABLE,
            "storing this message failed, and trying again would fail the same way, so it is "
            f"kept here and not retried: {type(error).__name__}: {str(error)[:500]}",
            msg.payload,
        )
        await self._keep([letter])
        return letter

    async def _keep(self, letters: list[Letter]) -> None:
        """Store `letters` (within the row cap), then count and log them."""
        await insert_letters(
            letters,
            payload_limit=self.dead_letter_payload_bytes,
            keep_at_most=self.dead_letter_max_rows,
        )
        self._count_and_log(letters)

    def _count_and_log(self, letters: list[Letter]) -> None:
        for letter in letters:
            metrics.MQTT_MESSAGES_REJECTED.labels(letter.reason).inc()
            self.rejected_by_reason[letter.reason] += 1
            # A device that does not exist is not a device to log for: one key for them all,
            # or whoever can publish writes a log line per made-up device id.
            key = "?unknown" if letter.reason == Reason.UNKNOWN_DEVICE else letter.device_id or "?"
            if key not in self._logged:
                self._logged[key] = True
                log.warning(
                    "refused a message on %s: %s: %s (logged at most once a minute per device; "
                    "all are in GET /api/v1/rejected)",
                    letter.topic[:200],
                    letter.reason,
                    letter.message,
                )
