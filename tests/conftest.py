"""Shared fixtures: a migrated database per test on SQLite and on PostgreSQL, an app client.

PostgreSQL tests make one migrated template database per session and clone it per test
(CREATE DATABASE ... TEMPLATE), so every test starts from an empty, migrated schema.
"""

from __future__ import annotations

import asyncio
import getpass
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
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


@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def empty_database_url(request: pytest.FixtureRequest, tmp_path: Any) -> Iterator[str]:
    """A database with nothing in it (no migrations): for migration and `fieldgate serve` tests."""
    if request.param == "sqlite":
        yield f"sqlite://{tmp_path}/empty/fieldgate.db"
        return
    need_service("PostgreSQL", PG_HOST, PG_PORT)
    name = f"fg_empty_{os.getpid()}_{secrets.token_hex(4)}"
    asyncio.run(_pg_admin(f'CREATE DATABASE "{name}"'))
    yield pg_url(name)
    asyncio.run(_pg_admin(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))


def make_settings(database_url: str, **overrides: Any) -> Settings:
    values: dict[str, Any] = {
        "database_url": database_url,
        "admin_token": ADMIN_TOKEN,
        "mqtt_url": "",
    }
    values.update(overrides)
    return Settings(_env_file=None, **values)


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


async def mqtt_ready(gw: Gateway) -> bool:
    """Whether the app's MQTT bridge is connected, as /readyz says."""
    return bool((await gw.client.get("/readyz")).json()["checks"]["mqtt"]["ok"])


async def start_mqtt_gateway(
    database_url: str, machine_broker: str, topic_prefix: str, **overrides: Any
) -> AsyncIterator[Gateway]:
    """The app with its bridge on the machine's broker under a topic prefix of its own (and a
    client id of its own), yielded once the bridge is connected."""
    values: dict[str, Any] = {
        "mqtt_url": machine_broker,
        "mqtt_topic_prefix": topic_prefix,
        "mqtt_client_id": f"fg-test-{topic_prefix}",
        "mqtt_session_expiry_s": 60,
    }
    values.update(overrides)
    async for gw in start_gateway(make_settings(database_url, **values)):
        await poll_until(partial(mqtt_ready, gw), within=20, what="the bridge to connect")
        yield gw


@pytest.fixture
async def small_gateway(database_url: str) -> AsyncIterator[Gateway]:
    """A gateway with tiny limits: 1 KiB bodies, 3 messages, 3 queued readings."""
    settings = make_settings(
        database_url,
        max_body_bytes=1024,
        max_messages=3,
        queue_size=3,
        batch_size=3,
        retry_after_s=7,
        auth_cache_ttl_s=600,
    )
    async for gw in start_gateway(settings):
        yield gw


@pytest.fixture
async def gateway(database_url: str) -> AsyncIterator[Gateway]:
    """The app on an empty database, with ADMIN_TOKEN as its admin token."""
    async for gw in start_gateway(make_settings(database_url)):
        yield gw


# --- MQTT: the machine's broker, a private broker per test, `fieldgate serve` as a subprocess ---

MQTT_HOST = os.environ.get("FIELDGATE_TEST_MQTT_HOST", "127.0.0.1")
MQTT_PORT = int(os.environ.get("FIELDGATE_TEST_MQTT_PORT", "1883"))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


async def poll_until(
    check: Callable[[], Awaitable[Any]], *, within: float, what: str, interval: float = 0.05
) -> Any:
    """Await `check()` until it returns something truthy (returned); fail after `within` s."""
    deadline = time.monotonic() + within
    last: Any = None
    while time.monotonic() < deadline:
        last = await check()
        if last:
            return last
        await asyncio.sleep(interval)
    pytest.fail(f"timed out after {within} s waiting for {what} (last: {last!r})")


@pytest.fixture
def machine_broker() -> str:
    """The machine's Mosquitto (127.0.0.1:1883): for tests that need no special broker config."""
    need_service("Mosquitto", MQTT_HOST, MQTT_PORT)
    return f"mqtt://{MQTT_HOST}:{MQTT_PORT}"


@pytest.fixture
def topic_prefix() -> str:
    """A topic prefix no other test (or test run) uses."""
    return f"fgtest-{os.getpid()}-{secrets.token_hex(4)}"


@dataclass
class Broker:
    """A private Mosquitto on a free port: unbounded queues (nothing dropped), persistence on."""

    port: int
    workdir: Path
    process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"mqtt://127.0.0.1:{self.port}"

    @property
    def config(self) -> Path:
        return self.workdir / "mosquitto.conf"

    def start(self) -> None:
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.config.write_text(
            f"listener {self.port} 127.0.0.1\n"
            "allow_anonymous true\n"
            f"user {getpass.getuser()}\n"  # as root, mosquitto would switch to its own user
            "persistence true\n"
            f"persistence_location {self.workdir}/\n"
            "autosave_interval 0\n"
            "max_queued_messages 0\n"  # no limit: the broker holds all a gateway has not acked
            "max_queued_bytes 0\n"
            "max_inflight_messages 0\n"
            f"log_dest file {self.workdir}/mosquitto.log\n"
        )
        self.run()

    def run(self) -> None:
        """Start Mosquitto with `config` and wait until it listens."""
        self.process = subprocess.Popen(["mosquitto", "-c", str(self.config)])
        deadline = time.monotonic() + 10
        while not service_up("127.0.0.1", self.port):
            if self.process.poll() is not None or time.monotonic() > deadline:
                log = (self.workdir / "mosquitto.log").read_text(errors="replace")[-2000:]
                pytest.fail(f"mosquitto did not start on port {self.port}: {log}")
            time.sleep(0.02)

    def stop(self) -> None:
        """A graceful stop (SIGTERM): Mosquitto saves its sessions and queues to disk."""
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            self.process.wait(timeout=15)
        self.process = None

    def forget_sessions(self) -> None:
        """Delete the persistence file (stopped broker): the next start knows no session."""
        (self.workdir / "mosquitto.db").unlink(missing_ok=True)


def need_mosquitto() -> None:
    """Skip (fail in CI) when the mosquitto binary is missing."""
    if shutil.which("mosquitto") is None:
        message = "the mosquitto binary is not installed (apt-get install mosquitto)"
        if IN_CI:
            pytest.fail(message)
        pytest.skip(message)


# Debian's chromium, which the browser tests drive (never a browser Playwright downloads).
CHROMIUM = Path("/usr/bin/chromium")


def need_chromium() -> None:
    """Skip (fail in CI) when Debian's chromium is missing."""
    if not CHROMIUM.exists():
        message = f"{CHROMIUM} is not installed (apt-get install chromium)"
        if IN_CI:
            pytest.fail(message)
        pytest.skip(message)


@pytest.fixture
def private_broker(tmp_path: Path) -> Iterator[Broker]:
    need_mosquitto()
    broker = Broker(free_port(), tmp_path / "mosquitto")
    broker.start()
    yield broker
    broker.stop()


# The `fieldgate` command, run as a user runs it (with this interpreter).
FIELDGATE = [sys.executable, "-c", "from gateway.cli import main; main()"]


@dataclass
class SecuredBroker(Broker):
    """A private Mosquitto made by `fieldgate broker init` (the README's secured-broker recipe):
    no anonymous clients, the dynamic security plugin, the gateway's and admin's identities.
    `settings` are the FIELDGATE_* lines of its fieldgate.env, as setting names."""

    settings: dict[str, str] = field(default_factory=dict)
    init_options: tuple[str, ...] = ()  # more options of `broker init`

    @property
    def url(self) -> str:
        return self.settings["mqtt_url"]

    @property
    def anonymous_url(self) -> str:
        return f"mqtt://127.0.0.1:{self.port}"

    def start(self) -> None:
        if not self.config.exists():
            init = [*FIELDGATE, "broker", "init", str(self.workdir), "--port", str(self.port)]
            made = subprocess.run(
                [*init, *self.init_options],
                capture_output=True,
                text=True,
                timeout=60,
            )
            assert made.returncode == 0, made.stderr
            for line in (self.workdir / "fieldgate.env").read_text().splitlines():
                if line and not line.startswith("#"):
                    key, _, value = line.partition("=")
                    self.settings[key.removeprefix("FIELDGATE_").lower()] = value
        self.run()


@pytest.fixture
def secured_broker(tmp_path: Path) -> Iterator[SecuredBroker]:
    need_mosquitto()
    broker = SecuredBroker(free_port(), tmp_path / "secured-broker")
    broker.start()
    yield broker
    broker.stop()


@dataclass
class GatewayProcess:
    """`fieldgate serve` as a subprocess, as a user runs it; its log is in `log_path`."""

    env: dict[str, str]
    port: int
    log_path: Path
    process: subprocess.Popen[bytes] | None = None
    args: tuple[str, ...] = ()  # more `serve` options, such as ("--log-level", "debug")

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def client(self) -> httpx.AsyncClient:
        return httpx.AsyncClient(
            base_url=self.base_url,
            headers={"Authorization": f"Bearer {ADMIN_TOKEN}"},
            timeout=30,
        )

    def spawn(self) -> None:
        command = "from gateway.cli import main; main()"
        with self.log_path.open("ab") as log:
            self.process = subprocess.Popen(
                [sys.executable, "-c", command, "serve", "--port", str(self.port), *self.args],
                env={**os.environ, **self.env},
                stdout=log,
                stderr=subprocess.STDOUT,
            )

    async def start(self, *, within: float = 30) -> None:
        """Spawn and wait until it answers /healthz."""
        self.spawn()

        async def up() -> bool:
            assert self.process is not None
            if self.process.poll() is not None:
                pytest.fail(f"fieldgate serve exited: {self.log_path.read_text()[-3000:]}")
            try:
                async with httpx.AsyncClient(base_url=self.base_url) as client:
                    return (await client.get("/healthz")).status_code == 200
            except httpx.TransportError:
                return False

        await poll_until(up, within=within, what="fieldgate serve to answer /healthz")

    def kill(self) -> None:
        """SIGKILL: no shutdown, no drain, no acknowledgements."""
        if self.process is not None and self.process.poll() is None:
            self.process.kill()
            self.process.wait(timeout=10)

    def terminate(self, *, timeout: float = 30) -> int:
        """SIGTERM and wait: the graceful stop; returns the exit status."""
        assert self.process is not None
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
        return self.process.wait(timeout=timeout)


@pytest.fixture
def serve(tmp_path: Path) -> Iterator[Callable[..., GatewayProcess]]:
    """Make `fieldgate serve` subprocesses (not started); all are killed after the test."""
    made: list[GatewayProcess] = []

    def make(database_url: str, **settings: str) -> GatewayProcess:
        env = {
            "FIELDGATE_DATABASE_URL": database_url,
            "FIELDGATE_ADMIN_TOKEN": ADMIN_TOKEN,
            "FIELDGATE_MQTT_URL": "",
            **{f"FIELDGATE_{k.upper()}": v for k, v in settings.items()},
        }
        gw = GatewayProcess(env, free_port(), tmp_path / f"fieldgate-{len(made)}.log")
        made.append(gw)
        return gw

    yield make
    for gw in made:
        gw.kill()


# --- PostgreSQL reused per session and emptied per test (cheaper than a clone per test) ---


@pytest.fixture(scope="session")
def pg_reused(pg_template: str) -> Iterator[str]:
    """One migrated PostgreSQL database for the session, for `emptied_database_url`."""
    name = f"fg_reuse_{os.getpid()}_{secrets.token_hex(3)}"
    asyncio.run(_pg_admin(f'CREATE DATABASE "{name}" TEMPLATE "{pg_template}"'))
    yield name
    asyncio.run(_pg_admin(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))


async def _pg_empty(database: str) -> None:
    """TRUNCATE every table but the migration history, restarting the id sequences."""
    conn = await asyncpg.connect(
        host=PG_HOST, port=PG_PORT, user=PG_USER, database=database, timeout=10
    )
    try:
        tables = await conn.fetch(
            "SELECT tablename FROM pg_tables WHERE schemaname = 'public'"
            " AND tablename <> 'tortoise_migrations'"
        )
        names = ", ".join(f'"{t["tablename"]}"' for t in tables)
        await conn.execute(f"TRUNCATE {names} RESTART IDENTITY CASCADE")
    finally:
        await conn.close()


@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def emptied_database_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """Like `database_url` (an empty, migrated database), but PostgreSQL tests share one
    database that is emptied before each test: ~0.05 s instead of ~0.5 s for a fresh clone.
    A test module opts in by overriding `database_url`:

        @pytest.fixture
        def database_url(emptied_database_url: str) -> str:
            return emptied_database_url
    """
    if request.param == "sqlite":
        return f"sqlite://{tmp_path}/fieldgate.db"
    name = request.getfixturevalue("pg_reused")
    asyncio.run(_pg_empty(name))
    return pg_url(name)


# --- A private PostgreSQL instance that a test may stop and start (never the shared server) ---


def _postgres_bin() -> Path | None:
    """The directory of PostgreSQL's server binaries (initdb, pg_ctl), or None."""
    configured = os.environ.get("FIELDGATE_TEST_PG_BIN")
    candidates = [Path(configured)] if configured else []
    candidates += sorted(Path("/usr/lib/postgresql").glob("*/bin"), reverse=True)
    found = shutil.which("initdb")
    if found:
        candidates.append(Path(found).parent)
    return next(
        (c for c in candidates if (c / "initdb").exists() and (c / "pg_ctl").exists()), None
    )


@dataclass
class PostgresInstance:
    """A PostgreSQL cluster of its own (initdb into a temporary directory) on a free port.

    initdb and postgres refuse to run as root: as root, they run as the `postgres` OS user."""

    bindir: Path
    workdir: Path
    port: int

    @property
    def url(self) -> str:
        return f"postgres://postgres@127.0.0.1:{self.port}/postgres"

    def _run(self, tool: str, *args: str) -> None:
        command = [str(self.bindir / tool), *args]
        if os.geteuid() == 0:
            command = ["runuser", "-u", "postgres", "--", *command]
        done = subprocess.run(command, capture_output=True, text=True, timeout=60, check=False)
        if done.returncode != 0:
            log = self.workdir / "postgres.log"
            tail = log.read_text(errors="replace")[-2000:] if log.exists() else ""
            pytest.fail(f"{tool} {' '.join(args)} failed: {done.stdout}{done.stderr}{tail}")

    def init(self) -> None:
        if os.geteuid() == 0:
            shutil.chown(self.workdir, "postgres")
        self._run(
            "initdb", "-D", str(self.workdir / "data"), "-U", "postgres", "--auth=trust",
            "--no-sync", "-E", "UTF8", "--locale=C",
        )  # fmt: skip

    def start(self) -> None:
        options = (
            f"-p {self.port} -c listen_addresses=127.0.0.1 -k {self.workdir}"
            # No fsync: the machine does not crash in a test, only the server does; commits
            # stay synchronous so that `stop("immediate")` (a crash) keeps every commit.
            " -c fsync=off -c full_page_writes=off"
        )
        data = str(self.workdir / "data")
        log = str(self.workdir / "postgres.log")
        self._run("pg_ctl", "-D", data, "-o", options, "-l", log, "-w", "-t", "30", "start")

    def stop(self, mode: str = "fast") -> None:
        """`pg_ctl stop -m fast` (sessions cut, clean shutdown) or `immediate` (a crash)."""
        self._run("pg_ctl", "-D", str(self.workdir / "data"), "-m", mode, "-w", "stop")

    def running(self) -> bool:
        return (self.workdir / "data" / "postmaster.pid").exists()


@pytest.fixture
def private_postgres() -> Iterator[PostgresInstance]:
    """A running private PostgreSQL on a free port (its own cluster in a temporary directory),
    stopped and deleted after the test. Skips (fails in CI) without PostgreSQL's binaries."""
    bindir = _postgres_bin()
    if bindir is None or (os.geteuid() == 0 and shutil.which("runuser") is None):
        message = "PostgreSQL's server binaries (initdb, pg_ctl) are not installed"
        if IN_CI:
            pytest.fail(message)
        pytest.skip(message)
    # Not under pytest's tmp_path: that is private to root, and the server runs as `postgres`.
    workdir = Path(tempfile.mkdtemp(prefix="fieldgate-pg-"))
    instance = PostgresInstance(bindir, workdir, free_port())
    try:
        instance.init()
        instance.start()
        yield instance
    finally:
        if instance.running():
            instance.stop("immediate")
        shutil.rmtree(workdir, ignore_errors=True)
