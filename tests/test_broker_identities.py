"""Device identities at the broker: a Mosquitto made by `fieldgate broker init` (the README's
secured-broker recipe), its device clients kept from the registry by the gateway.

Every test runs against a real Mosquitto with the dynamic security plugin on a free port
(`secured_broker`), and checks what the broker lets a device do by connecting as one.
"""

from __future__ import annotations

import asyncio
import os
import secrets
import sqlite3
import stat
import subprocess
import time
from collections.abc import AsyncIterator
from contextlib import closing
from datetime import UTC, datetime
from typing import Any

import aiomqtt
import pytest
from pydantic import ValidationError

from devices.models import Device
from gateway.broker.identities import DEVICE_TEXTNAME, role_name
from gateway.broker.recipe import GATEWAY_ROLE
from gateway.mqtt import bridge
from gateway.provisioning import broker_identities
from gateway.store import registry
from tests.conftest import FIELDGATE, Gateway, SecuredBroker, make_settings, mqtt_ready, poll_until
from tests.harness import read_points, running

pytestmark = pytest.mark.e2e

TS_MS = (int(time.time()) - 600) * 1000


def message(i: int) -> bytes:
    return b'{"ts": %d, "values": {"v": %d}}' % (TS_MS + i, i)


def device_client(broker: SecuredBroker, username: str | None, password: str | None) -> Any:
    return aiomqtt.Client(
        "127.0.0.1",
        broker.port,
        username=username,
        password=password,
        identifier=username or f"anonymous-{secrets.token_hex(4)}",  # a device: its own id
        protocol=aiomqtt.ProtocolVersion.V5,
        timeout=5,
    )


async def refused(broker: SecuredBroker, username: str | None, password: str | None) -> bool:
    """Whether the broker refuses to let this identity connect."""
    try:
        async with device_client(broker, username, password):
            return False
    except aiomqtt.MqttError as exc:
        return "not authori" in str(exc).lower() or "bad user name" in str(exc).lower()


async def publish(broker: SecuredBroker, device: str, token: str, topic: str, i: int) -> None:
    async with device_client(broker, device, token) as client:
        await client.publish(topic, message(i), qos=1)


async def publish_until_closed(client: aiomqtt.Client) -> None:
    """Publish on `client` until the broker closes it (MqttError); fail after 10 s."""
    async with asyncio.timeout(10):
        for i in range(10_000):
            await client.publish("devices/dev-a/telemetry", message(i), qos=1)
            await asyncio.sleep(0.01)


def gateway_settings(database_url: str, broker: SecuredBroker, **more: Any) -> Any:
    return make_settings(
        database_url,
        **broker.settings,
        mqtt_client_id=f"fieldgate-ids-{os.getpid()}-{secrets.token_hex(3)}",
        mqtt_session_expiry_s=60,
        mqtt_reconnect_min_s=0.1,
        mqtt_reconnect_max_s=1,
        **more,
    )


@pytest.fixture
async def secured_gateway(
    database_url: str, secured_broker: SecuredBroker
) -> AsyncIterator[Gateway]:
    """The app with its bridge on the secured broker, as the broker's `fieldgate` client, in a
    shared subscription group (the gateway's role allows one), keeping the device clients."""
    settings = gateway_settings(database_url, secured_broker, mqtt_shared_group="fieldgate")
    async with running(settings) as gw:
        await poll_until(lambda: mqtt_ready(gw), within=20, what="the bridge to connect")
        yield gw


async def readings(gw: Gateway, device: str) -> list[Any]:
    return await read_points(gw, device, "v")


class TestRecipe:
    def test_init_writes_a_private_store_and_env(self, secured_broker: SecuredBroker) -> None:
        d = secured_broker.workdir
        for name in ("dynamic-security.json", "fieldgate.env"):
            assert stat.S_IMODE((d / name).stat().st_mode) == 0o600, name
        assert secured_broker.settings["broker_admin"] == "mosquitto-dynsec"
        assert secured_broker.url.startswith("mqtt://fieldgate:")
        assert "allow_anonymous false" in (d / "mosquitto.conf").read_text()

    def test_init_refuses_to_write_over_files(self, secured_broker: SecuredBroker) -> None:
        again = subprocess.run(
            [*FIELDGATE, "broker", "init", str(secured_broker.workdir)],
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert again.returncode == 1
        assert "exist already" in again.stderr

    async def test_anonymous_and_unknown_clients_are_refused(
        self, secured_broker: SecuredBroker
    ) -> None:
        assert await refused(secured_broker, None, None)
        assert await refused(secured_broker, "nobody", "nothing")
        assert await refused(secured_broker, "fieldgate", "not-its-password")


class TestSettings:
    def test_broker_admin_needs_the_broker_and_the_admin(self) -> None:
        with pytest.raises(ValidationError, match="FIELDGATE_BROKER_ADMIN_USERNAME"):
            make_settings("sqlite://x", mqtt_url="mqtt://h:1", broker_admin="mosquitto-dynsec")

    def test_the_gateway_client_id_is_one_no_device_can_have(self) -> None:
        with pytest.raises(ValidationError, match="must start with 'fieldgate-'"):
            make_settings(
                "sqlite://x",
                mqtt_url="mqtt://h:1",
                broker_admin="mosquitto-dynsec",
                broker_admin_username="a",
                broker_admin_password="b",
                mqtt_client_id="gw-1",
            )


@pytest.mark.parametrize("database_url", ["sqlite"], indirect=True)
class TestDeviceIdentities:
    async def test_a_device_publishes_as_itself_only(
        self, secured_gateway: Gateway, secured_broker: SecuredBroker
    ) -> None:
        gw = secured_gateway
        token_a = await gw.create_device("dev-a")
        await gw.create_device("dev-b")
        async with device_client(secured_broker, "dev-a", token_a) as client:
            # into another device's topic: the broker denies it, nothing is stored
            await client.publish("devices/dev-b/telemetry", message(1), qos=1)
            # its own: stored (after the one above, on the same connection)
            await client.publish("devices/dev-a/telemetry", message(2), qos=1)
        await poll_until(lambda: readings(gw, "dev-a"), within=10, what="dev-a's reading")
        assert [p["value"] for p in await readings(gw, "dev-a")] == [2.0]
        assert await readings(gw, "dev-b") == []
        rejected = await gw.client.get("/api/v1/rejected", headers=gw.admin)
        assert rejected.json()["rejected"] == []  # denied at the broker, never reached us

    async def test_a_device_publishes_senml_as_itself_only(
        self, secured_gateway: Gateway, secured_broker: SecuredBroker
    ) -> None:
        """The SenML topic is a device's too (`Topics.device_publishes`), and the gateway's role
        lets it take that topic in its shared group."""
        gw = secured_gateway
        mqtt = (await gw.client.get("/readyz", headers=gw.admin)).json()["checks"]["mqtt"]
        assert mqtt["refused_subscriptions"] == []
        token_a = await gw.create_device("dev-a")
        await gw.create_device("dev-b")
        pack = b'[{"n": "v", "u": "Cel", "v": %d, "t": -1}]'
        async with device_client(secured_broker, "dev-a", token_a) as client:
            await client.publish("devices/dev-b/senml", pack % 1, qos=1)  # denied
            await client.publish("devices/dev-a/senml", pack % 2, qos=1)
        await poll_until(lambda: readings(gw, "dev-a"), within=10, what="dev-a's reading")
        assert [p["value"] for p in await readings(gw, "dev-a")] == [2.0]
        assert await readings(gw, "dev-b") == []
        r = await gw.client.get(
            "/api/v1/devices/dev-a/telemetry", params={"metric": "v"}, headers=gw.admin
        )
        assert r.json()["unit"] == "Cel"

    async def test_a_device_hears_only_its_own_errors(
        self, secured_gateway: Gateway, secured_broker: SecuredBroker
    ) -> None:
        token = await secured_gateway.create_device("dev-a")
        async with device_client(secured_broker, "dev-a", token) as client:
            (denied,) = await client.subscribe("devices/dev-b/errors", qos=0)
            assert denied.is_failure, denied
            (granted,) = await client.subscribe("devices/dev-a/errors", qos=0)
            assert not granted.is_failure, granted
            await client.publish("devices/dev-a/telemetry", b"not json", qos=1)
            async with asyncio.timeout(10):
                notice = await anext(client.messages)
            assert str(notice.topic) == "devices/dev-a/errors"

    async def test_token_changes_reach_the_broker(
        self, secured_gateway: Gateway, secured_broker: SecuredBroker
    ) -> None:
        gw = secured_gateway
        old = await gw.create_device("dev-a")
        await publish(secured_broker, "dev-a", old, "devices/dev-a/telemetry", 1)
        r = await gw.client.post("/api/v1/devices/dev-a/token", headers=gw.admin)
        assert r.status_code == 200, r.text
        new = r.json()["token"]
        assert await refused(secured_broker, "dev-a", old)
        await publish(secured_broker, "dev-a", new, "devices/dev-a/telemetry", 2)

        r = await gw.client.patch(
            "/api/v1/devices/dev-a", json={"enabled": False}, headers=gw.admin
        )
        assert r.status_code == 200, r.text
        assert await refused(secured_broker, "dev-a", new)
        r = await gw.client.patch("/api/v1/devices/dev-a", json={"enabled": True}, headers=gw.admin)
        await publish(secured_broker, "dev-a", new, "devices/dev-a/telemetry", 3)

        r = await gw.client.delete("/api/v1/devices/dev-a", headers=gw.admin)
        assert r.status_code == 204
        assert await refused(secured_broker, "dev-a", new)

    @pytest.mark.parametrize(
        ("method", "path", "body"),
        [
            ("POST", "/api/v1/devices/dev-a/token", None),
            ("PATCH", "/api/v1/devices/dev-a", {"enabled": False}),
            ("DELETE", "/api/v1/devices/dev-a", None),
        ],
        ids=["rotated", "disabled", "deleted"],
    )
    async def test_a_live_connection_is_closed_when_its_credential_goes(
        self,
        secured_gateway: Gateway,
        secured_broker: SecuredBroker,
        method: str,
        path: str,
        body: Any,
    ) -> None:
        gw = secured_gateway
        old = await gw.create_device("dev-a")
        async with device_client(secured_broker, "dev-a", old) as client:
            r = await gw.client.request(method, path, json=body, headers=gw.admin)
            assert r.is_success, r.text
            with pytest.raises(aiomqtt.MqttError):  # kicked: the connection is gone
                await publish_until_closed(client)

    async def test_a_device_cannot_take_another_s_session(
        self, secured_gateway: Gateway, secured_broker: SecuredBroker
    ) -> None:
        """A device connects with its id as client id or not at all: a broker gives a session
        (its subscriptions, the messages queued for it) to whoever connects with its client id,
        so a device using the gateway's would take the fleet's telemetry. Ids that start like
        the gateway's client ids are refused."""
        gw = secured_gateway
        token = await gw.create_device("dev-a")
        for other in (gw.settings.mqtt_client_id, "dev-b"):
            client = aiomqtt.Client(
                "127.0.0.1", secured_broker.port, username="dev-a", password=token,
                identifier=other, protocol=aiomqtt.ProtocolVersion.V5, timeout=5,
            )  # fmt: skip
            with pytest.raises(aiomqtt.MqttError, match=r"(?i)not authori"):
                async with client:
                    pass
        assert await mqtt_ready(gw)  # the gateway kept its session
        r = await gw.client.post("/api/v1/devices", json={"id": "fieldgate-x"}, headers=gw.admin)
        assert r.status_code == 409, r.text
        assert r.json()["error"]["code"] == "reserved_device_id"

    async def test_the_broker_s_own_clients_are_never_a_device_s(
        self, secured_gateway: Gateway, secured_broker: SecuredBroker
    ) -> None:
        """A device id equal to a client fieldgate did not make (here the gateway's and the
        admin's own): creating it is refused whole, rotating its token (a device made while the
        broker was not kept) too, and disabling or deleting it leaves that client alone."""
        gw = secured_gateway
        gateway_password = secured_broker.url.split(":")[2].split("@")[0]
        r = await gw.client.post("/api/v1/devices", json={"id": "fieldgate"}, headers=gw.admin)
        assert r.status_code == 409, r.text
        assert r.json()["error"]["code"] == "broker_client_exists"
        assert (
            await gw.client.get("/api/v1/devices/fieldgate", headers=gw.admin)
        ).status_code == 404

        await registry.create_device("fieldgate-admin", "", {}, True)  # made behind its back
        r = await gw.client.post("/api/v1/devices/fieldgate-admin/token", headers=gw.admin)
        assert r.status_code == 409, r.text
        off = {"enabled": False}
        r = await gw.client.patch("/api/v1/devices/fieldgate-admin", json=off, headers=gw.admin)
        assert r.status_code == 200, r.text
        r = await gw.client.delete("/api/v1/devices/fieldgate-admin", headers=gw.admin)
        assert r.status_code == 204
        admin = secured_broker.settings["broker_admin_password"]
        assert not await refused(secured_broker, "fieldgate-admin", admin)
        assert not await refused(secured_broker, "fieldgate", gateway_password)
        assert await mqtt_ready(gw)

    async def test_broker_down_refuses_a_new_device_whole(
        self, secured_gateway: Gateway, secured_broker: SecuredBroker
    ) -> None:
        gw = secured_gateway
        secured_broker.stop()
        r = await gw.client.post("/api/v1/devices", json={"id": "dev-x"}, headers=gw.admin)
        assert r.status_code == 503, r.text
        assert r.json()["error"]["code"] == "broker_unavailable"
        assert "Retry-After" in r.headers
        r = await gw.client.get("/api/v1/devices/dev-x", headers=gw.admin)
        assert r.status_code == 404  # no half-made device

        # a rotation that cannot reach the broker changes nothing
        secured_broker.start()
        token = await gw.create_device("dev-y")
        secured_broker.stop()
        r = await gw.client.post("/api/v1/devices/dev-y/token", headers=gw.admin)
        assert r.status_code == 503
        secured_broker.start()
        assert not await refused(secured_broker, "dev-y", token)
        r = await gw.client.get("/api/v1/devices/dev-y", headers=gw.admin)
        post = await gw.post("dev-y", token, {"values": {"v": 1}})
        assert post.status_code == 200, post.text


@pytest.mark.parametrize("database_url", ["sqlite"], indirect=True)
class TestSync:
    async def test_sync_mends_and_reports_drift(
        self, database_url: str, secured_broker: SecuredBroker
    ) -> None:
        settings = gateway_settings(database_url, secured_broker, broker_sync_interval_s=0.2)
        identities = broker_identities(settings)
        assert identities is not None
        async with running(settings) as gw:
            token_a = await gw.create_device("dev-a")
            # drift made behind the gateway's back, on the broker and in the registry
            await identities.create("gone", "its-token", enabled=True)  # no such device
            await identities.set_enabled("dev-a", False)  # the registry says enabled
            await registry.create_device("unprovisioned", "", {}, True)  # no broker client
            # made before the last minute (a device younger may be between row and client)
            long_ago = datetime(2020, 1, 1, tzinfo=UTC)
            await Device.filter(id="unprovisioned").update(created_at=long_ago)

            async def mended() -> bool:
                clients = {c["username"]: c for c in await identities.clients()}
                return "gone" not in clients and not clients["dev-a"].get("disabled")

            await poll_until(mended, within=10, what="the sync to mend the broker")
            assert not await refused(secured_broker, "dev-a", token_a)  # enabled again

            async def reported() -> dict[str, Any] | None:
                r = await gw.client.get("/readyz", headers=gw.admin)
                check: dict[str, Any] = r.json()["checks"]["broker_identities"]
                return check if check.get("missing") == 1 else None

            check = await poll_until(reported, within=10, what="a sync that saw the drift")
            assert check["ok"] is False
            assert check["missing_examples"] == ["unprovisioned"]
            r = await gw.client.get("/readyz")
            assert r.json()["status"] == "degraded"
            assert r.json()["checks"]["broker_identities"] == {"ok": False}
            clients = {c["username"]: c for c in await identities.clients()}
            assert clients["dev-a"]["textname"] == DEVICE_TEXTNAME
            assert "unprovisioned" not in clients

    async def test_sync_upgrades_a_broker_made_before_senml(
        self, database_url: str, secured_broker: SecuredBroker, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        """A broker provisioned before the SenML topic (device roles and the gateway's role
        without it): the sync adds it, the bridge asks again for the subscription it was
        refused, and the device's SenML is stored."""
        monkeypatch.setattr(bridge, "_RESUBSCRIBE_EVERY_S", 0.2)
        settings = gateway_settings(database_url, secured_broker)
        identities = broker_identities(settings)
        assert identities is not None
        async with running(settings) as gw:
            token = await gw.create_device("dev-a")
        old = [
            ("publishClientSend", "devices/dev-a/senml", role_name("dev-a")),
            ("subscribePattern", "devices/+/senml", GATEWAY_ROLE),
            ("subscribePattern", "$share/+/devices/+/senml", GATEWAY_ROLE),
        ]
        await identities.dynsec.run(
            [
                {"command": "removeRoleACL", "rolename": role, "acltype": kind, "topic": topic}
                for kind, topic, role in old
            ]
        )
        roles = await identities.roles()
        assert not any((kind, topic) in roles[role] for kind, topic, role in old)

        # a new instance (its own client id and session) in a shared group
        later = gateway_settings(
            database_url, secured_broker, mqtt_shared_group="fieldgate", broker_sync_interval_s=0.2
        )
        async with running(later) as gw:
            await poll_until(lambda: mqtt_ready(gw), within=20, what="the bridge to connect")

            async def subscribed() -> bool:
                r = await gw.client.get("/readyz", headers=gw.admin)
                refused: list[str] = r.json()["checks"]["mqtt"]["refused_subscriptions"]
                return refused == []

            await poll_until(subscribed, within=20, what="the SenML subscription")
            roles = await identities.roles()
            assert all((kind, topic) in roles[role] for kind, topic, role in old)
            async with device_client(secured_broker, "dev-a", token) as client:
                await client.publish("devices/dev-a/senml", b'[{"n": "v", "v": 7}]', qos=1)
            await poll_until(lambda: readings(gw, "dev-a"), within=10, what="the SenML reading")
            assert [p["value"] for p in await readings(gw, "dev-a")] == [7.0]

    def test_cli_sync_rotates_missing_devices(
        self, database_url: str, secured_broker: SecuredBroker
    ) -> None:
        env = {
            **os.environ,
            "FIELDGATE_DATABASE_URL": database_url,
            **{f"FIELDGATE_{k.upper()}": v for k, v in secured_broker.settings.items()},
        }

        def cli(*args: str) -> subprocess.CompletedProcess[str]:
            return subprocess.run(
                [*FIELDGATE, *args],
                capture_output=True,
                text=True,
                timeout=60,
                env=env,
            )

        made = cli("devices", "create", "dev-a")
        assert made.returncode == 0, made.stderr
        token = made.stdout.strip()
        assert not asyncio_run(refused(secured_broker, "dev-a", token))

        plain = cli("broker", "sync")
        assert plain.returncode == 0, plain.stderr

        # a device made while the gateway did not keep the broker (no broker settings)
        bare = {k: v for k, v in env.items() if not k.startswith("FIELDGATE_BROKER")}
        made = subprocess.run(
            [*FIELDGATE, "devices", "create", "old-device"],
            capture_output=True,
            text=True,
            timeout=60,
            env=bare,
        )
        assert made.returncode == 0, made.stderr
        fresh = cli("broker", "sync", "--dry-run")  # a device this new may be being made
        assert fresh.returncode == 0, fresh.stderr
        _age_device(database_url, "old-device")
        report = cli("broker", "sync", "--dry-run")
        assert report.returncode == 1
        assert "old-device" in report.stderr
        mended = cli("broker", "sync", "--rotate-missing")
        assert mended.returncode == 0, mended.stderr
        device, new_token = mended.stdout.strip().splitlines()[-1].split("\t")
        assert device == "old-device"
        assert not asyncio_run(refused(secured_broker, "old-device", new_token))

        gone = cli("devices", "delete", "dev-a")
        assert gone.returncode == 0, gone.stderr
        assert asyncio_run(refused(secured_broker, "dev-a", token))


def asyncio_run(coro: Any) -> Any:
    return asyncio.run(coro)


def _age_device(database_url: str, device_id: str) -> None:
    """Make `device_id` look a day old (SQLite)."""
    with closing(sqlite3.connect(database_url.removeprefix("sqlite://"))) as conn:
        conn.execute(
            "UPDATE device SET created_at = '2020-01-01 00:00:00+00:00' WHERE id = ?", (device_id,)
        )
        conn.commit()
