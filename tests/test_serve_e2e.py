"""End to end: `fieldgate serve` (the installed console script) as a subprocess on a free port,
spoken to over real HTTP, on SQLite and on a throwaway PostgreSQL database; the shared API
contract (`../shared/contract/check.py`) run against it."""

from __future__ import annotations

import os
import re
import secrets
import signal
import sqlite3
import subprocess
import sys
from collections.abc import Iterator
from contextlib import closing, contextmanager
from pathlib import Path

import httpx
import pytest

from tests.conftest import free_port
from tests.harness import wait_for_healthz

pytestmark = pytest.mark.e2e

FIELDGATE = Path(sys.executable).parent / "fieldgate"
CONTRACT = Path(os.environ.get("FIELDGATE_CONTRACT", "/work/shared/contract/check.py"))
ADMIN = "e2e-admin-" + secrets.token_hex(12)
T0 = 1_700_000_000_000
# The contract's aggregate checks: they must run and hold like every other.
AGGREGATE_CHECKS = ("aggregate is ", "a bucket is ", "an unknown fill is 400")


class Server:
    """One `fieldgate serve` process, its output in a file."""

    def __init__(self, workdir: Path, database_url: str, admin_token: str | None) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = workdir / f"serve-{self.port}.log"
        env = {k: v for k, v in os.environ.items() if not k.startswith("FIELDGATE_")}
        env["FIELDGATE_DATABASE_URL"] = database_url
        env["FIELDGATE_MQTT_URL"] = ""
        if admin_token:
            env["FIELDGATE_ADMIN_TOKEN"] = admin_token
        self.env = env
        self.workdir = workdir
        self.process: subprocess.Popen[bytes] | None = None

    def start(self, within_s: float = 30) -> None:
        with self.log.open("ab") as out:
            self.process = subprocess.Popen(
                [str(FIELDGATE), "serve", "--host", "127.0.0.1", "--port", str(self.port)],
                cwd=self.workdir,  # no stray .env
                env=self.env,
                stdout=out,
                stderr=subprocess.STDOUT,
            )
        wait_for_healthz(self.url, self.process, self.output, within_s)

    def stop(self) -> int | None:
        """SIGTERM, then wait (SIGKILL if it hangs); the exit status."""
        if self.process is None:
            return None
        if self.process.poll() is None:
            self.process.terminate()
            try:
                return self.process.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(timeout=10)
                pytest.fail(f"fieldgate serve ignored SIGTERM:\n{self.output()[-3000:]}")
        return self.process.returncode

    def output(self) -> str:
        return self.log.read_text(errors="replace") if self.log.exists() else ""


@contextmanager
def serving(workdir: Path, database_url: str, admin_token: str | None = ADMIN) -> Iterator[Server]:
    server = Server(workdir, database_url, admin_token)
    try:
        server.start()
        yield server
    finally:
        server.stop()


def test_serve_store_read_back_and_contract(tmp_path: Path, empty_database_url: str) -> None:
    with serving(tmp_path, empty_database_url) as server:
        admin = {"Authorization": f"Bearer {ADMIN}"}
        with httpx.Client(base_url=server.url + "/api/v1", timeout=30) as api:
            ready = httpx.get(server.url + "/readyz", timeout=10)
            assert ready.status_code == 200, ready.text
            assert ready.json()["checks"]["database"]["ok"] is True
            assert api.get("/devices").status_code == 401

            r = api.post("/devices", json={"id": "greenhouse-7", "name": "GH 7"}, headers=admin)
            assert r.status_code == 201, r.text
            device = {"Authorization": f"Bearer {r.json()['token']}"}
            r = api.post(
                "/devices/greenhouse-7/telemetry",
                json=[
                    {"ts": T0, "values": {"temperature": 21.5, "humidity": 40}},
                    {"ts": "2023-11-14T22:14:20Z", "values": {"temperature": 22.0}},
                    {"ts": T0, "values": {"temperature": "warm"}},
                ],
                headers=device,
            )
            assert r.status_code == 200, r.text
            assert r.json()["accepted"] == 3
            assert [x["code"] for x in r.json()["rejected"]] == ["invalid_value"]

            r = api.get(
                "/devices/greenhouse-7/telemetry", params={"metric": "temperature"}, headers=admin
            )
            assert r.status_code == 200, r.text
            assert r.json()["points"] == [
                {"ts": "2023-11-14T22:13:20Z", "value": 21.5},
                {"ts": "2023-11-14T22:14:20Z", "value": 22.0},
            ]
            r = api.get("/devices/greenhouse-7/telemetry/latest", headers=admin)
            humidity = {"ts": "2023-11-14T22:13:20Z", "value": 40.0, "unit": None}
            assert r.json()["values"]["humidity"] == humidity  # no unit: a native post
            r = api.get("/devices/greenhouse-7", headers=admin)
            assert r.json()["readings"] == 3

        contract = subprocess.run(
            [sys.executable, str(CONTRACT), "--url", server.url, "--admin-token", ADMIN],
            capture_output=True,
            text=True,
            timeout=120,
            check=False,
        )
        lines = contract.stdout.splitlines()
        checks = [line for line in lines if line.startswith(("ok ", "FAIL "))]
        assert len(checks) >= 15, contract.stdout + contract.stderr
        assert [line for line in checks if line.startswith("FAIL ")] == [], contract.stdout
        passed = [line for line in checks if line.startswith("ok ")]
        for check in AGGREGATE_CHECKS:
            assert any(check in line for line in passed), f"{check!r} not run:\n{contract.stdout}"
        assert contract.returncode == 0, contract.stdout + contract.stderr
        assert lines[-1] == "contract holds"

        status = server.stop()
    # uvicorn re-raises SIGTERM after a graceful shutdown, so -15 is a clean exit too.
    assert status in (0, -signal.SIGTERM), server.output()[-3000:]
    assert "Application shutdown complete" in server.output()
    assert "Traceback" not in server.output(), server.output()[-3000:]
    if empty_database_url.startswith("sqlite://"):
        # What the server answered 200 for is on disk after it stopped.
        path = empty_database_url.removeprefix("sqlite://")
        with closing(sqlite3.connect(path)) as db:
            (count,) = db.execute(
                "SELECT count(*) FROM reading r JOIN series s ON s.id = r.series_id"
                " WHERE s.device_id = 'greenhouse-7'"
            ).fetchone()
        assert count == 3


def test_first_start_prints_a_generated_admin_token_once(tmp_path: Path) -> None:
    database = f"sqlite://{tmp_path}/fieldgate.db"
    with serving(tmp_path, database, admin_token=None) as first:
        found = re.findall(r"\bfga_[A-Za-z0-9_-]{43}\b", first.output())
        assert len(found) == 1, first.output()
        token = found[0]
        r = httpx.get(
            first.url + "/api/v1/devices",
            headers={"Authorization": f"Bearer {token}"},
            timeout=10,
        )
        assert r.status_code == 200, r.text
    with serving(tmp_path, database, admin_token=None) as second:
        assert "fga_" not in second.output()
        r = httpx.post(
            second.url + "/api/v1/devices",
            json={"id": "dev-1"},
            headers={"Authorization": f"Bearer {token}"},
            timeout=10,
        )
        assert r.status_code == 201, r.text
    with closing(sqlite3.connect(database.removeprefix("sqlite://"))) as db:
        rows = db.execute("SELECT role, token_hash FROM api_token WHERE role = 'admin'").fetchall()
    assert len(rows) == 1
    assert token not in repr(rows)
