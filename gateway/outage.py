"""Database outages, told in a few lines: whether the database is reachable, since when it is not,
and how many requests it cost. Everything that meets a database failure reports it here (the HTTP
error boundary, the writer, the MQTT bridge, background tasks) instead of logging it itself, so an
outage logs one line when it starts, a summary every `summary_every_s` while it lasts, and one line
when it ends, however many requests fail meanwhile.

    if not database_outage.record(exc, refused=1):  # not a database outage: a bug
        log.exception("...")

The outage ends with the next database operation that works: a commit (the writer reports it) or
the probe that `watch` runs while the database is down.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Awaitable, Callable
from typing import Any

from gateway import metrics
from gateway.store.database import is_unavailable

log = logging.getLogger("fieldgate.database")

SUMMARY_EVERY_S = 30.0


def _describe(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {exc}"[:300]


class DatabaseOutage:
    """The database's availability as this process last saw it, and the outage's counts."""

    def __init__(
        self,
        *,
        summary_every_s: float = SUMMARY_EVERY_S,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.summary_every_s = summary_every_s
        self._clock = clock
        self._down_since: float | None = None
        self._last_summary = 0.0
        self._refused = 0
        self._last_error = ""
        self._last_failure = 0.0

    @property
    def down(self) -> bool:
        """True from a transient failure until a database operation works again."""
        return self._down_since is not None

    @property
    def refused(self) -> int:
        """Requests refused in the current outage (0 when the database is up)."""
        return self._refused

    def record(self, exc: BaseException, *, refused: int = 0) -> bool:
        """When `exc` says the database cannot answer now (`is_unavailable`), count it toward
        the outage and return True: the caller logs nothing more (`refused`: how many requests
        or messages it turned away). False for any other exception: the caller handles it."""
        if not is_unavailable(exc):
            return False
        now = self._last_failure = self._clock()
        self._last_error = _describe(exc)
        if self._down_since is None:
            self._down_since = self._last_summary = now
            self._refused = 0
            metrics.DATABASE_UP.set(0)
            metrics.DATABASE_OUTAGES.inc()
            log.error(
                "the database is unavailable (%s); requests get 503 database_unavailable until "
                "it is back",
                self._last_error,
            )
        if refused:
            self._refused += refused
            metrics.DATABASE_REFUSED.inc(refused)
        self._summarize(now)
        return True

    def succeeded(self) -> None:
        """A database operation worked: ends the outage, if there is one."""
        if self._down_since is None:
            return
        lasted = self._clock() - self._down_since
        self._down_since = None
        metrics.DATABASE_UP.set(1)
        log.warning(
            "the database is back after %.1f s; %d requests were refused meanwhile",
            lasted,
            self._refused,
        )
        self._refused = 0

    def _summarize(self, now: float) -> None:
        if self._down_since is None or now - self._last_summary < self.summary_every_s:
            return
        self._last_summary = now
        log.warning(
            "the database is still unavailable after %.0f s: %d requests refused so far "
            "(last error: %s)",
            now - self._down_since,
            self._refused,
            self._last_error,
        )

    async def watch(
        self,
        probe: Callable[[], Awaitable[Any]],
        stop: asyncio.Event,
        *,
        every_s: float = 1.0,
        timeout_s: float = 2.0,
    ) -> None:
        """Until `stop`: while the database is down, run `probe` (a trivial query) every
        `every_s`, so the outage ends (and is logged as ended) even when no request comes.

        Only when no failure came in the last `every_s`: a trivial query can work while real
        statements do not (SQLite answers SELECT 1 while its write lock is taken), and the
        outage would otherwise end and start again every `every_s`."""
        metrics.DATABASE_UP.set(0 if self.down else 1)
        while not stop.is_set():
            if self.down and self._clock() - self._last_failure >= every_s:
                try:
                    await asyncio.wait_for(probe(), timeout_s)
                except Exception as exc:
                    self.record(exc)  # still down (or, rarely, a permanent error: keep probing)
                else:
                    self.succeeded()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), every_s)


class DriverLogFilter(logging.Filter):
    """Drops a database driver's log records that carry a transient failure (asyncpg's pool
    logs "Failed to restore the pool connection floor; retrying" with a traceback on every
    retry while the server is down), counting them toward the outage instead."""

    def __init__(self, outage: DatabaseOutage) -> None:
        super().__init__()
        self.outage = outage

    def filter(self, record: logging.LogRecord) -> bool:
        exc = record.exc_info[1] if record.exc_info else None
        return exc is None or not self.outage.record(exc)


# One per process, like the database connections it watches (Tortoise's are process-wide).
database_outage = DatabaseOutage()
_driver_log_filter = DriverLogFilter(database_outage)
DRIVER_LOGGERS = ("asyncpg.pool",)


def quiet_driver_logs() -> None:
    """Route the database drivers' own outage log records to `database_outage` (idempotent)."""
    for name in DRIVER_LOGGERS:
        logging.getLogger(name).addFilter(_driver_log_filter)
