"""`fieldgate devices ...` and `tokens create` through typer's CliRunner, against a real SQLite
database (each command opens, migrates and closes it, as from a shell)."""

from __future__ import annotations

import asyncio
import json
import os
from pathlib import Path

import pytest
from typer.testing import CliRunner, Result

from gateway.cli import app
from gateway.settings import Settings
from gateway.store import database, registry


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
            ["boiler", "enabled", "0", "-", ""],
            ["greenhouse-7", "enabled", "0", "-", "Greenhouse 7"],
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


def test_tokens_create_prints_a_token_of_the_role(fieldgate: CliRunner) -> None:
    result = run(fieldgate, "tokens", "create", "--role", "operator", "--name", "grafana")
    assert result.exit_code == 0, result.output
    assert result.stdout.startswith("fgo_")
