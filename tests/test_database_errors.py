"""`is_unavailable`: the one place that tells a transient database failure from a permanent one."""

from __future__ import annotations

import sqlite3

import asyncpg
import pytest
from tortoise.exceptions import DBConnectionError, IntegrityError, OperationalError

from gateway.store.database import is_unavailable


def _wrapped(inner: BaseException) -> BaseException:
    """How Tortoise raises a driver error: OperationalError(exc) raised from it."""
    try:
        try:
            raise inner
        except BaseException as exc:
            raise OperationalError(exc) from exc
    except OperationalError as outer:
        return outer


class TestIsUnavailable:
    @pytest.mark.parametrize(
        "exc",
        [
            ConnectionRefusedError(111, "refused"),
            ConnectionResetError(104, "reset"),
            TimeoutError(),
            DBConnectionError("cannot connect"),
            asyncpg.exceptions.CannotConnectNowError("the database system is starting up"),
            asyncpg.exceptions.AdminShutdownError("terminating connection"),
            asyncpg.exceptions.ConnectionDoesNotExistError("connection was closed"),
            asyncpg.exceptions.TooManyConnectionsError("too many clients"),
            asyncpg.exceptions.SerializationError("could not serialize"),
            asyncpg.exceptions.InterfaceError("connection is closed"),
            asyncpg.exceptions.InternalClientError(
                "cannot switch to state 15; another operation (2) is in progress"
            ),
            _wrapped(sqlite3.OperationalError("database is locked")),
            _wrapped(asyncpg.exceptions.DiskFullError("no space left")),
        ],
        ids=repr,
    )
    def test_transient(self, exc: BaseException) -> None:
        assert is_unavailable(exc)

    @pytest.mark.parametrize(
        "exc",
        [
            ValueError("a bug"),
            OverflowError("int too big to convert"),
            UnicodeEncodeError("utf-8", "\ud800", 0, 1, "surrogates not allowed"),
            IntegrityError("duplicate key"),
            _wrapped(asyncpg.exceptions.CharacterNotInRepertoireError("invalid byte 0x00")),
            _wrapped(asyncpg.exceptions.NumericValueOutOfRangeError("out of range")),
            _wrapped(asyncpg.exceptions.UndefinedTableError("no such table")),
            _wrapped(sqlite3.OperationalError("no such table: reading")),
            asyncpg.exceptions.InterfaceError("another operation is in progress"),
        ],
        ids=repr,
    )
    def test_permanent(self, exc: BaseException) -> None:
        assert not is_unavailable(exc)
