"""The database: Tortoise configuration from one URL, migrations, and the dialect in use."""

from __future__ import annotations

import logging
import os
import sqlite3
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from enum import StrEnum
from pathlib import Path
from typing import TYPE_CHECKING, Any

import asyncpg
from tortoise import Tortoise, connections
from tortoise.backends.base.client import BaseDBAsyncClient
from tortoise.backends.base.config_generator import expand_db_url
from tortoise.backends.base.executor import EXECUTOR_CACHE
from tortoise.contrib.fastapi import RegisterTortoise
from tortoise.exceptions import DBConnectionError
from tortoise.migrations.api import migrate as tortoise_migrate

from gateway.settings import DEFAULT_DATABASE_URL

if TYPE_CHECKING:
    from fastapi import FastAPI

APP_LABEL = "models"
CONNECTION = "default"


class Dialect(StrEnum):
    SQLITE = "sqlite"
    POSTGRES = "postgres"


def tortoise_config(database_url: str) -> dict[str, Any]:
    """The Tortoise config for `database_url` (sqlite://path or postgres://user@host:port/db)."""
    url = database_url
    if url.startswith("postgresql://"):
        url = "postgres://" + url.removeprefix("postgresql://")
    conn: str | dict[str, Any] = url
    if url.startswith("postgres://"):
        conn = expand_db_url(url)
        # JIT compiling a short aggregate costs more than it saves (measured: 17 ms of a 40 ms
        # 24h query, 1.5 s of a 30-day one, on each of the first plans of a statement).
        settings = conn["credentials"].setdefault("server_settings", {})
        settings.setdefault("jit", "off")
        settings.setdefault("application_name", "fieldgate")
    elif url.startswith("sqlite://"):
        conn = expand_db_url(url)
        # Space freed by retention goes back to the file system (`PRAGMA incremental_vacuum`,
        # gateway/store/packed.py). SQLite takes this only before the first table is made: a
        # database made before it keeps its free pages for reuse (`fieldgate maintain --vacuum`
        # rewrites it once).
        # Set before journal_mode (Tortoise applies them in order): in WAL mode it cannot be.
        conn["credentials"] = {"auto_vacuum": "INCREMENTAL", **conn["credentials"]}
    return {
        "connections": {CONNECTION: conn},
        "apps": {
            APP_LABEL: {
                "models": ["devices.models", "gateway.store.dead_letters"],
                "default_connection": CONNECTION,
                "migrations": "migrations",
            }
        },
        "use_tz": True,
        "timezone": "UTC",
    }


def _ensure_sqlite_dir(database_url: str) -> None:
    if database_url.startswith("sqlite://"):
        path = database_url.removeprefix("sqlite://").split("?", 1)[0]
        if path and path != ":memory:":
            Path(path).parent.mkdir(parents=True, exist_ok=True)


async def migrate(database_url: str) -> None:
    """Apply every migration in `migrations/` that the database has not seen yet."""
    _ensure_sqlite_dir(database_url)
    try:
        await tortoise_migrate(config=tortoise_config(database_url))
    finally:
        # Close what the migration opened: an open SQLite connection's thread keeps the process
        # alive (`fieldgate migrate` would never exit).
        await Tortoise.close_connections()


def _tortoise_lifecycle_filter(record: logging.LogRecord) -> bool:
    """Drop Tortoise's "Tortoise-ORM started, {<objects>}" and "Tortoise-ORM shutdown" lines:
    object reprs, and a "shutdown" after the migrations and twice on the way out (RegisterTortoise
    logs it after `close_connections` has), which read like a failure. A filter on the
    "tortoise" logger itself: its children (tortoise.db_client's SQL at debug) are untouched."""
    return not str(record.msg).startswith("Tortoise-ORM ")


@asynccontextmanager
async def open_database(
    database_url: str, app: FastAPI | None = None, *, apply_migrations: bool = True
) -> AsyncIterator[None]:
    """Migrate the database (unless the caller has: `fieldgate serve` migrates before the app
    starts), then hold Tortoise's connections open until the block ends.

    Tortoise's own `RegisterTortoise` opens and closes the connections, with its global fallback
    on (its default), which makes them visible to every task (request handlers, the writer), not
    just to the task that runs the app's lifespan. Our connection settings (SQLite's file, the
    PostgreSQL `server_settings`) travel in the config it is given. What it cannot do is done
    here, before it opens:
    - migrations: it offers only `generate_schemas` (no history, no upgrade of a database with
      data), so `migrate` runs first (and makes the SQLite file's directory);
    - Tortoise caches generated SQL per connection name, not per dialect (`EXECUTOR_CACHE`): a
      process that reopens on another database kind (the test suite does) must not reuse
      SQLite's `?` on PostgreSQL, so the cache is cleared.
    Whatever needs the database on the way out (the writer's drain) runs inside the block, so
    it is done before the connections close."""
    logging.getLogger("tortoise").addFilter(_tortoise_lifecycle_filter)
    if apply_migrations:
        await migrate(database_url)
    EXECUTOR_CACHE.clear()
    async with RegisterTortoise(app, config=tortoise_config(database_url)):
        yield


def connection() -> BaseDBAsyncClient:
    conn: BaseDBAsyncClient = connections.get(CONNECTION)
    return conn


async def ping() -> None:
    """Ask the database the cheapest question there is; raises when it does not answer."""
    await connection().execute_query("SELECT 1")


def dialect_of(conn: BaseDBAsyncClient) -> Dialect:
    name = conn.capabilities.dialect
    if name == "sqlite":
        return Dialect.SQLITE
    if name == "postgres":
        return Dialect.POSTGRES
    raise RuntimeError(f"unsupported database dialect {name!r}")


# PostgreSQL error classes a later try can get past: 08 connection, 40 rollback (serialization,
# deadlock), 53 insufficient resources (disk full, too many connections), 57 operator intervention
# (shutdown, cannot connect now, statement timeout).
_TRANSIENT_SQLSTATE_CLASSES = frozenset(("08", "40", "53", "57"))
# SQLite's transient conditions, by message (sqlite3 raises OperationalError for all of them).
_TRANSIENT_SQLITE = ("locked", "busy", "disk i/o error", "unable to open", "disk is full")


def is_unavailable(exc: BaseException) -> bool:
    """True when `exc` says the database cannot take this statement *now* (down, unreachable,
    restarting, locked, out of connections or disk): a later try of the same statement can
    succeed. False for everything else (a bug, a value the database refuses): retrying that
    cannot help. The one place that tells transient database failures from permanent ones.

    Tortoise wraps driver errors (`OperationalError(exc)`), so the cause chain is searched."""
    seen: set[int] = set()
    stack: list[BaseException] = [exc]
    while stack:
        err = stack.pop()
        if id(err) in seen:
            continue
        seen.add(id(err))
        if isinstance(err, OSError | TimeoutError | DBConnectionError):
            return True
        if isinstance(err, asyncpg.PostgresError):
            if str(getattr(err, "sqlstate", "") or "")[:2] in _TRANSIENT_SQLSTATE_CLASSES:
                return True
        elif isinstance(err, asyncpg.InterfaceError):
            # "connection is closed", "pool is closing": the pool lost its server.
            if "closed" in str(err) or "closing" in str(err):
                return True
        elif isinstance(err, asyncpg.InternalClientError):
            # The server went away in the middle of a protocol exchange (seen when the pool
            # resets a connection on release as PostgreSQL shuts down: "cannot switch to state
            # 15; another operation (2) is in progress"); the pool drops that connection.
            if "cannot switch to state" in str(err):
                return True
        elif isinstance(err, sqlite3.OperationalError):
            text = str(err).lower()
            if any(word in text for word in _TRANSIENT_SQLITE):
                return True
        stack.extend(a for a in err.args if isinstance(a, BaseException))
        for linked in (err.__cause__, err.__context__):
            if linked is not None:
                stack.append(linked)
    return False


# For Tortoise's own CLI (`tortoise makemigrations`, `tortoise history`), found through
# [tool.tortoise] in pyproject.toml; it reads FIELDGATE_DATABASE_URL like the gateway.
TORTOISE_ORM = tortoise_config(os.environ.get("FIELDGATE_DATABASE_URL", DEFAULT_DATABASE_URL))
