"""Shared fixtures: a migrated database per test on SQLite and on PostgreSQL, an app client.

PostgreSQL tests make one migrated template database per session and clone it per test
(CREATE DATABASE ... TEMPLATE), so every test starts from an empty, migrated schema.
"""

from __future__ import annotations

import asyncio
import os
import secrets
import socket
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from typing import Any

import asyncpg
import httpx
import pytest

from gateway.app import create_app
from gateway.settings import Settings
from gateway.store.database import migrate

PG_HOST = os.environ.get("FIELDGATE_TEST_PG_HOST", "127.0.0.1")
PG_PORT = int(os.environ.get("FIELDGATE_TEST_PG_PORT", "5432"))
PG_USER = os.environ.get("FIELDGATE_TEST_PG_USER", "postgres")
PG_ADMIN_DB = os.environ.get("FIELDGATE_TEST_PG_DB", "test")
ADMIN_TOKEN = "test-admin-token-" + secrets.token_hex(8)
IN_CI = os.environ.get("CI", "").lower() in ("1", "true", "yes")

START_HINTS = {
    "PostgreSQL": "pg_ctlcluster --skip-systemctl-redirect $(ls /etc/postgresql) main start",
    "Mosquitto": "mosquitto -d -c /etc/mosquitto/mosquitto.conf",
}


def service_up(host: str, port: int) -> bool:
    with socket.socket() as s:
        s.settimeout(1.0)
        return s.connect_ex((host, port)) == 0


def need_service(name: str, host: str, port: int) -> None:
    """Skip (fail in CI) when a service the test needs is not running."""
    if service_up(host, port):
        return
    message = f"{name} is not running on {host}:{port}; start it with: {START_HINTS[name]}"
    if IN_CI:
        pytest.fail(message)
    pytest.skip(message)


def pg_url(database: str) -> str:
    return f"postgres://{PG_USER}@{PG_HOST}:{PG_PORT}/{database}"


async def _pg_admin(sql: str) -> None:
    conn = await asyncpg.connect(
        host=PG_HOST, port=PG_PORT, user=PG_USER, database=PG_ADMIN_DB, timeout=10
    )
    try:
        await conn.execute(sql)
    finally:
        await conn.close()


@pytest.fixture(scope="session")
def pg_template() -> Iterator[str]:
    """A migrated PostgreSQL database that each test clones."""
    need_service("PostgreSQL", PG_HOST, PG_PORT)
    name = f"fg_tmpl_{os.getpid()}_{secrets.token_hex(3)}"
    asyncio.run(_pg_admin(f'CREATE DATABASE "{name}"'))

    async def prepare() -> None:
        await migrate(pg_url(name))
        from tortoise import Tortoise

        await Tortoise.close_connections()

    asyncio.run(prepare())
    yield name
    asyncio.run(_pg_admin(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))


@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def database_url(request: pytest.FixtureRequest, tmp_path: Any) -> Iterator[str]:
    """An empty, migrated database: SQLite in tmp_path, or a fresh PostgreSQL clone."""
    if request.param == "sqlite":
        yield f"sqlite://{tmp_path}/fieldgate.db"
        return
    template = request.getfixturevalue("pg_template")
    name = f"fg_test_{os.getpid()}_{secrets.token_hex(4)}"
    asyncio.run(_pg_admin(f'CREATE DATABASE "{name}" TEMPLATE "{template}"'))
    yield pg_url(name)
    asyncio.run(_pg_admin(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))


def make_settings(database_url: str, **overrides: Any) -> Settings:
    values: dict[str, Any] = {
        "database_url": database_url,
        "admin_token": ADMIN_TOKEN,
        "mqtt_url": "",
    }
    values.update(overrides)
    return Settings(_env_file=None, **values)  # type: ignore[call-arg]


@dataclass
class Gateway:
    """An app under test, reached in-process through httpx's ASGI transport."""

    client: httpx.AsyncClient
    settings: Settings
    app: Any

    @property
    def admin(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {ADMIN_TOKEN}"}

    async def create_device(self, device_id: str, **fields: Any) -> str:
        """Create a device; its token."""
        r = await self.client.post(
            "/api/v1/devices", json={"id": device_id, **fields}, headers=self.admin
        )
        assert r.status_code == 201, r.text
        return str(r.json()["token"])

    async def post(self, device_id: str, token: str, body: Any) -> httpx.Response:
        kwargs: dict[str, Any] = {"content": body} if isinstance(body, bytes) else {"json": body}
        return await self.client.post(
            f"/api/v1/devices/{device_id}/telemetry",
            headers={"Authorization": f"Bearer {token}"},
            **kwargs,
        )


async def start_gateway(settings: Settings) -> AsyncIterator[Gateway]:
    app = create_app(settings)
    async with app.router.lifespan_context(app):
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://fieldgate") as client:
            yield Gateway(client, settings, app)


@pytest.fixture
async def gateway(database_url: str) -> AsyncIterator[Gateway]:
    """The app on an empty database, with ADMIN_TOKEN as its admin token."""
    async for gw in start_gateway(make_settings(database_url)):
        yield gw
