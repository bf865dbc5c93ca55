"""The `fieldgate` command: serve, migrate, and manage devices and tokens.

What goes wrong before the gateway runs (an invalid setting, a database that does not exist or
cannot be reached, a port that is taken) is told in one or two lines, with exit status 2; never
a traceback, which would also show settings' values (an admin token, a database password).
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import sys
from collections.abc import Awaitable, Callable, Coroutine, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, NoReturn, TypeVar

import typer

from devices.models import DEVICE_ID_RE, IssuedRole, Role
from gateway import provisioning
from gateway.errors import Conflict, Unavailable
from gateway.settings import Settings, SettingsError, load_settings
from gateway.store import database, registry
from gateway.store.diagnosis import display_url, explain_open_failure
from gateway.store.errors import DeviceExists, DeviceNotFound

if TYPE_CHECKING:  # the simulator is imported when `simulate` runs
    from simulator.faults import FaultKind
    from simulator.profile import Profile

app = typer.Typer(
    help="fieldgate: IoT telemetry ingestion gateway.",
    no_args_is_help=True,
    # A traceback's local variables would print settings, tokens included.
    pretty_exceptions_show_locals=False,
)
devices_app = typer.Typer(help="Manage devices.", no_args_is_help=True)
tokens_app = typer.Typer(help="Manage operator and admin tokens.", no_args_is_help=True)
app.add_typer(devices_app, name="devices")
app.add_typer(tokens_app, name="tokens")
broker_app = typer.Typer(
    help="The MQTT broker's device identities (Mosquitto's dynamic security).",
    no_args_is_help=True,
)
app.add_typer(broker_app, name="broker")

log = logging.getLogger("fieldgate")

T = TypeVar("T")

# Exit status of a gateway that cannot start: its configuration or its surroundings are wrong.
CANNOT_START = 2


def _fail(message: str, status: int = CANNOT_START) -> NoReturn:
    typer.echo(f"fieldgate: {message}", err=True)
    raise typer.Exit(status)


def _settings(**overrides: Any) -> Settings:
    try:
        return load_settings(**overrides)
    except SettingsError as exc:
        _fail(f"invalid configuration:\n{exc}")


def _with_database(settings: Settings, work: Callable[[], Awaitable[T]]) -> T:
    """Run `work` on the migrated database; a database that cannot be opened ends the command
    with what to do about it."""

    async def run() -> T:
        async with database.open_database(settings.database_url):
            return await work()

    return _run_explained(settings, run())


def _run_explained(settings: Settings, main: Coroutine[Any, Any, T]) -> T:
    """`asyncio.run(main)`; a database that cannot be opened ends the command with what to do
    about it, in a line or two."""
    try:
        return asyncio.run(main)
    except Exception as exc:
        explained = explain_open_failure(exc, settings.database_url)
        if explained is None:
            raise
        _fail(explained)


@app.command()
def serve(
    host: Annotated[str, typer.Option(help="address to listen on")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="port to listen on")] = 8000,
    log_level: Annotated[str, typer.Option(help="debug, info, warning, error")] = "info",
    workers: Annotated[
        int | None,
        typer.Option(
            min=1,
            max=64,
            help="processes serving the one socket, each with its own writer and MQTT "
            "connection (default: FIELDGATE_WORKERS, 1); about one per core",
        ),
    ] = None,
    ssl_certfile: Annotated[
        Path | None,
        typer.Option(
            help="serve HTTPS with this PEM certificate (chain), with --ssl-keyfile "
            "(default: FIELDGATE_SSL_CERTFILE)"
        ),
    ] = None,
    ssl_keyfile: Annotated[
        Path | None,
        typer.Option(help="the certificate's unencrypted PEM key (default: FIELDGATE_SSL_KEYFILE)"),
    ] = None,
) -> None:
    """Apply migrations and serve the HTTP API (and the MQTT bridge when configured)."""
    from gateway.app import create_app, ensure_admin_token
    from gateway.server import CannotListen, base_url, listen
    from gateway.server import serve as serve_http
    from gateway.workers import configure_logging, serve_workers

    # The options replace their settings and are checked with them (both or neither; the files
    # must load).
    tls = {"ssl_certfile": ssl_certfile, "ssl_keyfile": ssl_keyfile}
    settings = _settings(**{k: v for k, v in tls.items() if v is not None})
    workers = workers or settings.workers
    if (
        workers > 1
        and settings.database_url.startswith("sqlite")
        and not settings.workers_on_sqlite
    ):
        _fail(
            f"--workers {workers} on SQLite: the workers take turns at the database file's one "
            "write lock; measured, single-reading HTTP posts gained nothing, "
            "MQTT ingest 1.4x (README, Serving with several workers). Use PostgreSQL, or set "
            "FIELDGATE_WORKERS_ON_SQLITE=true to run them anyway"
        )
    configure_logging(log_level)
    # The port first: a second `serve` on a taken port must stop before it migrates or takes
    # the first one's MQTT session.
    try:
        sock = listen(host, port)
    except CannotListen as exc:
        _fail(str(exc))
    # Migrated here, where a database that is missing or unreachable can be told in two lines;
    # the app's lifespan then does not migrate again.
    _migrate(settings)
    log.info("database %s is migrated", display_url(settings.database_url))
    url = base_url(sock, tls=settings.ssl_certfile is not None)
    if workers == 1:
        app_ = create_app(settings)
        app_.state.migrated = True
        app_.state.base_url = url
        serve_http(app_, settings, sock=sock, log_level=log_level)
        return
    # Once, here, not in each worker: one token, printed once.
    _with_database(settings, lambda: ensure_admin_token(settings, url))
    if not serve_workers(settings, workers=workers, sock=sock, base_url=url, log_level=log_level):
        _fail("a worker could not start (its error is logged above); stopped every worker")


def _migrate(settings: Settings) -> None:
    _run_explained(settings, database.migrate(settings.database_url))


@app.command()
def migrate() -> None:
    """Apply the migrations the database has not seen yet."""
    settings = _settings()
    _migrate(settings)
    typer.echo(f"database is up to date: {display_url(settings.database_url)}")


@app.command()
def maintain(
    as_json: Annotated[bool, typer.Option("--json", help="print the report as JSON")] = False,
    vacuum: Annotated[
        bool,
        typer.Option(
            help="SQLite: rewrite a database made before incremental auto-vacuum, once, so "
            "that later runs return free space (locks the database while it runs)"
        ),
    ] = False,
) -> None:
    """Run the maintenance job once: retention, packing old readings into compressed chunks,
    space reclaim; print what it did. On PostgreSQL, while another run holds the maintenance
    lock (a gateway's, or another `fieldgate maintain`), it says so and waits for it."""
    from gateway import maintenance

    settings = _settings()

    # SQLite: a gateway serving the same file shares its one write lock with these steps, so
    # they rest as long as each took (half of it for the gateway's writer); PostgreSQL's
    # writer has its own connections.
    pause = 1.0 if settings.database_url.startswith("sqlite") else 0.0

    async def work() -> dict[str, Any]:
        report = await maintenance.run_exclusive(settings, wait=False, pause=pause)
        if report is None:
            typer.echo(
                "fieldgate: another maintenance run is in progress (a gateway or another "
                "`fieldgate maintain`); waiting for it to finish",
                err=True,
            )
            report = await maintenance.run_exclusive(settings, wait=True, pause=pause)
        assert report is not None  # waited for the lock
        out = report.as_dict()
        if vacuum:
            out["vacuum"] = await _vacuum()
        figures = await maintenance.storage_figures()
        out["stored"] = {
            "unpacked": figures.unpacked,
            "packed": figures.packed,
            "chunks": figures.chunks,
            "bytes": figures.bytes.total,
        }
        return out

    out = _with_database(settings, work)
    typer.echo(json.dumps(out, indent=2) if as_json else _maintenance_summary(out))


async def _vacuum() -> dict[str, Any]:
    """`--vacuum`: SQLite's one-off rewrite to incremental auto-vacuum, when it needs one."""
    from gateway.store import storage_stats
    from gateway.store.database import Dialect, connection, dialect_of

    conn = connection()
    if dialect_of(conn) is not Dialect.SQLITE:
        typer.echo(
            "fieldgate: --vacuum is for SQLite; PostgreSQL returns space by dropping partitions",
            err=True,
        )
        return {"done": False, "reason": "not SQLite"}
    mode = await storage_stats.sqlite_auto_vacuum(conn)
    if mode == "incremental":
        return {"done": False, "reason": "already incremental", "mode": mode}
    typer.echo(
        f"fieldgate: rewriting the database file (auto-vacuum {mode} -> incremental); it is "
        "locked while this runs, and takes as long as copying the file",
        err=True,
    )
    shrunk = await storage_stats.sqlite_rewrite_incremental(conn)
    return {"done": True, "from_mode": mode, "shrunk_bytes": shrunk}


def _maintenance_summary(out: dict[str, Any]) -> str:
    """The report for a person: what each job did and how long it took."""
    took = out["took_ms"]
    packed, expired, stored = out["packed"], out["expired"], out["stored"]
    lines = [
        f"retention  {took.get('retention', 0) / 1000:8.2f} s  expired {expired['chunks']:,}"
        f" chunks, {expired['readings']:,} readings; {expired['partitions']:,} partitions"
        " dropped",
        f"pack       {took.get('pack', 0) / 1000:8.2f} s  packed {packed['readings']:,} readings"
        f" of {out['series_packed']:,} series: {packed['chunks_written']:,} chunks written,"
        f" {packed['chunks_replaced']:,} rewritten",
        f"reclaim    {took.get('reclaim', 0) / 1000:8.2f} s  returned"
        f" {out['reclaimed_bytes']:,} bytes to the file system",
    ]
    if out.get("stopped"):
        lines.append("stopped before packing was done; the next run goes on")
    vacuum = out.get("vacuum")
    if vacuum is not None:
        lines.append(
            f"vacuum     rewrote the file: {vacuum['shrunk_bytes']:,} bytes smaller"
            if vacuum["done"]
            else f"vacuum     nothing to do ({vacuum['reason']})"
        )
    lines.append(
        f"stored now: {stored['packed']:,} readings packed in {stored['chunks']:,} chunks,"
        f" {stored['unpacked']:,} unpacked; {stored['bytes']:,} bytes on disk"
    )
    return "\n".join(lines)


DeviceId = Annotated[str, typer.Argument(metavar="ID", help="1-64 of A-Z a-z 0-9 _ . -")]


@devices_app.command("create")
def devices_create(
    device_id: DeviceId,
    name: Annotated[str, typer.Option(help="a human-readable name")] = "",
    retention_days: Annotated[
        float | None,
        typer.Option(
            min=0,
            max=100_000,
            help="days of readings kept for this device; 0 keeps all; default: "
            "FIELDGATE_RETENTION_DAYS",
        ),
    ] = None,
) -> None:
    """Create a device and print its token (shown only this once)."""
    if not DEVICE_ID_RE.fullmatch(device_id):
        raise typer.BadParameter("a device id is 1-64 characters of A-Z a-z 0-9 _ . -")

    settings = _settings()

    async def work() -> str:
        _, token = await provisioning.create_device(
            provisioning.broker_identities(settings),
            device_id,
            name,
            {},
            True,
            retention_days=retention_days,
        )
        return token

    try:
        token = _with_database(settings, work)
    except (DeviceExists, Unavailable, Conflict) as exc:
        _fail(exc.message, 1)
    typer.echo(token)


@devices_app.command("list")
def devices_list() -> None:
    """List every device: id, enabled, readings stored, last seen, retention days ("-": the
    global setting), name (tab-separated)."""
    from gateway.device_views import describe_devices

    async def work() -> list[dict[str, Any]]:
        rows: list[dict[str, Any]] = []
        after: str | None = None
        while page := await registry.list_devices(after=after, limit=500):
            rows += await describe_devices(page)
            after = page[-1].id
        return rows

    for d in _with_database(_settings(), work):
        enabled = "enabled" if d["enabled"] else "disabled"
        days = d["retention_days"]
        kept = "-" if days is None else f"{days:g}"
        typer.echo(
            f"{d['id']}\t{enabled}\t{d['readings']}\t{d['last_seen'] or '-'}\t{kept}\t{d['name']}"
        )


@devices_app.command("show")
def devices_show(device_id: DeviceId) -> None:
    """Print a device as JSON, as GET /api/v1/devices/ID answers it."""
    from gateway.device_views import describe_device

    async def work() -> dict[str, Any]:
        return await describe_device(await registry.get_device(device_id))

    try:
        shown = _with_database(_settings(), work)
    except DeviceNotFound as exc:
        _fail(exc.message, 1)
    typer.echo(json.dumps(shown, indent=2, ensure_ascii=False))


@devices_app.command("delete")
def devices_delete(device_id: DeviceId) -> None:
    """Delete a device with its tokens, series and readings. While a gateway runs, prefer
    DELETE /api/v1/devices/ID: it also forgets the device in the gateway's caches at once."""

    settings = _settings()

    async def work() -> None:
        await registry.require_device(device_id)
        await provisioning.delete_device(provisioning.broker_identities(settings), device_id)

    try:
        _with_database(settings, work)
    except DeviceNotFound as exc:
        _fail(exc.message, 1)
    typer.echo(f"deleted device {device_id!r}")


@tokens_app.command("create")
def tokens_create(
    role: Annotated[
        IssuedRole,
        typer.Option(
            help="operator (reads all), admin (manages devices, tokens) or writer (writes line "
            "protocol for any registered device, reads nothing)"
        ),
    ],
    name: Annotated[str, typer.Option(help="who or what the token is for")] = "",
    expires: Annotated[
        str | None,
        typer.Option(
            help="when it stops working: a duration from now (30d, 12h) or an RFC 3339 time; "
            "default: never"
        ),
    ] = None,
) -> None:
    """Create an operator, admin or writer token and print it (shown only this once)."""
    from gateway.errors import Unprocessable
    from gateway.timespec import now_us
    from gateway.token_views import expiry_of_text

    issued = Role(role.value)
    try:
        until = None if expires is None else expiry_of_text(expires, now_us())
    except Unprocessable as exc:
        raise typer.BadParameter(exc.message, param_hint="--expires") from None

    async def work() -> str:
        _, token = await registry.issue_token(issued, name, expires_us=until)
        return token

    typer.echo(_with_database(_settings(), work))


@tokens_app.command("list")
def tokens_list() -> None:
    """List operator and admin tokens, never their values: id, role, created, last used,
    expires ("-": never), name (tab-separated). Last used is written by running gateways every
    FIELDGATE_TOKEN_LAST_USED_INTERVAL_S."""
    from gateway.token_views import token_view

    for t in _with_database(_settings(), registry.list_tokens):
        v = token_view(t)
        typer.echo(
            f"{v['id']}\t{v['role']}\t{v['created_at']}\t{v['last_used_at'] or '-'}"
            f"\t{v['expires_at'] or '-'}\t{v['name']}"
        )


@tokens_app.command("revoke")
def tokens_revoke(
    token_id: Annotated[int, typer.Argument(metavar="ID", help="the id `tokens list` shows")],
) -> None:
    """Revoke (delete) an operator or admin token: every gateway sharing the database refuses
    it within FIELDGATE_AUTH_SYNC_INTERVAL_S (0.5 s). A device's token goes with its device:
    rotate it, or delete the device."""
    from gateway.store.errors import DeviceTokenNotManaged, TokenNotFound

    try:
        _with_database(_settings(), lambda: registry.revoke_token(token_id))
    except (TokenNotFound, DeviceTokenNotManaged) as exc:
        _fail(exc.message, 1)
    typer.echo(f"revoked token {token_id}")


@broker_app.command("init")
def broker_init(
    directory: Annotated[Path, typer.Argument(help="where the files go (made if need be)")],
    port: Annotated[int, typer.Option(min=1, max=65_535, help="the listener's port")] = 1883,
    topic_prefix: Annotated[
        str, typer.Option(help="as FIELDGATE_MQTT_TOPIC_PREFIX, if the gateway uses one")
    ] = "",
    plugin: Annotated[
        str | None, typer.Option(help="path of mosquitto_dynamic_security.so (found if omitted)")
    ] = None,
    force: Annotated[bool, typer.Option("--force", help="write over existing files")] = False,
    tls_port: Annotated[
        int | None,
        typer.Option(min=1, max=65_535, help="a listener for devices over TLS on this port"),
    ] = None,
    tls_host: Annotated[str, typer.Option(help="the TLS listener's address")] = "0.0.0.0",
    tls_certfile: Annotated[
        Path | None, typer.Option(help="the TLS listener's certificate (PEM, with its chain)")
    ] = None,
    tls_keyfile: Annotated[Path | None, typer.Option(help="its private key (PEM)")] = None,
) -> None:
    """Write a secured Mosquitto config (DIR/mosquitto.conf, its dynamic security store) and
    DIR/fieldgate.env, the settings a gateway needs to use it and keep its device clients. The
    gateway's listener is on 127.0.0.1; --tls-port adds one for devices over TLS."""
    from gateway.broker.recipe import RecipeError, TlsListener, write_recipe

    tls = None
    if tls_port is not None or tls_certfile is not None or tls_keyfile is not None:
        if tls_port is None or tls_certfile is None or tls_keyfile is None:
            raise typer.BadParameter("--tls-port, --tls-certfile and --tls-keyfile go together")
        tls = TlsListener(tls_port, tls_certfile, tls_keyfile, tls_host)
    try:
        recipe = write_recipe(
            directory,
            port=port,
            topic_prefix=topic_prefix,
            plugin=plugin,
            overwrite=force,
            tls=tls,
        )
    except RecipeError as exc:
        _fail(str(exc), 1)
    typer.echo(
        f"wrote {recipe.config_path}, {recipe.store_path} and {recipe.env_path}\n"
        f"start the broker:   mosquitto -c {recipe.config_path}\n"
        f"start the gateway:  set -a; . {recipe.env_path}; set +a; fieldgate serve"
    )


@broker_app.command("sync")
def broker_sync(
    rotate_missing: Annotated[
        bool,
        typer.Option(
            "--rotate-missing",
            help="give devices without a broker client a new token (printed: ID<TAB>TOKEN) "
            "and the client that goes with it",
        ),
    ] = False,
    dry_run: Annotated[bool, typer.Option("--dry-run", help="report only; change nothing")] = False,
) -> None:
    """Compare the broker's device clients with the registry and mend them: delete clients of
    devices that are gone, set enabled flags and roles. Exit status 1 while devices remain
    without a client (their tokens are not kept, so only a new token can make one) or share
    their id with another client."""
    from gateway.broker.dynsec import BrokerAdminError

    settings = _settings()
    identities = provisioning.broker_identities(settings)
    if identities is None:
        _fail("FIELDGATE_BROKER_ADMIN is not set: fieldgate does not keep the broker's clients")

    async def work() -> tuple[Any, list[tuple[str, str]]]:
        drift = await identities.sync(registry.device_enabled_states, mend=not dry_run)
        issued: list[tuple[str, str]] = []
        if rotate_missing and not dry_run:
            for device_id in list(drift.missing):
                device = await registry.get_device(device_id)
                token, _ = await provisioning.rotate_token(identities, device)
                issued.append((device_id, token))
                drift.missing.remove(device_id)
        return drift, issued

    try:
        drift, issued = _with_database(settings, work)
    except (BrokerAdminError, Unavailable, Conflict) as exc:
        _fail(str(exc), 1)
    would = "would be " if dry_run else ""
    typer.echo(
        f"{identities}: {len(drift.deleted)} client(s) of deleted devices {would}deleted, "
        f"{len(drift.fixed)} {would}mended, {len(issued)} provisioned with a new token"
    )
    for device_id, token in issued:
        typer.echo(f"{device_id}\t{token}")
    if drift.missing:
        typer.echo(
            f"{len(drift.missing)} device(s) have no broker client (--rotate-missing gives them "
            f"new tokens): {', '.join(sorted(drift.missing)[:20])}",
            err=True,
        )
    if drift.conflicts:
        typer.echo(
            f"{len(drift.conflicts)} device id(s) are taken by broker clients fieldgate did not "
            f"make: {', '.join(sorted(drift.conflicts)[:20])}",
            err=True,
        )
    if not drift.clean:
        raise typer.Exit(1)


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
    mqtt: Annotated[str, typer.Option(help="the broker, for mqtt and mixed (mqtts:// for TLS)")] = (
        "mqtt://127.0.0.1:1883"
    ),
    mqtt_ca: Annotated[
        Path | None, typer.Option(help="mqtts://: trust this PEM CA instead of the system's")
    ] = None,
    mqtt_prefix: Annotated[str, typer.Option(help="topic prefix (the gateway's)")] = "",
    mqtt_connections: Annotated[int, typer.Option(help="broker connections shared")] = 4,
    mqtt_as_devices: Annotated[
        bool,
        typer.Option(
            "--mqtt-as-devices",
            help="a connection per device, as itself (username = id, password = its token): "
            "for a broker that authenticates devices (fieldgate broker init)",
        ),
    ] = False,
    qos: Annotated[int, typer.Option(help="MQTT QoS, 0 or 1")] = 1,
    batch: Annotated[int, typer.Option(help="messages per HTTP request / MQTT payload")] = 1,
    concurrency: Annotated[int, typer.Option(help="HTTP requests in flight at most")] = 64,
    processes: Annotated[
        str, typer.Option(help="sender processes the fleet is split across; auto: one per core")
    ] = "1",
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
    from simulator.run import SimulationConfig, parse_processes, parse_seconds
    from simulator.run import simulate as run_simulation

    with _refused_as_bad_parameter():
        config = SimulationConfig(
            gateway=gateway,
            admin_token=admin_token,
            devices=devices,
            device_prefix=device_prefix,
            rate=rate,
            duration_s=parse_seconds(duration),
            protocol=protocol,  # type: ignore[arg-type]
            mqtt_url=mqtt,
            mqtt_ca=mqtt_ca,
            mqtt_prefix=mqtt_prefix,
            mqtt_connections=mqtt_connections,
            mqtt_as_devices=mqtt_as_devices,
            qos=qos,
            batch=batch,
            concurrency=concurrency,
            processes=parse_processes(processes, devices),
            ramp_up_s=parse_seconds(ramp_up),
            backfill_s=parse_seconds(backfill),
            bad_ratio=bad_ratio,
            duplicate_ratio=duplicate_ratio,
            fault_kinds=_fault_kinds(faults),
            dropout=dropout,
            profile=_profile(profile),
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
    if not admin_token and not dry_run:
        raise typer.BadParameter("--admin-token (or FIELDGATE_ADMIN_TOKEN) is required")
    raise typer.Exit(run_simulation(config))


@contextmanager
def _refused_as_bad_parameter() -> Iterator[None]:
    """A simulation setting that cannot work is a usage error (exit 2, the reason shown)."""
    from simulator.profile import ProfileError

    try:
        yield
    except (ValueError, ProfileError) as exc:
        raise typer.BadParameter(str(exc)) from None


def _fault_kinds(text: str) -> tuple[FaultKind, ...]:
    """`nan,wrong_type` -> the fault kinds (ValueError naming an unknown one)."""
    from simulator.faults import FaultKind

    return tuple(FaultKind(k.strip()) for k in text.split(",") if k.strip())


def _profile(path: Path | None) -> Profile:
    from simulator.profile import Profile, load_profile

    return load_profile(path) if path else Profile()


@app.command()
def openapi(
    output: Annotated[
        Path | None, typer.Option(help="write here (docs/openapi.json); default: stdout")
    ] = None,
) -> None:
    """Print the OpenAPI document of the HTTP API (sorted keys, 2-space indent)."""
    import json

    from gateway.app import create_app

    # Defaults only: neither the environment nor a .env file may change the checked-in document.
    document = create_app(Settings.model_construct(mqtt_url="")).openapi()
    text = json.dumps(document, indent=2, sort_keys=True, ensure_ascii=False) + "\n"
    if output is None:
        typer.echo(text, nl=False)
    else:
        output.write_text(text, encoding="utf-8")


def main() -> None:
    # Outside a terminal (a pipe, a file, CI) rich lays help out 80 columns wide and cuts long
    # values short ("nan,wrong_type,invalid_metri…"); rich takes its width from COLUMNS.
    if not sys.stdout.isatty():
        os.environ.setdefault("COLUMNS", "160")
    app()
