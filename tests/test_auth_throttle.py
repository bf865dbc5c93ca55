"""Failed authentication is throttled per client address (429 too_many_auth_failures with
Retry-After, no token lookup), without slowing valid clients. Both databases; the token lookups
are counted by wrapping the real registry function."""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import httpx
import pytest

from gateway.store import registry
from tests.conftest import Gateway, make_settings, poll_until, start_gateway

READING = {"values": {"t": 1.0}}


@pytest.fixture
def database_url(emptied_database_url: str) -> str:
    return emptied_database_url


@pytest.fixture
def lookups(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Every token hash looked up in the database (the real lookup still runs)."""
    seen: list[str] = []
    real: Callable[[str], Awaitable[Any]] = registry.find_token

    async def counting(token_hash: str) -> Any:
        seen.append(token_hash)
        return await real(token_hash)

    monkeypatch.setattr(registry, "find_token", counting)
    return seen


async def throttled(database_url: str, **overrides: Any) -> AsyncIterator[Gateway]:
    settings = make_settings(
        database_url, auth_failure_limit=5, auth_failure_window_s=60, **overrides
    )
    async for gw in start_gateway(settings):
        yield gw


@pytest.fixture
async def gateway(database_url: str) -> AsyncIterator[Gateway]:
    async for gw in throttled(database_url):
        yield gw


def client_from(gw: Gateway, host: str) -> httpx.AsyncClient:
    transport = httpx.ASGITransport(app=gw.app, client=(host, 40000))
    return httpx.AsyncClient(transport=transport, base_url="http://fieldgate")


def bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


async def write(client: httpx.AsyncClient, token: str) -> httpx.Response:
    return await client.post("/api/v1/devices/dev-a/telemetry", json=READING, headers=bearer(token))


class TestAuthThrottle:
    async def test_wrong_tokens_past_the_limit_are_429_without_a_lookup(
        self, gateway: Gateway, lookups: list[str]
    ) -> None:
        await gateway.create_device("dev-a")
        for i in range(5):
            r = await write(gateway.client, f"wrong-{i}")
            assert r.status_code == 401, r.text
        assert len(lookups) == 5
        for i in range(1_000):
            r = await write(gateway.client, f"wrong-again-{i}")
            assert r.status_code == 429, r.text
        assert len(lookups) == 5
        error = r.json()["error"]
        assert error["code"] == "too_many_auth_failures"
        assert 1 <= int(r.headers["retry-after"]) <= 60
        # Reads and admin calls from that address are refused the same way.
        r = await gateway.client.get("/api/v1/devices", headers=bearer("still-wrong"))
        assert r.status_code == 429, r.text

    async def test_valid_clients_are_not_slowed(self, gateway: Gateway, lookups: list[str]) -> None:
        token = await gateway.create_device("dev-a")
        for i in range(4):
            assert (await write(gateway.client, f"wrong-{i}")).status_code == 401
        # Under the limit, a valid token from the same address works, as often as it likes,
        # and its successes neither count nor wipe the failures.
        for _ in range(20):
            assert (await write(gateway.client, token)).status_code == 200
        assert (await write(gateway.client, "wrong-4")).status_code == 401
        # Locked out: unknown tokens get 429 without a lookup; the valid token this client has
        # been using is known (cached) and needs none, so it goes on (devices behind a NAT).
        assert (await write(gateway.client, "wrong-5")).status_code == 429
        before = len(lookups)
        assert (await write(gateway.client, token)).status_code == 200
        assert len(lookups) == before
        # Another address is not affected at all.
        async with client_from(gateway, "10.1.2.3") as other:
            assert (await write(other, token)).status_code == 200
            assert (await write(other, "wrong-from-elsewhere")).status_code == 401
            admin = await other.get("/api/v1/devices", headers=gateway.admin)
            assert admin.status_code == 200, admin.text

    async def test_a_missing_header_is_not_counted(self, gateway: Gateway) -> None:
        token = await gateway.create_device("dev-a")
        for _ in range(20):
            r = await gateway.client.post("/api/v1/devices/dev-a/telemetry", json=READING)
            assert r.status_code == 401, r.text
        assert (await write(gateway.client, token)).status_code == 200

    async def test_the_block_lapses_after_the_window(self, database_url: str) -> None:
        async for gw in start_gateway(
            make_settings(database_url, auth_failure_limit=2, auth_failure_window_s=0.5)
        ):
            token = await gw.create_device("dev-a")
            for i in range(2):
                assert (await write(gw.client, f"wrong-{i}")).status_code == 401
            assert (await write(gw.client, token)).status_code == 429

            async def allowed(client: httpx.AsyncClient = gw.client, t: str = token) -> bool:
                return (await write(client, t)).status_code == 200

            await poll_until(allowed, within=5, what="the throttle to lapse")

    async def test_zero_turns_it_off(self, database_url: str) -> None:
        async for gw in start_gateway(make_settings(database_url, auth_failure_limit=0)):
            token = await gw.create_device("dev-a")
            for i in range(150):
                assert (await write(gw.client, f"wrong-{i}")).status_code == 401
            assert (await write(gw.client, token)).status_code == 200
