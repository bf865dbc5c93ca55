"""The error boundary (gateway.app.RequestBoundary) and the outage log (gateway.outage): a bug is a
500 `internal_error` with one logged traceback, never a 503 that clients would retry forever; a
database outage is a 503 `database_unavailable` with Retry-After, logged in a few lines.

The real outage (a PostgreSQL stopped under load) is tests/test_database_outage.py."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator
from typing import Any

import asyncpg
import httpx
import orjson
import pytest
import uvicorn
from fastapi.responses import StreamingResponse
from prometheus_client import REGISTRY
from tortoise.exceptions import OperationalError

from gateway.app import create_app
from gateway.outage import DatabaseOutage, DriverLogFilter, database_outage
from tests.conftest import Gateway, free_port, make_settings, poll_until

T0 = 1_700_000_000_000


@pytest.fixture
def database_url(emptied_database_url: str) -> str:
    """PostgreSQL: one database for the module's tests, emptied before each (conftest)."""
    return emptied_database_url


def sample(name: str) -> float:
    value = REGISTRY.get_sample_value(name)
    assert value is not None, name
    return value


def tracebacks(caplog: pytest.LogCaptureFixture) -> list[logging.LogRecord]:
    return [r for r in caplog.records if r.exc_info]


async def _bug() -> None:
    raise ZeroDivisionError("a bug in a handler")


class TestBugs:
    async def test_a_bug_in_a_handler_is_a_500_with_one_traceback(
        self, gateway: Gateway, caplog: pytest.LogCaptureFixture
    ) -> None:
        gateway.app.add_api_route("/api/v1/bug", _bug)
        with caplog.at_level(logging.ERROR):
            r = await gateway.client.get("/api/v1/bug", headers=gateway.admin)
        assert r.status_code == 500
        assert r.headers["content-type"] == "application/json"
        assert r.json()["error"]["code"] == "internal_error"
        assert "retry-after" not in r.headers
        [logged] = tracebacks(caplog)
        assert logged.exc_info is not None
        assert isinstance(logged.exc_info[1], ZeroDivisionError)
        assert "GET /api/v1/bug" in logged.getMessage()

    async def test_a_bug_after_the_answer_began_is_still_logged(
        self, gateway: Gateway, caplog: pytest.LogCaptureFixture
    ) -> None:
        """Too late for a 500 (the status line is out), but not for the traceback."""

        async def halfway() -> AsyncIterator[bytes]:
            yield b"["
            raise ZeroDivisionError("a bug halfway through an answer")

        async def streams() -> StreamingResponse:
            return StreamingResponse(halfway(), media_type="application/json")

        gateway.app.add_api_route("/api/v1/halfway", streams)
        sent: list[dict[str, Any]] = []

        async def receive() -> dict[str, Any]:
            await asyncio.Event().wait()  # the client stays: no disconnect
            raise AssertionError("unreachable")

        async def send(message: dict[str, Any]) -> None:
            sent.append(message)

        path = "/api/v1/halfway"
        scope = {
            "type": "http",
            "asgi": {"version": "3.0", "spec_version": "2.4"},
            "http_version": "1.1",
            "method": "GET",
            "scheme": "http",
            "path": path,
            "raw_path": path.encode(),
            "query_string": b"",
            "root_path": "",
            "headers": [(b"host", b"fieldgate")],
            "client": ("127.0.0.1", 50000),
            "server": ("fieldgate", 80),
        }
        with caplog.at_level(logging.ERROR):
            await gateway.app(scope, receive, send)
        assert [m.get("status") for m in sent if m["type"] == "http.response.start"] == [200]
        [logged] = tracebacks(caplog)
        assert logged.exc_info is not None
        assert isinstance(logged.exc_info[1], ZeroDivisionError)
        assert "GET /api/v1/halfway" in logged.getMessage()

    async def test_a_bug_while_storing_telemetry_is_500_not_503(
        self, gateway: Gateway, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        token = await gateway.create_device("dev-1")

        async def store(*_: Any, **__: Any) -> None:
            raise OverflowError("a bug in the ingest path")

        monkeypatch.setattr(gateway.app.state.runtime.ingestor, "store", store)
        with caplog.at_level(logging.ERROR):
            r = await gateway.post("dev-1", token, {"ts": T0, "values": {"t": 1}})
        assert r.status_code == 500, r.text
        assert r.json()["error"]["code"] == "internal_error"
        assert "retry-after" not in r.headers
        assert len(tracebacks(caplog)) == 1
        assert not database_outage.down

    async def test_a_client_gone_mid_body_is_no_traceback_and_no_500(
        self, gateway: Gateway, caplog: pytest.LogCaptureFixture
    ) -> None:
        token = await gateway.create_device("dev-1")
        path = "/api/v1/devices/dev-1/telemetry"
        incoming: list[dict[str, Any]] = [
            {"type": "http.request", "body": b'[{"values": ', "more_body": True},
            {"type": "http.disconnect"},
        ]
        sent: list[dict[str, Any]] = []

        async def receive() -> dict[str, Any]:
            return incoming.pop(0) if incoming else {"type": "http.disconnect"}

        async def send(message: dict[str, Any]) -> None:
            sent.append(message)

        scope = {
            "type": "http",
            "asgi": {"version": "3.0"},
            "http_version": "1.1",
            "method": "POST",
            "scheme": "http",
            "path": path,
            "raw_path": path.encode(),
            "query_string": b"",
            "root_path": "",
            "headers": [
                (b"host", b"fieldgate"),
                (b"authorization", f"Bearer {token}".encode()),
                (b"content-type", b"application/json"),
                (b"content-length", b"1000"),
            ],
            "client": ("127.0.0.1", 50000),
            "server": ("fieldgate", 80),
        }
        label = {"method": "POST", "route": "/api/v1/devices/{device_id}/telemetry"}
        before = {
            code: REGISTRY.get_sample_value(
                "fieldgate_http_requests_total", {**label, "status": code}
            )
            or 0.0
            for code in ("499", "500")
        }
        with caplog.at_level(logging.WARNING):
            await gateway.app(scope, receive, send)
        assert not tracebacks(caplog)
        statuses = [m["status"] for m in sent if m["type"] == "http.response.start"]
        assert all(status < 500 for status in statuses), statuses
        # Counted as the client's leaving (nginx's 499), not as a server error.
        for code, more in (("499", 1), ("500", 0)):
            now = REGISTRY.get_sample_value(
                "fieldgate_http_requests_total", {**label, "status": code}
            )
            assert (now or 0.0) == before[code] + more, code
        r = await gateway.client.get(
            "/api/v1/devices/dev-1/telemetry/latest", headers=gateway.admin
        )
        assert r.json()["values"] == {}

    async def test_a_failed_commit_is_logged_once_by_the_writer(
        self, gateway: Gateway, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        token = await gateway.create_device("dev-1")

        async def insert_batch(*_: Any) -> list[int]:
            raise ValueError("a bug in the insert")

        monkeypatch.setattr("gateway.writer.insert_batch", insert_batch)
        with caplog.at_level(logging.ERROR):
            for i in range(3):
                r = await gateway.post("dev-1", token, {"ts": T0 + i, "values": {"t": 1}})
                assert r.status_code == 500, r.text
                assert r.json()["error"]["code"] == "internal_error"
        assert [r.name for r in tracebacks(caplog)] == ["fieldgate.writer"] * 3  # not again

    async def test_a_permanent_database_error_is_500(
        self, gateway: Gateway, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        """A statement the database refuses for good (not an outage) is not retried."""
        token = await gateway.create_device("dev-1")

        async def store(*_: Any, **__: Any) -> None:
            cause = asyncpg.exceptions.UndefinedTableError("relation does not exist")
            raise OperationalError(cause) from cause

        monkeypatch.setattr(gateway.app.state.runtime.ingestor, "store", store)
        with caplog.at_level(logging.ERROR):
            r = await gateway.post("dev-1", token, {"ts": T0, "values": {"t": 1}})
        assert r.status_code == 500, r.text
        assert r.json()["error"]["code"] == "internal_error"
        assert len(tracebacks(caplog)) == 1

    async def test_an_outage_while_storing_telemetry_is_503_without_a_traceback(
        self, gateway: Gateway, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        token = await gateway.create_device("dev-1")
        real_store = gateway.app.state.runtime.ingestor.store

        async def store(*_: Any, **__: Any) -> None:
            raise ConnectionRefusedError(111, "Connection refused")

        monkeypatch.setattr(gateway.app.state.runtime.ingestor, "store", store)
        refused_before = sample("fieldgate_database_refused_requests_total")
        with caplog.at_level(logging.INFO):
            for _ in range(5):
                r = await gateway.post("dev-1", token, {"ts": T0, "values": {"t": 1}})
                assert r.status_code == 503, r.text
                assert r.json()["error"]["code"] == "database_unavailable"
                assert r.headers["retry-after"] == str(gateway.settings.retry_after_s)
            assert database_outage.down
            assert sample("fieldgate_database_refused_requests_total") - refused_before == 5
            monkeypatch.setattr(gateway.app.state.runtime.ingestor, "store", real_store)
            r = await gateway.post("dev-1", token, {"ts": T0, "values": {"t": 1}})
            assert r.status_code == 200, r.text  # the commit ends the outage
        assert not database_outage.down
        assert not tracebacks(caplog)
        said = [r.getMessage() for r in caplog.records if r.name == "fieldgate.database"]
        assert len(said) == 2, said
        assert "the database is unavailable (ConnectionRefusedError" in said[0]
        assert "the database is back after" in said[1]
        assert "5 requests were refused" in said[1]


class TestUnderUvicorn:
    """Under a real server: Starlette's ServerErrorMiddleware and uvicorn log what reaches them
    (a second traceback) and uvicorn answers text/plain and closes the connection: the boundary
    answers first."""

    async def test_one_traceback_and_the_connection_stays_open(
        self, database_url: str, caplog: pytest.LogCaptureFixture
    ) -> None:
        app = create_app(make_settings(database_url))
        app.add_api_route("/bug", _bug)
        config = uvicorn.Config(app, port=free_port(), log_config=None, lifespan="on")
        server = uvicorn.Server(config)
        serving = asyncio.create_task(server.serve())
        try:
            await poll_until(
                lambda: asyncio.sleep(0, server.started), within=20, what="uvicorn to start"
            )
            with caplog.at_level(logging.INFO):
                async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{config.port}") as c:
                    r = await c.get("/bug")
                    assert r.status_code == 500
                    assert r.json()["error"]["code"] == "internal_error"
                    assert r.headers.get("connection") != "close"  # uvicorn's 500 closes
                    assert (await c.get("/healthz")).status_code == 200
        finally:
            server.should_exit = True
            await serving
        [logged] = tracebacks(caplog)
        assert logged.exc_info is not None
        assert isinstance(logged.exc_info[1], ZeroDivisionError)


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def _said(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name == "fieldgate.database"]


class TestDatabaseOutage:
    def test_one_line_per_state_change_and_a_summary_while_it_lasts(
        self, caplog: pytest.LogCaptureFixture
    ) -> None:
        caplog.set_level(logging.INFO, logger="fieldgate.database")
        clock = FakeClock()
        outage = DatabaseOutage(summary_every_s=30, clock=clock)
        outage.succeeded()
        assert _said(caplog) == []  # up, and was up: nothing to say
        refused = ConnectionRefusedError(111, "Connection refused")
        for _ in range(1000):
            assert outage.record(refused, refused=1)
            clock.now += 0.01  # 1000 refusals in 10 s
        assert outage.down
        assert sample("fieldgate_database_up") == 0
        [started] = _said(caplog)
        assert "unavailable (ConnectionRefusedError: [Errno 111] Connection refused)" in started
        clock.now = 1030.0  # 30 s after the first failure
        assert outage.record(refused, refused=1)
        assert len(_said(caplog)) == 2
        assert "still unavailable after 30 s: 1001 requests refused so far" in _said(caplog)[1]
        clock.now = 1059.0
        outage.record(refused, refused=1)
        assert len(_said(caplog)) == 2  # the next summary is due 30 s after this one
        clock.now = 1046.5 + 15
        outage.succeeded()
        assert not outage.down
        assert sample("fieldgate_database_up") == 1
        assert _said(caplog)[2] == (
            "the database is back after 61.5 s; 1002 requests were refused meanwhile"
        )
        outage.succeeded()
        assert len(_said(caplog)) == 3
        assert not [r for r in caplog.records if r.exc_info]

    def test_a_failure_that_is_not_an_outage_is_left_to_the_caller(
        self, caplog: pytest.LogCaptureFixture
    ) -> None:
        caplog.set_level(logging.INFO, logger="fieldgate.database")
        outage = DatabaseOutage(clock=FakeClock())
        assert not outage.record(ValueError("a bug"), refused=1)
        assert not outage.down
        assert outage.refused == 0
        assert _said(caplog) == []

    async def test_watch_ends_the_outage_when_the_probe_answers(
        self, caplog: pytest.LogCaptureFixture
    ) -> None:
        caplog.set_level(logging.INFO, logger="fieldgate.database")
        outage = DatabaseOutage()
        answers: list[BaseException | None] = [ConnectionRefusedError(111, "refused"), None]
        probed = 0

        async def probe() -> None:
            nonlocal probed
            probed += 1
            answer = answers.pop(0) if answers else None
            if answer is not None:
                raise answer

        stop = asyncio.Event()
        watching = asyncio.create_task(outage.watch(probe, stop, every_s=0.01))
        await asyncio.sleep(0.05)
        assert probed == 0  # nothing to probe while the database is up
        outage.record(asyncpg.exceptions.CannotConnectNowError("starting up"), refused=3)
        await poll_until(lambda: asyncio.sleep(0, not outage.down), within=5, what="the end")
        stop.set()
        await watching
        assert probed == 2
        # No probe (which could end the outage) while failures keep coming.
        outage.record(ConnectionRefusedError(111, "refused"))
        stop.clear()
        watching = asyncio.create_task(outage.watch(probe, stop, every_s=10))
        await asyncio.sleep(0.05)
        stop.set()
        await watching
        assert probed == 2
        assert outage.down
        said = _said(caplog)
        assert len(said) == 3, said
        assert "3 requests were refused meanwhile" in said[1]

    def test_driver_log_records_of_an_outage_are_dropped(
        self, caplog: pytest.LogCaptureFixture
    ) -> None:
        caplog.set_level(logging.INFO)
        outage = DatabaseOutage()
        pool_log = logging.getLogger("test.driver.pool")
        pool_log.addFilter(DriverLogFilter(outage))
        try:
            for exc in (ConnectionRefusedError(111, "refused"), ValueError("a driver bug")):
                try:
                    raise exc
                except Exception:
                    pool_log.warning("Failed to restore the pool connection floor", exc_info=True)
            pool_log.warning("a plain warning")
        finally:
            pool_log.filters.clear()
        kept = [r for r in caplog.records if r.name == "test.driver.pool"]
        assert [r.getMessage() for r in kept] == [
            "Failed to restore the pool connection floor",
            "a plain warning",
        ]
        assert kept[0].exc_info is not None
        assert isinstance(kept[0].exc_info[1], ValueError)
        assert outage.down


class TestErrorBodies:
    def test_client_text_json_cannot_carry_is_escaped_not_a_500(self) -> None:
        from gateway.errors import error_response

        r = error_response(
            404, "not_found", "device '\ud800' does not exist", [{"key\udfff": ["\ud800", 1]}]
        )
        body = orjson.loads(r.body)
        assert r.status_code == 404
        assert body["error"]["message"] == "device '\\ud800' does not exist"
        assert body["error"]["details"] == [{"key\\udfff": ["\\ud800", 1]}]
