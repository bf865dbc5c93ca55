"""The device registry over HTTP (create, list, get, patch, delete, token once) on both
databases, and `fieldgate devices create` / `fieldgate tokens create` on the command line."""

from __future__ import annotations

import asyncio
import os
import re
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import ADMIN_TOKEN, Gateway, make_settings
from tests.harness import bearer, committed, read_points, running

T0 = 1_700_000_000_000
FIELDGATE = Path(sys.executable).parent / "fieldgate"


def error_code(r: Any) -> str:
    err = r.json()["error"]
    assert set(err) == {"code", "message", "details"}
    assert err["message"]
    return str(err["code"])


def rfc3339_us(text: str) -> int:
    from datetime import datetime

    assert text.endswith("Z")
    dt = datetime.fromisoformat(text)
    return int(dt.timestamp()) * 1_000_000 + dt.microsecond


@pytest.fixture
def database_url(emptied_database_url: str) -> str:
    """PostgreSQL: one database for the module's tests, emptied before each (conftest)."""
    return emptied_database_url


class TestCreate:
    async def test_created_with_its_token_shown_once(self, gateway: Gateway) -> None:
        r = await gateway.client.post(
            "/api/v1/devices",
            json={"id": "greenhouse-7", "name": "Greenhouse 7", "metadata": {"row": 3}},
            headers=gateway.admin,
        )
        assert r.status_code == 201, r.text
        body = r.json()
        token = body.pop("token")
        assert token.startswith("fgd_")
        assert body["id"] == "greenhouse-7"
        assert body["name"] == "Greenhouse 7"
        assert body["metadata"] == {"row": 3}
        assert body["enabled"] is True
        assert body["last_seen"] is None
        assert body["retention_days"] is None
        assert body["readings"] == 0
        assert body["metrics"] == {}
        assert body["created_at"].endswith("Z")
        got = await gateway.client.get("/api/v1/devices/greenhouse-7", headers=gateway.admin)
        assert got.status_code == 200
        assert "token" not in got.json()
        assert token not in got.text
        listed = await gateway.client.get("/api/v1/devices", headers=gateway.admin)
        assert token not in listed.text
        r = await gateway.post("greenhouse-7", token, {"ts": T0, "values": {"t": 1}})
        assert r.status_code == 200, r.text

    async def test_duplicate_is_409_and_keeps_the_first(self, gateway: Gateway) -> None:
        token = await gateway.create_device("dev-a", name="first")
        r = await gateway.client.post(
            "/api/v1/devices", json={"id": "dev-a", "name": "second"}, headers=gateway.admin
        )
        assert r.status_code == 409, r.text
        assert error_code(r) == "device_exists"
        got = await gateway.client.get("/api/v1/devices/dev-a", headers=gateway.admin)
        assert got.json()["name"] == "first"
        assert (await gateway.post("dev-a", token, {"values": {"t": 1}})).status_code == 200

    @pytest.mark.parametrize("device_id", ["a", "A-Z_a-z.0-9", "x" * 64, "...", "-_-"])
    async def test_valid_ids(self, gateway: Gateway, device_id: str) -> None:
        await gateway.create_device(device_id)
        r = await gateway.client.get(f"/api/v1/devices/{device_id}", headers=gateway.admin)
        assert r.json()["id"] == device_id

    async def test_invalid_bodies_are_422_with_our_error_shape(self, gateway: Gateway) -> None:
        bad: list[Any] = [
            {"id": ""},
            {"id": "x" * 65},
            {"id": "has space"},
            {"id": "slash/y"},
            {"id": "dév"},
            {"id": "dev\n"},
            {"id": "semi;colon"},
            {"id": 42},
            {"name": "no id"},
            {"id": "ok", "colour": "red"},
            {"id": "ok", "metadata": [1, 2]},
            {"id": "ok", "name": "n" * 201},
            {"id": "ok", "retention_days": -1},
            {"id": "ok", "retention_days": "30"},
            {"id": "ok", "retention_days": True},
            {"id": "ok", "retention_days": 1e9},
            [{"id": "ok"}],
        ]
        for body in bad:
            r = await gateway.client.post("/api/v1/devices", json=body, headers=gateway.admin)
            assert r.status_code == 422, (body, r.text)
            assert error_code(r) == "invalid_body"
            details = r.json()["error"]["details"]
            assert details
            assert all(d["loc"][0] == "body" and d["message"] for d in details)
        listed = await gateway.client.get("/api/v1/devices", headers=gateway.admin)
        assert listed.json()["devices"] == []

    async def test_body_that_is_not_json_is_400(self, gateway: Gateway) -> None:
        r = await gateway.client.post(
            "/api/v1/devices",
            content=b"{id: dev}",
            headers={**gateway.admin, "Content-Type": "application/json"},
        )
        assert r.status_code == 400, r.text
        assert error_code(r) == "invalid_json"


class TestListAndGet:
    async def test_paging_returns_every_device_once_in_id_order(self, gateway: Gateway) -> None:
        ids = [f"dev-{i:02d}" for i in range(7)]
        for device_id in reversed(ids):
            await gateway.create_device(device_id)
        seen: list[str] = []
        cursor = None
        pages = 0
        while True:
            params: dict[str, Any] = {"limit": 3}
            if cursor:
                params["cursor"] = cursor
            r = await gateway.client.get("/api/v1/devices", params=params, headers=gateway.admin)
            assert r.status_code == 200, r.text
            page = r.json()
            assert len(page["devices"]) <= 3
            seen += [d["id"] for d in page["devices"]]
            pages += 1
            cursor = page["next_cursor"]
            if cursor is None:
                break
        assert seen == ids
        assert pages == 3
        r = await gateway.client.get("/api/v1/devices", params={"limit": 7}, headers=gateway.admin)
        assert r.json()["next_cursor"] is None
        assert len(r.json()["devices"]) == 7

    async def test_paging_holds_under_the_database_collation(self, gateway: Gateway) -> None:
        """Mixed case and punctuation sort differently per database; paging still sees each once."""
        ids = ["a", "B", "a-b", "ab", "A_c", "a.b", "Z", "0", "_x", "-y", "aB", "Ab"]
        for device_id in ids:
            await gateway.create_device(device_id)
        r = await gateway.client.get(
            "/api/v1/devices", params={"limit": 100}, headers=gateway.admin
        )
        one_page = [d["id"] for d in r.json()["devices"]]
        assert sorted(one_page) == sorted(ids)
        for limit in (1, 2, 5):
            seen: list[str] = []
            params: dict[str, Any] = {"limit": limit}
            for _ in range(len(ids) + 1):
                r = await gateway.client.get(
                    "/api/v1/devices", params=params, headers=gateway.admin
                )
                assert r.status_code == 200, r.text
                seen += [d["id"] for d in r.json()["devices"]]
                if r.json()["next_cursor"] is None:
                    break
                params["cursor"] = r.json()["next_cursor"]
            assert seen == one_page, limit

    @pytest.mark.parametrize("limit", [0, -1, 1001, "many"])
    async def test_bad_limit_is_400(self, gateway: Gateway, limit: Any) -> None:
        r = await gateway.client.get(
            "/api/v1/devices", params={"limit": limit}, headers=gateway.admin
        )
        assert r.status_code == 400, r.text
        assert error_code(r) == "invalid_parameter"

    async def test_last_seen_and_reading_counts(self, gateway: Gateway) -> None:
        token = await gateway.create_device("busy")
        await gateway.create_device("idle")
        before_us = time.time_ns() // 1000
        r = await gateway.post(
            "busy",
            token,
            [
                {"ts": T0, "values": {"t": 1, "h": 40}},
                {"ts": T0 + 1000, "values": {"t": 2}},
                {"ts": T0 + 2500, "values": {"t": 3}},
            ],
        )
        assert r.json()["accepted"] == 4
        after_us = time.time_ns() // 1000
        r = await gateway.client.get("/api/v1/devices", headers=gateway.admin)
        devices = {d["id"]: d for d in r.json()["devices"]}
        busy, idle = devices["busy"], devices["idle"]
        assert busy["readings"] == 4
        assert busy["metrics"] == {
            "h": {
                "count": 1,
                "first_ts": "2023-11-14T22:13:20Z",
                "last_ts": "2023-11-14T22:13:20Z",
                "unit": None,
            },
            "t": {
                "count": 3,
                "first_ts": "2023-11-14T22:13:20Z",
                "last_ts": "2023-11-14T22:13:22.500Z",
                "unit": None,
            },
        }
        assert busy["last_seen"] is not None
        assert before_us - 1000 <= rfc3339_us(busy["last_seen"]) <= after_us + 1000
        assert idle["readings"] == 0
        assert idle["metrics"] == {}
        assert idle["last_seen"] is None
        one = await gateway.client.get("/api/v1/devices/busy", headers=gateway.admin)
        assert one.json() == busy

    async def test_duplicates_do_not_count(self, gateway: Gateway) -> None:
        token = await gateway.create_device("dev-a")
        for _ in range(3):
            await gateway.post("dev-a", token, {"ts": T0, "values": {"t": 1}})
        r = await gateway.client.get("/api/v1/devices/dev-a", headers=gateway.admin)
        assert r.json()["readings"] == 1

    async def test_unknown_device_is_404(self, gateway: Gateway) -> None:
        r = await gateway.client.get("/api/v1/devices/nope", headers=gateway.admin)
        assert r.status_code == 404, r.text
        assert error_code(r) == "device_not_found"


class TestRetentionDays:
    """A device's own retention (days, >= 0; 0 keeps all; null: FIELDGATE_RETENTION_DAYS)."""

    async def test_set_on_create_changed_and_cleared_by_patch(self, gateway: Gateway) -> None:
        await gateway.create_device("dev-r", retention_days=30)
        got = await gateway.client.get("/api/v1/devices/dev-r", headers=gateway.admin)
        assert got.json()["retention_days"] == 30
        listed = await gateway.client.get("/api/v1/devices", headers=gateway.admin)
        assert listed.json()["devices"][0]["retention_days"] == 30

        url = "/api/v1/devices/dev-r"
        r = await gateway.client.patch(url, json={"retention_days": 0.5}, headers=gateway.admin)
        assert r.status_code == 200, r.text
        assert r.json()["retention_days"] == 0.5
        r = await gateway.client.patch(url, json={"name": "kept"}, headers=gateway.admin)
        assert r.json()["retention_days"] == 0.5  # not sent: unchanged
        r = await gateway.client.patch(url, json={"retention_days": 0}, headers=gateway.admin)
        assert r.json()["retention_days"] == 0
        r = await gateway.client.patch(url, json={"retention_days": None}, headers=gateway.admin)
        assert r.status_code == 200, r.text
        assert r.json()["retention_days"] is None  # back to the global setting
        assert r.json()["name"] == "kept"

    @pytest.mark.parametrize("days", [-0.5, "7", False, 100_001, [1]])
    async def test_an_invalid_value_is_422_and_changes_nothing(
        self, gateway: Gateway, days: Any
    ) -> None:
        await gateway.create_device("dev-r", retention_days=7)
        r = await gateway.client.patch(
            "/api/v1/devices/dev-r", json={"retention_days": days}, headers=gateway.admin
        )
        assert r.status_code == 422, r.text
        assert error_code(r) == "invalid_body"
        assert r.json()["error"]["details"][0]["loc"] == ["body", "retention_days"]
        got = await gateway.client.get("/api/v1/devices/dev-r", headers=gateway.admin)
        assert got.json()["retention_days"] == 7


class TestPatch:
    async def test_changes_only_what_is_sent(self, gateway: Gateway) -> None:
        await gateway.create_device("dev-a", name="old", metadata={"a": 1})
        r = await gateway.client.patch(
            "/api/v1/devices/dev-a", json={"name": "new"}, headers=gateway.admin
        )
        assert r.status_code == 200, r.text
        assert (r.json()["name"], r.json()["metadata"], r.json()["enabled"]) == (
            "new",
            {"a": 1},
            True,
        )
        r = await gateway.client.patch(
            "/api/v1/devices/dev-a",
            json={"metadata": {"b": [1, 2]}, "enabled": False},
            headers=gateway.admin,
        )
        assert r.status_code == 200, r.text
        got = await gateway.client.get("/api/v1/devices/dev-a", headers=gateway.admin)
        assert got.json()["name"] == "new"
        assert got.json()["metadata"] == {"b": [1, 2]}
        assert got.json()["enabled"] is False

    async def test_invalid_patch_is_422(self, gateway: Gateway) -> None:
        await gateway.create_device("dev-a", name="keep")
        for body in [{"id": "other"}, {"enabled": "perhaps"}, {"name": "n" * 201}]:
            r = await gateway.client.patch(
                "/api/v1/devices/dev-a", json=body, headers=gateway.admin
            )
            assert r.status_code == 422, (body, r.text)
            assert error_code(r) == "invalid_body"
        got = await gateway.client.get("/api/v1/devices/dev-a", headers=gateway.admin)
        assert (got.json()["id"], got.json()["name"]) == ("dev-a", "keep")

    async def test_unknown_device_is_404(self, gateway: Gateway) -> None:
        r = await gateway.client.patch(
            "/api/v1/devices/nope", json={"name": "x"}, headers=gateway.admin
        )
        assert r.status_code == 404, r.text
        assert error_code(r) == "device_not_found"


class TestDelete:
    async def test_delete_cascades_to_series_readings_and_tokens(self, gateway: Gateway) -> None:
        url = gateway.settings.database_url
        token = await gateway.create_device("doomed")
        other = await gateway.create_device("other")
        body = [{"ts": T0 + i, "values": {"t": i, "h": i}} for i in range(5)]
        assert (await gateway.post("doomed", token, body)).json()["accepted"] == 10
        assert (await gateway.post("other", other, body)).json()["accepted"] == 10
        series = [
            row[0]
            for row in await committed(url, "SELECT id FROM series WHERE device_id = 'doomed'")
        ]
        assert len(series) == 2

        r = await gateway.client.delete("/api/v1/devices/doomed", headers=gateway.admin)
        assert r.status_code == 204, r.text
        assert r.content == b""

        marks = ", ".join("?" * len(series))
        rows = await committed(
            url, f"SELECT count(*) FROM reading WHERE series_id IN ({marks})", *series
        )
        assert rows == [(0,)]
        assert await committed(url, "SELECT id FROM series WHERE device_id = 'doomed'") == []
        assert await committed(url, "SELECT id FROM api_token WHERE device_id = 'doomed'") == []
        assert await committed(url, "SELECT id FROM device WHERE id = 'doomed'") == []
        # The other device is untouched.
        assert len(await read_points(gateway, "other", "t")) == 5
        assert await committed(url, "SELECT count(*) FROM reading") == [(10,)]
        r = await gateway.client.get("/api/v1/devices/doomed", headers=gateway.admin)
        assert r.status_code == 404
        r = await gateway.client.delete("/api/v1/devices/doomed", headers=gateway.admin)
        assert r.status_code == 404, r.text
        assert error_code(r) == "device_not_found"

    async def test_recreated_device_starts_clean(self, gateway: Gateway) -> None:
        url = gateway.settings.database_url
        token = await gateway.create_device("phoenix")
        old = [{"ts": T0 + i, "values": {"t": i, "h": i}} for i in range(3)]
        assert (await gateway.post("phoenix", token, old)).json()["accepted"] == 6
        assert len(await read_points(gateway, "phoenix", "t")) == 3  # series cached for reads
        r = await gateway.client.delete("/api/v1/devices/phoenix", headers=gateway.admin)
        assert r.status_code == 204

        token = await gateway.create_device("phoenix")
        got = await gateway.client.get("/api/v1/devices/phoenix", headers=gateway.admin)
        assert (got.json()["readings"], got.json()["metrics"]) == (0, {})
        assert got.json()["last_seen"] is None
        assert await read_points(gateway, "phoenix", "t") == []
        r = await gateway.post("phoenix", token, {"ts": T0 + 100, "values": {"t": 42}})
        assert r.json() == {"accepted": 1, "duplicates": 0, "rejected": []}
        assert await read_points(gateway, "phoenix", "t") == [
            {"ts": "2023-11-14T22:13:20.100Z", "value": 42.0}
        ]
        assert await read_points(gateway, "phoenix", "h") == []
        # Every stored reading belongs to a series that exists (no orphans from stale ids).
        orphans = await committed(
            url,
            "SELECT count(*) FROM reading r LEFT JOIN series s ON s.id = r.series_id"
            " WHERE s.id IS NULL",
        )
        assert orphans == [(0,)]
        rows = await committed(
            url,
            "SELECT s.metric, r.value FROM reading r JOIN series s ON s.id = r.series_id"
            " WHERE s.device_id = 'phoenix'",
        )
        assert rows == [("t", 42.0)]


def _cli_env(database_url: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("FIELDGATE_")}
    env["FIELDGATE_DATABASE_URL"] = database_url
    return env


async def fieldgate(cwd: Path, env: dict[str, str], *args: str) -> tuple[int, str, str]:
    proc = await asyncio.create_subprocess_exec(
        str(FIELDGATE),
        *args,
        cwd=cwd,
        env=env,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    out, err = await asyncio.wait_for(proc.communicate(), 60)
    assert proc.returncode is not None
    return proc.returncode, out.decode(), err.decode()


class TestCommandLine:
    async def test_devices_create_and_tokens_create(self, tmp_path: Path) -> None:
        url = f"sqlite://{tmp_path}/cli/fieldgate.db"
        env = _cli_env(url)
        code, out, err = await fieldgate(tmp_path, env, "devices", "create", "sensor-1")
        assert code == 0, err
        device_token = out.strip()
        assert re.fullmatch(r"fgd_[A-Za-z0-9_-]{43}", device_token), out
        code, out, err = await fieldgate(tmp_path, env, "tokens", "create", "--role", "operator")
        assert code == 0, err
        operator_token = out.strip()
        assert re.fullmatch(r"fgo_[A-Za-z0-9_-]{43}", operator_token), out

        code, _, err = await fieldgate(tmp_path, env, "devices", "create", "sensor-1")
        assert code == 1
        assert err == "fieldgate: device 'sensor-1' already exists\n"  # one line, no traceback
        for bad in ["bad id", "x" * 65, "dev\n", ""]:
            code, out, err = await fieldgate(tmp_path, env, "devices", "create", bad)
            assert code == 2, (bad, out, err)
            assert out == ""
        code, _, _ = await fieldgate(tmp_path, env, "tokens", "create", "--role", "device")
        assert code == 2

        rows = await committed(url, "SELECT token_hash FROM api_token")
        assert len(rows) == 2
        assert device_token not in repr(rows)
        assert operator_token not in repr(rows)

        async with running(make_settings(url)) as gw:
            r = await gw.post("sensor-1", device_token, {"ts": T0, "values": {"t": 21.5}})
            assert r.status_code == 200, r.text
            r = await gw.client.get("/api/v1/devices", headers=bearer(operator_token))
            assert r.status_code == 200, r.text
            assert [d["id"] for d in r.json()["devices"]] == ["sensor-1"]
            assert r.json()["devices"][0]["readings"] == 1
            r = await gw.client.post(
                "/api/v1/devices", json={"id": "x"}, headers=bearer(operator_token)
            )
            assert r.status_code == 403, r.text
            assert await read_points(gw, "sensor-1", "t") == [
                {"ts": "2023-11-14T22:13:20Z", "value": 21.5}
            ]

    async def test_tokens_create_admin(self, tmp_path: Path) -> None:
        url = f"sqlite://{tmp_path}/fieldgate.db"
        code, out, err = await fieldgate(
            tmp_path, _cli_env(url), "tokens", "create", "--role", "admin", "--name", "ops"
        )
        assert code == 0, err
        admin = out.strip()
        assert admin.startswith("fga_")
        async with running(make_settings(url, admin_token=ADMIN_TOKEN)) as gw:
            r = await gw.client.post("/api/v1/devices", json={"id": "d"}, headers=bearer(admin))
            assert r.status_code == 201, r.text
        assert await committed(url, "SELECT role, name FROM api_token WHERE role = 'admin'") == [
            ("admin", "ops")
        ]


async def test_delete_during_a_committing_write_leaves_no_orphans(gateway: Gateway) -> None:
    """A write committing while its device is deleted adds no readings that outlive the device.

    PostgreSQL row locks make the race deterministic: the writer's statement inserts its rows and
    then waits on the device row (last_seen); the delete removes the device's readings (it cannot
    see the uncommitted ones) and waits on the same row; the write commits first."""
    import asyncpg

    from tests.harness import is_sqlite, wait_until

    url = gateway.settings.database_url
    if is_sqlite(url):
        pytest.skip("needs row locks to interleave the two transactions: PostgreSQL only")
    token = await gateway.create_device("racy")
    assert (await gateway.post("racy", token, {"ts": T0, "values": {"t": 1}})).status_code == 200
    holder = await asyncpg.connect(url, timeout=10)
    waiting = await asyncpg.connect(url, timeout=10)
    try:
        tx = holder.transaction()
        await tx.start()
        await holder.execute("SELECT 1 FROM device WHERE id = 'racy' FOR UPDATE")

        async def blocked() -> int:
            return int(
                await waiting.fetchval(
                    "SELECT count(*) FROM pg_stat_activity"
                    " WHERE datname = current_database() AND wait_event_type = 'Lock'"
                )
            )

        post = asyncio.create_task(
            gateway.post("racy", token, [{"ts": T0 + i, "values": {"t": i}} for i in range(1, 50)])
        )
        deadline = time.monotonic() + 10
        while await blocked() < 1:
            assert time.monotonic() < deadline, "the write never reached the device row lock"
        delete = asyncio.create_task(
            gateway.client.delete("/api/v1/devices/racy", headers=gateway.admin)
        )
        while await blocked() < 2:
            assert time.monotonic() < deadline, "the delete never reached the device row lock"
        await tx.rollback()
        assert (await post).status_code == 200
        assert (await delete).status_code == 204
        await wait_until(lambda: delete.done())
    finally:
        await holder.close()
        await waiting.close()
    orphans = await committed(
        url, "SELECT count(*) FROM reading WHERE series_id NOT IN (SELECT id FROM series)"
    )
    assert orphans == [(0,)]


async def test_a_device_deleted_elsewhere_and_created_anew_loses_no_reading(
    gateway: Gateway,
) -> None:
    """Another instance (or the CLI) deletes a device whose series ids this instance has cached,
    then the device is created anew: a write is never answered 200 while going to the old, deleted
    series (readings nobody could read again); it is refused while the device is gone and stored,
    and readable, once it exists again."""
    from gateway.store import registry

    url = gateway.settings.database_url
    old = await gateway.create_device("again")
    r = await gateway.post("again", old, {"ts": T0, "values": {"t": 1}})
    assert r.json()["accepted"] == 1  # this instance now caches the device's series ids
    await registry.delete_device("again")  # as the CLI or another instance does: no cache told

    r = await gateway.post("again", old, {"ts": T0 + 1, "values": {"t": 2}})
    assert r.status_code in (401, 404), r.text  # the old token may be cached: then 404
    if r.status_code == 404:
        assert error_code(r) == "device_not_found"

    new = await gateway.create_device("again")
    r = await gateway.post("again", new, {"ts": T0 + 2, "values": {"t": 3}})
    assert r.status_code == 200, r.text
    assert r.json() == {"accepted": 1, "duplicates": 0, "rejected": []}
    assert [p["value"] for p in await read_points(gateway, "again", "t")] == [3.0]
    orphans = await committed(
        url, "SELECT count(*) FROM reading WHERE series_id NOT IN (SELECT id FROM series)"
    )
    assert orphans == [(0,)]
