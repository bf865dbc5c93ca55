"""Schemathesis over the whole OpenAPI document: no request, however wrong, is a server error.

`fieldgate serve` runs as a subprocess (environment=development, which serves /openapi.json) on
SQLite and on PostgreSQL; schemathesis calls every operation as admin (the device's own token
for its ingest endpoint) through its examples, coverage and fuzzing phases, with a fixed seed and
a bounded number of examples, so the run is repeatable and fits CI (~30 s a database). A
seeded device (`fuzz-dev`, metric `t`) is the example of every device id, and the fuzzing phase
aims at it half the time, so the paths past "device not found" are reached too.

Asserted for every call: no 5xx, and every 4xx is the API's error shape with a code.
"""

from __future__ import annotations

import asyncio
import os
import secrets
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
import schemathesis
from hypothesis import strategies as st
from schemathesis.config import SchemathesisConfig

from gateway.app import create_app
from tests.conftest import (
    ADMIN_TOKEN,
    GatewayProcess,
    _pg_admin,
    free_port,
    make_settings,
    pg_url,
)
from tests.harness import INFLUXDB_PATHS, INFLUXDB_WRITE_PATHS

SEED_DEVICE = "fuzz-dev"
SEED_METRIC = "t"
T0 = 1_700_000_000_000  # epoch ms
MAX_EXAMPLES = 25  # fuzzing phase, per operation


class Seeded:
    """The seeded device's current token (a fuzzed rotation or delete changes it)."""

    def __init__(self, base_url: str) -> None:
        self.base_url = base_url
        self.device_token = ""

    def ensure_device(self) -> None:
        """Create the seeded device with a few readings, unless it exists."""
        admin = {"Authorization": f"Bearer {ADMIN_TOKEN}"}
        with httpx.Client(base_url=self.base_url, timeout=30) as client:
            r = client.post("/api/v1/devices", json={"id": SEED_DEVICE}, headers=admin)
            if r.status_code == 409:
                return
            assert r.status_code == 201, r.text
            self.device_token = r.json()["token"]
            r = client.post(
                f"/api/v1/devices/{SEED_DEVICE}/telemetry",
                json=[{"ts": T0 + i * 1000, "values": {SEED_METRIC: i}} for i in range(10)],
                headers={"Authorization": f"Bearer {self.device_token}"},
            )
            assert r.status_code == 200, r.text


@pytest.fixture(
    scope="module", params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)]
)
def fuzzed_gateway(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[tuple[GatewayProcess, Seeded]]:
    workdir = tmp_path_factory.mktemp(f"fuzz-{request.param}")
    database = None
    if request.param == "sqlite":
        url = f"sqlite://{workdir}/fieldgate.db"
    else:
        template = request.getfixturevalue("pg_template")
        database = f"fg_fuzz_{os.getpid()}_{secrets.token_hex(4)}"
        asyncio.run(_pg_admin(f'CREATE DATABASE "{database}" TEMPLATE "{template}"'))
        url = pg_url(database)
    env = {
        "FIELDGATE_DATABASE_URL": url,
        "FIELDGATE_ADMIN_TOKEN": ADMIN_TOKEN,
        "FIELDGATE_MQTT_URL": "",
        "FIELDGATE_ENVIRONMENT": "development",
        # the broker hook on, so its endpoints are called past the secret (the admin token here)
        "FIELDGATE_BROKER_HOOK_SECRET": ADMIN_TOKEN,
    }
    gw = GatewayProcess(env, free_port(), workdir / "fieldgate.log")
    try:
        asyncio.run(gw.start())
        seeded = Seeded(gw.base_url)
        seeded.ensure_device()
        yield gw, seeded
    finally:
        gw.kill()
        if database is not None:
            asyncio.run(_pg_admin(f'DROP DATABASE IF EXISTS "{database}" WITH (FORCE)'))


# Examples for the parameters, by name: the seeded device and metric, and the values that once
# were 500s (issue 8), so the examples phase sends each of them to every operation that takes
# the parameter; the coverage and fuzzing phases add the unexpected rest.
EXAMPLES: dict[str, list[Any]] = {
    "device_id": [SEED_DEVICE, "a" * 65],
    "device": [SEED_DEVICE, "b" * 65],
    "metric": [SEED_METRIC],
    "start": ["-99999999999999d", "0001-01-01T00:00:00+14:00", "-1000w"],
    "end": ["+99999999999999d", "9999-12-31T23:59:59Z"],
    "window": ["99999999999999999w", "1d", "auto"],
    "agg": ["count", "avg,min,max,sum,count,first,last,stddev"],
    "fill": ["previous", "linear"],
    "tz": ["Pacific/Kiritimati"],
    "cursor": [str(10**30), "dHM6MTAwMDAwMDAwMDAwMDAwMDAwMDAwMDA"],
    "limit": [2**63],
}


# The ingest endpoint reads its body itself (JSON, SenML or line protocol, size-checked first),
# so the document has no body for it; the fuzz run gives it the native JSON message's shape.
_MESSAGE = {
    "type": "object",
    "properties": {
        "ts": {"oneOf": [{"type": "string"}, {"type": "number"}]},
        "values": {"type": "object", "additionalProperties": {"type": "number"}},
    },
    "required": ["values"],
}
INGEST_BODY = {
    "required": True,
    "content": {
        "application/json": {
            "schema": {"oneOf": [_MESSAGE, {"type": "array", "items": _MESSAGE}]},
            "examples": {
                "one": {"value": {"ts": T0, "values": {SEED_METRIC: 1.5}}},
                "huge_ts": {"value": [{"ts": 1e308, "values": {SEED_METRIC: 1}}]},
            },
        }
    },
}


def _with_examples(document: dict[str, Any]) -> dict[str, Any]:
    """The OpenAPI document with EXAMPLES added to the parameters of those names."""
    document["paths"]["/api/v1/devices/{device_id}/telemetry"]["post"]["requestBody"] = INGEST_BODY
    for item in document["paths"].values():
        for operation in item.values():
            for parameter in operation.get("parameters", []):
                values = EXAMPLES.get(parameter["name"])
                if values:
                    parameter["examples"] = {f"e{i}": {"value": v} for i, v in enumerate(values)}
    return document


def _load_schema() -> Any:
    """The app's own OpenAPI document (built without a database), with seeded examples."""
    app = create_app(make_settings("sqlite://:memory:", environment="development"))
    config = SchemathesisConfig.from_dict(
        {
            "seed": 8,
            # A slow, shared CI machine is no finding: only the server's answers are.
            "suppress-health-check": ["all"],
            "phases": {
                "examples": {"enabled": True},
                "coverage": {"enabled": True},
                "fuzzing": {"enabled": True},
                "stateful": {"enabled": False},
            },
            "generation": {"max-examples": MAX_EXAMPLES, "database": "none"},
            "request-timeout": 30,
        }
    )
    return schemathesis.openapi.from_dict(_with_examples(app.openapi()), config=config)


# Loaded at import: schemathesis' lazy `from_fixture` loader does not run on pytest 9.2 (it sets
# the removed `Node._nodeid`); the document does not depend on the database anyway.
schema = _load_schema()


@schema.hook
def flatmap_path_parameters(context: Any, path_parameters: dict[str, Any]) -> Any:
    """Half the fuzzed device ids are the seeded device, so paths past "not found" run too."""
    if not path_parameters or "device_id" not in path_parameters:
        return st.just(path_parameters)
    return st.sampled_from([path_parameters, {**path_parameters, "device_id": SEED_DEVICE}])


def _log_tail(gw: GatewayProcess) -> str:
    return gw.log_path.read_text(errors="replace")[-4000:]


def _stream_started(case: Any, base_url: str, headers: dict[str, str]) -> bool:
    """Whether the stream request `case` makes starts a stream (200, text/event-stream); else
    the caller makes it again, as every other call, to check the refusal."""
    kwargs = case.as_transport_kwargs(base_url=base_url, headers=headers)
    with (
        httpx.Client(timeout=30) as client,
        client.stream(
            kwargs["method"],
            kwargs["url"],
            headers=kwargs.get("headers"),
            params=kwargs.get("params"),
            cookies=kwargs.get("cookies"),
        ) as response,
    ):
        if response.status_code != 200:
            return False
        assert response.headers["content-type"].startswith("text/event-stream")
        return True


@schema.parametrize()
def test_no_request_is_a_server_error(
    case: Any, fuzzed_gateway: tuple[GatewayProcess, Seeded]
) -> None:
    gw, seeded = fuzzed_gateway
    token = ADMIN_TOKEN
    influx = case.method == "POST" and case.path in INFLUXDB_WRITE_PATHS
    ingest = (case.method == "POST" and case.path.endswith("/telemetry")) or influx
    if ingest and seeded.device_token:
        token = seeded.device_token
    headers = {"Authorization": f"Bearer {token}"}
    if case.path.endswith("/stream") and _stream_started(case, gw.base_url, headers):
        return  # a live stream that starts goes on for ever: its head is the answer
    response = case.call(base_url=gw.base_url, headers=headers)
    where = f"{case.method} {response.request.url} -> {response.status_code}"
    assert response.status_code < 500, (
        f"{where}\n{response.text[:1000]}\n--- server log ---\n{_log_tail(gw)}"
    )
    body = response.json() if response.status_code >= 400 else None
    error = body.get("error") if body is not None else None
    if isinstance(error, str) and case.path in INFLUXDB_PATHS:
        pass  # InfluxDB's own error shape, which its clients (Grafana) read: {"error": "..."}
    elif influx and body is not None and not isinstance(error, dict):
        # InfluxDB 2's shape (gateway/api/influx_write.py); the text guard in front of every
        # route (gateway/api/text_guard.py) answers in fieldgate's
        assert isinstance(body.get("code"), str), f"{where}: {response.text[:1000]}"
        assert body["code"], f"{where}: {body}"
        assert isinstance(body.get("fieldgate_code"), str), f"{where}: {body}"
    elif response.status_code >= 400:
        assert isinstance(error, dict), f"{where}: {response.text[:1000]}"
        assert isinstance(error.get("code"), str), f"{where}: {error}"
        assert error["code"], f"{where}: {error}"
    # A fuzzed delete or token rotation of the seeded device: keep it there, and its token known.
    if case.path_parameters and case.path_parameters.get("device_id") == SEED_DEVICE:
        if case.method == "POST" and case.path.endswith("/token") and response.status_code == 200:
            seeded.device_token = response.json()["token"]
        if case.method == "DELETE":
            seeded.ensure_device()


ROUTES = {
    ("GET", "/healthz"),
    ("GET", "/readyz"),
    ("GET", "/metrics"),
    ("POST", "/api/v1/devices"),
    ("GET", "/api/v1/devices"),
    ("GET", "/api/v1/devices/{device_id}"),
    ("PATCH", "/api/v1/devices/{device_id}"),
    ("DELETE", "/api/v1/devices/{device_id}"),
    ("POST", "/api/v1/devices/{device_id}/token"),
    ("POST", "/api/v1/devices/{device_id}/telemetry"),
    ("GET", "/api/v1/devices/{device_id}/telemetry"),
    ("GET", "/api/v1/devices/{device_id}/telemetry/latest"),
    ("GET", "/api/v1/devices/{device_id}/telemetry/aggregate"),
    ("GET", "/api/v1/telemetry/aggregate"),
    ("GET", "/api/v1/rejected"),
    ("GET", "/query"),
    ("POST", "/query"),
    ("POST", "/api/v2/write"),
    ("POST", "/write"),
}


def test_the_fuzzed_document_is_the_served_one_with_every_route(
    fuzzed_gateway: tuple[GatewayProcess, Seeded],
) -> None:
    """The run above covers every route: the served document is the one fuzzed, and lists each."""
    gw, _ = fuzzed_gateway
    served = httpx.get(f"{gw.base_url}/openapi.json", timeout=30).json()
    listed = {(m.upper(), p) for p, item in served["paths"].items() for m in item}
    fuzzed = {(op.method.upper(), op.path) for op in (r.ok() for r in schema.get_all_operations())}
    assert fuzzed == listed
    assert listed >= ROUTES, ROUTES - listed
