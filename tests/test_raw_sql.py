"""`sqlite_transaction`, the one adapter over aiosqlite's private API: on an aiosqlite upgrade
that moves `_execute` or `_conn` or changes what they do, these fail instead of the writer."""

from __future__ import annotations

import asyncio
import inspect
import sqlite3
from collections.abc import AsyncIterator
from importlib.metadata import version
from pathlib import Path

import aiosqlite
import pytest
from tortoise.backends.base.client import BaseDBAsyncClient
from tortoise.context import TortoiseContext
from tortoise.transactions import in_transaction

from gateway.store.database import CONNECTION, tortoise_config
from gateway.store.raw_sql import execute, fetch, sqlite_transaction


@pytest.fixture
async def client(tmp_path: Path) -> AsyncIterator[BaseDBAsyncClient]:
    """The Tortoise SQLite client as the store gets it, with one table `t(n)`."""
    async with TortoiseContext() as ctx:
        await ctx.init(config=tortoise_config(f"sqlite://{tmp_path / 'db.sqlite3'}"))
        conn = ctx.db(CONNECTION)
        await conn.execute_script("CREATE TABLE t (n INTEGER PRIMARY KEY)")
        yield conn


def _insert(db: sqlite3.Connection, *values: int) -> list[int]:
    db.executemany("INSERT INTO t (n) VALUES (?)", [(v,) for v in values])
    return [row[0] for row in db.execute("SELECT n FROM t ORDER BY n")]


def _insert_then_fail(db: sqlite3.Connection, value: int) -> None:
    db.execute("INSERT INTO t (n) VALUES (?)", (value,))
    raise ValueError("work failed after its insert")


async def _stored(client: BaseDBAsyncClient) -> list[int]:
    return [row[0] for row in await fetch(client, "SELECT n FROM t ORDER BY n")]


async def _in_transaction(client: BaseDBAsyncClient) -> bool:
    """Whether the connection has a transaction open, asked on aiosqlite's thread."""
    async with client.acquire_connection() as raw:
        conn: aiosqlite.Connection = raw
        open_: bool = await conn._execute(lambda db: db.in_transaction, conn._conn)  # type: ignore[no-untyped-call]
        return open_


class TestPrivateNames:
    def test_the_version_checked_against(self) -> None:
        """pyproject pins aiosqlite 0.22; a new minor version needs these tests read again."""
        assert version("aiosqlite").startswith("0.22."), version("aiosqlite")

    def test_execute_and_conn_exist(self) -> None:
        """`_execute(fn, *args)` queues a call on the connection's thread; `_conn` is the
        sqlite3 connection."""
        execute_ = getattr(aiosqlite.Connection, "_execute", None)
        assert execute_ is not None, "aiosqlite.Connection._execute is gone"
        assert inspect.iscoroutinefunction(execute_)
        assert list(inspect.signature(execute_).parameters)[:2] == ["self", "fn"]
        assert isinstance(inspect.getattr_static(aiosqlite.Connection, "_conn"), property)

    async def test_conn_is_the_sqlite3_connection_of_the_thread(
        self, client: BaseDBAsyncClient
    ) -> None:
        async with client.acquire_connection() as raw:
            assert isinstance(raw, aiosqlite.Connection)
            assert isinstance(raw._conn, sqlite3.Connection)
            # autocommit mode (Tortoise's isolation_level=None): BEGIN is ours to issue
            assert raw._conn.isolation_level is None
        assert await _in_transaction(client) is False


class TestSqliteTransaction:
    async def test_work_commits_and_returns(
        self, client: BaseDBAsyncClient, tmp_path: Path
    ) -> None:
        assert await sqlite_transaction(client, _insert, 1, 2, 3) == [1, 2, 3]
        # committed: another connection to the file sees the rows
        with sqlite3.connect(tmp_path / "db.sqlite3") as other:
            assert [r[0] for r in other.execute("SELECT n FROM t ORDER BY n")] == [1, 2, 3]
        other.close()

    async def test_raising_work_rolls_back_and_the_connection_stays_usable(
        self, client: BaseDBAsyncClient
    ) -> None:
        await sqlite_transaction(client, _insert, 1)
        with pytest.raises(ValueError, match="work failed"):
            await sqlite_transaction(client, _insert_then_fail, 2)
        assert await _stored(client) == [1]
        assert await _in_transaction(client) is False
        assert await sqlite_transaction(client, _insert, 3) == [1, 3]

    async def test_a_failing_statement_rolls_back_the_whole_transaction(
        self, client: BaseDBAsyncClient
    ) -> None:
        with pytest.raises(sqlite3.IntegrityError):
            await sqlite_transaction(client, _insert, 5, 6, 5)  # the second 5 is refused
        assert await _stored(client) == []

    async def test_the_lock_keeps_other_statements_out(self, client: BaseDBAsyncClient) -> None:
        """A Tortoise transaction holds the client's lock across many hops to aiosqlite's thread;
        our BEGIN must wait for its COMMIT (without the lock it would run inside it and fail
        with "cannot start a transaction within a transaction")."""
        async with in_transaction(CONNECTION) as tx:
            await tx.execute_query("INSERT INTO t (n) VALUES (1)")
            ours = asyncio.create_task(sqlite_transaction(client, _insert, 2))
            # one more hop inside the transaction: the task runs meanwhile up to the lock
            await tx.execute_query("INSERT INTO t (n) VALUES (3)")
            assert not ours.done()
            other = asyncio.create_task(execute(client, "INSERT INTO t (n) VALUES (4)"))
            await tx.execute_query("SELECT 1")
            assert not other.done()
        assert await ours == [1, 2, 3]  # ran after the COMMIT, saw the committed rows
        assert await other == 1
        assert await _stored(client) == [1, 2, 3, 4]
