"""bench/storage.py, run at a tiny scale, so the script cannot rot: it loads the same readings into
fieldgate and into whichever of InfluxDB and VictoriaMetrics are installed, sizes them, queries
them, and their answers agree."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parent.parent

pytestmark = pytest.mark.e2e

# 6 hours of 2 devices x 2 metrics, one reading every 10 s.
READINGS = 6 * 360 * 2 * 2
PEERS = {
    "influxdb": ("influxd", "InfluxDB"),
    "victoriametrics": ("victoria-metrics", "VictoriaMetrics"),
}


def run_bench(
    tmp_path: Path, databases: list[str], env: dict[str, str] | None = None
) -> tuple[dict[str, Any], str]:
    report = tmp_path / "report.json"
    done = subprocess.run(
        [
            sys.executable,
            str(ROOT / "bench" / "storage.py"),
            *("--databases", ",".join(databases), "--days", "0.25", "--devices", "2"),
            *("--query-runs", "1", "--warmup", "0", "--settle-s", "60"),
            *("--report-json", str(report)),
        ],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=240,
    )
    output = done.stdout + done.stderr
    assert done.returncode == 0, output
    return json.loads(report.read_text()), output


def test_storage_smoke_sqlite_and_installed_peers(tmp_path: Path) -> None:
    report, output = run_bench(tmp_path, ["sqlite", "influxdb", "victoriametrics"])
    installed = [name for binary, name in PEERS.values() if shutil.which(binary)]
    for binary, name in PEERS.values():
        if name not in installed:
            assert f"`{binary}` is not installed" in output
    (run,) = report["runs"]
    assert [m["db"] for m in run] == ["fieldgate sqlite", *installed], output
    for m in run:
        assert m["readings"] == READINGS
        assert m["disk_bytes"] > 0, output
        assert m["bytes_per_reading"] == m["disk_bytes"] / READINGS
        assert m["ingest_rate"] > 0
        assert m["one_ms"] > 0
        assert m["fleet_ms"] > 0
    assert report["answer_problems"] == [], output
    assert "answers agree" in output
    assert "fieldgate maintain:" in run[0]["settle"]
    # A target line for each peer that ran, fieldgate SQLite against it.
    peers_in_targets = {t["peer"] for t in report["targets"]}
    assert peers_in_targets == set(installed), output
    for t in report["targets"]:
        assert t["fieldgate"] == "fieldgate sqlite"
        assert ("[holds]" if t["holds"] else "[FAILS]") in output


@pytest.mark.postgres
def test_storage_smoke_postgres(tmp_path: Path) -> None:
    report, output = run_bench(tmp_path, ["postgres"])
    ((m,),) = report["runs"]
    assert m["db"] == "fieldgate postgres"
    assert m["readings"] == READINGS
    assert {"reading", "series"} <= set(m["disk_how"].split("+")), output
    assert m["disk_bytes"] > 0
    assert report["answer_problems"] == []
    assert report["targets"] == []  # no peer ran: nothing to compare with


def test_storage_skips_missing_peers(tmp_path: Path) -> None:
    """With neither peer on PATH, the benchmark says so and measures fieldgate alone."""
    env = {**os.environ, "PATH": str(Path(sys.executable).parent)}
    report, output = run_bench(tmp_path, ["sqlite", "influxdb", "victoriametrics"], env)
    assert "skipped influxdb: `influxd` is not installed (apt-get install influxdb)" in output
    assert "skipped victoriametrics: `victoria-metrics` is not installed" in output
    ((m,),) = report["runs"]
    assert m["db"] == "fieldgate sqlite"
    assert report["targets"] == []
