"""The app factory and its lifespan, which owns the database, the writer and the MQTT bridge."""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
import os
import re
import sys
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

from fastapi import FastAPI
from starlette.requests import ClientDisconnect
from starlette.responses import Response
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from devices.models import Role
from gateway import maintenance, metrics
from gateway.api import (
    broker_hook,
    console,
    devices,
    health,
    influx_write,
    reads,
    rejected,
    storage,
    stream,
    thingsboard,
    tokens,
    writes,
)
from gateway.api import influxql as influxql_api
from gateway.api.limits import BodyLimit, RequestLimits
from gateway.api.openapi import document_errors
from gateway.api.text_guard import RefuseUnstorableText
from gateway.errors import error_response, install_error_handlers, is_logged
from gateway.mqtt.bridge import MqttBridge
from gateway.outage import database_outage, quiet_driver_logs
from gateway.runtime import Runtime
from gateway.settings import Settings
from gateway.store import registry
from gateway.store.database import open_database, ping
from gateway.store.dead_letters import prune_letters
from gateway.timespec import now_us
from gateway.workers import worker_stopped

log = logging.getLogger("fieldgate")

API_PREFIX = "/api/v1"


async def ensure_admin_token(settings: Settings, base_url: str = "http://HOST:PORT") -> str | None:
    """With no admin token configured or stored, make one; returns it (shown only once)."""
    if settings.admin_token or await registry.has_admin_token():
        return None
    token = await registry.create_token(Role.ADMIN, "generated on first start")
    print(
        "\n  fieldgate generated an admin token (stored hashed; it is shown only now):\n\n"
        f"    {token}\n\n"
        f"  Use it as: curl -H 'Authorization: Bearer <token>' {base_url}/api/v1/devices\n"
        f"  or sign in with it to the operator console at {base_url}/\n"
        "  or set FIELDGATE_ADMIN_TOKEN to a value of your own.\n",
        file=sys.stderr,
        flush=True,
    )
    return token


async def prune_dead_letters(
    retention_days: float, stop: asyncio.Event, every_s: float = 3600.0
) -> None:
    """Delete dead letters older than the retention, now and then every hour, until `stop`.

    Stopped by the event, not cancelled: a cancelled query would leave aiosqlite's thread
    answering a loop that may be closed by then."""
    while not stop.is_set():
        try:
            gone = await prune_letters(now_us() - int(retention_days * 86_400_000_000))
            if gone:
                log.info("deleted %d dead letters older than %g days", gone, retention_days)
        except Exception as exc:
            if not database_outage.record(exc):
                log.exception("pruning dead letters failed; trying again in %.0f s", every_s)
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), every_s)


@asynccontextmanager
async def lifespan(app: FastAPI) -> AsyncIterator[None]:
    """Migrate and open the database, then run the writer, the MQTT bridge, the background
    probes and the maintenance job (gateway/maintenance.py); on the way out stop reading MQTT,
    drain the writer, and only then close the database (the drain commits through it: it runs
    inside `open_database`'s block)."""
    settings: Settings = app.state.settings
    quiet_driver_logs()
    # `fieldgate serve` tells where it listens (gateway.server.base_url); an embedding does not.
    base_url: str | None = getattr(app.state, "base_url", None)
    # `fieldgate serve` migrates before the app starts (to tell a missing database in two lines).
    migrated = bool(getattr(app.state, "migrated", False))
    # With `serve --workers N` (gateway/workers.py): this worker's index; the parent made the
    # admin token, and jobs that must run once per gateway run in worker 0 only (the
    # maintenance job would also be safe beside another on PostgreSQL, by its lock, but not
    # on SQLite, where two would take turns at the one write lock for nothing).
    worker: int | None = getattr(app.state, "worker", None)
    runs_jobs = worker in (None, 0)
    async with open_database(settings.database_url, app, apply_migrations=not migrated):
        database_outage.succeeded()  # it answered (migrations ran): a previous outage is over
        if not getattr(app.state, "admin_token_checked", False):
            await ensure_admin_token(settings, base_url or "http://HOST:PORT")
        runtime = Runtime.build(settings)
        app.state.runtime = runtime
        bridge = (
            MqttBridge(settings, runtime.ingestor, runtime.components)
            if settings.mqtt_url
            else None
        )
        async with asyncio.TaskGroup() as tasks:
            tasks.create_task(runtime.writer.run(), name="writer")
            if bridge is not None:
                tasks.create_task(bridge.run(), name="mqtt-bridge")
                runtime.credential_listeners.append(bridge.handler.devices.clear)
            stop_background = asyncio.Event()
            _start_background(tasks, runtime, stop_background, runs_jobs=runs_jobs)
            if base_url is not None:
                _serving(base_url, worker)
            try:
                yield
            finally:
                stop_background.set()
                if bridge is not None:
                    await bridge.stop()  # stop reading; commit and acknowledge what is in flight
                await runtime.writer.stop()  # drain: run() returns once the queue is committed
    if worker is not None:
        worker_stopped(worker)


def _serving(base_url: str, worker: int | None) -> None:
    """`fieldgate serve` (one process, or a worker) has started: say so, and move what startup
    made out of the garbage collector's reach (`gc.freeze`). The modules, routes, models and
    caches are hundreds of thousands of objects that live as long as the process, and each full
    collection walked them all: under a steady load of one-reading posts, full collections ran
    every ~0.4 s and took ~60 ms (max 106 ms), which set the p99 latency; frozen, they walk only
    what came since (~0.6 ms). Not for an app embedded elsewhere, such as the tests' many apps in
    one process: it would keep their garbage for good."""
    if worker is not None:
        log.info("worker %d (pid %d) is serving on %s", worker, os.getpid(), base_url)
    else:
        log.info("fieldgate is serving on %s", base_url)
    if worker in (None, 0):
        log.info("operator console: %s/ (sign in with an admin or operator token)", base_url)
    gc.collect()  # what startup left as garbage is not frozen for good
    gc.freeze()


def _start_background(
    tasks: asyncio.TaskGroup, runtime: Runtime, stop: asyncio.Event, *, runs_jobs: bool
) -> None:
    """The database probe, the auth change poll, the token last-used writer, and (`runs_jobs`:
    in one process, or worker 0) the broker identities' sync, dead-letter pruning and the
    maintenance job, all until `stop`."""
    settings = runtime.settings
    tasks.create_task(database_outage.watch(ping, stop), name="database-outage-probe")
    if settings.auth_sync_interval_s:  # in every worker: each has its own caches
        tasks.create_task(runtime.follow_auth_changes(stop), name="auth-changes")
    if runtime.identities is not None and runs_jobs:
        tasks.create_task(runtime.keep_broker_identities(stop), name="broker-identities")
    if runtime.live is not None:  # in every worker: each serves its own streams
        tasks.create_task(runtime.live.run(stop), name="live-hub")
    if settings.token_last_used_interval_s:  # in every worker: each notes its own uses
        tasks.create_task(runtime.record_token_uses(stop), name="token-last-used")
    if settings.dead_letter_retention_days and runs_jobs:
        tasks.create_task(
            prune_dead_letters(settings.dead_letter_retention_days, stop),
            name="dead-letter-retention",
        )
    if settings.maintenance_interval_s and runs_jobs:
        tasks.create_task(maintenance.run_every(settings, stop), name="maintenance")


# Counted for a request whose client left before it was answered (nginx's code for it).
CLIENT_CLOSED = 499


class RequestBoundary:
    """The app's edge, a plain ASGI middleware outside every other: each request is counted by
    method, route template and final status, and an exception no handler turned into an answer
    is answered here (one layer for both: each layer costs every request a frame and a send
    wrapper, ~1.5 us of a one-reading post's ~40 in-process):

    - the database cannot answer now (`is_unavailable`: down, restarting, locked, out of
      connections), wherever that surfaced (a token lookup, a read, the writer's commit): 503
      `database_unavailable` with Retry-After; the outage is logged by `database_outage` in a
      few lines, not once per request;
    - the client went away while its body was read (`ClientDisconnect`): nothing to answer and
      nothing to log (under overload, clients that time out would otherwise fill the log); it
      is counted as 499, nginx's "client closed request", not as a server error (5xx alerts
      would fire when clients time out);
    - anything else is a bug: 500 `internal_error`, its traceback logged once, here.

    The exception is not raised on: Starlette's ServerErrorMiddleware and the server would log
    a second traceback, and uvicorn would answer text/plain and close the connection."""

    def __init__(self, app: ASGIApp, retry_after_s: int) -> None:
        self.app = app
        self.retry_after_s = retry_after_s
        # (method, route, under the API prefix, status) -> its counter: `labels()` costs more
        # than the increment.
        # Bounded: the HTTP parser knows a fixed set of methods; routes and statuses are ours.
        self._counters: dict[tuple[str, str | None, bool, int], Any] = {}

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        status = 0  # no answer started yet

        async def send_and_watch(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_and_watch)
        except ClientDisconnect:
            # The client left before its body was read: nobody to answer, nothing stored.
            status = status or CLIENT_CLOSED
        except Exception as exc:
            response = self._answer(exc, scope)  # logged (or the outage noted) even when too late
            if not status:  # else too late for another answer: the connection is cut
                await response(scope, receive, send)
                status = response.status_code
        finally:
            self._count(scope, status or 500)

    def _answer(self, exc: Exception, scope: Scope) -> Response:
        """The answer to `exc`; the bug is logged (or the outage recorded) here, whether or not
        the answer can still be sent (an exception after the status line went out is no less a
        bug)."""
        if database_outage.record(exc, refused=1):
            response = error_response(
                503,
                "database_unavailable",
                "the database is unavailable; retry later",
                None,
                **{"Retry-After": str(self.retry_after_s)},
            )
        else:
            if not is_logged(exc):
                # (a ThingsBoard-style path holds a device token: never logged)
                path = thingsboard.loggable_path(scope["path"])
                log.exception("%s %s failed", scope["method"], path)
            response = error_response(500, "internal_error", "an unexpected error (logged)")
        return response

    def _count(self, scope: Scope, status: int) -> None:
        path: str | None = getattr(scope.get("route"), "path", None)
        # FastAPI 0.16x hands the included router's own route (no prefix) to the scope. Part of
        # the key: the cached counter must not depend on which request came first.
        under_api = path is not None and scope["path"].startswith(API_PREFIX)
        key = (scope["method"], path, under_api, status)
        counter = self._counters.get(key)
        if counter is None:
            if path is None:
                label = "unmatched"  # no route: one label, whatever the path
            elif under_api and not path.startswith(API_PREFIX):
                label = API_PREFIX + path
            else:
                label = path
            counter = metrics.HTTP_REQUESTS.labels(scope["method"], label, str(status))
            self._counters[key] = counter
        counter.inc()


def create_app(settings: Settings | None = None, *, telemetry_lane: bool = True) -> FastAPI:
    """The app. `telemetry_lane=False` leaves telemetry posts and line protocol writes to
    FastAPI's routing (the lanes' tests compare the two; gateway/api/writes.py,
    gateway/api/influx_write.py)."""
    settings = settings or Settings()
    # Only /healthz, /readyz and /metrics answer without a token, so the interactive docs and the
    # OpenAPI document are served in development only (FIELDGATE_ENVIRONMENT=development).
    docs = settings.environment == "development"
    app = FastAPI(
        title="fieldgate",
        summary="IoT telemetry ingestion gateway",
        version="0.1.0",
        lifespan=lifespan,
        docs_url="/docs" if docs else None,
        redoc_url=None,
        openapi_url="/openapi.json" if docs else None,
        # fieldgate's metrics are Prometheus (/metrics); FastAPI's OpenTelemetry hooks would
        # look up OTEL_* environment variables on every request (~5% of ingest CPU).
        telemetry={"tracing": False, "metrics": False, "logs": False},
    )
    app.state.settings = settings
    install_error_handlers(app)
    document_errors(app, API_PREFIX)
    app.include_router(health.router)
    app.include_router(devices.router, prefix=API_PREFIX)
    app.include_router(writes.router, prefix=API_PREFIX)
    app.include_router(rejected.router, prefix=API_PREFIX)
    app.include_router(reads.router, prefix=API_PREFIX)
    app.include_router(stream.router, prefix=API_PREFIX)
    app.include_router(storage.router, prefix=API_PREFIX)
    app.include_router(tokens.router, prefix=API_PREFIX)
    app.include_router(broker_hook.router, prefix=API_PREFIX)
    app.include_router(influxql_api.router)  # InfluxDB's /query: no prefix
    app.include_router(influx_write.router)  # at the root, as InfluxDB's (no API prefix)
    app.include_router(console.router)  # the operator console at /: static, public, no schema
    # Last: its `/{device_token}/telemetry` must not take a path another route serves.
    app.include_router(thingsboard.router, prefix=API_PREFIX)
    if telemetry_lane:  # added first, so innermost: inside every limit, guard and count below
        app.add_middleware(writes.TelemetryLane, prefix=API_PREFIX)
        app.add_middleware(influx_write.WriteLane)  # line protocol's two write endpoints
    app.add_middleware(RefuseUnstorableText)
    app.add_middleware(
        RequestLimits,
        max_body_bytes=settings.max_request_body_bytes,
        body_timeout_s=settings.http_body_timeout_s,
        body_min_rate=settings.http_body_min_rate,
        routes=[
            BodyLimit(
                "POST", re.compile(f"{API_PREFIX}/devices/[^/]+/telemetry"), settings.max_body_bytes
            ),
            # ThingsBoard's device API (api/thingsboard.py): `/api/v1/{device_token}/telemetry`
            BodyLimit("POST", re.compile(f"{API_PREFIX}/[^/]+/telemetry"), settings.max_body_bytes),
            BodyLimit(
                "POST", re.compile("/api/v2/write"), settings.max_body_bytes, influx_write.refusal
            ),
            BodyLimit(
                "POST", re.compile("/write"), settings.max_body_bytes, influx_write.refusal_v1
            ),
        ],
    )
    # Added last, so outermost: it counts what the limits refuse, and answers what escapes all.
    app.add_middleware(RequestBoundary, retry_after_s=settings.retry_after_s)
    return app
