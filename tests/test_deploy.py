"""deploy/ as far as it can be checked without systemd or Docker running: the unit verified by
systemd-analyze (when installed) and its hardening asserted, the compose file and the env example
naming only settings that exist, the Mosquitto config accepted by a real Mosquitto, and the
shutdown grace of both long enough for the gateway's own drain."""

from __future__ import annotations

import getpass
import re
import shutil
import subprocess
import sys
import time
import tomllib
from pathlib import Path
from typing import Any

import pytest
import yaml  # type: ignore[import-untyped]  # PyYAML: installed with schemathesis (dev)

from gateway.mqtt import bridge
from gateway.settings import Settings
from tests.conftest import free_port, need_mosquitto, service_up

ROOT = Path(__file__).resolve().parent.parent
DEPLOY = ROOT / "deploy"
SETTING_NAMES = {f"FIELDGATE_{name.upper()}" for name in Settings.model_fields}
SETTING_RE = re.compile(r"\bFIELDGATE_[A-Z0-9_]+\b")
GATEWAYS = ("gateway-1", "gateway-2")


def _default(name: str) -> Any:
    return Settings.model_fields[name].default


# SIGTERM: uvicorn lets requests run for shutdown_timeout_s, then the lifespan stops the MQTT
# bridge (bounded by its _STOP_TIMEOUT_S) and drains the writer: the service manager must wait
# for both, with room for the drain, before it kills the process.
NEEDED_STOP_S = _default("shutdown_timeout_s") + bridge._STOP_TIMEOUT_S + 10


def _seconds(text: str) -> float:
    """A systemd or compose duration (`60s`, `1m30s`, `45`) in seconds."""
    units = {"ms": 0.001, "s": 1, "m": 60, "min": 60, "h": 3600}
    parts = re.findall(r"(\d+(?:\.\d+)?)\s*(ms|min|s|m|h)?", text.strip())
    assert parts, f"not a duration: {text!r}"
    return sum(float(n) * units[u or "s"] for n, u in parts)


def _unit() -> dict[str, list[str]]:
    """[Service] keys of the unit, each with every value it is given (a key may repeat)."""
    section = None
    keys: dict[str, list[str]] = {}
    for line in (DEPLOY / "fieldgate.service").read_text().splitlines():
        line = line.strip()
        if not line or line.startswith(("#", ";")):
            continue
        if line.startswith("["):
            section = line
        elif section == "[Service]":
            key, _, value = line.partition("=")
            keys.setdefault(key.strip(), []).append(value.strip())
    return keys


def _need_tool(name: str) -> str:
    """The tool's path; skipped when it is not installed (in CI too: a tool, not a service)."""
    path = shutil.which(name)
    if path is None:
        pytest.skip(f"{name} is not installed on this machine; the check needs it")
    return path


class TestSystemdUnit:
    def test_hardening(self) -> None:
        unit = _unit()

        def one(key: str) -> str:
            assert key in unit, f"the unit sets no {key}="
            return unit[key][-1]

        assert one("DynamicUser") == "yes" or one("User") not in ("", "root")
        assert one("StateDirectory") == "fieldgate"
        assert one("ProtectSystem") == "strict"
        assert one("ProtectHome") == "yes"
        assert one("NoNewPrivileges") == "yes"
        assert one("PrivateTmp") == "yes"
        assert one("CapabilityBoundingSet") == ""
        assert set(one("RestrictAddressFamilies").split()) <= {"AF_INET", "AF_INET6", "AF_UNIX"}
        assert "@system-service" in unit["SystemCallFilter"]
        assert one("Restart") == "on-failure"
        assert one("EnvironmentFile").startswith("/etc/")
        assert "fieldgate serve" in one("ExecStart")

    def test_stop_timeout_covers_the_gateways_drain(self) -> None:
        stop_s = _seconds(_unit()["TimeoutStopSec"][-1])
        assert stop_s >= NEEDED_STOP_S, (
            f"TimeoutStopSec={stop_s:g}s would SIGKILL the gateway while it drains "
            f"(needs {NEEDED_STOP_S:g}s: shutdown_timeout_s + the MQTT bridge's stop + the writer)"
        )

    @pytest.fixture
    def runnable_unit(self, tmp_path: Path) -> Path:
        """The unit with ExecStart pointing at this checkout's `fieldgate` (verify checks that
        the command exists)."""
        fieldgate = Path(sys.executable).parent / "fieldgate"
        assert fieldgate.exists(), f"{fieldgate}: install the project (pip install -e .)"
        text = (DEPLOY / "fieldgate.service").read_text()
        assert "ExecStart=/opt/fieldgate/bin/fieldgate " in text
        unit = tmp_path / "fieldgate.service"
        unit.write_text(text.replace("/opt/fieldgate/bin/fieldgate", str(fieldgate)))
        return unit

    def test_systemd_analyze_verify(self, runnable_unit: Path) -> None:
        tool = _need_tool("systemd-analyze")
        done = subprocess.run(
            [tool, "verify", str(runnable_unit)], capture_output=True, text=True, timeout=60
        )
        # An unknown or misspelt key is only a warning (exit status 0): no output is the pass.
        assert (done.returncode, done.stdout + done.stderr) == (0, "")

    def test_systemd_analyze_security_exposure_is_low(self, runnable_unit: Path) -> None:
        tool = _need_tool("systemd-analyze")
        version = subprocess.run([tool, "--version"], capture_output=True, text=True, timeout=30)
        found = re.match(r"systemd (\d+)", version.stdout)
        if found is None or int(found[1]) < 250:
            pytest.skip(f"systemd-analyze security --offline needs systemd 250: {version.stdout}")
        # --threshold is in tenths: exit status 0 when the exposure is at most 2.0 ("OK").
        done = subprocess.run(
            [tool, "security", "--offline=yes", "--threshold=20", str(runnable_unit)],
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert done.returncode == 0, done.stdout[-3000:] + done.stderr


class TestCompose:
    @pytest.fixture
    def compose(self) -> dict[str, Any]:
        document = yaml.safe_load((DEPLOY / "compose.yaml").read_text())
        assert isinstance(document, dict)
        return document

    def test_services(self, compose: dict[str, Any]) -> None:
        services = compose["services"]
        assert set(services) == {"mosquitto", "postgres", "migrate", *GATEWAYS}
        for name in ("mosquitto", "postgres", *GATEWAYS):
            test = services[name]["healthcheck"]["test"]
            assert test[0] == "CMD", name
            assert len(test) > 1, name
        assert "/readyz" in " ".join(services["gateway-1"]["healthcheck"]["test"])

    def test_gateways_share_one_subscription_and_one_database(
        self, compose: dict[str, Any]
    ) -> None:
        envs = [compose["services"][name]["environment"] for name in GATEWAYS]
        groups = {env["FIELDGATE_MQTT_SHARED_GROUP"] for env in envs}
        assert len(groups) == 1
        assert "" not in groups
        (group,) = groups
        client_ids = [env["FIELDGATE_MQTT_CLIENT_ID"] for env in envs]
        assert len(set(client_ids)) == len(GATEWAYS), "client ids must differ per instance"
        assert {env["FIELDGATE_MQTT_URL"] for env in envs} == {"mqtt://mosquitto:1883"}
        urls = {env["FIELDGATE_DATABASE_URL"] for env in envs}
        assert len(urls) == 1
        assert urls.pop().startswith("postgres://")
        for env in envs:  # the values are settings the gateway accepts
            values = {**env, "FIELDGATE_ADMIN_TOKEN": "x" * 32}
            fields = {k.removeprefix("FIELDGATE_").lower(): v for k, v in values.items()}
            settings = Settings(_env_file=None, **fields)
            assert settings.mqtt_shared_group == group
            assert settings.mqtt_url == "mqtt://mosquitto:1883"

    def test_environment_names_are_settings(self, compose: dict[str, Any]) -> None:
        for name, service in compose["services"].items():
            names = {k for k in service.get("environment", {}) if k.startswith("FIELDGATE_")}
            assert names - SETTING_NAMES == set(), f"{name}: not in gateway/settings.py"

    def test_order_and_grace(self, compose: dict[str, Any]) -> None:
        services = compose["services"]
        assert services["migrate"]["command"] == ["fieldgate", "migrate"]
        assert services["migrate"]["depends_on"]["postgres"]["condition"] == "service_healthy"
        for name in GATEWAYS:
            service = services[name]
            migrate = service["depends_on"]["migrate"]["condition"]
            assert migrate == "service_completed_successfully", name
            assert _seconds(service["stop_grace_period"]) >= NEEDED_STOP_S, name

    def test_mounted_files_and_build(self, compose: dict[str, Any]) -> None:
        mounts = compose["services"]["mosquitto"]["volumes"]
        assert "./mosquitto.conf:/mosquitto/config/mosquitto.conf:ro" in mounts
        build = compose["services"]["gateway-1"]["build"]
        assert (DEPLOY / build["context"] / build["dockerfile"]).resolve() == (
            DEPLOY / "Dockerfile"
        )


def test_dockerfile_copies_every_package() -> None:
    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text())
    include = pyproject["tool"]["setuptools"]["packages"]["find"]["include"]
    packages = {p.rstrip("*") for p in include}
    copied = set(re.findall(r"^COPY (\S+) \1$", (DEPLOY / "Dockerfile").read_text(), re.M))
    assert packages <= copied, f"deploy/Dockerfile does not copy {packages - copied}"


class TestEnvExample:
    def test_names_are_settings(self) -> None:
        names = set(SETTING_RE.findall((DEPLOY / "fieldgate.env.example").read_text()))
        assert names, "the example names no setting"
        assert names - SETTING_NAMES == set(), "not in gateway/settings.py"

    def test_the_gateway_accepts_it(self, monkeypatch: pytest.MonkeyPatch) -> None:
        for name in SETTING_NAMES:
            monkeypatch.delenv(name, raising=False)
        settings = Settings(_env_file=DEPLOY / "fieldgate.env.example")
        assert settings.environment == "production"
        assert settings.database_url.startswith("postgres://")
        grace = settings.shutdown_timeout_s + bridge._STOP_TIMEOUT_S + 10
        assert _seconds(_unit()["TimeoutStopSec"][-1]) >= grace


def test_mosquitto_accepts_the_config(tmp_path: Path) -> None:
    """The compose file's broker config, on a free port and a private directory, starts a real
    Mosquitto (it refuses unknown or malformed options)."""
    need_mosquitto()
    port = free_port()
    text = (DEPLOY / "mosquitto.conf").read_text()
    for old, new in [
        ("listener 1883\n", f"listener {port} 127.0.0.1\n"),
        ("persistence_location /mosquitto/data/\n", f"persistence_location {tmp_path}/\n"),
        ("log_dest stdout\n", f"log_dest file {tmp_path}/mosquitto.log\n"),
    ]:
        assert old in text
        text = text.replace(old, new)
    conf = tmp_path / "mosquitto.conf"
    conf.write_text(text + f"user {getpass.getuser()}\n")
    output = tmp_path / "output.txt"
    with output.open("wb") as out:
        process = subprocess.Popen(["mosquitto", "-c", str(conf)], stdout=out, stderr=out)
    try:
        deadline = time.monotonic() + 10
        while not service_up("127.0.0.1", port):
            if process.poll() is not None or time.monotonic() > deadline:
                said = output.read_text(errors="replace")[-2000:]
                pytest.fail(f"mosquitto refused deploy/mosquitto.conf: {said}")
            time.sleep(0.02)
    finally:
        process.terminate()
        process.wait(timeout=15)
