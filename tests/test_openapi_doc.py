"""The checked-in API reference (docs/openapi.json, docs/api.md) matches the app."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
from typer.testing import CliRunner

from gateway.cli import app

DOCS = Path(__file__).resolve().parent.parent / "docs"
REGENERATE = "fieldgate openapi --output docs/openapi.json"
METHODS = {"get", "post", "put", "patch", "delete"}


def generated(*args: str) -> str:
    result = CliRunner().invoke(app, ["openapi", *args])
    assert result.exit_code == 0, result.output
    return result.stdout


def test_checked_in_document_matches_the_app() -> None:
    checked_in = (DOCS / "openapi.json").read_text(encoding="utf-8")
    assert checked_in == generated(), (
        f"docs/openapi.json does not match the app: run `{REGENERATE}` and commit the file"
    )


def test_output_option_writes_the_same_document(tmp_path: Path) -> None:
    target = tmp_path / "openapi.json"
    assert generated("--output", str(target)) == ""
    text = target.read_text(encoding="utf-8")
    assert text == generated()
    assert text.endswith("}\n")
    assert json.loads(text)["info"]["title"] == "fieldgate"


def test_the_environment_does_not_change_the_document(monkeypatch: pytest.MonkeyPatch) -> None:
    before = generated()
    # Settings() would refuse these; the document is built from the defaults alone.
    monkeypatch.setenv("FIELDGATE_ADMIN_TOKEN", "short")
    monkeypatch.setenv("FIELDGATE_ENVIRONMENT", "development")
    monkeypatch.setenv("FIELDGATE_MAX_PAGE_SIZE", "7")
    assert generated() == before


def test_api_md_has_a_section_for_every_operation() -> None:
    document = json.loads((DOCS / "openapi.json").read_text(encoding="utf-8"))
    api_md = (DOCS / "api.md").read_text(encoding="utf-8")
    headings = set(re.findall(r"^#+ `([A-Z]+ /\S*)`", api_md, flags=re.MULTILINE))
    operations = {
        f"{method.upper()} {path}"
        for path, ops in document["paths"].items()
        for method in ops
        if method in METHODS
    }
    assert operations, "the document lists no operations"
    assert operations - headings == set(), "docs/api.md lacks a section for these"
    assert headings - operations == set(), "docs/api.md documents operations the app lacks"


def test_api_md_names_every_rejection_code() -> None:
    """A code added to the parser, the ingest limits, the MQTT reasons or the store's errors is
    documented in docs/api.md, or this fails."""
    from devices.formats import Code
    from devices.line_protocol import LineCode
    from gateway.errors import DOMAIN_ERRORS
    from gateway.ingest import LimitCode
    from gateway.mqtt.service import Reason

    codes = {
        value
        for holder in (Code, LimitCode, Reason, LineCode)
        for name, value in vars(holder).items()
        if name.isupper() and isinstance(value, str)
    }
    codes |= {code for _, code in DOMAIN_ERRORS.values()}
    text = (DOCS / "api.md").read_text()
    missing = sorted(c for c in codes if f"`{c}`" not in text)
    assert not missing, f"docs/api.md does not name these codes: {missing}"
