"""The token lifecycle (issue 12): operator and admin tokens listed, issued with an optional
expiry and revoked, over the API and the CLI; an expired token refused even when cached; a
revocation refused at once here and within a second on another gateway; when a token was last
used, written in batches. Both databases (the CLI's own tests: SQLite, as in test_cli.py)."""

from __future__ import annotations

import asyncio
import os
import re
import sys
from pathlib import Path
from typing import Any

import httpx
import pytest
from typer.testing import CliRunner, Result

from devices.credentials import hash_token
from devices.models import Role
from gateway.auth import Authenticator
from gateway.cli import app as cli_app
from gateway.errors import Unauthorized
from gateway.outage import database_outage
from gateway.runtime import Runtime
from gateway.store import registry
from gateway.store.database import connection
from gateway.store.raw_sql import execute
from gateway.timespec import now_us, parse_instant
from tests.conftest import ADMIN_TOKEN, Gateway, make_settings, poll_until
from tests.harness import bearer, committed, new_token, running

DAY_US = 86_400_000_000


@pytest.fixture
def database_url(emptied_database_url: str) -> str:
    """PostgreSQL: one database for the module's tests, emptied before each (conftest)."""
    return emptied_database_url


async def issue(gw: Gateway, **body: Any) -> httpx.Response:
    return await gw.client.post("/api/v1/tokens", json=body, headers=gw.admin)


async def listed(gw: Gateway, headers: dict[str, str] | None = None) -> list[dict[str, Any]]:
    r = await gw.client.get("/api/v1/tokens", headers=headers or gw.admin)
    assert r.status_code == 200, r.text
    tokens: list[dict[str, Any]] = r.json()["tokens"]
    return tokens


async def status(gw: Gateway, token: str, path: str = "/api/v1/devices") -> int:
    return (await gw.client.get(path, headers=bearer(token))).status_code


def runtime_of(gw: Gateway) -> Runtime:
    runtime: Runtime = gw.app.state.runtime
    return runtime


class TestOverTheApi:
    async def test_issue_list_revoke(self, gateway: Gateway) -> None:
        await gateway.create_device("dev-a")  # its token is not listed
        r = await issue(gateway, role="operator", name="grafana")
        assert r.status_code == 201, r.text
        created = r.json()
        token = created.pop("token")
        assert token.startswith("fgo_")
        assert created == {
            "id": created["id"],
            "role": "operator",
            "name": "grafana",
            "created_at": created["created_at"],
            "last_used_at": None,
            "expires_at": None,
        }
        assert abs(parse_instant(created["created_at"], 0, name="t") - now_us()) < 60_000_000
        assert await status(gateway, token) == 200  # works, and is cached now

        r = await gateway.client.get("/api/v1/tokens", headers=gateway.admin)
        assert r.status_code == 200, r.text
        assert r.json() == {"tokens": [created]}
        assert token not in r.text
        assert hash_token(token) not in r.text

        r = await gateway.client.delete(f"/api/v1/tokens/{created['id']}", headers=gateway.admin)
        assert r.status_code == 204, r.text
        r = await gateway.client.get("/api/v1/devices", headers=bearer(token))
        assert r.status_code == 401, r.text  # at once, though it was cached
        assert r.json()["error"]["code"] == "unauthorized"
        assert await listed(gateway) == []
        r = await gateway.client.delete(f"/api/v1/tokens/{created['id']}", headers=gateway.admin)
        assert r.status_code == 404, r.text
        assert r.json()["error"]["code"] == "token_not_found"

    async def test_an_issued_admin_token_manages_tokens(self, gateway: Gateway) -> None:
        r = await issue(gateway, role="admin")
        assert r.status_code == 201, r.text
        admin = r.json()["token"]
        assert admin.startswith("fga_")
        assert r.json()["name"] == ""
        r = await gateway.client.post(
            "/api/v1/tokens", json={"role": "operator"}, headers=bearer(admin)
        )
        assert r.status_code == 201, r.text
        assert [t["role"] for t in await listed(gateway, bearer(admin))] == ["admin", "operator"]

    async def test_listed_oldest_first_with_tokens_made_elsewhere(self, gateway: Gateway) -> None:
        await new_token(Role.ADMIN, "cli")  # as `fieldgate tokens create` makes them
        await issue(gateway, role="operator", name="api")
        assert [(t["id"], t["name"]) for t in await listed(gateway)] == [(1, "cli"), (2, "api")]

    async def test_a_device_token_is_not_revoked_here(self, gateway: Gateway) -> None:
        device_token = await gateway.create_device("dev-a")
        ((token_id,),) = await committed(
            gateway.settings.database_url, "SELECT id FROM api_token WHERE device_id = 'dev-a'"
        )
        r = await gateway.client.delete(f"/api/v1/tokens/{token_id}", headers=gateway.admin)
        assert r.status_code == 409, r.text
        error = r.json()["error"]
        assert error["code"] == "device_token"
        assert "/api/v1/devices/dev-a/token" in error["message"]
        assert "delete the device" in error["message"]
        r = await gateway.post("dev-a", device_token, {"values": {"t": 1.0}})
        assert r.status_code == 200, r.text  # still works

    @pytest.mark.parametrize("token_id", ["999", "0", "-1", str(2**31), str(2**63)])
    async def test_an_unknown_id_is_404(self, gateway: Gateway, token_id: str) -> None:
        r = await gateway.client.delete(f"/api/v1/tokens/{token_id}", headers=gateway.admin)
        assert r.status_code == 404, r.text
        assert r.json()["error"]["code"] == "token_not_found"

    async def test_an_id_that_is_no_number_is_400(self, gateway: Gateway) -> None:
        r = await gateway.client.delete("/api/v1/tokens/abc", headers=gateway.admin)
        assert r.status_code == 400, r.text
        assert r.json()["error"]["code"] == "invalid_parameter"


class TestRoles:
    async def test_only_admins(self, gateway: Gateway) -> None:
        operator = await new_token(Role.OPERATOR)
        device = await gateway.create_device("dev-a")
        ((token_id,),) = await committed(
            gateway.settings.database_url, "SELECT id FROM api_token WHERE role = 'operator'"
        )
        routes = [
            ("GET", "/api/v1/tokens", None),
            ("POST", "/api/v1/tokens", {"role": "operator"}),
            ("DELETE", f"/api/v1/tokens/{token_id}", None),
        ]
        for method, path, body in routes:
            for token, expected in [(operator, 403), (device, 403), (None, 401)]:
                headers = bearer(token) if token else {}
                r = await gateway.client.request(method, path, json=body, headers=headers)
                assert r.status_code == expected, (method, path, token, r.text)
                code = "forbidden" if expected == 403 else "unauthorized"
                assert r.json()["error"]["code"] == code
        # nothing issued, nothing revoked
        assert [t["role"] for t in await listed(gateway)] == ["operator"]
        assert await status(gateway, operator) == 200

    async def test_the_openapi_document_says_so(self, gateway: Gateway) -> None:
        paths = gateway.app.openapi()["paths"]
        for path, method in [
            ("/api/v1/tokens", "get"),
            ("/api/v1/tokens", "post"),
            ("/api/v1/tokens/{token_id}", "delete"),
        ]:
            assert paths[path][method]["security"] == [{"bearerAuth": []}]


class TestValidation:
    @pytest.mark.parametrize(
        ("body", "code"),
        [
            ({"role": "device"}, "invalid_body"),
            ({"role": "root"}, "invalid_body"),
            ({"name": "no role"}, "invalid_body"),
            ({"role": "operator", "secret": "x"}, "invalid_body"),
            ({"role": "operator", "name": "x" * 201}, "invalid_body"),
            ({"role": "operator", "name": "nul\u0000"}, "invalid_body"),
            ({"role": "operator", "expires_at": 1893456000}, "invalid_body"),
            ({"role": "operator", "expires_at": "2020-01-01T00:00:00Z"}, "invalid_expiry"),
            ({"role": "operator", "expires_at": "now"}, "invalid_expiry"),
            ({"role": "operator", "expires_at": "-1h"}, "invalid_expiry"),
            ({"role": "operator", "expires_at": "tomorrow"}, "invalid_expiry"),
            ({"role": "operator", "expires_at": "2099-01-01T00:00:00"}, "invalid_expiry"),
            ({"role": "operator", "expires_in": "0s"}, "invalid_expiry"),
            ({"role": "operator", "expires_in": "-1d"}, "invalid_expiry"),
            ({"role": "operator", "expires_in": "30 days"}, "invalid_expiry"),
            ({"role": "operator", "expires_in": "99999999w"}, "invalid_expiry"),
            (
                {"role": "operator", "expires_at": "2099-01-01T00:00:00Z", "expires_in": "1d"},
                "invalid_expiry",
            ),
        ],
    )
    async def test_refused_with_a_code(
        self, gateway: Gateway, body: dict[str, Any], code: str
    ) -> None:
        r = await issue(gateway, **body)
        assert r.status_code == 422, r.text
        assert r.json()["error"]["code"] == code
        assert await listed(gateway) == []  # nothing issued

    async def test_not_json_is_400(self, gateway: Gateway) -> None:
        r = await gateway.client.post("/api/v1/tokens", content=b"{", headers=gateway.admin)
        assert r.status_code == 400, r.text
        assert r.json()["error"]["code"] == "invalid_json"

    async def test_the_expiry_in_both_shapes(self, gateway: Gateway) -> None:
        r = await issue(gateway, role="operator", expires_at="2099-01-01T01:00:00+01:00")
        assert r.status_code == 201, r.text
        assert r.json()["expires_at"] == "2099-01-01T00:00:00Z"
        before = now_us()
        r = await issue(gateway, role="admin", expires_in="30d")
        assert r.status_code == 201, r.text
        expires = parse_instant(r.json()["expires_at"], 0, name="t")
        assert before + 30 * DAY_US <= expires <= now_us() + 30 * DAY_US
        assert [t["expires_at"] for t in await listed(gateway)] == [
            "2099-01-01T00:00:00Z",
            r.json()["expires_at"],
        ]


class TestExpiry:
    async def test_a_cached_token_is_refused_once_it_expires(self, gateway: Gateway) -> None:
        """The cache entry carries the expiry and each use checks it against the wall clock:
        no lookup is needed to refuse it."""
        expires = now_us() + DAY_US
        _, token = await registry.issue_token(Role.OPERATOR, "short", expires_us=expires)
        wall = [expires - 1]
        lookups: list[str] = []
        authenticator = Authenticator(None, ttl_s=600, wall_clock=lambda: wall[0])
        principal = await authenticator.authenticate(token, lambda: lookups.append(token))
        assert principal.expires_us == expires
        wall[0] = expires
        for _ in range(2):
            with pytest.raises(Unauthorized) as refused:
                await authenticator.authenticate(token, lambda: lookups.append(token))
            assert refused.value.code == "token_expired"
            assert refused.value.message == "the bearer token has expired"
        assert lookups == [token]  # one lookup: the refusals came from the cached entry
        assert authenticator.take_uses() == {hash_token(token): expires - 1}  # not the refusals

    async def test_over_the_api(self, gateway: Gateway) -> None:
        r = await issue(gateway, role="operator", expires_in="500ms")
        assert r.status_code == 201, r.text
        token = r.json()["token"]
        assert await status(gateway, token) == 200  # cached now

        async def expired() -> bool:
            r = await gateway.client.get("/api/v1/devices", headers=bearer(token))
            assert r.status_code in (200, 401), r.text
            if r.status_code == 401:
                assert r.json()["error"] == {
                    "code": "token_expired",
                    "message": "the bearer token has expired",
                    "details": [],
                }
                assert r.headers["www-authenticate"] == "Bearer"
            return r.status_code == 401

        await poll_until(expired, within=3, what="the expired token's 401")
        assert (await listed(gateway))[0]["name"] == ""  # listed still: expired, not deleted

    async def test_a_device_token_with_an_expiry_is_refused_too(self, gateway: Gateway) -> None:
        token = await gateway.create_device("dev-a")
        changed = await execute(
            connection(),
            "UPDATE api_token SET expires_us = ? WHERE device_id = 'dev-a'",
            [now_us()],
        )
        assert changed == 1
        r = await gateway.post("dev-a", token, {"values": {"t": 1.0}})
        assert r.status_code == 401, r.text
        assert r.json()["error"]["code"] == "token_expired"


class TestRevokedElsewhere:
    """A revocation by another gateway or the CLI moves the auth change counter: this one drops
    its cached tokens within a poll (FIELDGATE_AUTH_SYNC_INTERVAL_S, 0.5 s)."""

    async def test_revoked_by_another_instance(self, gateway: Gateway) -> None:
        token = await new_token(Role.OPERATOR)
        assert await status(gateway, token) == 200  # cached now
        ((token_id,),) = await committed(gateway.settings.database_url, "SELECT id FROM api_token")
        await registry.revoke_token(token_id)  # as another instance does: this cache is not told

        async def refused() -> bool:
            code = await status(gateway, token)
            assert code in (200, 401)
            return code == 401

        await poll_until(refused, within=1.0, what="the revoked token's 401")

    async def test_revoked_here_refused_by_a_served_gateway(
        self, gateway: Gateway, serve: Any
    ) -> None:
        """A second gateway, `fieldgate serve` in its own process on the same database."""
        other = serve(gateway.settings.database_url)
        await other.start()
        r = await issue(gateway, role="operator")
        token, token_id = r.json()["token"], r.json()["id"]
        async with httpx.AsyncClient(base_url=other.base_url, timeout=10) as client:
            r = await client.get("/api/v1/devices", headers=bearer(token))
            assert r.status_code == 200, r.text  # cached there now
            r = await gateway.client.delete(f"/api/v1/tokens/{token_id}", headers=gateway.admin)
            assert r.status_code == 204, r.text

            async def refused() -> bool:
                r = await client.get("/api/v1/devices", headers=bearer(token))
                assert r.status_code in (200, 401), r.text
                return r.status_code == 401

            await poll_until(refused, within=1.0, what="the other gateway's 401")

    async def test_revoked_by_the_cli(self, gateway: Gateway) -> None:
        """`fieldgate tokens revoke` moves the auth change counter as the API does."""
        token = await new_token(Role.OPERATOR)
        assert await status(gateway, token) == 200
        cli = await asyncio.create_subprocess_exec(
            str(Path(sys.executable).parent / "fieldgate"),
            "tokens",
            "revoke",
            "1",
            env={**os.environ, "FIELDGATE_DATABASE_URL": gateway.settings.database_url},
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.STDOUT,
        )
        out, _ = await asyncio.wait_for(cli.communicate(), timeout=60)
        assert cli.returncode == 0, out.decode()
        assert out.decode().strip() == "revoked token 1"

        async def refused() -> bool:
            return await status(gateway, token) == 401

        await poll_until(refused, within=1.0, what="the revoked token's 401")


class TestLastUsed:
    async def test_a_used_token_shows_it_an_unused_one_null(self, database_url: str) -> None:
        settings = make_settings(database_url, token_last_used_interval_s=0.05)
        async with running(settings) as gw:
            used = (await issue(gw, role="operator", name="used")).json()
            unused = (await issue(gw, role="operator", name="unused")).json()
            before = now_us()
            assert await status(gw, used["token"]) == 200
            after = now_us()

            async def written() -> dict[str, Any] | None:
                tokens = {t["name"]: t for t in await listed(gw)}
                return tokens if tokens["used"]["last_used_at"] else None

            tokens = await poll_until(written, within=3, what="last_used_at")
            last_used = parse_instant(tokens["used"]["last_used_at"], 0, name="t")
            assert before // 1000 <= last_used // 1000 <= after // 1000  # ms in the answer
            assert tokens["unused"]["last_used_at"] is None
            assert unused["token"] not in repr(tokens)

    async def test_no_write_per_request_and_one_batch_on_stop(
        self, database_url: str, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        """With the default interval (60 s) nothing is written while requests come; the uses
        held in memory are written once when the gateway stops."""
        writes: list[dict[str, int]] = []
        real = registry.record_token_uses

        async def counted(uses: dict[str, int]) -> None:
            writes.append(dict(uses))
            await real(uses)

        monkeypatch.setattr(registry, "record_token_uses", counted)
        async with running(make_settings(database_url)) as gw:
            token = await new_token(Role.OPERATOR)
            for _ in range(20):
                assert await status(gw, token) == 200
            assert writes == []
        assert len(writes) == 1
        assert list(writes[0]) == [hash_token(token)]
        rows = await committed(database_url, "SELECT last_used_us FROM api_token")
        assert rows == [(writes[0][hash_token(token)],)]

    async def test_only_forward(self, gateway: Gateway) -> None:
        token = await new_token(Role.OPERATOR)
        h = hash_token(token)
        await registry.record_token_uses({h: 2_000})
        await registry.record_token_uses({h: 1_000})  # another gateway's older use, written late
        await registry.record_token_uses({hash_token("revoked since"): 3_000})
        rows = await committed(gateway.settings.database_url, "SELECT last_used_us FROM api_token")
        assert rows == [(2_000,)]
        await registry.record_token_uses({h: 5_000})
        rows = await committed(gateway.settings.database_url, "SELECT last_used_us FROM api_token")
        assert rows == [(5_000,)]

    async def test_a_failed_write_is_kept_for_the_next(
        self, gateway: Gateway, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        token = await new_token(Role.OPERATOR)
        assert await status(gateway, token) == 200
        runtime = runtime_of(gateway)
        real = registry.record_token_uses

        async def down(uses: dict[str, int]) -> None:
            raise ConnectionRefusedError("the database is away")

        monkeypatch.setattr(registry, "record_token_uses", down)
        try:
            await runtime.write_token_uses()
            assert database_outage.down  # told as an outage, not logged as a bug
        finally:
            database_outage.succeeded()
        monkeypatch.setattr(registry, "record_token_uses", real)
        await runtime.write_token_uses()
        rows = await committed(gateway.settings.database_url, "SELECT last_used_us FROM api_token")
        assert rows[0][0] is not None
        assert runtime.authenticator.take_uses() == {}

    async def test_device_and_configured_admin_tokens_are_not_noted(self, gateway: Gateway) -> None:
        device = await gateway.create_device("dev-a")
        assert (await gateway.post("dev-a", device, {"values": {"t": 1.0}})).status_code == 200
        assert await status(gateway, ADMIN_TOKEN) == 200
        assert runtime_of(gateway).authenticator.take_uses() == {}


# --- the CLI, as test_cli.py runs it: typer's CliRunner on a SQLite file ---


@pytest.fixture
def fieldgate(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> CliRunner:
    monkeypatch.chdir(tmp_path)
    for name in [k for k in os.environ if k.startswith("FIELDGATE_")]:
        monkeypatch.delenv(name)
    monkeypatch.setenv("FIELDGATE_DATABASE_URL", f"sqlite://{tmp_path}/cli.sqlite3")
    return CliRunner()


def run(runner: CliRunner, *args: str) -> Result:
    return runner.invoke(cli_app, list(args))


class TestCli:
    def test_create_list_revoke(self, fieldgate: CliRunner) -> None:
        forever = run(fieldgate, "tokens", "create", "--role", "admin", "--name", "ops team")
        assert forever.exit_code == 0, forever.output
        monthly = run(fieldgate, "tokens", "create", "--role", "operator", "--expires", "30d")
        assert monthly.exit_code == 0, monthly.output
        assert monthly.stdout.startswith("fgo_")
        dated = run(
            fieldgate, "tokens", "create", "--role", "operator", "--expires", "2099-01-01T00:00:00Z"
        )
        assert dated.exit_code == 0, dated.output
        assert run(fieldgate, "devices", "create", "dev-a").exit_code == 0  # not listed

        listed = run(fieldgate, "tokens", "list")
        assert listed.exit_code == 0, listed.output
        for secret in (forever.stdout, monthly.stdout, dated.stdout):
            assert secret.strip() not in listed.stdout
            assert hash_token(secret.strip()) not in listed.stdout
        rows = [line.split("\t") for line in listed.stdout.splitlines()]
        assert [(r[0], r[1], r[3], r[5]) for r in rows] == [
            ("1", "admin", "-", "ops team"),
            ("2", "operator", "-", ""),
            ("3", "operator", "-", ""),
        ]
        assert rows[0][4] == "-"
        expires = parse_instant(rows[1][4], 0, name="t")
        assert abs(expires - (now_us() + 30 * DAY_US)) < 60_000_000
        assert rows[2][4] == "2099-01-01T00:00:00Z"
        assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d(\.\d+)?Z", rows[0][2])

        revoked = run(fieldgate, "tokens", "revoke", "2")
        assert revoked.exit_code == 0, revoked.output
        assert revoked.stdout.strip() == "revoked token 2"
        listed = run(fieldgate, "tokens", "list")
        assert [line.split("\t")[0] for line in listed.stdout.splitlines()] == ["1", "3"]

    def test_revoking_an_unknown_or_a_device_token_is_status_1(self, fieldgate: CliRunner) -> None:
        result = run(fieldgate, "tokens", "revoke", "7")
        assert result.exit_code == 1
        assert result.stderr.strip() == "fieldgate: token 7 does not exist"
        assert run(fieldgate, "devices", "create", "dev-a").exit_code == 0
        result = run(fieldgate, "tokens", "revoke", "1")
        assert result.exit_code == 1
        assert "device 'dev-a'" in result.stderr
        assert "delete the device" in result.stderr

    @pytest.mark.parametrize("expires", ["2020-01-01T00:00:00Z", "0s", "soon"])
    def test_an_expiry_that_cannot_be_is_a_usage_error(
        self, fieldgate: CliRunner, expires: str
    ) -> None:
        result = run(fieldgate, "tokens", "create", "--role", "operator", "--expires", expires)
        assert result.exit_code == 2, result.output
        assert "--expires" in result.output
        assert run(fieldgate, "tokens", "list").stdout == ""
