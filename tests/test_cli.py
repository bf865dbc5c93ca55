"""`fieldgate devices ...` and `tokens create` through typer's CliRunner, against a real SQLite
database (each command opens, migrates and closes it, as from a shell)."""

from __future__ import annotations

import asyncio
import json
import os
import sqlite3
from pathlib import Path

import pytest
from typer.testing import CliRunner, Result

from gateway.cli import app
from gateway.settings import Settings
from gateway.store import database, registry
from gateway.store.raw_sql import execute, fetch
from gateway.timespec import now_us


@pytest.fixture
def fieldgate(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> CliRunner:
    monkeypatch.chdir(tmp_path)  # no stray .env, and the default database stays in tmp_path
    for name in [k for k in os.environ if k.startswith("FIELDGATE_")]:
        monkeypatch.delenv(name)
    monkeypatch.setenv("FIELDGATE_DATABASE_URL", f"sqlite://{tmp_path}/cli.sqlite3")
    return CliRunner()


def run(runner: CliRunner, *args: str) -> Result:
    return runner.invoke(app, list(args))


class TestDevices:
    def test_create_list_show_delete(self, fieldgate: CliRunner) -> None:
        created = run(fieldgate, "devices", "create", "greenhouse-7", "--name", "Greenhouse 7")
        assert created.exit_code == 0, created.output
        assert created.stdout.startswith("fgd_")
        assert run(fieldgate, "devices", "create", "boiler").exit_code == 0

        listed = run(fieldgate, "devices", "list")
        assert listed.exit_code == 0, listed.output
        rows = [line.split("\t") for line in listed.stdout.splitlines()]
        assert rows == [
            ["boiler", "enabled", "0", "-", "-", ""],
            ["greenhouse-7", "enabled", "0", "-", "-", "Greenhouse 7"],
        ]

        shown = run(fieldgate, "devices", "show", "greenhouse-7")
        assert shown.exit_code == 0, shown.output
        device = json.loads(shown.stdout)
        assert device["id"] == "greenhouse-7"
        assert device["name"] == "Greenhouse 7"
        assert device["readings"] == 0
        assert device["metrics"] == {}

        deleted = run(fieldgate, "devices", "delete", "greenhouse-7")
        assert deleted.exit_code == 0, deleted.output
        listed = run(fieldgate, "devices", "list")
        assert [line.split("\t")[0] for line in listed.stdout.splitlines()] == ["boiler"]

    @pytest.mark.parametrize("command", ["show", "delete"])
    def test_a_missing_device_is_one_line_and_status_1(
        self, fieldgate: CliRunner, command: str
    ) -> None:
        result = run(fieldgate, "devices", command, "nope")
        assert result.exit_code == 1
        assert result.stderr.strip() == "fieldgate: device 'nope' does not exist"
        assert result.stdout == ""

    def test_an_existing_id_is_one_line_and_status_1(self, fieldgate: CliRunner) -> None:
        assert run(fieldgate, "devices", "create", "dup").exit_code == 0
        result = run(fieldgate, "devices", "create", "dup")
        assert result.exit_code == 1
        assert result.stderr.strip() == "fieldgate: device 'dup' already exists"

    def test_list_pages_through_every_device(self, fieldgate: CliRunner) -> None:
        # list_devices pages by 500: more than one page must come out whole and in order.
        async def make() -> None:
            async with database.open_database(Settings().database_url):
                for i in range(501):
                    await registry.create_device(f"d-{i:04d}", "", {}, True)

        asyncio.run(make())
        listed = run(fieldgate, "devices", "list")
        assert listed.exit_code == 0, listed.output
        ids = [line.split("\t")[0] for line in listed.stdout.splitlines()]
        assert ids == [f"d-{i:04d}" for i in range(501)]


@pytest.mark.parametrize(("role", "prefix"), [("operator", "fgo_"), ("writer", "fgw_")])
def test_tokens_create_prints_a_token_of_the_role(
    fieldgate: CliRunner, role: str, prefix: str
) -> None:
    result = run(fieldgate, "tokens", "create", "--role", role, "--name", "grafana")
    assert result.exit_code == 0, result.output
    assert result.stdout.startswith(prefix)
    listed = run(fieldgate, "tokens", "list")
    assert listed.stdout.split("\t")[1] == role


class TestRetentionDays:
    def test_create_with_retention_days_shown_by_list_and_show(self, fieldgate: CliRunner) -> None:
        created = run(fieldgate, "devices", "create", "short", "--retention-days", "7.5")
        assert created.exit_code == 0, created.output
        assert run(fieldgate, "devices", "create", "keep", "--retention-days", "0").exit_code == 0
        listed = run(fieldgate, "devices", "list")
        rows = [line.split("\t") for line in listed.stdout.splitlines()]
        assert [(r[0], r[4]) for r in rows] == [("keep", "0"), ("short", "7.5")]
        shown = json.loads(run(fieldgate, "devices", "show", "short").stdout)
        assert shown["retention_days"] == 7.5

    def test_a_negative_value_is_a_usage_error(self, fieldgate: CliRunner) -> None:
        result = run(fieldgate, "devices", "create", "d", "--retention-days", "-1")
        assert result.exit_code == 2
        assert "retention-days" in result.output


def _old_readings(database_url: str, n: int) -> None:
    """A device `d` with `n` readings of `t` two days old, stored directly."""

    async def make() -> None:
        async with database.open_database(database_url):
            await registry.create_device("d", "", {}, True)
            conn = database.connection()
            await execute(conn, "INSERT INTO series (device_id, metric) VALUES ('d', 't')")
            (sid,) = (await fetch(conn, "SELECT id FROM series"))[0]
            start = now_us() - 2 * 86_400_000_000
            for i in range(n):
                await execute(
                    conn,
                    "INSERT INTO reading (series_id, ts, value) VALUES (?, ?, ?)",
                    (sid, start + i * 1_000_000, float(i)),
                )

    asyncio.run(make())


class TestMaintain:
    def test_prints_what_each_job_did(self, fieldgate: CliRunner) -> None:
        _old_readings(Settings().database_url, 300)
        result = run(fieldgate, "maintain")
        assert result.exit_code == 0, result.output
        lines = result.stdout.splitlines()
        assert lines[0].startswith("retention ")
        assert "expired 0 chunks, 0 readings; 0 partitions dropped" in lines[0]
        assert lines[1].startswith("pack ")
        assert "packed 300 readings of 1 series: 1 chunks written, 0 rewritten" in lines[1]
        assert lines[2].startswith("reclaim ")
        assert lines[-1].startswith("stored now: 300 readings packed in 1 chunks, 0 unpacked;")
        again = run(fieldgate, "maintain")
        assert "packed 0 readings of 0 series" in again.stdout

    def test_json_report(self, fieldgate: CliRunner) -> None:
        _old_readings(Settings().database_url, 50)
        result = run(fieldgate, "maintain", "--json")
        assert result.exit_code == 0, result.output
        report = json.loads(result.stdout)
        assert report["packed"] == {"readings": 50, "chunks_written": 1, "chunks_replaced": 0}
        assert report["expired"] == {"chunks": 0, "readings": 0, "partitions": 0}
        assert set(report["took_ms"]) == {"retention", "pack", "reclaim"}
        assert report["stored"]["packed"] == 50
        assert report["stored"]["unpacked"] == 0
        assert "vacuum" not in report

    def test_vacuum_rewrites_a_database_made_before_incremental_auto_vacuum(
        self, fieldgate: CliRunner, tmp_path: Path
    ) -> None:
        path = tmp_path / "cli.sqlite3"
        with sqlite3.connect(path) as db:  # made the old way: no auto-vacuum, a table first
            db.execute("PRAGMA auto_vacuum = NONE")
            db.execute("CREATE TABLE made_before (x)")
        assert run(fieldgate, "migrate").exit_code == 0
        with sqlite3.connect(path) as db:
            assert db.execute("PRAGMA auto_vacuum").fetchone() == (0,)

        result = run(fieldgate, "maintain", "--vacuum")
        assert result.exit_code == 0, result.output
        assert "locked while this runs" in result.stderr
        assert "vacuum     rewrote the file" in result.stdout
        with sqlite3.connect(path) as db:
            assert db.execute("PRAGMA auto_vacuum").fetchone() == (2,)  # incremental

        again = run(fieldgate, "maintain", "--vacuum", "--json")
        assert again.exit_code == 0, again.output
        assert json.loads(again.stdout)["vacuum"] == {
            "done": False,
            "reason": "already incremental",
            "mode": "incremental",
        }
        assert again.stderr == ""
