"""Liveness, readiness and Prometheus metrics, and that nothing else answers without a token."""

from __future__ import annotations

import asyncio
import os
import secrets
from typing import Any

import pytest
from prometheus_client.parser import text_string_to_metric_families

from devices.models import Role
from tests.conftest import ADMIN_TOKEN, Gateway, _pg_admin, make_settings, pg_url
from tests.harness import (
    INFLUXDB_PATHS,
    INFLUXDB_WRITE_PATHS,
    bearer,
    new_token,
    running,
    sample,
    scrape,
    wait_until,
    writes_held,
)

T0 = 1_700_000_000_000
OPEN = {"/healthz", "/readyz", "/metrics"}
TELEMETRY_ROUTE = "/api/v1/devices/{device_id}/telemetry"


def telemetry_requests(text: str, status: str) -> float:
    """POSTs to the telemetry route (labelled by its full template) that answered `status`."""
    return sum(
        s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
        if s.name == "fieldgate_http_requests_total"
        and s.labels.get("method") == "POST"
        and s.labels.get("route") == TELEMETRY_ROUTE
        and s.labels.get("status") == status
    )


@pytest.fixture
def database_url(emptied_database_url: str) -> str:
    """PostgreSQL: one database for the module's tests, emptied before each (conftest)."""
    return emptied_database_url


class TestProbes:
    async def test_healthz(self, gateway: Gateway) -> None:
        r = await gateway.client.get("/healthz")
        assert r.status_code == 200
        assert r.json() == {"status": "ok"}

    async def test_readyz_with_the_database_up(self, gateway: Gateway) -> None:
        r = await gateway.client.get("/readyz", headers=gateway.admin)
        assert r.status_code == 200, r.text
        body = r.json()
        assert body["status"] == "ready"
        assert body["checks"]["database"] == {"ok": True}
        assert body["checks"]["writer"]["ok"] is True
        assert body["checks"]["writer"]["queued_readings"] == 0

    async def test_readyz_details_need_an_operator_token(self, gateway: Gateway) -> None:
        """Without a token: the status and each check's `ok` (enough for a load balancer);
        the details (error text, broker address, client id, counts) need an operator token."""
        r = await gateway.client.get("/readyz")
        assert r.status_code == 200, r.text
        assert r.json() == {
            "status": "ready",
            "checks": {"database": {"ok": True}, "writer": {"ok": True}},
        }
        device = await gateway.create_device("dev-a")
        assert (await gateway.client.get("/readyz", headers=bearer(device))).status_code == 403
        wrong = await gateway.client.get("/readyz", headers=bearer("fgo_not-a-token"))
        assert wrong.status_code == 401
        operator = await new_token(Role.OPERATOR)
        detailed = await gateway.client.get("/readyz", headers=bearer(operator))
        assert detailed.json()["checks"]["writer"]["queued_readings"] == 0

    @pytest.mark.postgres
    async def test_readyz_is_503_when_the_database_is_gone(self, pg_template: str) -> None:
        name = f"fg_gone_{os.getpid()}_{secrets.token_hex(4)}"
        await _pg_admin(f'CREATE DATABASE "{name}" TEMPLATE "{pg_template}"')
        try:
            async with running(make_settings(pg_url(name))) as gw:
                assert (await gw.client.get("/readyz")).status_code == 200
                await _pg_admin(f'DROP DATABASE "{name}" WITH (FORCE)')
                r = await gw.client.get("/readyz", headers=gw.admin)
                assert r.status_code == 503, r.text
                body = r.json()
                assert body["status"] == "not_ready"
                assert body["checks"]["database"]["ok"] is False
                assert body["checks"]["database"]["error"]
                assert (await gw.client.get("/healthz")).status_code == 200  # still alive
        finally:
            await _pg_admin(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


class TestMetrics:
    async def test_exposition_format_without_a_token(self, gateway: Gateway) -> None:
        r = await gateway.client.get("/metrics")
        assert r.status_code == 200
        assert r.headers["content-type"].startswith("text/plain")
        for name, kind in [
            ("fieldgate_readings_accepted_total", "counter"),
            ("fieldgate_readings_duplicate_total", "counter"),
            ("fieldgate_readings_rejected_total", "counter"),
            ("fieldgate_http_requests_total", "counter"),
            ("fieldgate_writer_queue_readings", "gauge"),
            ("fieldgate_writer_batch_readings", "histogram"),
            ("fieldgate_writer_batch_requests", "histogram"),
            ("fieldgate_writer_commit_seconds", "histogram"),
        ]:
            assert f"\n# TYPE {name} {kind}\n" in r.text, name

    async def test_counters_follow_what_happened(self, gateway: Gateway) -> None:
        token = await gateway.create_device("dev-1")
        before = await scrape(gateway.client)
        # 3 accepted, 1 duplicate (within the request), 2 rejected (invalid_value, empty_values)
        r = await gateway.post(
            "dev-1",
            token,
            [
                {"ts": T0, "values": {"t": 1, "h": 2, "s": "x"}},
                {"ts": T0, "values": {"t": 1}},
                {"ts": T0 + 1, "values": {"t": 3}},
                {"ts": T0 + 2, "values": {}},
            ],
        )
        assert r.json()["accepted"] == 3
        assert r.json()["duplicates"] == 1
        assert (await gateway.post("dev-1", token, b"{nope")).status_code == 400
        assert (await gateway.post("dev-1", "wrong-token", {"values": {"t": 1}})).status_code == 401
        assert (await gateway.post("dev-1", token, [{"values": {}}])).status_code == 422
        after = await scrape(gateway.client)

        def delta(name: str, labels: dict[str, str] | None = None) -> float:
            return sample(after, name, labels) - sample(before, name, labels)

        http = {"transport": "http"}
        assert delta("fieldgate_readings_accepted_total", http) == 3
        assert delta("fieldgate_readings_duplicate_total", http) == 1
        for code, n in [("invalid_value", 1), ("empty_values", 2), ("non_finite_value", 0)]:
            assert delta("fieldgate_readings_rejected_total", {**http, "code": code}) == n, code
        for status, n in [("200", 1), ("400", 1), ("401", 1), ("422", 1), ("503", 0)]:
            got = telemetry_requests(after, status) - telemetry_requests(before, status)
            assert got == n, status
        # One commit of 4 readings (the duplicate is inserted and ignored by the database).
        assert delta("fieldgate_writer_batch_readings_count") == 1
        assert delta("fieldgate_writer_batch_readings_sum") == 4
        assert delta("fieldgate_writer_batch_readings_bucket", {"le": "1.0"}) == 0
        assert delta("fieldgate_writer_batch_readings_bucket", {"le": "10.0"}) == 1
        assert delta("fieldgate_writer_commit_seconds_count") == 1
        assert delta("fieldgate_writer_commit_seconds_sum") > 0
        assert delta("fieldgate_writer_batch_requests_count") == 1
        assert sample(after, "fieldgate_writer_queue_readings") == 0

    async def test_a_request_no_route_matched_is_labelled_unmatched_wherever_it_went(
        self, gateway: Gateway
    ) -> None:
        """One label for every path no route knows, whichever such path came first (the
        boundary caches each label's counter)."""
        before = await scrape(gateway.client)
        for path in ("/api/v1/no-such-thing", "/no-such-thing", "/api/v1/no/such/thing"):
            assert (await gateway.client.get(path, headers=gateway.admin)).status_code == 404
        after = await scrape(gateway.client)
        unmatched = {"method": "GET", "route": "unmatched", "status": "404"}
        got = sample(after, "fieldgate_http_requests_total", unmatched)
        assert got - sample(before, "fieldgate_http_requests_total", unmatched) == 3
        routes = {
            s.labels["route"]
            for family in text_string_to_metric_families(after)
            for s in family.samples
            if s.name == "fieldgate_http_requests_total"
        }
        assert not {r for r in routes if "unmatched" in r} - {"unmatched"}, routes

    async def test_queue_depth_gauge(self, gateway: Gateway) -> None:
        token = await gateway.create_device("dev-1")
        assert (
            await gateway.post("dev-1", token, {"ts": T0, "values": {"t": 0}})
        ).status_code == 200
        writer = gateway.app.state.runtime.writer
        async with writes_held(gateway):
            post = asyncio.create_task(
                gateway.post(
                    "dev-1", token, [{"ts": T0 + i, "values": {"t": i}} for i in range(1, 6)]
                )
            )
            await wait_until(lambda: writer.pending == 5)
            assert sample(await scrape(gateway.client), "fieldgate_writer_queue_readings") == 5
        assert (await post).status_code == 200
        assert sample(await scrape(gateway.client), "fieldgate_writer_queue_readings") == 0


def _api_operations(app: Any) -> list[tuple[str, str]]:
    """(method, path) of every operation in the app's OpenAPI document."""
    schema = app.openapi()
    return [
        (method.upper(), path)
        for path, item in schema["paths"].items()
        for method in item
        if method in {"get", "post", "put", "patch", "delete"}
    ]


class TestOnlyProbesAreOpen:
    async def test_every_other_endpoint_wants_a_token(self, database_url: str) -> None:
        # the broker hook on: off, its endpoints answer 404 to anyone
        settings = make_settings(
            database_url, environment="development", broker_hook_secret=ADMIN_TOKEN + "-hook"
        )
        async with running(settings) as gw:
            operations = _api_operations(gw.app)
            paths = {path for _, path in operations}
            assert paths >= OPEN
            assert "/api/v1/devices" in paths
            assert "/api/v1/devices/{device_id}/telemetry" in paths
            await gw.create_device("dev-a")
            closed = [(m, p) for m, p in operations if p not in OPEN]
            assert len(closed) >= 8
            for method, path in closed:
                url = path.replace("{device_id}", "dev-a").replace("{token_id}", "1")
                # ThingsBoard's device API: its token is the path's (none valid here: 401)
                url = url.replace("{device_token}", "fgd_not-a-token")
                assert "{" not in url, url
                r = await gw.client.request(method, url, json={} if method != "GET" else None)
                assert r.status_code == 401, (method, path, r.status_code, r.text)
                body = r.json()
                if path in INFLUXDB_PATHS:  # InfluxDB's shape: {"error": "..."} (or code)
                    assert "auth" in r.text.lower(), (path, r.text)
                elif path in INFLUXDB_WRITE_PATHS:  # InfluxDB 2's (gateway/api/influx_write.py)
                    assert body["code"] == body["fieldgate_code"] == "unauthorized"
                else:
                    assert body["error"]["code"] == "unauthorized"
            for path in OPEN:
                assert (await gw.client.get(path)).status_code == 200, path

    async def test_docs_are_served_in_development_only(self, gateway: Gateway) -> None:
        assert gateway.settings.environment == "production"
        for path in ["/docs", "/openapi.json", "/redoc"]:
            r = await gateway.client.get(path)
            assert r.status_code == 404, (path, r.text)
