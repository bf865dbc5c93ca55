"""What a user is told about the database: its URL without the password, and why it would not
open (one or two lines with what to do, instead of the driver's traceback)."""

from __future__ import annotations

import sqlite3
from urllib.parse import urlsplit, urlunsplit

import asyncpg
from tortoise.exceptions import DBConnectionError


def display_url(database_url: str) -> str:
    """`database_url` with its password replaced by `***`: safe for a log or a terminal."""
    parts = urlsplit(database_url)
    if parts.password is None:
        return database_url
    user = parts.username or ""
    host = parts.hostname or ""
    if parts.port is not None:
        host = f"{host}:{parts.port}"
    return urlunsplit(parts._replace(netloc=f"{user}:***@{host}"))


def _causes(exc: BaseException) -> list[BaseException]:
    """`exc` and what it wraps (Tortoise wraps driver errors: `DBConnectionError(exc)`)."""
    seen: list[BaseException] = []
    stack = [exc]
    while stack:
        err = stack.pop()
        if any(err is s for s in seen):
            continue
        seen.append(err)
        stack.extend(a for a in err.args if isinstance(a, BaseException))
        stack.extend(e for e in (err.__cause__, err.__context__) if e is not None)
    return seen


def explain_open_failure(exc: BaseException, database_url: str) -> str | None:
    """One or two lines saying why `database_url` could not be opened or migrated and what to
    do, or None when `exc` is not a failure to reach the database (a bug: let it raise)."""
    where = display_url(database_url)
    parts = urlsplit(database_url)
    host, port = parts.hostname or "127.0.0.1", parts.port or 5432
    user, name = parts.username or "postgres", parts.path.lstrip("/")
    causes = _causes(exc)
    for err in causes:
        if isinstance(err, asyncpg.InvalidCatalogNameError):
            return (
                f"the PostgreSQL database {name!r} does not exist ({where}).\n"
                f"Create it (createdb -h {host} -p {port} -U {user} {name}) or point "
                "FIELDGATE_DATABASE_URL at one that exists."
            )
        if isinstance(err, asyncpg.InvalidAuthorizationSpecificationError):  # a password too
            return (
                f"PostgreSQL refused user {user!r} ({where}): {err}.\n"
                "Check the user and password in FIELDGATE_DATABASE_URL."
            )
        if isinstance(err, sqlite3.OperationalError) and "unable to open" in str(err):
            return (
                f"cannot open the SQLite file of {where}: {err}.\n"
                "Check that its directory exists and is writable, or set FIELDGATE_DATABASE_URL."
            )
    # Tortoise's DBConnectionError is an OSError too: the driver's error under it says more.
    reached = [e for e in causes if isinstance(e, OSError | TimeoutError)]
    if reached:
        drivers = [e for e in reached if not isinstance(e, DBConnectionError)]
        err = (drivers or reached)[0]
        reason = getattr(err, "strerror", None) or str(err) or type(err).__name__
        if database_url.startswith("sqlite://"):
            return (
                f"cannot open the SQLite file of {where} ({reason}).\n"
                "Check that its directory can be made and written, or set FIELDGATE_DATABASE_URL."
            )
        return (
            f"cannot connect to the database at {where} ({reason}).\n"
            "Is it running and reachable? Check FIELDGATE_DATABASE_URL."
        )
    return None
