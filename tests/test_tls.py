"""TLS end to end, with a CA and certificates made here (trustme): the MQTT bridge on a real
Mosquitto TLS listener (a CA of our own, then a client certificate too; a wrong CA and a missing
client certificate refused, in /readyz), `fieldgate serve --ssl-certfile --ssl-keyfile` over
HTTPS (one process and workers), and the settings that refuse unusable files.

These are transport tests: they run on SQLite only (the storage path is the one the other tests
run on both databases)."""

from __future__ import annotations

import getpass
import logging
import os
import ssl
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import aiomqtt
import httpx
import orjson
import pytest
import trustme
from pydantic import ValidationError
from typer.testing import CliRunner

from gateway.cli import app as cli_app
from gateway.mqtt.client import BrokerAddress, BrokerClient
from gateway.settings import Settings, describe_invalid
from tests.conftest import (
    ADMIN_TOKEN,
    Gateway,
    SecuredBroker,
    free_port,
    make_settings,
    need_mosquitto,
    poll_until,
    service_up,
    start_gateway,
)
from tests.harness import running

FIELDGATE = Path(sys.executable).parent / "fieldgate"
ADMIN = {"Authorization": f"Bearer {ADMIN_TOKEN}"}


@dataclass(frozen=True)
class Pki:
    """PEM files: our CA, a server certificate for 127.0.0.1 and localhost, a client
    certificate, and another CA that signed neither."""

    ca: Path
    server_cert: Path
    server_key: Path
    client_cert: Path
    client_key: Path
    other_ca: Path

    def client_context(self, *, client_cert: bool = False) -> ssl.SSLContext:
        context = ssl.create_default_context(cafile=self.ca)
        if client_cert:
            context.load_cert_chain(self.client_cert, self.client_key)
        return context


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    directory = tmp_path_factory.mktemp("pki")
    ca, other = trustme.CA(), trustme.CA()
    server = ca.issue_cert("127.0.0.1", "localhost")
    client = ca.issue_cert("fieldgate-gateway")
    files = Pki(
        *(directory / f"{n}.pem" for n in ("ca", "scert", "skey", "ccert", "ckey", "other"))
    )
    ca.cert_pem.write_to_path(str(files.ca))
    other.cert_pem.write_to_path(str(files.other_ca))
    server.cert_chain_pems[0].write_to_path(str(files.server_cert))
    server.private_key_pem.write_to_path(str(files.server_key))
    client.cert_chain_pems[0].write_to_path(str(files.client_cert))
    client.private_key_pem.write_to_path(str(files.client_key))
    return files


# --- MQTT over TLS --------------------------------------------------------------------------


@dataclass
class TlsBroker:
    """A private Mosquitto with one TLS listener on a free port (like conftest's `Broker`)."""

    port: int
    workdir: Path
    pki: Pki
    require_certificate: bool
    process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"mqtts://127.0.0.1:{self.port}"

    @property
    def log(self) -> str:
        return (self.workdir / "mosquitto.log").read_text(errors="replace")

    def start(self) -> None:
        self.workdir.mkdir(parents=True, exist_ok=True)
        conf = self.workdir / "mosquitto.conf"
        conf.write_text(
            f"listener {self.port} 127.0.0.1\n"
            f"cafile {self.pki.ca}\n"
            f"certfile {self.pki.server_cert}\n"
            f"keyfile {self.pki.server_key}\n"
            f"require_certificate {str(self.require_certificate).lower()}\n"
            "allow_anonymous true\n"
            f"user {getpass.getuser()}\n"  # as root, mosquitto would switch to its own user
            f"log_dest file {self.workdir}/mosquitto.log\n"
        )
        self.process = subprocess.Popen(["mosquitto", "-c", str(conf)])
        deadline = time.monotonic() + 10
        while not service_up("127.0.0.1", self.port):
            if self.process.poll() is not None or time.monotonic() > deadline:
                pytest.fail(f"mosquitto did not start on port {self.port}: {self.log[-2000:]}")
            time.sleep(0.02)

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            self.process.wait(timeout=15)


@pytest.fixture(params=[False, True], ids=["server-cert", "client-cert-required"])
def tls_broker(request: pytest.FixtureRequest, tmp_path: Path, pki: Pki) -> Iterator[TlsBroker]:
    need_mosquitto()
    broker = TlsBroker(free_port(), tmp_path / "mosquitto", pki, request.param)
    broker.start()
    yield broker
    broker.stop()


def _tls_settings(tmp_path: Path, broker: TlsBroker, **overrides: Any) -> Settings:
    values: dict[str, Any] = {
        "mqtt_url": broker.url,
        "mqtt_client_id": f"fg-tls-{broker.port}",
        "mqtt_session_expiry_s": 60,
        "mqtt_reconnect_min_s": 0.05,
        "mqtt_reconnect_max_s": 0.2,
    }
    values.update(overrides)
    return make_settings(f"sqlite://{tmp_path}/fieldgate.db", **values)


async def _mqtt_check(gw: Gateway) -> dict[str, Any]:
    """/readyz's broker check, with its details (they need a token)."""
    check: dict[str, Any] = (await gw.client.get("/readyz", headers=ADMIN)).json()["checks"]["mqtt"]
    return check


async def _points(gw: Gateway, device_id: str) -> list[dict[str, Any]]:
    r = await gw.client.get(
        f"/api/v1/devices/{device_id}/telemetry",
        params={"metric": "temperature", "start": "2023-01-01T00:00:00Z"},
        headers=ADMIN,
    )
    assert r.status_code == 200, r.text
    points: list[dict[str, Any]] = r.json()["points"]
    return points


async def _publish(broker: TlsBroker, device_id: str, value: float) -> None:
    """Publish one reading over TLS (QoS 1: returns once the broker has it)."""
    context = broker.pki.client_context(client_cert=broker.require_certificate)
    async with aiomqtt.Client(
        "127.0.0.1", broker.port, tls_context=context, identifier=f"pub-{device_id}"
    ) as client:
        body = f'{{"ts": "2026-01-01T00:00:00Z", "values": {{"temperature": {value}}}}}'
        await client.publish(f"devices/{device_id}/telemetry", body, qos=1)


async def test_the_bridge_stores_what_is_published_over_tls(
    tmp_path: Path, tls_broker: TlsBroker, pki: Pki
) -> None:
    client_files = (
        {"mqtt_client_certfile": pki.client_cert, "mqtt_client_keyfile": pki.client_key}
        if tls_broker.require_certificate
        else {}
    )
    settings = _tls_settings(tmp_path, tls_broker, mqtt_ca_file=pki.ca, **client_files)
    async for gw in start_gateway(settings):
        await poll_until(partial(_ok_check, gw), within=10, what="the bridge to connect")
        await gw.create_device("tls-1")
        await _publish(tls_broker, "tls-1", 21.5)
        points = await poll_until(partial(_points, gw, "tls-1"), within=10, what="the reading")
        assert points == [{"ts": "2026-01-01T00:00:00Z", "value": 21.5}]
        check = await _mqtt_check(gw)
        assert check["broker"] == tls_broker.url
        assert check["last_error"] is None


@pytest.mark.parametrize("tls_broker", [False], ids=["server-cert"], indirect=True)
async def test_one_context_per_address_and_paho_s_own_logger_once_connected(
    tls_broker: TlsBroker, pki: Pki
) -> None:
    address = BrokerAddress.from_url(tls_broker.url, ca_file=pki.ca)
    for n in range(2):
        client = BrokerClient(
            address, client_id=f"ctx-{n}", session_expiry_s=0, receive_maximum=10, keepalive_s=10
        )
        async with client:
            assert client.connected
            assert client._paho._ssl_context is address.tls_context  # made once, reused
            # The error recorder is paho's logger only until CONNACK (no cost per message).
            assert client._paho.logger is logging.getLogger("mqtt")


def test_the_broker_admin_connects_with_the_same_tls_files(pki: Pki) -> None:
    """FIELDGATE_BROKER_ADMIN's connection (Mosquitto dynsec) goes to the broker the bridge
    uses, so it trusts the same CA and shows the same client certificate."""
    from gateway.provisioning import broker_identities

    settings = make_settings(
        "sqlite://x.db",
        mqtt_url="mqtts://127.0.0.1:8883",
        mqtt_ca_file=pki.ca,
        broker_admin="mosquitto-dynsec",
        broker_admin_username="fieldgate-admin",
        broker_admin_password="a-password",
    )
    identities = broker_identities(settings)
    assert identities is not None
    address = identities.dynsec.address
    assert address.tls_context is not None
    assert identities.dynsec._tls_context is address.tls_context
    assert len(address.tls_context.get_ca_certs()) == 1  # ours, not the system's


async def _ok_check(gw: Gateway) -> dict[str, Any] | None:
    check = await _mqtt_check(gw)
    return check if check["ok"] else None


async def _error_check(gw: Gateway, reason: str) -> dict[str, Any] | None:
    check = await _mqtt_check(gw)
    return check if reason in (check["last_error"] or "") else None


@pytest.mark.parametrize(
    ("tls_broker", "files", "reason", "hint"),
    [
        # the broker's certificate is from our CA; the gateway trusts another
        (
            False,
            {"mqtt_ca_file": "other_ca"},
            "CERTIFICATE_VERIFY_FAILED",
            "FIELDGATE_MQTT_CA_FILE",
        ),
        # the broker wants a client certificate; the gateway has none
        (True, {"mqtt_ca_file": "ca"}, "CERTIFICATE_REQUIRED", "FIELDGATE_MQTT_CLIENT_CERTFILE"),
    ],
    ids=["wrong-ca", "no-client-cert"],
    indirect=["tls_broker"],
)
async def test_a_refused_tls_connection_is_shown_in_readyz_and_retried(
    tmp_path: Path,
    tls_broker: TlsBroker,
    pki: Pki,
    files: dict[str, str],
    reason: str,
    hint: str,
) -> None:
    settings = _tls_settings(tmp_path, tls_broker, **{k: getattr(pki, v) for k, v in files.items()})
    async for gw in start_gateway(settings):
        started = time.monotonic()
        check = await poll_until(
            partial(_error_check, gw, reason), within=10, what=f"{reason} in /readyz"
        )
        # Told at once, not after the client's 10 s connect timeout.
        assert time.monotonic() - started < 5
        assert check["ok"] is False
        assert check["connects"] == 0
        assert check["last_error"].startswith("TLS: ")
        assert hint in check["last_error"]
        ready = await gw.client.get("/readyz")
        assert ready.status_code == 200  # a broker outage degrades; HTTP ingestion goes on
        assert ready.json()["status"] == "degraded"

        # It keeps trying: the broker refuses one handshake after another.
        async def attempts() -> int | None:
            seen = tls_broker.log.count("OpenSSL Error")  # one line per refused handshake
            return seen if seen >= 3 else None

        await poll_until(attempts, within=10, what="three connection attempts")
        await gw.create_device("tls-2")
        await _publish(tls_broker, "tls-2", 1.0)  # a publisher with the right files gets in
        assert (await _mqtt_check(gw))["connects"] == 0
        assert await _points(gw, "tls-2") == []


@pytest.mark.parametrize("database_url", ["sqlite"], indirect=True)
async def test_broker_init_with_a_tls_listener_for_devices(
    database_url: str, tmp_path: Path, pki: Pki
) -> None:
    """`fieldgate broker init --tls-port`: devices connect over TLS with their id and token,
    the gateway keeps its local plain listener; anonymous clients are refused on both."""
    tls_port = free_port()
    broker = SecuredBroker(free_port(), tmp_path / "broker")
    broker.init_options = (
        *("--tls-port", str(tls_port), "--tls-host", "127.0.0.1"),
        *("--tls-certfile", str(pki.server_cert), "--tls-keyfile", str(pki.server_key)),
    )
    broker.start()
    try:
        settings = make_settings(
            database_url, **broker.settings, mqtt_client_id="fieldgate-tls-init"
        )
        async with running(settings) as gw:
            await poll_until(partial(_ok_check, gw), within=20, what="the bridge to connect")
            r = await gw.client.post("/api/v1/devices", json={"id": "tls-dev"}, headers=ADMIN)
            assert r.status_code == 201, r.text
            token = r.json()["token"]

            def device(username: str | None, password: str | None) -> aiomqtt.Client:
                return aiomqtt.Client(
                    "127.0.0.1",
                    tls_port,
                    identifier=username,
                    username=username,
                    password=password,
                    tls_context=pki.client_context(),
                    timeout=5,
                )

            async with device("tls-dev", token) as client:
                payload = orjson.dumps({"values": {"temperature": 7.0}})
                await client.publish("devices/tls-dev/telemetry", payload, qos=1)
            points = await poll_until(partial(_points, gw, "tls-dev"), within=10, what="a reading")
            assert [p["value"] for p in points] == [7.0]
            with pytest.raises(aiomqtt.MqttError, match=r"(?i)not authori"):
                async with device(None, None):
                    pass
    finally:
        broker.stop()


@pytest.mark.parametrize("tls_broker", [False], ids=["server-cert"], indirect=True)
async def test_the_simulator_publishes_over_tls(
    tmp_path: Path, tls_broker: TlsBroker, pki: Pki
) -> None:
    from simulator.mqtt import MqttPool

    settings = _tls_settings(tmp_path, tls_broker, mqtt_ca_file=pki.ca)
    async for gw in start_gateway(settings):
        await poll_until(partial(_ok_check, gw), within=10, what="the bridge to connect")
        await gw.create_device("sim-tls")
        async with MqttPool(tls_broker.url, size=1, ca_file=pki.ca) as pool:
            body = b'{"ts": "2026-01-01T00:00:00Z", "values": {"temperature": 3.5}}'
            await pool.publish(0, "sim-tls", body)
        points = await poll_until(partial(_points, gw, "sim-tls"), within=10, what="the reading")
        assert points == [{"ts": "2026-01-01T00:00:00Z", "value": 3.5}]


def test_the_simulator_refuses_a_ca_without_mqtts(pki: Pki) -> None:
    from simulator.run import SimulationConfig

    with pytest.raises(ValueError, match="--mqtt-ca is for TLS"):
        SimulationConfig(mqtt_ca=pki.ca).check()
    SimulationConfig(mqtt_url="mqtts://127.0.0.1", mqtt_ca=pki.ca).check()


# --- HTTPS: `fieldgate serve --ssl-certfile --ssl-keyfile` ----------------------------------


@pytest.mark.e2e
@pytest.mark.parametrize("workers", [1, 2])
def test_serve_over_https(tmp_path: Path, pki: Pki, workers: int) -> None:
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("FIELDGATE_")}
    env.update(
        FIELDGATE_DATABASE_URL=f"sqlite://{tmp_path}/fieldgate.db",
        FIELDGATE_ADMIN_TOKEN=ADMIN_TOKEN,
        FIELDGATE_MQTT_URL="",
        FIELDGATE_WORKERS_ON_SQLITE="true",
    )
    log = tmp_path / "serve.log"
    command = [
        str(FIELDGATE), "serve", "--port", str(port), "--workers", str(workers),
        "--ssl-certfile", str(pki.server_cert), "--ssl-keyfile", str(pki.server_key),
    ]  # fmt: skip
    with log.open("wb") as out:
        process = subprocess.Popen(command, cwd=tmp_path, env=env, stdout=out, stderr=out)
    try:
        url = f"https://127.0.0.1:{port}"
        with httpx.Client(base_url=url, verify=pki.client_context(), timeout=5) as client:
            deadline = time.monotonic() + 30
            while True:
                if process.poll() is not None:
                    pytest.fail(f"fieldgate serve exited: {log.read_text()[-3000:]}")
                try:
                    healthz = client.get("/healthz")
                    break
                except httpx.TransportError:
                    if time.monotonic() > deadline:
                        pytest.fail(f"no /healthz over HTTPS: {log.read_text()[-3000:]}")
                    time.sleep(0.05)  # poll interval under the deadline above
            assert healthz.status_code == 200
            assert healthz.json() == {"status": "ok"}
            assert client.get("/api/v1/devices", headers=ADMIN).status_code == 200
        # Plain HTTP on the HTTPS port gets no answer that could be mistaken for one.
        try:
            plain = httpx.get(f"http://127.0.0.1:{port}/healthz", timeout=5)
        except httpx.TransportError:
            pass
        else:
            assert plain.status_code != 200
        # A client that does not trust our CA refuses the server.
        with pytest.raises(httpx.ConnectError, match="CERTIFICATE_VERIFY_FAILED"):
            httpx.get(f"{url}/healthz", timeout=5)
        assert f"serving on https://127.0.0.1:{port}" in log.read_text()
    finally:
        process.terminate()
        process.wait(timeout=30)
    assert "Traceback" not in log.read_text(), log.read_text()[-3000:]


# --- Settings: both files or neither, and they must load ----------------------------------


def _refusal(**values: Any) -> str:
    with pytest.raises(ValidationError) as caught:
        make_settings("sqlite://x.db", **values)
    return describe_invalid(caught.value)


class TestSettings:
    def test_files_that_load_are_accepted(self, pki: Pki) -> None:
        settings = make_settings(
            "sqlite://x.db",
            ssl_certfile=str(pki.server_cert),
            ssl_keyfile=str(pki.server_key),
            mqtt_url="mqtts://127.0.0.1:8883",
            mqtt_ca_file=str(pki.ca),
            mqtt_client_certfile=str(pki.client_cert),
            mqtt_client_keyfile=str(pki.client_key),
        )
        assert settings.ssl_certfile == pki.server_cert
        assert settings.mqtt_ca_file == pki.ca

    def test_empty_means_unset(self) -> None:
        settings = make_settings("sqlite://x.db", ssl_certfile="", ssl_keyfile="", mqtt_ca_file="")
        assert (settings.ssl_certfile, settings.ssl_keyfile, settings.mqtt_ca_file) == (None,) * 3

    @pytest.mark.parametrize(
        ("pair", "names"),
        [
            ("ssl", "FIELDGATE_SSL_CERTFILE and FIELDGATE_SSL_KEYFILE go together"),
            ("mqtt", "FIELDGATE_MQTT_CLIENT_CERTFILE and FIELDGATE_MQTT_CLIENT_KEYFILE go"),
        ],
    )
    def test_a_certificate_without_its_key_is_refused(
        self, pki: Pki, pair: str, names: str
    ) -> None:
        values: dict[str, Any] = (
            {"ssl_certfile": pki.server_cert}
            if pair == "ssl"
            else {"mqtt_url": "mqtts://h", "mqtt_client_keyfile": pki.client_key}
        )
        assert names in _refusal(**values)

    def test_a_missing_file_is_named(self, pki: Pki, tmp_path: Path) -> None:
        missing = tmp_path / "nope.pem"
        message = _refusal(ssl_certfile=missing, ssl_keyfile=pki.server_key)
        assert message == f"FIELDGATE_SSL_CERTFILE: {missing} does not exist"
        message = _refusal(mqtt_url="mqtts://h", mqtt_ca_file=missing)
        assert message == f"FIELDGATE_MQTT_CA_FILE: {missing} does not exist"

    def test_files_that_do_not_load_are_refused(self, pki: Pki) -> None:
        message = _refusal(ssl_certfile=pki.server_cert, ssl_keyfile=pki.client_key)
        assert "FIELDGATE_SSL_CERTFILE and FIELDGATE_SSL_KEYFILE: cannot load" in message
        assert "KEY_VALUES_MISMATCH" in message
        assert "\n" not in message
        message = _refusal(mqtt_url="mqtts://h", mqtt_ca_file=pki.server_key)
        assert message.startswith("FIELDGATE_MQTT_CA_FILE: ")
        assert "holds no PEM certificate" in message

    def test_a_ca_asks_for_mqtts(self, pki: Pki) -> None:
        message = _refusal(mqtt_url="mqtt://127.0.0.1:1883", mqtt_ca_file=pki.ca)
        assert "FIELDGATE_MQTT_URL must start with mqtts://" in message

    def test_serve_refuses_a_lone_option_in_one_line(
        self, pki: Pki, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        monkeypatch.chdir(tmp_path)  # no stray .env
        for name in [k for k in os.environ if k.startswith("FIELDGATE_")]:
            monkeypatch.delenv(name)
        monkeypatch.setenv("FIELDGATE_DATABASE_URL", f"sqlite://{tmp_path}/x.db")
        result = CliRunner().invoke(cli_app, ["serve", "--ssl-certfile", str(pki.server_cert)])
        assert result.exit_code == 2, result.output
        assert result.output == (
            "fieldgate: invalid configuration:\n"
            "FIELDGATE_SSL_CERTFILE and FIELDGATE_SSL_KEYFILE go together: set both or neither\n"
        )
        assert not (tmp_path / "x.db").exists()  # stopped before it touched the database
