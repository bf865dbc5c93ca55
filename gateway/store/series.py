"""The series cache: (device, metric) -> integer series id, kept in memory.

A miss creates the series idempotently (insert, ignoring a conflict, then select), so two gateway
instances racing on a new series both end with the same id. Work is per batch: one dict lookup per
reading, one round trip per device with new metrics.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Iterable

import asyncpg

from gateway.errors import NotFound
from gateway.store.database import Dialect, connection, dialect_of
from gateway.store.sql import execute, fetch


class SeriesCache:
    def __init__(self) -> None:
        self._ids: dict[str, dict[str, int]] = {}

    async def resolve(self, device_id: str, metrics: list[str]) -> list[int]:
        """The series id of each metric of `device_id`, in order, creating what is missing."""
        known = self._ids.get(device_id)
        if known is not None:
            try:
                return [known[m] for m in metrics]
            except KeyError:
                pass
        await self._load(device_id, metrics)
        known = self._ids[device_id]
        return [known[m] for m in metrics]

    async def ids_of(self, device_id: str, metrics: Iterable[str]) -> dict[str, int]:
        """Existing series ids (no creation) of `device_id` for `metrics`: for the read path."""
        wanted = set(metrics)
        known = self._ids.get(device_id, {})
        if not wanted <= known.keys():
            known = await self._select(device_id)
        return {m: known[m] for m in wanted if m in known}

    def forget(self, device_id: str) -> None:
        self._ids.pop(device_id, None)

    async def _select(self, device_id: str) -> dict[str, int]:
        rows = await fetch(
            connection(), "SELECT metric, id FROM series WHERE device_id = ?", (device_id,)
        )
        known = {str(metric): int(sid) for metric, sid in rows}
        self._ids[device_id] = known
        return known

    async def _load(self, device_id: str, metrics: list[str]) -> None:
        known = await self._select(device_id)
        missing = sorted(set(metrics) - known.keys())
        if not missing:
            return
        conn = connection()
        try:
            if dialect_of(conn) is Dialect.SQLITE:
                async with conn.acquire_connection() as raw:
                    await raw.executemany(
                        "INSERT OR IGNORE INTO series (device_id, metric) VALUES (?, ?)",
                        [(device_id, m) for m in missing],
                    )
            else:
                await execute(
                    conn,
                    "INSERT INTO series (device_id, metric) SELECT ?, unnest(?::text[])"
                    " ON CONFLICT DO NOTHING",
                    (device_id, missing),
                )
        except (sqlite3.IntegrityError, asyncpg.IntegrityConstraintViolationError):
            raise NotFound(
                f"device {device_id!r} does not exist", code="device_not_found"
            ) from None
        await self._select(device_id)


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
