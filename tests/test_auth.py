"""Who may do what: bearer tokens, roles, rotation, disabled devices, the first-start admin
token, and tokens stored only as hashes. Both databases."""

from __future__ import annotations

import asyncio
import hashlib
import os
import re
import sys
from pathlib import Path
from typing import Any
from unittest.mock import ANY

import httpx
import pytest

from devices.credentials import hash_token
from devices.models import Role
from gateway.auth import Authenticator
from gateway.errors import Unauthorized
from gateway.store import registry
from tests.conftest import ADMIN_TOKEN, Gateway, make_settings, poll_until
from tests.harness import bearer, committed, new_token, running, wait_until

T0 = 1_700_000_000_000
READING = {"ts": T0, "values": {"t": 1.0}}


async def call(gw: Gateway, method: str, path: str, token: str | None, **kwargs: Any) -> int:
    headers = bearer(token) if token else {}
    r = await gw.client.request(method, "/api/v1" + path, headers=headers, **kwargs)
    return r.status_code


async def telemetry(gw: Gateway, device_id: str, token: str) -> httpx.Response:
    return await gw.post(device_id, token, READING)


# Every endpoint behind a token (method, path, body), on a device "dev-a" that exists.
ROUTES: list[tuple[str, str, Any]] = [
    ("GET", "/devices", None),
    ("POST", "/devices", {"id": "new"}),
    ("GET", "/devices/dev-a", None),
    ("PATCH", "/devices/dev-a", {"name": "x"}),
    ("POST", "/devices/dev-a/token", None),
    ("POST", "/devices/dev-a/telemetry", READING),
    ("GET", "/devices/dev-a/telemetry?metric=t", None),
    ("GET", "/devices/dev-a/telemetry/latest", None),
    ("DELETE", "/devices/dev-a", None),
]
READS = [route for route in ROUTES if route[0] == "GET"]
MANAGE = [route for route in ROUTES if route[0] != "GET" and "telemetry" not in route[1]]

# Token checks do not depend on the route, so each test walks its cases on one gateway
# (a fresh PostgreSQL database costs ~0.4 s).
WRONG_TOKENS = ["not-a-token", "fgd_" + "A" * 43, ADMIN_TOKEN + "x", ADMIN_TOKEN[:-1], "  wrong"]
MALFORMED = [
    "Basic dXNlcjpwYXNz",
    "Bearer",
    "Bearer ",
    "Bearer    ",
    "Token {token}",
    "{token}",
    "Bearer{token}",
    "",
]


async def status_of(gw: Gateway, route: tuple[str, str, Any], headers: dict[str, str]) -> int:
    method, path, body = route
    r = await gw.client.request(method, "/api/v1" + path, json=body, headers=headers)
    if r.status_code >= 400:
        assert set(r.json()["error"]) == {"code", "message", "details"}
    return r.status_code


@pytest.fixture
def database_url(emptied_database_url: str) -> str:
    """PostgreSQL: one database for the module's tests, emptied before each (conftest)."""
    return emptied_database_url


class TestAuthentication:
    async def test_no_token_is_401_everywhere(self, gateway: Gateway) -> None:
        await gateway.create_device("dev-a")
        for method, path, body in ROUTES:
            r = await gateway.client.request(method, "/api/v1" + path, json=body)
            assert r.status_code == 401, (method, path, r.text)
            assert r.json()["error"]["code"] == "unauthorized"
            assert r.headers["www-authenticate"] == "Bearer"
        assert await call(gateway, "GET", "/devices/dev-a", ADMIN_TOKEN) == 200  # nothing done

    async def test_wrong_token_is_401(self, gateway: Gateway) -> None:
        await gateway.create_device("dev-a")
        for token in WRONG_TOKENS:
            for route in ROUTES:
                assert await status_of(gateway, route, bearer(token)) == 401, (token, route)
        assert await call(gateway, "GET", "/devices/dev-a", ADMIN_TOKEN) == 200

    async def test_malformed_header_is_401(self, gateway: Gateway) -> None:
        for header in MALFORMED:
            r = await gateway.client.get(
                "/api/v1/devices", headers={"Authorization": header.format(token=ADMIN_TOKEN)}
            )
            assert r.status_code == 401, (header, r.text)
            assert r.json()["error"]["code"] == "unauthorized"

    async def test_missing_and_malformed_headers_say_which(self, gateway: Gateway) -> None:
        """Our 401 body and WWW-Authenticate, not HTTPBearer's own {"detail": ...}."""
        cases = [(None, "missing Authorization"), ("", "missing Authorization")]
        cases += [(header, "must be 'Bearer <token>'") for header in MALFORMED if header]
        for header, message in cases:
            headers = {} if header is None else {"Authorization": header.format(token="x")}
            r = await gateway.client.get("/api/v1/devices", headers=headers)
            assert r.status_code == 401, (header, r.text)
            assert r.headers["www-authenticate"] == "Bearer"
            assert message in r.json()["error"]["message"], (header, r.text)

    async def test_openapi_declares_the_bearer_scheme(self, gateway: Gateway) -> None:
        document = gateway.app.openapi()
        schemes = document["components"]["securitySchemes"]
        assert schemes == {
            "bearerAuth": {"type": "http", "scheme": "bearer", "description": ANY},
            # the broker hook's shared secret (tests/test_broker_hook.py), not an API token
            "brokerHookSecret": {"type": "http", "scheme": "bearer", "description": ANY},
        }
        operations = {
            (method.upper(), path): operation
            for path, item in document["paths"].items()
            for method, operation in item.items()
        }
        for method, path, _ in ROUTES:
            template = re.sub(r"\?.*", "", path).replace("dev-a", "{device_id}")
            operation = operations[(method, "/api/v1" + template)]
            assert operation["security"] == [{"bearerAuth": []}], (method, path)
        for path in ("/healthz", "/readyz", "/metrics"):
            assert "security" not in operations[("GET", path)], path
        for method, path in [
            ("POST", "/api/v1/broker/authenticate"),
            ("GET", "/api/v1/broker/authorize"),
        ]:
            assert operations[(method, path)]["security"] == [{"brokerHookSecret": []}], path

    async def test_scheme_is_case_insensitive(self, gateway: Gateway) -> None:
        for scheme in ["Bearer", "bearer", "BEARER"]:
            r = await gateway.client.get(
                "/api/v1/devices", headers={"Authorization": f"{scheme} {ADMIN_TOKEN}"}
            )
            assert r.status_code == 200, (scheme, r.text)


def hold_lookups(
    monkeypatch: pytest.MonkeyPatch, *, from_call: int = 1
) -> tuple[list[str], asyncio.Event]:
    """Token lookups recorded (their hashes) and, from the `from_call`-th, held after the
    database has answered until the event is set."""
    calls: list[str] = []
    release = asyncio.Event()
    real = registry.find_token

    async def held(token_hash: str) -> Any:
        calls.append(token_hash)
        found = await real(token_hash)
        if len(calls) >= from_call:
            await release.wait()
        return found

    monkeypatch.setattr(registry, "find_token", held)
    return calls, release


class TestTokenCache:
    """The Authenticator's cache: one lookup per token per TTL, bounded in size."""

    async def test_one_lookup_per_token_until_it_lapses(self, gateway: Gateway) -> None:
        token = await gateway.create_device("dev-a")
        lookups: list[int] = []
        authenticator = Authenticator(None, ttl_s=600)
        for _ in range(3):
            principal = await authenticator.authenticate(token, lambda: lookups.append(1))
            assert principal.device_id == "dev-a"
        for _ in range(3):
            with pytest.raises(Unauthorized):
                await authenticator.authenticate("wrong", lambda: lookups.append(1))
        assert len(lookups) == 2  # a valid and a wrong token, each looked up once

        lapsing = Authenticator(None, ttl_s=0)
        lookups.clear()
        for _ in range(3):
            await lapsing.authenticate(token, lambda: lookups.append(1))
        assert len(lookups) == 3

    async def test_bounded_least_recently_used_go_first(self, gateway: Gateway) -> None:
        tokens = [await gateway.create_device(f"dev-{i}") for i in range(3)]
        looked_up: list[str] = []

        async def use(token: str) -> None:
            await authenticator.authenticate(token, lambda: looked_up.append(token))

        authenticator = Authenticator(None, ttl_s=600, max_tokens=2)
        await use(tokens[0])
        await use(tokens[1])
        await use(tokens[0])  # cached; now the most recently used
        await use(tokens[2])  # full: evicts tokens[1]
        assert looked_up == [tokens[0], tokens[1], tokens[2]]
        await use(tokens[0])
        await use(tokens[1])
        assert looked_up == [tokens[0], tokens[1], tokens[2], tokens[1]]

    async def test_forget_drops_one_or_all(self, gateway: Gateway) -> None:
        tokens = [await gateway.create_device(f"dev-{i}") for i in range(2)]
        looked_up: list[str] = []

        async def use(token: str) -> None:
            await authenticator.authenticate(token, lambda: looked_up.append(token))

        authenticator = Authenticator(None, ttl_s=600)
        for token in tokens:
            await use(token)
        authenticator.forget([hash_token(tokens[0])])
        for token in tokens:
            await use(token)
        assert looked_up == [tokens[0], tokens[1], tokens[0]]
        authenticator.forget()
        for token in tokens:
            await use(token)
        assert looked_up == [tokens[0], tokens[1], tokens[0], *tokens]

    async def test_concurrent_misses_share_one_lookup(
        self, gateway: Gateway, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        """A token's lapsed entry sends one query, however many requests wait for it: each
        lapse of a busy device's entry had sent all its requests to the database (issue 11)."""
        token = await gateway.create_device("dev-a")
        calls, release = hold_lookups(monkeypatch)  # every caller below waits for the answer
        authenticator = Authenticator(None, ttl_s=600)
        waiting = [asyncio.create_task(authenticator.authenticate(token)) for _ in range(50)]
        wrong = [asyncio.create_task(authenticator.authenticate("wrong")) for _ in range(5)]
        await wait_until(lambda: len(calls) == 2)
        waiting[0].cancel()  # a caller that goes away does not take the lookup with it
        release.set()
        principals = await asyncio.gather(*waiting[1:])
        assert {p.device_id for p in principals} == {"dev-a"}
        for task in wrong:
            with pytest.raises(Unauthorized):
                await task
        assert calls == [hash_token(token), hash_token("wrong")]
        await authenticator.authenticate(token)  # now cached
        assert len(calls) == 2

    async def test_a_lookup_begun_before_forget_is_not_cached(
        self, gateway: Gateway, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        token = await gateway.create_device("dev-a")
        calls, release = hold_lookups(monkeypatch)  # the answer is read, then the token changes
        authenticator = Authenticator(None, ttl_s=600)
        first = asyncio.create_task(authenticator.authenticate(token))
        await wait_until(lambda: len(calls) == 1)
        r = await gateway.client.delete("/api/v1/devices/dev-a", headers=bearer(ADMIN_TOKEN))
        assert r.status_code == 204
        authenticator.forget()  # as the delete does for the app's own authenticator
        later = asyncio.create_task(authenticator.authenticate(token))  # its own lookup
        await wait_until(lambda: len(calls) == 2)
        release.set()
        assert (await first).device_id == "dev-a"  # answered as of its read
        with pytest.raises(Unauthorized):
            await later
        with pytest.raises(Unauthorized):  # the stale answer was not cached
            await authenticator.authenticate(token)

    async def test_a_token_in_use_is_refreshed_without_waiting(
        self, gateway: Gateway, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        """Past half its TTL a cached token is looked up again in the background: its request
        goes on with the cached answer, and the new answer (here: deleted) replaces it."""
        token = await gateway.create_device("dev-a")
        calls, release = hold_lookups(monkeypatch, from_call=3)  # the refresh is held
        now = [0.0]
        authenticator = Authenticator(None, ttl_s=10, clock=lambda: now[0])
        await authenticator.authenticate(token)
        with pytest.raises(Unauthorized):
            await authenticator.authenticate("wrong")
        now[0] = 6.0  # past half the TTL, not past it
        with pytest.raises(Unauthorized):  # a token that is not valid is not refreshed
            await authenticator.authenticate("wrong")
        assert len(calls) == 2
        r = await gateway.client.delete("/api/v1/devices/dev-a", headers=bearer(ADMIN_TOKEN))
        assert r.status_code == 204
        # answered from the cache while the refresh waits for the database
        principal = await asyncio.wait_for(authenticator.authenticate(token), timeout=2)
        assert principal.device_id == "dev-a"
        await asyncio.wait_for(authenticator.authenticate(token), timeout=2)
        assert calls[2:] == [hash_token(token)]  # one refresh, however many requests
        release.set()

        async def refused() -> bool:
            try:
                await authenticator.authenticate(token)
            except Unauthorized:
                return True
            return False

        await poll_until(refused, within=5, what="the refreshed answer")
        assert len(calls) == 3


class TestChangesElsewhere:
    """A token rotated, a device disabled or deleted by another instance, worker or the CLI (the
    change moves the auth change counter; this instance's cache is not told) stops working here
    within a second: the counter is polled every FIELDGATE_AUTH_SYNC_INTERVAL_S (0.5 s)."""

    async def test_a_rotation_elsewhere(self, gateway: Gateway) -> None:
        token = await gateway.create_device("dev-a")
        assert (await telemetry(gateway, "dev-a", token)).status_code == 200  # cached now
        await registry.rotate_device_token(await registry.get_device("dev-a"))
        await poll_until(
            lambda: refused(gateway, "dev-a", token, 401), within=1.0, what="the old token's 401"
        )

    async def test_a_device_disabled_elsewhere(self, gateway: Gateway) -> None:
        token = await gateway.create_device("dev-a")
        assert (await telemetry(gateway, "dev-a", token)).status_code == 200
        await registry.update_device(await registry.get_device("dev-a"), {"enabled": False})
        await poll_until(
            lambda: refused(gateway, "dev-a", token, 403), within=1.0, what="the disabled 403"
        )

    async def test_a_device_deleted_by_the_cli(self, gateway: Gateway) -> None:
        token = await gateway.create_device("dev-a")
        assert (await telemetry(gateway, "dev-a", token)).status_code == 200
        cli = await asyncio.create_subprocess_exec(
            str(Path(sys.executable).parent / "fieldgate"),
            "devices",
            "delete",
            "dev-a",
            env={**os.environ, "FIELDGATE_DATABASE_URL": gateway.settings.database_url},
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.STDOUT,
        )
        out, _ = await asyncio.wait_for(cli.communicate(), timeout=60)
        assert cli.returncode == 0, out.decode()
        # Until the poll drops the cached token, a post finds no device (404): nothing stored.
        await poll_until(
            lambda: refused(gateway, "dev-a", token, 401, meanwhile=404),
            within=1.0,
            what="the deleted device's 401",
        )


async def refused(
    gateway: Gateway, device_id: str, token: str, status: int, meanwhile: int = 200
) -> bool:
    r = await telemetry(gateway, device_id, token)
    assert r.status_code in (meanwhile, status), r.text
    return r.status_code == status


class TestRoles:
    async def test_device_may_write_only_its_own_telemetry(self, gateway: Gateway) -> None:
        token_a = await gateway.create_device("dev-a")
        token_b = await gateway.create_device("dev-b")
        r = await telemetry(gateway, "dev-b", token_a)
        assert r.status_code == 403, r.text
        assert r.json()["error"]["code"] == "forbidden"
        assert (await telemetry(gateway, "no-such-device", token_a)).status_code == 403
        assert (await telemetry(gateway, "dev-a", token_a)).status_code == 200
        assert (await telemetry(gateway, "dev-b", token_b)).status_code == 200
        rows = await committed(
            gateway.settings.database_url,
            "SELECT s.device_id, count(*) FROM reading r JOIN series s ON s.id = r.series_id"
            " GROUP BY s.device_id ORDER BY s.device_id",
        )
        assert rows == [("dev-a", 1), ("dev-b", 1)]

    async def test_device_token_may_not_read_or_manage(self, gateway: Gateway) -> None:
        token = await gateway.create_device("dev-a")
        assert (await telemetry(gateway, "dev-a", token)).status_code == 200
        for route in READS + MANAGE:
            r = await gateway.client.request(
                route[0], "/api/v1" + route[1], json=route[2], headers=bearer(token)
            )
            assert r.status_code == 403, (route, r.text)
            assert r.json()["error"]["code"] == "forbidden"
        assert await call(gateway, "GET", "/devices/dev-a", ADMIN_TOKEN) == 200

    async def test_operator_reads_everything(self, gateway: Gateway) -> None:
        device_token = await gateway.create_device("dev-a")
        assert (await telemetry(gateway, "dev-a", device_token)).status_code == 200
        op = await new_token(Role.OPERATOR)
        assert op.startswith("fgo_")
        assert await call(gateway, "GET", "/devices", op) == 200
        assert await call(gateway, "GET", "/devices/dev-a", op) == 200
        r = await gateway.client.get(
            "/api/v1/devices/dev-a/telemetry", params={"metric": "t"}, headers=bearer(op)
        )
        assert r.status_code == 200, r.text
        assert len(r.json()["points"]) == 1
        assert await call(gateway, "GET", "/devices/dev-a/telemetry/latest", op) == 200

    async def test_operator_may_not_manage_or_write(self, gateway: Gateway) -> None:
        await gateway.create_device("dev-a")
        op = await new_token(Role.OPERATOR)
        for route in [*MANAGE, ("POST", "/devices/dev-a/telemetry", READING)]:
            r = await gateway.client.request(
                route[0], "/api/v1" + route[1], json=route[2], headers=bearer(op)
            )
            assert r.status_code == 403, (route, r.text)
            assert r.json()["error"]["code"] == "forbidden"
        r = await gateway.client.get("/api/v1/devices", headers=bearer(op))
        assert [d["id"] for d in r.json()["devices"]] == ["dev-a"]  # nothing created or deleted
        assert r.json()["devices"][0]["name"] == ""
        assert r.json()["devices"][0]["readings"] == 0

    @pytest.mark.parametrize("stored_admin", [False, True])
    async def test_admin_does_everything_but_write_as_a_device(
        self, gateway: Gateway, stored_admin: bool
    ) -> None:
        """Both the configured admin token and an admin token from the database."""
        admin = await new_token(Role.ADMIN) if stored_admin else ADMIN_TOKEN
        r = await gateway.client.post(
            "/api/v1/devices", json={"id": "dev-a"}, headers=bearer(admin)
        )
        assert r.status_code == 201, r.text
        device_token = r.json()["token"]
        assert (await telemetry(gateway, "dev-a", device_token)).status_code == 200
        assert await call(gateway, "GET", "/devices", admin) == 200
        assert await call(gateway, "GET", "/devices/dev-a", admin) == 200
        assert await call(gateway, "GET", "/devices/dev-a/telemetry?metric=t", admin) == 200
        assert await call(gateway, "GET", "/devices/dev-a/telemetry/latest", admin) == 200
        assert await call(gateway, "PATCH", "/devices/dev-a", admin, json={"name": "A"}) == 200
        # Telemetry is written with the device's own token only.
        assert (await telemetry(gateway, "dev-a", admin)).status_code == 403
        assert await call(gateway, "POST", "/devices/dev-a/token", admin) == 200
        assert await call(gateway, "DELETE", "/devices/dev-a", admin) == 204
        assert await call(gateway, "GET", "/devices/dev-a", admin) == 404


class TestDeviceTokens:
    async def test_rotation_stops_the_old_token_at_once(self, gateway: Gateway) -> None:
        old = await gateway.create_device("dev-a")
        assert (await telemetry(gateway, "dev-a", old)).status_code == 200  # cached now
        r = await gateway.client.post("/api/v1/devices/dev-a/token", headers=gateway.admin)
        assert r.status_code == 200, r.text
        assert r.json()["role"] == "device"
        new = r.json()["token"]
        assert new != old
        assert new.startswith("fgd_")
        r = await telemetry(gateway, "dev-a", old)
        assert r.status_code == 401, r.text
        r = await gateway.post("dev-a", new, {"ts": T0 + 1, "values": {"t": 2}})
        assert r.status_code == 200, r.text
        assert r.json()["accepted"] == 1

    async def test_rotating_an_unknown_device_is_404(self, gateway: Gateway) -> None:
        r = await gateway.client.post("/api/v1/devices/nope/token", headers=gateway.admin)
        assert r.status_code == 404, r.text
        assert r.json()["error"]["code"] == "device_not_found"

    async def test_disabled_device_cannot_write(self, gateway: Gateway) -> None:
        token = await gateway.create_device("dev-a")
        assert (await telemetry(gateway, "dev-a", token)).status_code == 200  # cached now
        r = await gateway.client.patch(
            "/api/v1/devices/dev-a", json={"enabled": False}, headers=gateway.admin
        )
        assert r.status_code == 200, r.text
        assert r.json()["enabled"] is False
        r = await gateway.post("dev-a", token, {"ts": T0 + 1, "values": {"t": 2}})
        assert r.status_code == 403, r.text
        assert r.json()["error"]["code"] == "device_disabled"
        # Its readings can still be read; enabling it again lets it write.
        assert await call(gateway, "GET", "/devices/dev-a/telemetry?metric=t", ADMIN_TOKEN) == 200
        r = await gateway.client.patch(
            "/api/v1/devices/dev-a", json={"enabled": True}, headers=gateway.admin
        )
        assert r.status_code == 200, r.text
        r = await gateway.post("dev-a", token, {"ts": T0 + 1, "values": {"t": 2}})
        assert r.status_code == 200, r.text

    async def test_device_created_disabled_cannot_write(self, gateway: Gateway) -> None:
        token = await gateway.create_device("dev-a", enabled=False)
        r = await telemetry(gateway, "dev-a", token)
        assert r.status_code == 403, r.text
        assert r.json()["error"]["code"] == "device_disabled"

    async def test_deleted_device_token_stops_working(self, gateway: Gateway) -> None:
        token = await gateway.create_device("dev-a")
        assert (await telemetry(gateway, "dev-a", token)).status_code == 200
        assert await call(gateway, "DELETE", "/devices/dev-a", ADMIN_TOKEN) == 204
        assert (await telemetry(gateway, "dev-a", token)).status_code == 401


def sha(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


class TestStoredTokens:
    async def test_tokens_are_stored_hashed(self, gateway: Gateway) -> None:
        device = await gateway.create_device("dev-a")
        r = await gateway.client.post("/api/v1/devices/dev-a/token", headers=gateway.admin)
        rotated = r.json()["token"]
        op = await new_token(Role.OPERATOR)
        admin = await new_token(Role.ADMIN)
        rows = await committed(
            gateway.settings.database_url,
            "SELECT token_hash, role, device_id, name FROM api_token ORDER BY id",
        )
        dump = repr(rows)
        for raw in (device, rotated, op, admin, ADMIN_TOKEN):
            assert raw not in dump
            assert raw.split("_", 1)[-1] not in dump
        hashes = {row[0]: row[1] for row in rows}
        assert hashes == {sha(rotated): "device", sha(op): "operator", sha(admin): "admin"}
        assert sha(device) not in hashes  # the rotated-out token is gone
        assert sha(ADMIN_TOKEN) not in hashes  # the configured admin token is not stored

    async def test_tokens_are_random_and_long(self, gateway: Gateway) -> None:
        tokens = [await gateway.create_device(f"dev-{i}") for i in range(5)]
        tokens += [await new_token(Role.OPERATOR) for _ in range(5)]
        assert len(set(tokens)) == 10
        for token in tokens:
            secret = token.split("_", 1)[1]
            assert len(secret) >= 22  # >= 128 bits of base64


class TestGeneratedAdminToken:
    async def test_first_start_generates_and_prints_one(
        self, database_url: str, capsys: pytest.CaptureFixture[str]
    ) -> None:
        settings = make_settings(database_url, admin_token=None)
        async with running(settings) as gw:
            printed = capsys.readouterr()
            found = re.findall(r"\bfga_[A-Za-z0-9_-]{43}\b", printed.err)
            assert len(found) == 1, printed.err
            token = found[0]
            assert "Authorization: Bearer" in printed.err
            assert token not in printed.out
            assert await call(gw, "GET", "/devices", token) == 200
            r = await gw.client.post("/api/v1/devices", json={"id": "dev-a"}, headers=bearer(token))
            assert r.status_code == 201, r.text
            assert await call(gw, "GET", "/devices", ADMIN_TOKEN) == 401  # not configured here
        rows = await committed(database_url, "SELECT token_hash, role, name FROM api_token")
        admin_rows = [row for row in rows if row[1] == "admin"]
        assert admin_rows == [(sha(token), "admin", "generated on first start")]
        assert token not in repr(rows)

        async with running(settings) as gw:
            assert "fga_" not in capsys.readouterr().err  # not generated again
            assert await call(gw, "GET", "/devices", token) == 200  # and still works
        rows = await committed(database_url, "SELECT role FROM api_token WHERE role = 'admin'")
        assert rows == [("admin",)]

    async def test_none_generated_when_one_is_configured(
        self, gateway: Gateway, capsys: pytest.CaptureFixture[str]
    ) -> None:
        assert "fga_" not in capsys.readouterr().err
        rows = await committed(gateway.settings.database_url, "SELECT role FROM api_token")
        assert rows == []
