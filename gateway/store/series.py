"""The series cache: (device, metric) -> integer series id, kept in memory.

A miss creates the series idempotently (insert, ignoring a conflict, then select), so two gateway
instances racing on a new series both end with the same id. Work is per batch: one dict lookup per
reading, one round trip per device with new metrics.

Creating series is bounded so one device cannot hold the others hostage: a device has at most
`max_series_per_device` series (`SeriesLimitReached` names the metrics past it, after the ones
that fit were created), and new series are inserted `CREATE_CHUNK` at a time, each chunk its own
short transaction, outside the writer's commits: between two chunks the writer (and every other
statement) gets the database.

Units: a series holds the unit its values are in, set once, by the first write that names one
(`claim_units`: `UPDATE ... WHERE unit IS NULL`, so racing instances agree on the first) and
never changed after; a write naming another unit is told which one the series has. So a unit
cached here is never stale, and only metrics whose series has none yet cost a round trip.
"""

from __future__ import annotations

import asyncio
import sqlite3
import weakref
from collections.abc import Iterable, Sequence

import asyncpg

from gateway.store.database import Dialect, connection, dialect_of
from gateway.store.errors import DeviceNotFound
from gateway.store.raw_sql import execute, fetch, sqlite_transaction

# New series per statement and transaction. SQLite holds its one connection for a chunk:
# ~5 ms for 500 rows on this kind of machine, so a write of another device waits that long at
# most (one autocommit INSERT per series, as before, took ~75 s for 200,000 series).
CREATE_CHUNK = 500

_SQLITE_INSERT = "INSERT OR IGNORE INTO series (device_id, metric) VALUES (?, ?)"


class SeriesLimitReached(Exception):
    """`device_id` has `limit` series; `refused` (new metrics) were not created."""

    code = "series_limit"

    def __init__(self, device_id: str, limit: int, refused: list[str]) -> None:
        super().__init__(
            f"device {device_id!r} has reached its limit of {limit} series; "
            f"{len(refused)} new metric(s) were not created"
        )
        self.device_id = device_id
        self.limit = limit
        self.refused = refused


class SeriesCache:
    def __init__(self, *, max_series_per_device: int = 10_000) -> None:
        self.max_series_per_device = max_series_per_device
        self._ids: dict[str, dict[str, int]] = {}
        self._units: dict[str, dict[str, str]] = {}  # device -> metric -> unit, where one is set
        # One creator per device at a time (the limit holds; the same rows are not inserted twice);
        # a lock lives only as long as someone holds or waits for it.
        self._creating: weakref.WeakValueDictionary[str, asyncio.Lock] = (
            weakref.WeakValueDictionary()
        )

    async def resolve(self, device_id: str, metrics: list[str]) -> list[int]:
        """The series id of each metric of `device_id`, in order, creating what is missing.

        Raises SeriesLimitReached when some new metrics would take the device past its limit
        (the others are created: resolving the remaining metrics again succeeds)."""
        known = self._ids.get(device_id)
        if known is not None:
            try:
                return [known[m] for m in metrics]
            except KeyError:
                pass
        known = await self._create(device_id, metrics)
        refused = [m for m in dict.fromkeys(metrics) if m not in known]
        if refused:
            raise SeriesLimitReached(device_id, self.max_series_per_device, refused)
        return [known[m] for m in metrics]

    async def ids_of(self, device_id: str, metrics: Iterable[str]) -> dict[str, int]:
        """Existing series ids (no creation) of `device_id` for `metrics`: for the read path.
        Always from the database (one indexed query, refreshing the cache): a cached id may name
        a series another instance or the CLI deleted with its device, and a read must not answer
        from the old series of a device created anew."""
        wanted = set(metrics)
        known = await self._select(device_id)
        return {m: known[m] for m in wanted if m in known}

    async def all_of(self, device_id: str) -> dict[str, int]:
        """Every series of `device_id`, metric -> id, from the database (as `ids_of`)."""
        return dict(await self._select(device_id))

    def unit_of(self, device_id: str, metric: str) -> str | None:
        """The unit of a series of `device_id`, as of the last read of its series (`ids_of`,
        `resolve` on a miss); None when it has none."""
        return self._units.get(device_id, {}).get(metric)

    async def claim_units(self, device_id: str, units: dict[str, str]) -> dict[str, str]:
        """Give the existing series of `device_id` the units of `units` (metric -> unit) where
        they have none yet; metric -> the unit its series has, for those that have another."""
        known = self._units.get(device_id, {})
        if all(known.get(m) == u for m, u in units.items()):
            return {}  # the usual case: no query
        conn = connection()
        for metric in [m for m in units if m not in known]:
            await execute(
                conn,
                "UPDATE series SET unit = ? WHERE device_id = ? AND metric = ? AND unit IS NULL",
                (units[metric], device_id, metric),
            )
        # What this or another instance set first (and a cached unit may be that of a series
        # deleted since, with its device: read again before telling a write it is wrong).
        await self._select(device_id)
        known = self._units.get(device_id, {})
        return {m: known[m] for m, u in units.items() if m in known and known[m] != u}

    def forget(self, device_id: str) -> None:
        self._ids.pop(device_id, None)
        self._units.pop(device_id, None)

    async def _select(self, device_id: str) -> dict[str, int]:
        rows = await fetch(
            connection(), "SELECT metric, id, unit FROM series WHERE device_id = ?", (device_id,)
        )
        known = {str(metric): int(sid) for metric, sid, _ in rows}
        self._ids[device_id] = known
        self._units[device_id] = {str(m): str(u) for m, _, u in rows if u is not None}
        return known

    async def _create(self, device_id: str, metrics: list[str]) -> dict[str, int]:
        """The device's series after creating the missing ones that fit under the limit."""
        lock = self._creating.get(device_id)
        if lock is None:
            lock = self._creating[device_id] = asyncio.Lock()
        async with lock:
            known = await self._select(device_id)
            missing = [m for m in dict.fromkeys(metrics) if m not in known]
            room = max(self.max_series_per_device - len(known), 0)
            create = missing[:room]
            if not create:
                return known
            for i in range(0, len(create), CREATE_CHUNK):
                await self._insert(device_id, create[i : i + CREATE_CHUNK])
            return await self._select(device_id)

    async def _insert(self, device_id: str, metrics: Sequence[str]) -> None:
        conn = connection()
        try:
            if dialect_of(conn) is Dialect.SQLITE:
                # One transaction per chunk (autocommit would commit, and sync, each row).
                await sqlite_transaction(conn, _sqlite_insert, device_id, metrics)
            else:
                await execute(
                    conn,
                    "INSERT INTO series (device_id, metric) SELECT ?, unnest(?::text[])"
                    " ON CONFLICT DO NOTHING",
                    (device_id, list(metrics)),
                )
        except (sqlite3.IntegrityError, asyncpg.IntegrityConstraintViolationError):
            raise DeviceNotFound(device_id) from None


def _sqlite_insert(db: sqlite3.Connection, device_id: str, metrics: Sequence[str]) -> None:
    db.executemany(_SQLITE_INSERT, [(device_id, m) for m in metrics])


async def find_series(
    metrics: list[str], device_ids: list[str] | None
) -> list[tuple[int, str, str]]:
    """(series id, device id, metric) of the series with these metrics (of these devices, or of
    every device), ordered by device and metric."""
    sql = "SELECT id, device_id, metric FROM series WHERE metric IN ({})".format(
        ", ".join("?" * len(metrics))
    )
    values: list[str] = list(metrics)
    if device_ids is not None:
        sql += " AND device_id IN ({})".format(", ".join("?" * len(device_ids)))
        values += device_ids
    rows = await fetch(connection(), sql + " ORDER BY device_id, metric", values)
    return [(int(r[0]), str(r[1]), str(r[2])) for r in rows]


async def series_units(series_ids: list[int]) -> dict[int, str]:
    """The unit of each of these series that has one."""
    if not series_ids:
        return {}
    rows = await fetch(
        connection(),
        "SELECT id, unit FROM series WHERE unit IS NOT NULL AND id IN ({})".format(
            ", ".join("?" * len(series_ids))
        ),
        series_ids,
    )
    return {int(sid): str(unit) for sid, unit in rows}


async def series_names(device_ids: list[str] | None = None) -> list[tuple[str, str]]:
    """(device id, metric) of every series (of these devices), ordered by device and metric:
    what the InfluxQL metadata statements list (gateway/influxql_executor.py)."""
    sql = "SELECT device_id, metric FROM series"
    values: list[str] = []
    if device_ids is not None:
        sql += " WHERE device_id IN ({})".format(", ".join("?" * len(device_ids)))
        values = list(device_ids)
    rows = await fetch(connection(), sql + " ORDER BY device_id, metric", values)
    return [(str(r[0]), str(r[1])) for r in rows]


async def metrics_of(series_ids: Iterable[int]) -> dict[int, str]:
    """series id -> metric name, for the ids that still exist (the live streams' lookup of the
    commit log's series ids)."""
    wanted = list(series_ids)
    out: dict[int, str] = {}
    conn = connection()
    for i in range(0, len(wanted), 500):
        chunk = wanted[i : i + 500]
        marks = ", ".join("?" * len(chunk))
        rows = await fetch(conn, f"SELECT id, metric FROM series WHERE id IN ({marks})", chunk)
        out.update((int(sid), str(metric)) for sid, metric in rows)
    return out
