"""migrations/: one history that builds the schema from empty on SQLite and PostgreSQL, is a no-op
the second time, and matches the Tortoise models (the autodetector finds nothing to add)."""

from __future__ import annotations

import os
import sqlite3
import subprocess
import sys
from pathlib import Path
from typing import Any

import asyncpg
import pytest
from tortoise import Tortoise
from tortoise.cli.cli import tortoise_cli_context
from tortoise.migrations.autodetector import MigrationAutodetector

from gateway.store.database import APP_LABEL, Dialect, migrate, tortoise_config
from gateway.store.raw_sql import placeholders
from tests.harness import committed, is_sqlite

TABLES = {"device", "api_token", "series", "reading", "tortoise_migrations"}
MIGRATIONS = Path(__file__).parent.parent / "migrations"
HISTORY = sorted(p.stem for p in MIGRATIONS.glob("[0-9][0-9][0-9][0-9]_*.py"))


async def apply(database_url: str) -> None:
    await migrate(database_url)
    await Tortoise.close_connections()


async def tables(database_url: str) -> set[str]:
    if is_sqlite(database_url):
        rows = await committed(database_url, "SELECT name FROM sqlite_master WHERE type = 'table'")
    else:
        rows = await committed(
            database_url,
            "SELECT table_name FROM information_schema.tables WHERE table_schema = 'public'",
        )
    return {str(r[0]) for r in rows}


async def schema(database_url: str) -> list[tuple[Any, ...]]:
    """Everything that describes the schema, to compare before and after."""
    if is_sqlite(database_url):
        return await committed(
            database_url, "SELECT type, name, tbl_name, sql FROM sqlite_master ORDER BY name"
        )
    return await committed(
        database_url,
        "SELECT table_name, column_name, data_type, is_nullable, column_default"
        " FROM information_schema.columns WHERE table_schema = 'public'"
        " ORDER BY table_name, column_name",
    ) + await committed(
        database_url,
        "SELECT tablename, indexname, indexdef FROM pg_indexes WHERE schemaname = 'public'"
        " ORDER BY indexname",
    )


class TestHistory:
    async def test_applies_from_empty(self, empty_database_url: str) -> None:
        url = empty_database_url
        if not is_sqlite(url):
            assert await tables(url) == set()
        await apply(url)
        assert await tables(url) >= TABLES
        applied = await committed(url, "SELECT app, name FROM tortoise_migrations ORDER BY name")
        assert applied == [(APP_LABEL, name) for name in HISTORY]

    async def test_second_run_is_a_no_op(self, empty_database_url: str) -> None:
        url = empty_database_url
        await apply(url)
        before = await schema(url)
        applied = await committed(url, "SELECT * FROM tortoise_migrations")
        async with RawSession(url) as run:
            await run(
                "INSERT INTO device (id, name, metadata, enabled, created_at, updated_at)"
                " VALUES ('keep', '', '{}', ?, ?, ?)",
                *_device_values(url),
            )
        await apply(url)
        await apply(url)
        assert await schema(url) == before
        assert await committed(url, "SELECT * FROM tortoise_migrations") == applied
        assert await committed(url, "SELECT id FROM device") == [("keep",)]

    async def test_reading_table_is_keyed_by_series_and_ts(self, empty_database_url: str) -> None:
        url = empty_database_url
        await apply(url)
        if is_sqlite(url):
            (sql,) = (await committed(url, "SELECT sql FROM sqlite_master WHERE name = 'reading'"))[
                0
            ]
            assert "PRIMARY KEY (series_id, ts)" in sql
            assert "WITHOUT ROWID" in sql
        else:
            columns = dict(
                await committed(
                    url,
                    "SELECT column_name, data_type FROM information_schema.columns"
                    " WHERE table_name = 'reading'",
                )
            )
            assert columns == {
                "series_id": "integer",
                "ts": "bigint",
                "value": "double precision",
            }
            (indexdef,) = (
                await committed(
                    url, "SELECT indexdef FROM pg_indexes WHERE indexname = 'reading_pkey'"
                )
            )[0]
            assert "(series_id, ts)" in indexdef

    async def test_constraints_hold(self, empty_database_url: str) -> None:
        """Unique keys and cascades come from the one history on both databases."""
        url = empty_database_url
        await apply(url)
        statements = [
            "INSERT INTO device (id, name, metadata, enabled, created_at, updated_at)"
            " VALUES ('d', '', '{}', ?, ?, ?)",
            "INSERT INTO series (device_id, metric) VALUES ('d', 't')",
            "INSERT INTO api_token (token_hash, role, device_id, name, created_at)"
            " VALUES ('h', 'device', 'd', '', ?)",
            "INSERT INTO reading (series_id, ts, value) VALUES (1, 5, 1.0)",
        ]
        args = [_device_values(url), (), _device_values(url)[2:], ()]
        duplicates = [
            ("INSERT INTO series (device_id, metric) VALUES ('d', 't')", ()),
            (
                "INSERT INTO api_token (token_hash, role, name, created_at)"
                " VALUES ('h', 'admin', '', ?)",
                _device_values(url)[2:],
            ),
            ("INSERT INTO reading (series_id, ts, value) VALUES (1, 5, 2.0)", ()),
            ("INSERT INTO series (device_id, metric) VALUES ('no-such-device', 't')", ()),
        ]
        async with RawSession(url) as run:
            for sql, values in zip(statements, args, strict=True):
                await run(sql, *values)
            for sql, values in duplicates:
                with pytest.raises(
                    (sqlite3.IntegrityError, asyncpg.IntegrityConstraintViolationError)
                ):
                    await run(sql, *values)
            await run("DELETE FROM device WHERE id = 'd'")
            assert await run("SELECT count(*) FROM series") == [(0,)]
            assert await run("SELECT count(*) FROM api_token") == [(0,)]


def _device_values(url: str) -> tuple[Any, ...]:
    """enabled, created_at, updated_at in the form each driver takes."""
    if is_sqlite(url):
        return (1, "2026-01-01T00:00:00+00:00", "2026-01-01T00:00:00+00:00")
    from datetime import UTC, datetime

    now = datetime(2026, 1, 1, tzinfo=UTC)
    return (True, now, now)


class RawSession:
    """One connection with foreign keys enforced (SQLite needs the pragma per connection),
    autocommit per statement; calling it runs `?`-style SQL and returns the rows."""

    def __init__(self, url: str) -> None:
        self.url = url
        self.sqlite: sqlite3.Connection | None = None
        self.pg: asyncpg.Connection | None = None

    async def __aenter__(self) -> Any:
        if is_sqlite(self.url):
            self.sqlite = sqlite3.connect(self.url.removeprefix("sqlite://"), isolation_level=None)
            self.sqlite.execute("PRAGMA foreign_keys = ON")
        else:
            self.pg = await asyncpg.connect(self.url)
        return self.run

    async def __aexit__(self, *exc: object) -> None:
        if self.sqlite is not None:
            self.sqlite.close()
        if self.pg is not None:
            await self.pg.close()

    async def run(self, sql: str, *args: Any) -> list[tuple[Any, ...]]:
        if self.sqlite is not None:
            return [tuple(r) for r in self.sqlite.execute(sql, args).fetchall()]
        assert self.pg is not None
        return [tuple(r) for r in await self.pg.fetch(placeholders(Dialect.POSTGRES, sql), *args)]


class TestModelsMatchMigrations:
    async def test_autodetector_finds_no_changes(self) -> None:
        """What `tortoise makemigrations` would write: nothing."""
        config = tortoise_config("sqlite://:memory:")
        async with tortoise_cli_context(config) as ctx:
            assert ctx.apps is not None
            detector = MigrationAutodetector(ctx.apps, config["apps"])
            writers = await detector.changes()
            state = await detector._project_state()
            models = set(ctx.apps[APP_LABEL])
        assert writers == [], [w.operations for w in writers]
        assert models >= {"Device", "ApiToken", "Series"}
        assert {name for app, name in state.models if app == APP_LABEL} == models

    async def test_autodetector_would_notice_a_missing_history(self, tmp_path: Path) -> None:
        """The check above can fail: with an empty history it wants to create every model."""
        package = tmp_path / "empty_history"
        package.mkdir()
        (package / "__init__.py").write_text("")
        sys.path.insert(0, str(tmp_path))
        try:
            config = tortoise_config("sqlite://:memory:")
            config["apps"][APP_LABEL]["migrations"] = "empty_history"
            async with tortoise_cli_context(config) as ctx:
                assert ctx.apps is not None
                writers = await MigrationAutodetector(ctx.apps, config["apps"]).changes()
        finally:
            sys.path.remove(str(tmp_path))
            sys.modules.pop("empty_history", None)
        assert len(writers) == 1
        created = {
            type(op).__name__ + ":" + getattr(op, "name", "") for op in writers[0].operations
        }
        assert created >= {"CreateModel:Device", "CreateModel:ApiToken", "CreateModel:Series"}


def test_history_is_numbered_without_gaps() -> None:
    assert HISTORY[0] == "0001_initial"
    assert [int(name[:4]) for name in HISTORY] == list(range(1, len(HISTORY) + 1))


def test_fieldgate_migrate_exits(tmp_path: Path) -> None:
    """`fieldgate migrate` applies the history and exits (an open SQLite thread once kept it up)."""
    fieldgate = Path(sys.executable).with_name("fieldgate")
    db = tmp_path / "m.db"
    done = subprocess.run(
        [str(fieldgate), "migrate"],
        env={**os.environ, "FIELDGATE_DATABASE_URL": f"sqlite://{db}"},
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 0, done.stderr
    assert "up to date" in done.stdout
    tables = {r[0] for r in sqlite3.connect(db).execute("SELECT name FROM sqlite_master")}
    assert {"device", "series", "reading", "api_token"} <= tables


class TestDeadLetterPayloadBytes:
    """0003: the dead letters' payload becomes bytes; rows stored as text before keep their
    payload (as its UTF-8 bytes), and any bytes can be stored after."""

    async def test_existing_payloads_are_kept_as_bytes_both_ways(
        self, empty_database_url: str
    ) -> None:
        from tortoise.migrations.api import migrate as tortoise_migrate

        url = empty_database_url
        if is_sqlite(url):
            Path(url.removeprefix("sqlite://")).parent.mkdir(parents=True, exist_ok=True)
        try:
            await tortoise_migrate(config=tortoise_config(url), target="models.0002_dead_letter")
        finally:
            await Tortoise.close_connections()
        async with RawSession(url) as run:
            await run(
                "INSERT INTO dead_letter (received_us, transport, device_id, topic, reason,"
                " message, details, payload, payload_bytes) VALUES (1, 'mqtt', 'd', 't', 'r',"
                " 'm', '[]', ?, 9)",
                '{"é": \\1}',
            )
        await apply(url)
        rows = await committed(url, "SELECT payload, payload_bytes FROM dead_letter")
        assert [(bytes(p), n) for p, n in rows] == [('{"é": \\1}'.encode(), 9)]
        async with RawSession(url) as run:
            await run(
                "INSERT INTO dead_letter (received_us, transport, topic, reason, message,"
                " details, payload, payload_bytes) VALUES (2, 'mqtt', 't', 'r', 'm', '[]', ?, 3)",
                b"\x00\xff\x80",
            )
            with pytest.raises((sqlite3.IntegrityError, asyncpg.NotNullViolationError)):
                await run(
                    "INSERT INTO dead_letter (received_us, transport, topic, reason, message,"
                    " details, payload_bytes) VALUES (3, 'mqtt', 't', 'r', 'm', '[]', 0)"
                )
        rows = await committed(url, "SELECT payload FROM dead_letter WHERE received_us = 2")
        assert bytes(rows[0][0]) == b"\x00\xff\x80"

        # a downgrade brings the text column back, the rows with it (NUL and bad bytes replaced)
        try:
            await tortoise_migrate(config=tortoise_config(url), target="models.0002_dead_letter")
        finally:
            await Tortoise.close_connections()
        rows = await committed(url, "SELECT payload FROM dead_letter ORDER BY received_us")
        assert rows == [('{"é": \\1}',), ("\\x00\ufffd\ufffd",)]
        await apply(url)
        rows = await committed(url, "SELECT payload FROM dead_letter ORDER BY received_us")
        assert [bytes(r[0]) for r in rows] == ['{"é": \\1}'.encode(), "\\x00\ufffd\ufffd".encode()]


class TestTokenLifecycleColumns:
    """0006: tokens made before it keep working (no expiry, never used); the step goes back."""

    async def test_existing_tokens_get_nulls_both_ways(self, empty_database_url: str) -> None:
        from tortoise.migrations.api import migrate as tortoise_migrate

        url = empty_database_url
        if is_sqlite(url):
            Path(url.removeprefix("sqlite://")).parent.mkdir(parents=True, exist_ok=True)

        async def to(target: str) -> None:
            try:
                await tortoise_migrate(config=tortoise_config(url), target=target)
            finally:
                await Tortoise.close_connections()

        await to("models.0005_auth_change")
        insert = (
            "INSERT INTO api_token (token_hash, role, name, created_at) VALUES (?, 'admin', '', ?)"
        )
        async with RawSession(url) as run:
            await run(insert, "before", _device_values(url)[1])
        await apply(url)
        rows = await committed(url, "SELECT token_hash, expires_us, last_used_us FROM api_token")
        assert rows == [("before", None, None)]
        async with RawSession(url) as run:
            big = 253_402_300_799_999_999  # 9999-12-31T23:59:59.999999Z: needs 64 bits
            await run("UPDATE api_token SET expires_us = ?, last_used_us = ?", big, big - 1)
        rows = await committed(url, "SELECT expires_us, last_used_us FROM api_token")
        assert rows == [(big, big - 1)]

        await to("models.0005_auth_change")
        assert await committed(url, "SELECT token_hash FROM api_token") == [("before",)]
        await apply(url)
        rows = await committed(url, "SELECT token_hash, expires_us, last_used_us FROM api_token")
        assert rows == [("before", None, None)]
