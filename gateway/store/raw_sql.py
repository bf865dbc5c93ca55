"""The little SQL that differs between SQLite and PostgreSQL, in one place."""

from __future__ import annotations

import re
import sqlite3
from collections.abc import AsyncIterator, Callable, Sequence
from contextlib import asynccontextmanager
from typing import Any, TypeVar

from tortoise.backends.base.client import BaseDBAsyncClient, TransactionalDBClient

from gateway.store.database import Dialect, dialect_of

_QMARK = re.compile(r"\?")
T = TypeVar("T")


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


async def sqlite_transaction(conn: BaseDBAsyncClient, work: Callable[..., T], *args: Any) -> T:
    """Run `work(db, *args)` on the SQLite connection `db` in one transaction (BEGIN ... COMMIT,
    rolled back if it raises), in a single call to aiosqlite's thread: one hop instead of one per
    statement, and no other statement of the app in between (the client's connection lock).

    The one adapter over aiosqlite's private API (`_execute` runs a call on the connection's
    thread, `_conn` is the sqlite3 connection): pyproject pins aiosqlite 0.22 for it, and
    tests/test_raw_sql.py fails if the names go or stop committing, rolling back and locking."""
    async with conn.acquire_connection() as raw:
        result: T = await raw._execute(_in_transaction, raw._conn, work, args)
        return result


async def sqlite_script(conn: BaseDBAsyncClient, script: str) -> None:
    """Run `script` to its end on the SQLite connection (outside any transaction): what
    `execute` cannot do for `PRAGMA incremental_vacuum`, which frees one page a step."""
    async with conn.acquire_connection() as raw:
        await raw._execute(raw._conn.executescript, script)


@asynccontextmanager
async def read_snapshot(conn: BaseDBAsyncClient) -> AsyncIterator[BaseDBAsyncClient]:
    """A client whose statements all see one snapshot of the database, for a read of several
    statements that must agree: `reading` and `chunk` read apart would see a packing step that
    commits between them, a reading twice (as a row and in its chunk) or not at all.

    PostgreSQL: a READ ONLY, REPEATABLE READ transaction on one pooled connection. SQLite: a
    deferred read transaction (its snapshot taken at the first read, as WAL gives another
    process's commits) holding the client's connection lock, so this process's writer and
    packer wait until it ends. Inside a transaction already: that one."""
    if isinstance(conn, TransactionalDBClient):
        yield conn
        return
    async with conn._in_transaction() as tx:
        if dialect_of(conn) is Dialect.POSTGRES:
            async with tx.acquire_connection() as raw:
                await raw.execute("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ, READ ONLY")
        yield tx


def _in_transaction(db: sqlite3.Connection, work: Callable[..., T], args: tuple[Any, ...]) -> T:
    # IMMEDIATE: the write lock from the start, so what the transaction reads (which series
    # exist) is still true when it writes; a deferred BEGIN would read an older snapshot.
    db.execute("BEGIN IMMEDIATE")
    try:
        result = work(db, *args)
        db.execute("COMMIT")
    except BaseException:
        if db.in_transaction:
            db.execute("ROLLBACK")
        raise
    return result
