"""The `fieldgate` command: serve, migrate, and manage devices and tokens."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from typing import Annotated, TypeVar

import typer
from tortoise.exceptions import IntegrityError

from devices.models import DEVICE_ID_RE, Role
from gateway.settings import Settings
from gateway.store import database, registry

app = typer.Typer(help="fieldgate: IoT telemetry ingestion gateway.", no_args_is_help=True)
devices_app = typer.Typer(help="Manage devices.", no_args_is_help=True)
tokens_app = typer.Typer(help="Manage operator and admin tokens.", no_args_is_help=True)
app.add_typer(devices_app, name="devices")
app.add_typer(tokens_app, name="tokens")

T = TypeVar("T")


def _with_database(work: Callable[[], Awaitable[T]]) -> T:
    settings = Settings()

    async def run() -> T:
        await database.open_database(settings.database_url)
        try:
            return await work()
        finally:
            await database.close_database()

    return asyncio.run(run())


@app.command()
def serve(
    host: Annotated[str, typer.Option(help="address to listen on")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="port to listen on")] = 8000,
    log_level: Annotated[str, typer.Option(help="debug, info, warning, error")] = "info",
) -> None:
    """Apply migrations and serve the HTTP API (and the MQTT bridge when configured)."""
    import uvicorn

    from gateway.app import create_app

    logging.basicConfig(
        level=log_level.upper(), format="%(asctime)s %(levelname)s %(name)s %(message)s"
    )
    uvicorn.run(create_app(Settings()), host=host, port=port, log_level=log_level, access_log=False)


@app.command()
def migrate() -> None:
    """Apply the migrations the database has not seen yet."""
    settings = Settings()
    asyncio.run(database.migrate(settings.database_url))
    typer.echo(f"database is up to date: {settings.database_url.split('@')[-1]}")


@devices_app.command("create")
def devices_create(
    device_id: Annotated[str, typer.Argument(metavar="ID", help="1-64 of A-Z a-z 0-9 _ . -")],
    name: Annotated[str, typer.Option(help="a human-readable name")] = "",
) -> None:
    """Create a device and print its token (shown only this once)."""
    if not DEVICE_ID_RE.fullmatch(device_id):
        raise typer.BadParameter("a device id is 1-64 characters of A-Z a-z 0-9 _ . -")

    async def work() -> str:
        _, token = await registry.create_device(device_id, name, {}, True)
        return token

    try:
        token = _with_database(work)
    except IntegrityError:
        typer.echo(f"device {device_id!r} already exists", err=True)
        raise typer.Exit(1) from None
    typer.echo(token)


@tokens_app.command("create")
def tokens_create(
    role: Annotated[Role, typer.Option(help="operator (reads all) or admin (manages devices)")],
    name: Annotated[str, typer.Option(help="who or what the token is for")] = "",
) -> None:
    """Create an operator or admin token and print it (shown only this once)."""
    if role is Role.DEVICE:
        raise typer.BadParameter("device tokens come with `fieldgate devices create`")
    typer.echo(_with_database(lambda: registry.create_token(role, name)))


def main() -> None:
    app()
