"""Liveness, readiness and Prometheus metrics: the only endpoints open without a token (/readyz's
details need an operator token)."""

from __future__ import annotations

import asyncio

from fastapi import APIRouter, Request
from fastapi.responses import Response
from prometheus_client import CONTENT_TYPE_LATEST

from devices.models import Role
from gateway import metrics
from gateway.api.deps import JSON, RuntimeDep
from gateway.auth import principal_of
from gateway.errors import FieldgateError, Forbidden
from gateway.runtime import Runtime
from gateway.store.database import ping
from gateway.timespec import now_us

router = APIRouter(tags=["health"])

_DB_TIMEOUT_S = 2.0
# How long after the broker last gave this gateway's MQTT session to another client (same
# client id) /readyz reports the clash: the two take it from each other at least this often.
CLIENT_ID_CLASH_SHOWN_S = 300.0


@router.get("/healthz")
async def healthz() -> JSON:
    """The process is up and serving."""
    return JSON({"status": "ok"})


@router.get("/readyz")
async def readyz(request: Request, runtime: RuntimeDep) -> JSON:
    """Ready (200) when the database answers and no MQTT batch is stuck. Without a token the
    answer is the status and each check's `ok` only; the details (database error text, broker
    address, client id, counts) need an operator or admin token (a device token gets 403, a
    token that is not valid 401). The MQTT bridge's state
    is reported too, but a broker outage only makes the gateway `degraded`: HTTP ingestion and
    reads still work, and a load balancer must not take every instance out because their shared
    broker is down. A batch of MQTT messages that the database has refused (and the bridge has
    retried) for longer than FIELDGATE_MQTT_STUCK_BATCH_S makes it not ready (503): this
    instance holds messages it cannot store (`checks.mqtt.stuck_batch_s`, `retrying_batches`).
    Another client taking the bridge's session (the same client id) in the last
    CLIENT_ID_CLASH_SHOWN_S makes it degraded too, with `checks.mqtt.client_id_clash` saying so."""
    checks: dict[str, dict[str, object]] = {}
    try:
        await asyncio.wait_for(ping(), _DB_TIMEOUT_S)
        checks["database"] = {"ok": True}
    except Exception as exc:
        checks["database"] = {"ok": False, "error": f"{type(exc).__name__}: {exc}"[:300]}
    checks["writer"] = {"ok": True, "queued_readings": runtime.writer.pending}
    ready = all(bool(c.get("ok")) for c in checks.values())
    degraded = False
    for name, component in runtime.components.items():
        check = dict(component)
        since_us = check.pop("retrying_since_us", None)
        if since_us is not None:
            stuck_s = max(0.0, (now_us() - since_us) / 1e6)
            check["stuck_batch_s"] = round(stuck_s, 1)
            if stuck_s > runtime.settings.mqtt_stuck_batch_s:
                check["ok"] = False
                check["stuck"] = True
                ready = False
        taken_over_us = check.pop("taken_over_us", None)
        if taken_over_us is not None:
            if (now_us() - taken_over_us) / 1e6 < CLIENT_ID_CLASH_SHOWN_S:
                check["ok"] = False
            else:
                check["client_id_clash"] = None
        degraded = degraded or not check.get("ok")
        checks[name] = check
    status = "not_ready" if not ready else "degraded" if degraded else "ready"
    if not await _may_see_details(request, runtime):
        checks = {name: {"ok": bool(check.get("ok"))} for name, check in checks.items()}
    return JSON({"status": status, "checks": checks}, status_code=200 if ready else 503)


async def _may_see_details(request: Request, runtime: Runtime) -> bool:
    """Whether the request carries an operator or admin token (none: no; not valid: 401). The
    admin token of the settings needs no lookup, so it shows the details of a database outage."""
    authorization = request.headers.get("authorization")
    if not authorization:
        return False
    address = request.client.host if request.client else None
    try:
        principal = await principal_of(runtime, authorization, address)
    except FieldgateError:
        raise
    except Exception:  # the token cannot be looked up (the database is away): no details
        return False
    if not principal.role.may(Role.OPERATOR):
        raise Forbidden(f"the details need an operator token, not {principal.role.value}")
    return True


@router.get("/metrics")
async def prometheus_metrics() -> Response:
    """Prometheus metrics in the text exposition format."""
    # With `serve --workers N`, every worker's, combined (gateway/metrics.py).
    return Response(metrics.exposition(), media_type=CONTENT_TYPE_LATEST)
