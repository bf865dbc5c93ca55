"""Simulated devices and the payloads they send, built a batch at a time.

A device turns a list of measurement times into one ready-to-send body (orjson, once per batch),
replacing some messages with bad ones (`--bad-ratio`) and re-sending some earlier valid messages
(`--duplicate-ratio`: they ride in the device's next batch, as a device does that missed an
acknowledgement). Each payload carries a tally of the valid readings it holds for the first time,
which the ledger adds up once the payload is acknowledged; that is what `--verify` compares.

Checksum: per (device, metric), the sum modulo 2**64 of `hash((ts_us, value))` over the readings.
It does not depend on order, so the gateway's pages can be added up as they come; Python's hash of
ints and floats is not salted, so it is the same in every process.
"""

from __future__ import annotations

import math
from collections import Counter
from dataclasses import dataclass, field
from typing import Any, Final

import orjson

from simulator.faults import ALL_KINDS, BadMessage, FaultKind, bad_message
from simulator.profile import Profile
from simulator.signals import Signal, device_rng

MASK64: Final = (1 << 64) - 1
FOLD_MESSAGES: Final = 4096
Message = dict[str, Any]


def _ts(message: Message) -> int:
    return int(message["ts"])


def checksum(ts_us: list[int], values: list[float]) -> int:
    """The order-independent checksum of readings (see the module docstring)."""
    return sum(map(hash, zip(ts_us, values, strict=True))) & MASK64


@dataclass(slots=True)
class Tally:
    """What is known of one series (device, metric): count, checksum, time range."""

    count: int = 0
    checksum: int = 0
    first_us: int = 2**63 - 1
    last_us: int = -1
    total: float = 0.0  # the sum of the values (for the cheap aggregate check)

    def add(self, ts_us: list[int], values: list[float]) -> None:
        if not ts_us:
            return
        self.count += len(ts_us)
        self.checksum = (self.checksum + checksum(ts_us, values)) & MASK64
        self.total += math.fsum(values)
        self.first_us = min(self.first_us, min(ts_us))
        self.last_us = max(self.last_us, max(ts_us))

    @classmethod
    def of(cls, pairs: list[tuple[int, float]]) -> Tally:
        """The tally of (ts_us, value) pairs in time order."""
        return cls(
            count=len(pairs),
            checksum=sum(map(hash, pairs)) & MASK64,
            first_us=pairs[0][0],
            last_us=pairs[-1][0],
            total=math.fsum(v for _, v in pairs),
        )

    def merge(self, other: Tally) -> None:
        self.count += other.count
        self.checksum = (self.checksum + other.checksum) & MASK64
        self.total += other.total
        self.first_us = min(self.first_us, other.first_us)
        self.last_us = max(self.last_us, other.last_us)


@dataclass(slots=True)
class Ledger:
    """The valid readings the gateway acknowledged, per (device, metric)."""

    series: dict[tuple[str, str], Tally] = field(default_factory=dict)

    @classmethod
    def of(cls, devices: list[SimDevice]) -> Ledger:
        return cls({(d.id, m): t for d in devices for m, t in d.tallies().items()})

    @property
    def readings(self) -> int:
        return sum(t.count for t in self.series.values())


def tallies_of(messages: list[Message], names: tuple[str, ...]) -> dict[str, Tally]:
    """Per metric, the tally of `messages` (in time order): one pass per metric."""
    out: dict[str, Tally] = {}
    for name in names:
        pairs = [(m["ts"] * 1000, v) for m in messages if (v := m["values"].get(name)) is not None]
        if pairs:
            out[name] = Tally.of(pairs)
    return out


@dataclass(slots=True)
class Payload:
    """One body to send (an HTTP request or an MQTT publish) and what it holds."""

    device_id: str
    body: bytes
    messages: int
    valid: int  # valid readings, re-sent ones included
    duplicates: int  # valid readings sent before (by an earlier payload)
    bad: list[BadMessage]
    fresh: list[Message]  # the valid messages sent for the first time (what the ledger counts)
    probe: tuple[str, int] | None  # (metric, ts_us) of a reading to time until it is queryable

    def tallies(self) -> dict[str, Tally]:
        """The first-time valid readings per metric (the ledger folds many payloads at once)."""
        return tallies_of(
            self.fresh, tuple(dict.fromkeys(k for m in self.fresh for k in m["values"]))
        )

    @property
    def readings(self) -> int:
        """Readings in the body: valid ones plus one per bad message."""
        return self.valid + len(self.bad)

    @property
    def expected_codes(self) -> Counter[str]:
        return Counter(b.code for b in self.bad)


@dataclass(frozen=True, slots=True)
class Faults:
    bad_ratio: float = 0.0
    duplicate_ratio: float = 0.0
    kinds: tuple[FaultKind, ...] = ALL_KINDS


class SimDevice:
    """One simulated device: its signals, its random streams and re-sends still to go."""

    def __init__(
        self,
        device_id: str,
        profile: Profile,
        seed: int,
        faults: Faults,
        *,
        max_messages: int = 10_000,
        max_bytes: int = 4 * 1024 * 1024,
    ) -> None:
        self.id = device_id
        self.max_messages = max_messages  # the gateway's per-body limits
        self.max_bytes = max_bytes
        self.profile = profile
        self.faults = faults
        self.rng = device_rng(seed, device_id, "values")
        self.fault_rng = device_rng(seed, device_id, "faults")
        self.schedule_rng = device_rng(seed, device_id, "schedule")
        self.signals = [Signal(m, self.rng) for m in profile.metrics]
        self.names = tuple(m.name for m in profile.metrics)
        self.token = ""
        self._resend: list[Message] = []
        self._outage_until_ms = -1
        self._acked: list[Message] = []
        self._tallies: dict[str, Tally] = {}

    def acknowledged(self, payload: Payload) -> None:
        """The gateway (or broker) took `payload`: its first-time readings join the ledger.
        They are folded in a few thousand messages at a time (per-batch, not per-reading work)."""
        self._acked += payload.fresh
        if len(self._acked) >= FOLD_MESSAGES:
            self._fold()

    def _fold(self) -> None:
        acked, self._acked = self._acked, []
        acked.sort(key=_ts)  # re-sends and retries may have arrived out of order
        for name, tally in tallies_of(acked, self.names).items():
            mine = self._tallies.get(name)
            if mine is None:
                self._tallies[name] = tally
            else:
                mine.merge(tally)

    def tallies(self) -> dict[str, Tally]:
        """What was acknowledged so far, per metric."""
        if self._acked:
            self._fold()
        return self._tallies

    def _present(self, times_ms: list[int]) -> list[int]:
        """Drop the times that fall in a device outage (a dropout of the whole device)."""
        p = self.profile.outage
        if not p:
            return times_ms
        out = []
        rnd = self.rng.random
        span_ms = int(self.profile.outage_s * 1000)
        for t in times_ms:
            if t < self._outage_until_ms:
                continue
            if rnd() < p:
                self._outage_until_ms = t + span_ms
                continue
            out.append(t)
        return out

    def messages(self, times_ms: list[int]) -> list[Message]:
        """Valid messages at `times_ms` (epoch ms, increasing), with per-metric dropouts."""
        times_ms = self._present(times_ms)
        if not times_ms:
            return []
        times_s = [t / 1000.0 for t in times_ms]
        names = self.names
        columns = [sig.values(times_s, self.rng) for sig in self.signals]
        if not any(sig.spec.dropout for sig in self.signals):
            return [
                {"ts": t, "values": dict(zip(names, row, strict=True))}
                for t, row in zip(times_ms, zip(*columns, strict=True), strict=True)
            ]
        rnd = self.rng.random
        drops = [sig.spec.dropout for sig in self.signals]
        out = []
        for i, t in enumerate(times_ms):
            values = {
                name: col[i]
                for name, col, p in zip(names, columns, drops, strict=True)
                if not p or rnd() >= p
            }
            if values:
                out.append({"ts": t, "values": values})
        return out

    def payloads(self, times_ms: list[int], *, probe: bool = False) -> list[Payload]:
        """The bodies for the messages at `times_ms` (see `package`)."""
        return self.package(self.messages(times_ms), probe=probe)

    def package(self, fresh: list[Message], *, probe: bool = False) -> list[Payload]:
        """The bodies for `fresh` messages: one normally; more when broken JSON must travel
        alone or the batch is over the gateway's limits. Re-sends from earlier batches ride
        along."""
        faults = self.faults
        rng = self.fault_rng
        bad: list[BadMessage] = []
        good: list[Message] = fresh
        if faults.bad_ratio and fresh:
            good = []
            for msg in fresh:
                if rng.random() < faults.bad_ratio:
                    kind = rng.choice(faults.kinds)
                    metric = rng.choice(self.names)
                    bad.append(bad_message(kind, msg["ts"], metric, rng))
                else:
                    good.append(msg)
        resent, self._resend = self._resend, []
        if faults.duplicate_ratio:
            self._resend = [m for m in good if rng.random() < faults.duplicate_ratio]
        out = [Payload(self.id, b.raw, 1, 0, 0, [b], [], None) for b in bad if b.alone]
        inline = [b for b in bad if not b.alone]
        out.extend(self._bodies(good, resent, inline))
        if probe and good and out:
            first = good[0]
            metric = next(iter(first["values"]))
            for p in out:
                if p.fresh:
                    p.probe = (metric, first["ts"] * 1000)
                    break
        return out

    def flush_resends(self) -> list[Payload]:
        """The re-sends still waiting (at the end of a run)."""
        resent, self._resend = self._resend, []
        if not resent:
            return []
        return self._bodies([], resent, [])

    def _bodies(
        self,
        good: list[Message],
        resent: list[Message],
        inline: list[BadMessage],
        limit: int = 0,
    ) -> list[Payload]:
        """Bodies of at most `limit` messages (default: the gateway's) and `max_bytes` bytes."""
        limit = limit or self.max_messages
        total = len(good) + len(resent) + len(inline)
        if not total:
            return []
        if total > limit:  # split each kind into parts of `limit`
            out: list[Payload] = []
            for lo in range(0, len(good), limit):
                out += self._bodies(good[lo : lo + limit], [], [], limit)
            for lo in range(0, len(resent), limit):
                out += self._bodies([], resent[lo : lo + limit], [], limit)
            for lo in range(0, len(inline), limit):
                out += self._bodies([], [], inline[lo : lo + limit], limit)
            return out
        body = _encode(good + resent, inline, single=total == 1)
        if len(body) > self.max_bytes and total > 1:
            return self._bodies(good, resent, inline, max(1, total // 2))
        valid = sum(len(m["values"]) for m in good)
        dups = sum(len(m["values"]) for m in resent)
        return [Payload(self.id, body, total, valid + dups, dups, inline, good, None)]


def _encode(messages: list[Message], inline: list[BadMessage], *, single: bool) -> bytes:
    """One body: an object when there is one message, else an array; bad messages spliced in
    as raw bytes (orjson cannot write NaN)."""
    if not inline:
        return orjson.dumps(messages[0] if single else messages)
    raws = b",".join(b.raw for b in inline)
    if single:
        return raws
    if not messages:
        return b"[" + raws + b"]"
    return orjson.dumps(messages)[:-1] + b"," + raws + b"]"
