"""What a new user meets in the first hour: a second `serve` on a taken port, a database that does
not exist, an invalid setting next to an admin token, the first-start banner, two gateways with
one MQTT client id, help text piped to a file, and a README that lists every setting."""

from __future__ import annotations

import contextlib
import logging
import os
import re
import secrets
import signal
import subprocess
import sys
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import aiomqtt
import pytest

from gateway.mqtt.client import BrokerAddress
from gateway.settings import Settings
from tests.conftest import (
    PG_HOST,
    PG_PORT,
    PG_USER,
    Gateway,
    GatewayProcess,
    need_service,
    poll_until,
    start_mqtt_gateway,
)

README = Path(__file__).resolve().parent.parent / "README.md"
CLI = "from gateway.cli import main; main()"


def fieldgate(*args: str, cwd: Path, **env: str) -> subprocess.CompletedProcess[str]:
    """The CLI as a user runs it (stdout and stderr pipes, not a terminal)."""
    clean = {k: v for k, v in os.environ.items() if not k.startswith("FIELDGATE_")}
    return subprocess.run(
        [sys.executable, "-c", CLI, *args],
        cwd=cwd,  # no stray .env
        env={**clean, **{f"FIELDGATE_{k.upper()}": v for k, v in env.items()}},
        capture_output=True,
        text=True,
        timeout=120,
    )


async def _mqtt_check(gw: GatewayProcess) -> dict[str, Any]:
    async with gw.client() as client:  # the details need a token
        check: dict[str, Any] = (await client.get("/readyz")).json()["checks"]["mqtt"]
        return check


async def test_a_second_serve_on_a_taken_port_stops_before_the_database_and_the_broker(
    serve: Callable[..., GatewayProcess], tmp_path: Path, machine_broker: str, topic_prefix: str
) -> None:
    first = serve(
        f"sqlite://{tmp_path}/first.sqlite3",
        mqtt_url=machine_broker,
        mqtt_topic_prefix=topic_prefix,
        mqtt_client_id=f"fg-test-{topic_prefix}",
        mqtt_session_expiry_s="60",
    )
    await first.start()

    async def connected() -> bool:
        return bool((await _mqtt_check(first))["ok"])

    await poll_until(connected, within=20, what="the first gateway's bridge to connect")

    # The README's old trap: the same command again (same client id), on another database.
    second_db = tmp_path / "second.sqlite3"
    env = {k.removeprefix("FIELDGATE_").lower(): v for k, v in first.env.items()}
    second = fieldgate(
        "serve",
        "--port",
        str(first.port),
        cwd=tmp_path,
        **{**env, "database_url": f"sqlite://{second_db}"},
    )
    assert second.returncode == 2, second.stderr
    assert second.stderr.strip().splitlines() == [
        f"fieldgate: cannot listen on 127.0.0.1:{first.port}: Address already in use (is "
        "another fieldgate serve running? stop it, or pick another --port)"
    ]
    assert not second_db.exists()  # it stopped before migrating
    check = await _mqtt_check(first)
    assert check["ok"] is True, check
    assert check["connects"] == 1, check  # its session was never taken
    assert check["sessions_taken_over"] == 0, check


@pytest.fixture
async def quick_mqtt_gateway(
    tmp_path: Path, machine_broker: str, topic_prefix: str
) -> AsyncIterator[Gateway]:
    """The app with its bridge on the machine's broker, reconnecting within 0.2 s."""
    async for gw in start_mqtt_gateway(
        f"sqlite://{tmp_path}/db.sqlite3",
        machine_broker,
        topic_prefix,
        mqtt_reconnect_min_s=0.05,
        mqtt_reconnect_max_s=0.2,
    ):
        yield gw


async def test_a_client_id_clash_is_logged_and_shown_in_readyz(
    quick_mqtt_gateway: Gateway, machine_broker: str, caplog: pytest.LogCaptureFixture
) -> None:
    gw = quick_mqtt_gateway
    caplog.set_level(logging.ERROR, logger="fieldgate.mqtt")
    client_id = gw.settings.mqtt_client_id
    broker = BrokerAddress.from_url(machine_broker)

    async def mqtt() -> dict[str, Any]:
        check: dict[str, Any] = (await gw.client.get("/readyz", headers=gw.admin)).json()["checks"][
            "mqtt"
        ]
        return check

    assert (await mqtt())["client_id_clash"] is None
    # Another client with the gateway's client id, connecting again whenever the gateway has
    # taken the session back: the broker closes the gateway's connection each time (Mosquitto
    # 2.0.11 without a reason code; newer brokers say 0x8E, session taken over).
    for _ in range(3):
        connects = (await mqtt())["connects"]
        intruder = aiomqtt.Client(
            broker.host, broker.port, identifier=client_id, protocol=aiomqtt.ProtocolVersion.V5
        )
        with contextlib.suppress(aiomqtt.MqttError):  # taken back by the gateway at once
            async with intruder:
                pass

        async def taken_back(connects: int = connects) -> bool:
            check = await mqtt()
            return bool(check["state"] == "connected" and check["connects"] > connects)

        await poll_until(taken_back, within=20, what="the gateway to connect again")
    ready = (await gw.client.get("/readyz", headers=gw.admin)).json()
    check = ready["checks"]["mqtt"]
    assert ready["status"] == "degraded", ready
    assert check["ok"] is False
    assert check["sessions_taken_over"] >= 1
    clash = check["client_id_clash"]
    assert f"client id {client_id!r}" in clash
    assert "FIELDGATE_MQTT_CLIENT_ID" in clash
    assert clash in [r.getMessage() for r in caplog.records]


async def test_first_start_banner_names_the_real_address_and_the_database(
    serve: Callable[..., GatewayProcess], tmp_path: Path
) -> None:
    gw = serve(f"sqlite://{tmp_path}/fresh.sqlite3", admin_token="")
    await gw.start()
    assert gw.terminate() in (0, -signal.SIGTERM)  # uvicorn re-raises the signal once stopped
    log = gw.log_path.read_text()
    token = re.search(r"\b(fga_[A-Za-z0-9_-]{43})\b", log)
    assert token is not None, log
    banner_at = log.index(token.group(1))
    assert f"http://127.0.0.1:{gw.port}/api/v1/devices" in log
    assert "HOST:PORT" not in log
    assert "Tortoise-ORM shutdown" not in log
    migrated = log.index(f"database sqlite://{tmp_path}/fresh.sqlite3 is migrated")
    serving = log.index(f"fieldgate is serving on http://127.0.0.1:{gw.port}")
    assert migrated < banner_at < serving


@pytest.mark.postgres
@pytest.mark.parametrize("command", [["migrate"], ["serve", "--port", "0"], ["devices", "list"]])
def test_a_missing_postgres_database_is_two_lines_saying_createdb(
    tmp_path: Path, command: list[str]
) -> None:
    need_service("PostgreSQL", PG_HOST, PG_PORT)
    password = "pw-" + secrets.token_hex(8)
    name = f"fg_missing_{secrets.token_hex(4)}"
    url = f"postgres://{PG_USER}:{password}@{PG_HOST}:{PG_PORT}/{name}"
    result = fieldgate(*command, cwd=tmp_path, database_url=url, mqtt_url="")
    assert result.returncode == 2
    assert result.stdout == ""
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 2, result.stderr
    assert f"database {name!r} does not exist" in lines[0]
    assert f"createdb -h {PG_HOST} -p {PG_PORT} -U {PG_USER} {name}" in lines[1]
    assert password not in result.stderr
    assert f"{PG_USER}:***@" in lines[0]


class TestInvalidSettings:
    @pytest.mark.parametrize("command", [["serve"], ["migrate"], ["devices", "list"]])
    def test_named_in_a_line_each_with_no_value_printed(
        self, tmp_path: Path, command: list[str]
    ) -> None:
        token = "admin-" + secrets.token_hex(16)
        result = fieldgate(
            *command,
            cwd=tmp_path,
            admin_token=token,
            max_messages=f"lots-{token}",
            environment="staging",
        )
        assert result.returncode == 2
        assert result.stderr.strip().splitlines() == [
            "fieldgate: invalid configuration:",
            "FIELDGATE_ENVIRONMENT: Input should be 'production' or 'development'",
            "FIELDGATE_MAX_MESSAGES: Input should be a valid integer, unable to parse string "
            "as an integer",
        ]
        assert token[6:] not in result.stdout + result.stderr
        assert not (tmp_path / "fieldgate-data").exists()

    def test_a_short_admin_token_is_refused_without_showing_it(self, tmp_path: Path) -> None:
        token = "sh0rt-" + secrets.token_hex(4)
        result = fieldgate("serve", cwd=tmp_path, admin_token=token)
        assert result.returncode == 2
        assert "FIELDGATE_ADMIN_TOKEN must be at least 16 characters" in result.stderr
        assert token not in result.stdout + result.stderr
        assert len(result.stderr.strip().splitlines()) == 2

    def test_a_password_in_the_database_url_is_not_shown(self, tmp_path: Path) -> None:
        result = fieldgate("migrate", cwd=tmp_path, database_url="mysql://u:s3cr3t-pw@h/db")
        assert result.returncode == 2
        assert "FIELDGATE_DATABASE_URL must start with sqlite:// or postgres://" in result.stderr
        assert "s3cr3t-pw" not in result.stderr

    @pytest.mark.parametrize(
        ("url", "why"),
        [
            ("mqtt://u:s3cr3t-pw@127.0.0.1:99999", "Port out of range"),
            ("mqtt://u:s3cr3t-pw@127.0.0.1:notaport", "could not be cast to integer"),
            ("mqtts://u:s3cr3t-pw@[::1", "Invalid IPv6 URL"),
            ("mqtt://", "names no host"),
        ],
    )
    def test_an_unusable_mqtt_url_is_refused_before_the_database(
        self, tmp_path: Path, url: str, why: str
    ) -> None:
        result = fieldgate("serve", cwd=tmp_path, mqtt_url=url)
        assert result.returncode == 2
        assert "FIELDGATE_MQTT_URL" in result.stderr
        assert why in result.stderr
        assert "s3cr3t-pw" not in result.stdout + result.stderr
        assert len(result.stderr.strip().splitlines()) == 2
        assert not (tmp_path / "fieldgate-data").exists()


def test_help_piped_to_a_file_keeps_whole_values(tmp_path: Path) -> None:
    result = fieldgate("simulate", "--help", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert "…" not in result.stdout
    assert "nan,wrong_type,invalid_metric,future_timestamp,broken_json" in result.stdout
    top = fieldgate("--help", cwd=tmp_path)
    assert "Load a gateway like a fleet of devices, with faults on purpose" in top.stdout


def test_the_readme_settings_tables_name_every_setting() -> None:
    text = README.read_text()
    named: set[str] = set()
    for row in re.findall(r"^\| `(FIELDGATE_[A-Z0-9_]+)`(?: / `(_[A-Z0-9_]+)`)? \|", text, re.M):
        first, other = row
        named.add(first)
        if other:  # `FIELDGATE_MQTT_RECONNECT_MIN_S` / `_MAX_S`
            named.add(first[: -len(other)] + other)
    wanted = {f"FIELDGATE_{field.upper()}" for field in Settings.model_fields}
    assert sorted(wanted - named) == []
    assert sorted(named - wanted) == []


@pytest.mark.parametrize(
    ("bind", "shown"), [("0.0.0.0", "http://127.0.0.1:"), ("127.0.0.1", "http://127.0.0.1:")]
)
def test_the_address_shown_is_one_a_client_can_use(bind: str, shown: str) -> None:
    import socket

    from gateway.server import base_url

    with socket.socket() as sock:
        sock.bind((bind, 0))
        assert base_url(sock) == f"{shown}{sock.getsockname()[1]}"
