"""The writer: a bounded queue drained into batched commits (group commit).

Callers (HTTP requests, the MQTT bridge) hand in `Rows` and await the commit that holds them. While
a commit runs, new requests queue up; the next commit takes them all (up to `batch_size`
readings), so concurrent requests share transactions instead of paying one each. The queue is
bounded in readings: `submit(..., wait=False)` refuses with `QueueFull` when it is full (HTTP
answers 503); `wait=True` waits for room (the MQTT bridge stops reading; the broker holds the rest).

Up to `commits_in_flight` commits run at once, each on its own connection (PostgreSQL: 2, so the
database inserts one batch while the other is committed, sent or answered; SQLite: 1, it has one
connection). A device is in at most one commit at a time and its requests are committed in the
order they came: two commits in flight never touch the same series or device row, so they never
wait for each other's locks, and a device's earlier reading of a key is the one kept.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import Counter, deque
from collections.abc import Callable
from dataclasses import dataclass, field

from gateway import metrics
from gateway.errors import mark_logged
from gateway.outage import database_outage
from gateway.store.database import Dialect, connection, dialect_of
from gateway.store.errors import SeriesGone
from gateway.store.readings import GONE, Rows, insert_batch
from gateway.timespec import now_us

log = logging.getLogger("fieldgate.writer")


class QueueFull(Exception):
    """The writer holds as many readings as it may; try again shortly."""


class WriterStopped(Exception):
    """The writer is shutting down and takes no new work."""


@dataclass(slots=True)
class _Request:
    rows: Rows
    device_id: str
    seen_us: int
    done: asyncio.Future[int] = field(repr=False)


class Writer:
    def __init__(
        self,
        *,
        batch_size: int,
        queue_size: int,
        linger_s: float = 0.0,
        commits_in_flight: int | None = None,
        live_log: bool = False,
    ) -> None:
        self.batch_size = batch_size
        # Whether each commit also writes what it added to the commit log (live streams).
        self.live_log = live_log
        # Called after each commit that stored something (the live hub's wakeup): cheap, sync.
        self.on_commit: Callable[[], None] | None = None
        self.queue_size = queue_size
        self.linger_s = linger_s
        # None: by the database, when `run` starts (PostgreSQL 2, SQLite 1).
        self.commits_in_flight = commits_in_flight
        self._queue: deque[_Request] = deque()
        self._queued_by_device: Counter[str] = Counter()  # requests in `_queue`, per device
        self._committing: set[str] = set()  # devices of the commits in flight
        self._in_flight: list[list[_Request]] = []
        self._pending = 0
        self._wakeup = asyncio.Event()
        self._room = asyncio.Condition()
        self._stopping = False

    @property
    def pending(self) -> int:
        """Readings queued or being committed."""
        return self._pending

    async def write(self, rows: Rows, device_id: str, seen_us: int, *, wait: bool) -> int:
        """Queue `rows` and return, once committed, how many were new (the rest were duplicates).
        Raises SeriesGone, nothing stored, when their series no longer exist."""
        if self._stopping:
            raise WriterStopped("the gateway is shutting down")
        n = len(rows)
        if self._pending and self._pending + n > self.queue_size:
            if not wait:
                metrics.QUEUE_FULL.inc()
                raise QueueFull(f"{self._pending} readings are waiting to be written")
            async with self._room:
                await self._room.wait_for(
                    lambda: (
                        self._stopping or not self._pending or self._pending + n <= self.queue_size
                    )
                )
            if self._stopping:
                raise WriterStopped("the gateway is shutting down")
        done: asyncio.Future[int] = asyncio.get_running_loop().create_future()
        self._queue.append(_Request(rows, device_id, seen_us, done))
        self._queued_by_device[device_id] += 1
        self._pending += n
        metrics.WRITER_QUEUE_DEPTH.set(self._pending)
        self._wakeup.set()
        return await done

    async def run(self) -> None:
        """The writer: commit batches until stopped and drained."""
        lanes = self.commits_in_flight
        if lanes is None:
            lanes = 1 if dialect_of(connection()) is Dialect.SQLITE else 2
        async with asyncio.TaskGroup() as tasks:
            for i in range(lanes):
                tasks.create_task(self._lane(), name=f"writer-commit-{i}")

    async def _lane(self) -> None:
        """One commit at a time, taking batches from the shared queue."""
        while True:
            if self._stopping and not self._queue:
                # Before waiting: a lane that starts after `stop` (a gateway stopped before its
                # writer task first ran) would wait for a wakeup the lanes before it cleared.
                return
            await self._wakeup.wait()
            if not self._eligible():
                self._wakeup.clear()
                if self._stopping and not self._queue:
                    return
                continue  # what is queued waits for a device's commit in flight
            if self.linger_s and not self._stopping:
                await asyncio.sleep(self.linger_s)  # let more requests join this commit
            batch = self._take_batch()
            if not batch:  # all were cancelled: room for waiting writers
                await self._release(0)
                continue
            devices = {req.device_id for req in batch}
            self._committing |= devices
            self._in_flight.append(batch)
            try:
                await self._commit(batch)
            finally:
                self._committing -= devices
                self._in_flight.remove(batch)
                self._wakeup.set()  # their later requests may be queued

    async def flush(self) -> None:
        """Return once every write queued before this call is committed (or failed)."""
        waiting = [req.done for req in self._queue]
        waiting += [req.done for batch in self._in_flight for req in batch]
        if waiting:
            # asyncio.wait, not gather: a cancelled flush must not cancel the writes
            await asyncio.wait(waiting)

    async def stop(self) -> None:
        """Refuse new writes; `run` returns once everything queued is committed."""
        self._stopping = True
        self._wakeup.set()
        async with self._room:
            self._room.notify_all()

    def _eligible(self) -> bool:
        """Whether a request of a device with no commit in flight is queued."""
        return any(d not in self._committing for d in self._queued_by_device)

    def _take_batch(self) -> list[_Request]:
        """The oldest requests of devices with no commit in flight, up to `batch_size` readings;
        a device's requests are taken in order (one left behind holds its later ones back)."""
        batch: list[_Request] = []
        size = 0
        passed: deque[_Request] = deque()
        held = set(self._committing)
        while self._queue:
            req = self._queue[0]
            if req.device_id not in held and batch and size + len(req.rows) > self.batch_size:
                break
            self._queue.popleft()
            if req.device_id in held:
                passed.append(req)
                continue
            self._dequeued(req)
            if req.done.cancelled():  # the caller went away before we started; skip it
                self._pending -= len(req.rows)
                continue
            batch.append(req)
            size += len(req.rows)
        self._queue.extendleft(reversed(passed))
        return batch

    def _dequeued(self, req: _Request) -> None:
        left = self._queued_by_device[req.device_id] - 1
        if left:
            self._queued_by_device[req.device_id] = left
        else:
            del self._queued_by_device[req.device_id]

    async def _commit(self, batch: list[_Request]) -> None:
        readings = sum(len(r.rows) for r in batch)
        seen: dict[str, int] = {}
        for req in batch:
            if req.seen_us > seen.get(req.device_id, 0):
                seen[req.device_id] = req.seen_us
        started = time.perf_counter()
        try:
            inserted = await insert_batch(
                connection(),
                [(r.device_id, r.rows) for r in batch],
                seen,
                now_us() if self.live_log else None,
            )
        except Exception as exc:
            metrics.WRITER_FAILURES.inc()
            if not database_outage.record(exc):  # an outage is logged there, in a few lines
                log.exception("commit of %d readings failed", readings)
                mark_logged(exc)  # once, not again by each request of the batch
            for req in batch:
                if not req.done.done():
                    req.done.set_exception(exc)
        else:
            database_outage.succeeded()
            metrics.WRITER_COMMIT_SECONDS.observe(time.perf_counter() - started)
            metrics.WRITER_BATCH_READINGS.observe(readings)
            metrics.WRITER_BATCH_REQUESTS.observe(len(batch))
            if self.on_commit is not None:
                self.on_commit()
            for req, n in zip(batch, inserted, strict=True):
                if req.done.done():
                    continue
                if n == GONE:
                    req.done.set_exception(SeriesGone(req.device_id))
                else:
                    req.done.set_result(n)
        await self._release(readings)

    async def _release(self, readings: int) -> None:
        self._pending -= readings
        metrics.WRITER_QUEUE_DEPTH.set(self._pending)
        async with self._room:
            self._room.notify_all()
