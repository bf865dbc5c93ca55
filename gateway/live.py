"""Live streams: each committed batch of a device's readings, to every open stream that wants
it, only after commit, in commit order, and resumable.

    writer commit --(commit log row, same transaction)--> LiveHub (tails the log)
        --> each Subscription's bounded queue --> its SSE response (gateway/api/stream.py)

The commit log (gateway/store/commit_log.py) is the one source: a stream sees this instance's
commits (the writer wakes the hub at once) and those of every other instance on the database
(the hub reads the log every `live_poll_interval_s` while streams are open) the same way, in
the same order. An event's id is `{log id}.{device id}`; a stream that comes back with it as
Last-Event-ID gets every event after it from the log, then live ones, with none missed and none
twice, as long as the log still holds them (FIELDGATE_LIVE_LOG_WINDOW_S); else it is told
(`reset`) and goes on live.

A stream can also start with history (`start`): its readings from `start` on, read a page at a
time, then the live events; a reading committed while the history was read is in one of the
two, never both (`HistoryPages`).

The hub never waits for a stream: an event goes into each queue or, when a queue is full, the
stream is marked overflowed; it then sends what it holds, an `overflow` event, and ends.
"""

from __future__ import annotations

import asyncio
import bisect
import contextlib
import logging
from collections import Counter, deque
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import orjson
from cachetools import LRUCache

from devices.formats import TS_MAX_US
from gateway.errors import TooManyRequests
from gateway.outage import database_outage
from gateway.settings import Settings
from gateway.store import commit_log
from gateway.store.database import connection
from gateway.store.readings import select_raw
from gateway.store.series import metrics_of
from gateway.timespec import format_ts, now_us

log = logging.getLogger("fieldgate.live")

# (log id, device id): where an event stands in commit order; an event id names one.
Position = tuple[int, str]
# (metric, ts in epoch microseconds, value)
Point = tuple[str, int, float]

_READ_ROWS = 500  # log rows a read takes
_METRIC_NAMES = 200_000  # series names the hub remembers


def event_id(position: Position) -> str:
    return f"{position[0]}.{position[1]}"


def parse_event_id(text: str) -> Position | None:
    """The position an event id names; None for text that is not one."""
    log_id, dot, device = text.strip().partition(".")
    if not dot or not log_id.isdigit() or len(log_id) > 19:
        return None
    return int(log_id), device


@dataclass(slots=True)
class LiveEvent:
    log_id: int
    device: str
    points: list[Point]
    _data: bytes | None = None

    @property
    def id(self) -> str:
        return event_id((self.log_id, self.device))

    def data(self) -> bytes:
        """The event's JSON: {"device", "points": [{"metric", "ts", "value"}]}."""
        if self._data is None:
            self._data = readings_json(self.device, self.points)
        return self._data


def readings_json(device: str, points: Sequence[Point]) -> bytes:
    return orjson.dumps(
        {
            "device": device,
            "points": [{"metric": m, "ts": format_ts(t), "value": v} for m, t, v in points],
        }
    )


@dataclass(eq=False)
class Subscription:
    """One open stream: what it wants, and the events the hub handed it, not yet sent."""

    key: str  # whose stream (a token's hash): the per-token limit
    devices: frozenset[str] | None  # None: every device
    metrics: frozenset[str] | None  # None: every metric
    buffer: int
    start: int = 0  # the hub's log position when it subscribed: it hands over what follows
    after: Position = (0, "")  # events at or before this are not this stream's to send
    overflowed: bool = False
    queue: deque[LiveEvent] = field(default_factory=deque)
    ready: asyncio.Event = field(default_factory=asyncio.Event)

    def select(
        self, log_id: int, device: str, points: list[Point], after: Position | None = None
    ) -> LiveEvent | None:
        """The event of `points` this stream wants, if any: after `after` (default: `self.after`,
        where its queue starts)."""
        if self.devices is not None and device not in self.devices:
            return None
        if (log_id, device) <= (self.after if after is None else after):
            return None
        if self.metrics is not None:
            points = [p for p in points if p[0] in self.metrics]
            if not points:
                return None
        return LiveEvent(log_id, device, points)

    def offer(self, event: LiveEvent) -> None:
        """Hold `event` to send; never waits (a full queue marks the stream overflowed)."""
        if self.overflowed:
            return
        if len(self.queue) >= self.buffer:
            self.overflowed = True
        else:
            self.queue.append(event)
        self.ready.set()


class LiveHub:
    def __init__(self, settings: Settings) -> None:
        self.window_s = settings.live_log_window_s
        self.poll_s = settings.live_poll_interval_s
        self.buffer = settings.stream_buffer_events
        self.per_token = settings.streams_per_token
        self.max_streams = settings.max_streams
        self.position = 0  # the newest log id handed to the subscriptions
        self._subs: list[Subscription] = []
        self._by_key: Counter[str] = Counter()
        self._wakeup = asyncio.Event()
        self._names: LRUCache[int, str] = LRUCache(_METRIC_NAMES)
        self.stopping = asyncio.Event()  # set when the gateway stops: streams end

    def wake(self) -> None:
        """A commit of this instance logged something: read the log now."""
        self._wakeup.set()

    async def subscribe(
        self, key: str, devices: frozenset[str] | None, metrics: frozenset[str] | None
    ) -> Subscription:
        """Open a stream (TooManyRequests past the limits); the caller must `unsubscribe`."""
        if len(self._subs) >= self.max_streams:
            raise TooManyRequests(
                f"this gateway serves at most {self.max_streams} streams",
                code="too_many_streams",
                retry_after_s=5,
            )
        if self._by_key[key] >= self.per_token:
            raise TooManyRequests(
                f"a token may hold at most {self.per_token} open streams"
                " (FIELDGATE_STREAMS_PER_TOKEN)",
                code="too_many_streams",
                retry_after_s=5,
            )
        if not self._subs:
            # Idle, the hub did not follow the log: start from where it stands.
            newest = await commit_log.newest_id(connection())
            if not self._subs:
                self.position = max(self.position, newest)
        sub = Subscription(key, devices, metrics, self.buffer)
        sub.start = self.position
        sub.after = (self.position + 1, "")  # nothing of the log rows up to `start`
        self._subs.append(sub)
        self._by_key[key] += 1
        self._wakeup.set()
        return sub

    def unsubscribe(self, sub: Subscription) -> None:
        if sub in self._subs:
            self._subs.remove(sub)
            self._by_key[sub.key] -= 1
            if not self._by_key[sub.key]:
                del self._by_key[sub.key]

    async def run(self, stop: asyncio.Event) -> None:
        """Follow the log while streams are open, and prune it, until `stop`."""
        pruned_at = 0.0
        loop = asyncio.get_running_loop()
        while not stop.is_set():
            if self._subs:
                try:
                    await self._follow()
                except Exception as exc:
                    if not database_outage.record(exc):
                        log.exception("reading the commit log failed")
            if loop.time() - pruned_at >= min(60.0, self.window_s / 4):
                pruned_at = loop.time()
                await self._prune()
            wait = self.poll_s if self._subs else min(60.0, self.window_s / 4)
            self._wakeup.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(first_of(self._wakeup, stop), wait)
        self.stopping.set()

    async def _follow(self) -> None:
        """Hand every log row after `position` to the subscriptions."""
        while self._subs:
            rows = await commit_log.read_after(connection(), self.position, _READ_ROWS)
            if not rows:
                return
            events = await self.events_of(rows)
            # From here to the position's move nothing awaits: a stream that subscribes now
            # starts at `position` and gets these events from the log itself.
            for log_id, device, points in events:
                if log_id <= self.position:
                    continue
                for sub in self._subs:
                    event = sub.select(log_id, device, points)
                    if event is not None:
                        sub.offer(event)
            self.position = max(self.position, rows[-1][0])
            if len(rows) < _READ_ROWS:
                return

    async def events_of(
        self, rows: list[tuple[int, list[commit_log.Part]]]
    ) -> list[tuple[int, str, list[Point]]]:
        """Log rows as (log id, device, points) in event order: by log id, then device id.
        Readings of series deleted since are left out."""
        unknown = {
            sid for _, parts in rows for part in parts for sid in part[1] if sid not in self._names
        }
        if unknown:
            self._names.update(await metrics_of(unknown))
        names = self._names
        out: list[tuple[int, str, list[Point]]] = []
        for log_id, parts in rows:
            by_device: dict[str, list[Point]] = {}
            for device, sids, ts, values in parts:
                points = by_device.setdefault(device, [])
                points.extend(
                    (names[s], t, v) for s, t, v in zip(sids, ts, values, strict=True) if s in names
                )
            out.extend((log_id, d, by_device[d]) for d in sorted(by_device) if by_device[d])
        return out

    async def replay(self, sub: Subscription, after: Position) -> AsyncIterator[LiveEvent]:
        """The events `sub` wants from the log after `after`, up to where it subscribed (what
        follows comes through its queue)."""
        at = after[0] - 1
        while at < sub.start:
            rows = await commit_log.read_after(connection(), at, _READ_ROWS)
            rows = [r for r in rows if r[0] <= sub.start]
            if not rows:
                return
            for log_id, device, points in await self.events_of(rows):
                event = sub.select(log_id, device, points, after)
                if event is not None:
                    yield event
            at = rows[-1][0]

    async def holds(self, position: Position) -> bool:
        """Whether every event after `position` is still in the log (or is yet to come)."""
        oldest, newest = await commit_log.bounds(connection())
        if position[0] > newest:
            return False  # not an id of this database's log
        # The newest row is never pruned, so an id at or after the oldest is covered. Just before
        # it: nothing was deleted in between (ids can skip, but not that one).
        return position[0] >= oldest - 1

    async def _prune(self) -> None:
        try:
            gone = await commit_log.prune(connection(), now_us() - int(self.window_s * 1e6))
        except Exception as exc:
            if not database_outage.record(exc):
                log.exception("pruning the commit log failed")
            return
        if gone:
            log.debug("deleted %d commit log rows older than %g s", gone, self.window_s)


class Waitable(Protocol):
    async def wait(self) -> Any: ...


async def first_of(*events: Waitable) -> None:
    """Return when any of `events` is set."""
    waits = [asyncio.ensure_future(e.wait()) for e in events]
    try:
        await asyncio.wait(waits, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for w in waits:
            w.cancel()


@dataclass(slots=True)
class HistoryPage:
    """A history page of one metric: the readings with lo <= ts < hi, read while the log stood
    between `before` and `after` (ids), and, when a commit came in between, its timestamps."""

    lo: int
    hi: int
    before: int
    after: int
    ts: frozenset[int] | None


class HistoryPages:
    """What the history part of a stream sent, to drop from its live part exactly the readings
    that were already in it. A reading committed with log id e, in a page read while the log
    stood at `before`..`after`: e <= before, it was committed before the page was read (in it);
    e > after, committed after (not in it); in between, the page's timestamps tell."""

    def __init__(self) -> None:
        self._pages: dict[str, list[HistoryPage]] = {}
        self._starts: dict[str, list[int]] = {}  # each metric's pages' `lo`, for bisect
        self.newest = 0  # the largest `after`: live events past it were never in a page

    def add(self, metric: str, page: HistoryPage) -> None:
        self._pages.setdefault(metric, []).append(page)
        self._starts.setdefault(metric, []).append(page.lo)
        self.newest = max(self.newest, page.after)

    def sent(self, log_id: int, metric: str, ts: int) -> bool:
        pages = self._pages.get(metric)
        if not pages or log_id > self.newest:
            return False
        i = bisect.bisect_right(self._starts[metric], ts) - 1
        if i < 0 or ts >= pages[i].hi:
            return False
        page = pages[i]
        if log_id <= page.before:
            return True
        if log_id > page.after:
            return False
        return page.ts is not None and ts in page.ts

    def unsent(self, event: LiveEvent) -> LiveEvent | None:
        """`event` without the readings the history sent (None if nothing is left)."""
        if event.log_id > self.newest:
            return event
        points = [p for p in event.points if not self.sent(event.log_id, p[0], p[1])]
        if not points:
            return None
        return LiveEvent(event.log_id, event.device, points)


async def history(
    device: str, series: dict[str, int], start_us: int, page_size: int, pages: HistoryPages
) -> AsyncIterator[bytes]:
    """The readings of `series` (metric -> series id) of `device` timed at or after `start_us`,
    as event data a page at a time, each page noted in `pages`."""
    conn = connection()
    for metric, series_id in sorted(series.items()):
        lo = start_us
        while True:
            before = await commit_log.newest_id(conn)
            rows = await select_raw(conn, series_id, lo, TS_MAX_US + 1, page_size)
            after = await commit_log.newest_id(conn)
            more = len(rows) == page_size
            hi = rows[-1][0] + 1 if more else TS_MAX_US + 1
            seen = frozenset(t for t, _ in rows) if after != before else None
            pages.add(metric, HistoryPage(lo, hi, before, after, seen))
            if rows:
                yield readings_json(device, [(metric, t, v) for t, v in rows])
            if not more:
                break
            lo = hi
