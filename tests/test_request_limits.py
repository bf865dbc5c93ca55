"""Request bodies are read only after the token check, and every body has a limit (telemetry:
max_body_bytes; admin JSON: max_request_body_bytes; device metadata: max_metadata_bytes); a body
that stops arriving is cut (408). In-process, through httpx's ASGI transport, which hands the app
the request body only as the app asks for it: a counting body shows how much was read."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator

import httpx
import pytest

from tests.conftest import Gateway, make_settings, start_gateway

CHUNK = b"x" * (1 << 20)


class CountingBody:
    """A streamed (chunked) request body of `chunks` MiB that records how much the app read."""

    def __init__(self, chunks: int = 200, start: bytes = b"") -> None:
        self.chunks = chunks
        self.start = start
        self.read = 0

    async def __aiter__(self) -> AsyncIterator[bytes]:
        if self.start:
            self.read += len(self.start)
            yield self.start
        for _ in range(self.chunks):
            self.read += len(CHUNK)
            yield CHUNK


def error_code(r: httpx.Response) -> str:
    assert r.headers["content-type"].startswith("application/json"), r.text
    return str(r.json()["error"]["code"])


@pytest.fixture
def database_url(emptied_database_url: str) -> str:
    return emptied_database_url


@pytest.fixture
async def gateway(database_url: str) -> AsyncIterator[Gateway]:
    settings = make_settings(
        database_url,
        max_body_bytes=8192,
        max_request_body_bytes=4096,
        max_metadata_bytes=1024,
        http_body_timeout_s=0.5,
    )
    async for gw in start_gateway(settings):
        yield gw


# Every route that takes a body: (method, path, role that may call it).
BODY_ROUTES = [
    ("POST", "/api/v1/devices"),
    ("PATCH", "/api/v1/devices/dev-a"),
    ("POST", "/api/v1/devices/dev-a/telemetry"),
]


class TestAuthBeforeBody:
    @pytest.mark.parametrize(("method", "path"), BODY_ROUTES)
    async def test_a_huge_body_without_a_token_is_401_and_never_read(
        self, gateway: Gateway, method: str, path: str
    ) -> None:
        await gateway.create_device("dev-a")
        for headers in ({}, {"Authorization": "Bearer wrong-token"}):
            body = CountingBody(chunks=200)  # 200 MiB
            r = await gateway.client.request(method, path, content=body, headers=headers)
            assert r.status_code == 401, r.text
            assert error_code(r) == "unauthorized"
            assert body.read == 0
            # The rest of the upload is not waited for: the connection is closed after this.
            assert r.headers["connection"] == "close"

    @pytest.mark.parametrize(("method", "path"), BODY_ROUTES)
    async def test_a_declared_length_over_the_limit_is_413_before_anything(
        self, gateway: Gateway, method: str, path: str
    ) -> None:
        body = CountingBody(chunks=1)
        r = await gateway.client.request(
            method, path, content=body, headers={"Content-Length": str(200 << 20)}
        )
        assert r.status_code == 413, r.text
        assert error_code(r) == "payload_too_large"
        assert body.read == 0

    async def test_a_valid_token_with_a_streamed_admin_body_over_the_limit_is_cut(
        self, gateway: Gateway
    ) -> None:
        for method, path in BODY_ROUTES[:2]:
            body = CountingBody(chunks=200, start=b'{"id": "dev-b", "name": "')
            r = await gateway.client.request(method, path, content=body, headers=gateway.admin)
            assert r.status_code == 413, r.text
            assert error_code(r) == "payload_too_large"
            assert body.read <= 4096 + len(CHUNK) + 100  # read up to the chunk that passed 4 KiB
        listed = await gateway.client.get("/api/v1/devices", headers=gateway.admin)
        assert listed.json()["devices"] == []

    async def test_telemetry_has_its_own_larger_limit(self, gateway: Gateway) -> None:
        token = await gateway.create_device("dev-a")
        values = {f"m{i:03d}": i for i in range(400)}
        body = json.dumps({"ts": 1_700_000_000_000, "values": values}).encode()
        assert 4096 < len(body) <= 8192  # over the default limit, under the telemetry one
        r = await gateway.post("dev-a", token, body)
        assert r.status_code == 200, r.text
        assert r.json()["accepted"] == 400
        r = await gateway.client.post(
            "/api/v1/devices",
            content=json.dumps({"id": "dev-b", "name": "n", "metadata": values}).encode()
            + b" " * 4096,
            headers={**gateway.admin, "Content-Type": "application/json"},
        )
        assert r.status_code == 413, r.text

    async def test_an_admin_body_of_50_mb_metadata_is_413(self, gateway: Gateway) -> None:
        huge = {"id": "dev-b", "metadata": {"blob": "x" * (50 << 20)}}
        r = await gateway.client.post("/api/v1/devices", json=huge, headers=gateway.admin)
        assert r.status_code == 413, r.text
        assert error_code(r) == "payload_too_large"

    async def test_json_bodies_still_validate_as_before(self, gateway: Gateway) -> None:
        cases: list[tuple[bytes, int, str]] = [
            (b"", 422, "invalid_body"),
            (b"{id: x}", 400, "invalid_json"),
            (b"[1]", 422, "invalid_body"),
            (b'{"id": "has space"}', 422, "invalid_body"),
            (b'{"id": "ok", "colour": "red"}', 422, "invalid_body"),
        ]
        for content, status, code in cases:
            r = await gateway.client.post(
                "/api/v1/devices",
                content=content,
                headers={**gateway.admin, "Content-Type": "application/json"},
            )
            assert (r.status_code, error_code(r)) == (status, code), (content, r.text)
            details = r.json()["error"]["details"]
            assert details
            assert all(d["loc"][0] == "body" for d in details)
        r = await gateway.client.post("/api/v1/devices", json={"id": "ok"}, headers=gateway.admin)
        assert r.status_code == 201, r.text
        r = await gateway.client.patch(
            "/api/v1/devices/ok", json={"name": "n" * 201}, headers=gateway.admin
        )
        assert (r.status_code, error_code(r)) == (422, "invalid_body")
        r = await gateway.client.patch(
            "/api/v1/devices/ok", json={"name": "renamed"}, headers=gateway.admin
        )
        assert r.status_code == 200, r.text
        assert r.json()["name"] == "renamed"

    def test_openapi_still_documents_the_bodies(self, gateway: Gateway) -> None:
        paths = gateway.app.openapi()["paths"]
        create = paths["/api/v1/devices"]["post"]["requestBody"]
        update = paths["/api/v1/devices/{device_id}"]["patch"]["requestBody"]
        assert create["required"] is True
        assert "id" in create["content"]["application/json"]["schema"]["properties"]
        assert create["content"]["application/json"]["schema"]["required"] == ["id"]
        assert "metadata" in update["content"]["application/json"]["schema"]["properties"]


class TestMetadataLimit:
    async def test_metadata_over_the_limit_is_413_on_create_and_update(
        self, gateway: Gateway
    ) -> None:
        at_limit = {"k": "x" * (1024 - len('{"k":""}'))}
        assert len(json.dumps(at_limit, separators=(",", ":"))) == 1024
        over = {"k": at_limit["k"] + "x"}
        r = await gateway.client.post(
            "/api/v1/devices", json={"id": "big", "metadata": over}, headers=gateway.admin
        )
        assert r.status_code == 413, r.text
        assert error_code(r) == "metadata_too_large"
        r = await gateway.client.post(
            "/api/v1/devices", json={"id": "fits", "metadata": at_limit}, headers=gateway.admin
        )
        assert r.status_code == 201, r.text
        r = await gateway.client.patch(
            "/api/v1/devices/fits", json={"metadata": over}, headers=gateway.admin
        )
        assert r.status_code == 413, r.text
        assert error_code(r) == "metadata_too_large"
        got = await gateway.client.get("/api/v1/devices/fits", headers=gateway.admin)
        assert got.json()["metadata"] == at_limit
        listed = await gateway.client.get("/api/v1/devices", headers=gateway.admin)
        assert [d["id"] for d in listed.json()["devices"]] == ["fits"]


class TestSlowBody:
    @pytest.mark.parametrize("admin", [True, False])
    async def test_a_body_that_stops_arriving_is_408(self, gateway: Gateway, admin: bool) -> None:
        token = await gateway.create_device("dev-a")
        stalled = asyncio.Event()

        async def half_a_body() -> AsyncIterator[bytes]:
            yield b'{"ts": 1700000000000, "values": {"t":'
            await stalled.wait()  # never set: the client stops sending
            yield b" 1}}"

        if admin:
            method, path, headers = "POST", "/api/v1/devices", gateway.admin
        else:
            method, path = "POST", "/api/v1/devices/dev-a/telemetry"
            headers = {"Authorization": f"Bearer {token}"}
        started = asyncio.get_running_loop().time()
        r = await asyncio.wait_for(
            gateway.client.request(method, path, content=half_a_body(), headers=headers), 10
        )
        took = asyncio.get_running_loop().time() - started
        assert r.status_code == 408, r.text
        assert error_code(r) == "request_timeout"
        assert r.headers["connection"] == "close"
        assert took < 5  # the body timeout is 0.5 s

    async def test_a_trickle_below_the_minimum_rate_is_408(self, database_url: str) -> None:
        """Each piece in time (0.1 s apart, the pause limit is 0.5 s), but 10 bytes a second
        against a minimum of 200: cut once the first 0.5 s are past, not after hours."""
        settings = make_settings(database_url, http_body_timeout_s=0.5, http_body_min_rate=200)
        async for gw in start_gateway(settings):
            token = await gw.create_device("dev-a")
            sent = 0

            async def trickle() -> AsyncIterator[bytes]:
                nonlocal sent
                yield b'{"values": {"t": 1'
                for _ in range(600):  # a minute at most
                    await asyncio.sleep(0.1)  # the slow client itself, not a wait for a result
                    sent += 1
                    yield b" "
                yield b"}}"

            r = await asyncio.wait_for(
                gw.client.post(
                    "/api/v1/devices/dev-a/telemetry",
                    content=trickle(),
                    headers={"Authorization": f"Bearer {token}"},
                ),
                30,
            )
            assert r.status_code == 408, r.text
            assert error_code(r) == "request_timeout"
            assert sent < 30, sent  # cut within ~3 s of trickling, not at the end
            latest = await gw.client.get("/api/v1/devices/dev-a/telemetry/latest", headers=gw.admin)
            assert latest.json()["values"] == {}

    async def test_a_slow_body_that_keeps_the_rate_is_taken(self, database_url: str) -> None:
        settings = make_settings(database_url, http_body_timeout_s=0.5, http_body_min_rate=20)

        async for gw in start_gateway(settings):
            token = await gw.create_device("dev-a")

            async def steady() -> AsyncIterator[bytes]:
                yield b'{"values": {"t": 1'
                for _ in range(15):  # 1.5 s at 50 bytes a second, above the minimum of 20
                    await asyncio.sleep(0.1)
                    yield b" " * 5
                yield b"}}"

            r = await gw.client.post(
                "/api/v1/devices/dev-a/telemetry",
                content=steady(),
                headers={"Authorization": f"Bearer {token}"},
            )
            assert r.status_code == 200, r.text
            assert r.json()["accepted"] == 1

    async def test_a_complete_request_keeps_its_connection(self, gateway: Gateway) -> None:
        r = await gateway.client.post(
            "/api/v1/devices", json={"id": "dev-a"}, headers=gateway.admin
        )
        assert r.status_code == 201, r.text
        assert "connection" not in r.headers
        r = await gateway.client.get("/api/v1/devices", headers=gateway.admin)
        assert "connection" not in r.headers


def test_settings_refuse_metadata_limit_not_below_body_limit() -> None:
    with pytest.raises(ValueError, match="MAX_METADATA_BYTES"):
        make_settings("sqlite://x.db", max_metadata_bytes=4096, max_request_body_bytes=4096)
