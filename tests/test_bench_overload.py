"""bench/overload.py, run with tiny parameters, so the script cannot rot: it starts its own
gateway and broker, overloads them briefly and checks that every acknowledged reading is stored."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent

pytestmark = pytest.mark.e2e


def test_overload_smoke_sqlite(tmp_path: Path) -> None:
    for binary in ("mosquitto", "mosquitto_pub", "mosquitto_sub"):
        if shutil.which(binary) is None:
            pytest.skip(f"{binary} is not installed (apt-get install mosquitto mosquitto-clients)")
    report = tmp_path / "report.json"
    done = subprocess.run(
        [
            sys.executable,
            str(ROOT / "bench" / "overload.py"),
            *("--database", "sqlite", "--seconds", "2", "--calibrate-s", "1"),
            *("--clients", "1", "--http-devices", "4", "--max-connections", "16"),
            *("--mqtt-publishers", "2", "--mqtt-max-messages", "5000", "--drain-s", "3"),
            *("--report-json", str(report)),
        ],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=120,
    )
    output = done.stdout + done.stderr
    assert done.returncode == 0, output
    (run,) = json.loads(report.read_text())
    assert run["failures"] == [], output
    assert run["http_missing"] == 0
    assert run["mqtt_missing"] == 0
    # The load reached the gateway and the checks had something to check.
    assert run["http_2xx"] > 0, output
    assert run["http_acked_readings"] > 0, output
    assert run["mqtt_acked"] > 0, output
    assert run["mqtt_acked"] + run["mqtt_left_in_session"] == run["mqtt_published"], output
    assert run["mqtt_stored"] >= run["mqtt_acked"], output
    assert 0 < run["peak_rss_mb"] < 200, output
    assert "OK: every acknowledged reading stored" in done.stdout


def test_overload_hostile_reports_instead_of_crashing(tmp_path: Path) -> None:
    """--hostile on a tiny scale: whatever the gateway does with the hostile clients, the script
    ends with a report (exit 0 or 1, not a crash) and still finds no acknowledged reading
    missing."""
    for binary in ("mosquitto", "mosquitto_pub", "mosquitto_sub"):
        if shutil.which(binary) is None:
            pytest.skip(f"{binary} is not installed (apt-get install mosquitto mosquitto-clients)")
    report = tmp_path / "report.json"
    done = subprocess.run(
        [
            sys.executable,
            str(ROOT / "bench" / "overload.py"),
            *("--database", "sqlite", "--seconds", "2", "--calibrate-s", "1"),
            *("--clients", "1", "--http-devices", "4", "--max-connections", "16"),
            *("--mqtt-publishers", "2", "--mqtt-max-messages", "2000", "--drain-s", "2"),
            *("--hostile", "--hostile-big", "1", "--hostile-big-mb", "2"),
            *("--hostile-bad-tokens", "40", "--hostile-slow", "4", "--stop-timeout-s", "3"),
            # Short gateway timeouts, so the half-sent requests are closed within the wait.
            *(
                "--env",
                "FIELDGATE_HTTP_HEADER_TIMEOUT_S=1",
                "--env",
                "FIELDGATE_HTTP_BODY_TIMEOUT_S=1",
            ),
            *("--hostile-slow-wait-s", "8"),
            *("--report-json", str(report)),
        ],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=120,
    )
    output = done.stdout + done.stderr
    assert done.returncode in (0, 1), output
    assert "Traceback" not in done.stderr, output
    (run,) = json.loads(report.read_text())
    assert run["http_missing"] == 0, output
    assert run["mqtt_missing"] == 0, output
    hostile = run["hostile"]
    assert hostile["poison_sent"] == 5, output
    assert hostile["slow_opened"] == 4, output
    # The gateway times out half-sent requests (header and body timeouts), before the SIGTERM.
    assert hostile["slow_closed_by_server"] == 4, output
    assert hostile["slow_closed_after_s_max"] < 8, output
    assert sum(hostile["bad_tokens"].values()) == 40, output
    # Every failure the script found is named in the report and in its output.
    assert (done.returncode == 1) == bool(run["failures"]), output
    for failure in run["failures"]:
        assert failure in done.stdout
