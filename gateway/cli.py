"""The `fieldgate` command: serve, migrate, and manage devices and tokens."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Annotated, TypeVar

import typer

from devices.models import DEVICE_ID_RE, Role
from gateway.settings import Settings
from gateway.store import database, registry
from gateway.store.errors import DeviceExists

app = typer.Typer(help="fieldgate: IoT telemetry ingestion gateway.", no_args_is_help=True)
devices_app = typer.Typer(help="Manage devices.", no_args_is_help=True)
tokens_app = typer.Typer(help="Manage operator and admin tokens.", no_args_is_help=True)
app.add_typer(devices_app, name="devices")
app.add_typer(tokens_app, name="tokens")

T = TypeVar("T")


def _with_database(work: Callable[[], Awaitable[T]]) -> T:
    settings = Settings()

    async def run() -> T:
        async with database.open_database(settings.database_url):
            return await work()

    return asyncio.run(run())


@app.command()
def serve(
    host: Annotated[str, typer.Option(help="address to listen on")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="port to listen on")] = 8000,
    log_level: Annotated[str, typer.Option(help="debug, info, warning, error")] = "info",
) -> None:
    """Apply migrations and serve the HTTP API (and the MQTT bridge when configured)."""
    from gateway.app import create_app
    from gateway.server import serve as serve_http

    logging.basicConfig(
        level=log_level.upper(), format="%(asctime)s %(levelname)s %(name)s %(message)s"
    )
    settings = Settings()
    serve_http(create_app(settings), settings, host=host, port=port, log_level=log_level)


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
    except DeviceExists:
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


@app.command()
def simulate(
    gateway: Annotated[str, typer.Option(help="the gateway's base URL")] = "http://127.0.0.1:8000",
    admin_token: Annotated[
        str, typer.Option(envvar="FIELDGATE_ADMIN_TOKEN", help="creates the devices, reads back")
    ] = "",
    devices: Annotated[int, typer.Option(help="how many devices (sim-0000, sim-0001, ...)")] = 10,
    device_prefix: Annotated[str, typer.Option(help="device ids start with this")] = "sim-",
    rate: Annotated[float, typer.Option(help="messages per second per device")] = 1.0,
    duration: Annotated[str, typer.Option(help="live phase: 60, 90s, 15m, 1h")] = "60s",
    protocol: Annotated[str, typer.Option(help="http, mqtt or mixed (half each)")] = "http",
    mqtt: Annotated[str, typer.Option(help="the broker, for mqtt and mixed")] = (
        "mqtt://127.0.0.1:1883"
    ),
    mqtt_prefix: Annotated[str, typer.Option(help="topic prefix (the gateway's)")] = "",
    mqtt_connections: Annotated[int, typer.Option(help="broker connections shared")] = 4,
    qos: Annotated[int, typer.Option(help="MQTT QoS, 0 or 1")] = 1,
    batch: Annotated[int, typer.Option(help="messages per HTTP request / MQTT payload")] = 1,
    concurrency: Annotated[int, typer.Option(help="HTTP requests in flight at most")] = 64,
    ramp_up: Annotated[str, typer.Option(help="spread device starts over this long")] = "0",
    backfill: Annotated[str, typer.Option(help="first send this much history, fast: 24h")] = "0",
    bad_ratio: Annotated[float, typer.Option(help="share of messages made invalid")] = 0.0,
    faults: Annotated[
        str, typer.Option(help="kinds: nan,wrong_type,invalid_metric,future_timestamp,broken_json")
    ] = "nan,wrong_type,invalid_metric,future_timestamp,broken_json",
    duplicate_ratio: Annotated[float, typer.Option(help="share of messages sent twice")] = 0.0,
    dropout: Annotated[float, typer.Option(help="chance a reading is missing")] = 0.0,
    profile: Annotated[Path | None, typer.Option(help="metrics and signals (TOML/JSON)")] = None,
    seed: Annotated[int, typer.Option(help="same seed, same values")] = 0,
    verify: Annotated[bool, typer.Option(help="read back and compare; exit 1 on a difference")] = (
        False
    ),
    verify_mode: Annotated[str, typer.Option(help="exact (raw pages) or aggregate (sums)")] = (
        "exact"
    ),
    report_json: Annotated[Path | None, typer.Option(help="write the JSON report here")] = None,
    quiet: Annotated[bool, typer.Option(help="no live progress")] = False,
    dry_run: Annotated[bool, typer.Option(help="build payloads, send none (own ceiling)")] = False,
    max_messages: Annotated[int, typer.Option(help="the gateway's messages per body")] = 10_000,
    max_body_bytes: Annotated[int, typer.Option(help="the gateway's body size limit")] = 4 << 20,
) -> None:
    """Load a gateway like a fleet of devices, with faults on purpose, and verify what it stored."""
    from simulator.faults import FaultKind
    from simulator.profile import Profile, ProfileError, load_profile
    from simulator.run import SimulationConfig, parse_seconds
    from simulator.run import simulate as run_simulation

    try:
        config = SimulationConfig(
            gateway=gateway,
            admin_token=admin_token,
            devices=devices,
            device_prefix=device_prefix,
            rate=rate,
            duration_s=parse_seconds(duration),
            protocol=protocol,  # type: ignore[arg-type]
            mqtt_url=mqtt,
            mqtt_prefix=mqtt_prefix,
            mqtt_connections=mqtt_connections,
            qos=qos,
            batch=batch,
            concurrency=concurrency,
            ramp_up_s=parse_seconds(ramp_up),
            backfill_s=parse_seconds(backfill),
            bad_ratio=bad_ratio,
            duplicate_ratio=duplicate_ratio,
            fault_kinds=tuple(FaultKind(k.strip()) for k in faults.split(",") if k.strip()),
            dropout=dropout,
            profile=load_profile(profile) if profile else Profile(),
            seed=seed,
            verify=verify,
            verify_mode=verify_mode,  # type: ignore[arg-type]
            report_json=report_json,
            progress=not quiet,
            dry_run=dry_run,
            max_messages=max_messages,
            max_bytes=max_body_bytes,
        )
        config.check()
    except (ValueError, ProfileError) as exc:
        raise typer.BadParameter(str(exc)) from None
    if not admin_token and not dry_run:
        raise typer.BadParameter("--admin-token (or FIELDGATE_ADMIN_TOKEN) is required")
    raise typer.Exit(run_simulation(config))


def main() -> None:
    app()
