"""Liveness, readiness and Prometheus metrics: the only endpoints open without a token."""

from __future__ import annotations

import asyncio

from fastapi import APIRouter
from fastapi.responses import Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from gateway.api.deps import JSON, RuntimeDep
from gateway.store.database import connection

router = APIRouter(tags=["health"])

_DB_TIMEOUT_S = 2.0


@router.get("/healthz")
async def healthz() -> JSON:
    """The process is up and serving."""
    return JSON({"status": "ok"})


@router.get("/readyz")
async def readyz(runtime: RuntimeDep) -> JSON:
    """Ready (200) when the database answers. The MQTT bridge's state is reported too, but a
    broker outage only makes the gateway `degraded`: HTTP ingestion and reads still work, and a
    load balancer must not take every instance out because their shared broker is down."""
    checks: dict[str, dict[str, object]] = {}
    try:
        await asyncio.wait_for(connection().execute_query("SELECT 1"), _DB_TIMEOUT_S)
        checks["database"] = {"ok": True}
    except Exception as exc:
        checks["database"] = {"ok": False, "error": f"{type(exc).__name__}: {exc}"[:300]}
    checks["writer"] = {"ok": True, "queued_readings": runtime.writer.pending}
    ready = all(bool(c.get("ok")) for c in checks.values())
    checks.update(runtime.components)
    degraded = not all(bool(c.get("ok")) for c in runtime.components.values())
    status = "not_ready" if not ready else "degraded" if degraded else "ready"
    return JSON({"status": status, "checks": checks}, status_code=200 if ready else 503)


@router.get("/metrics")
async def prometheus_metrics() -> Response:
    """Prometheus metrics in the text exposition format."""
    return Response(generate_latest(), media_type=CONTENT_TYPE_LATEST)
