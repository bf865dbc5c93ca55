"""The little SQL that differs between SQLite and PostgreSQL, in one place."""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import Any

from tortoise.backends.base.client import BaseDBAsyncClient

from gateway.store.database import Dialect, dialect_of

_QMARK = re.compile(r"\?")


def placeholders(dialect: Dialect, sql: str) -> str:
    """Write queries with `?`; PostgreSQL gets `$1, $2, ...`."""
    if dialect is Dialect.SQLITE:
        return sql
    counter = iter(range(1, 10_000))
    return _QMARK.sub(lambda _: f"${next(counter)}", sql)


async def fetch(conn: BaseDBAsyncClient, sql: str, values: Sequence[Any] = ()) -> list[Any]:
    """Rows (indexable tuples / records) of `sql` written with `?` placeholders."""
    dialect = dialect_of(conn)
    query = placeholders(dialect, sql)
    async with conn.acquire_connection() as raw:
        if dialect is Dialect.SQLITE:
            cursor = await raw.execute(query, list(values))
            rows = await cursor.fetchall()
            await cursor.close()
            return list(rows)
        return list(await raw.fetch(query, *values))


async def execute(conn: BaseDBAsyncClient, sql: str, values: Sequence[Any] = ()) -> int:
    """Run one statement written with `?` placeholders; the number of rows it changed."""
    dialect = dialect_of(conn)
    query = placeholders(dialect, sql)
    async with conn.acquire_connection() as raw:
        if dialect is Dialect.SQLITE:
            cursor = await raw.execute(query, list(values))
            count = int(cursor.rowcount)
            await cursor.close()
            return count
        status: str = await raw.execute(query, *values)
        return status_count(status)


def status_count(status: str) -> int:
    """Rows from a PostgreSQL command tag: 'INSERT 0 5' -> 5, 'UPDATE 3' -> 3."""
    try:
        return int(status.rsplit(" ", 1)[1])
    except (IndexError, ValueError):
        return 0
