"""The console's files as the gateway serves them (gateway/api/console.py): public, a fixed set,
a strict Content-Security-Policy, and not part of the API's OpenAPI document. What the page does
is tests/test_console_browser.py's."""

from __future__ import annotations

import re
from collections.abc import AsyncIterator
from pathlib import Path

import httpx
import pytest

from gateway.api.console import FILES
from gateway.app import create_app
from tests.conftest import make_settings

CONSOLE = Path(__file__).resolve().parent.parent / "gateway" / "console"


@pytest.fixture
async def client(tmp_path: Path) -> AsyncIterator[httpx.AsyncClient]:
    """The app without its lifespan: the console needs no database."""
    app = create_app(make_settings(f"sqlite:///{tmp_path}/unused.sqlite3"))
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
        yield client


async def test_the_page_is_public_with_a_strict_policy(client: httpx.AsyncClient) -> None:
    r = await client.get("/")
    assert r.status_code == 200
    assert r.headers["content-type"] == "text/html; charset=utf-8"
    assert "<title>fieldgate console</title>" in r.text
    policy = r.headers["content-security-policy"]
    assert "default-src 'none'" in policy
    assert "script-src 'self';" in policy
    assert "connect-src 'self';" in policy
    assert "unsafe" not in policy
    assert r.headers["x-content-type-options"] == "nosniff"
    assert r.headers["x-frame-options"] == "DENY"


async def test_every_file_the_page_names_is_served(client: httpx.AsyncClient) -> None:
    page = (CONSOLE / "index.html").read_text(encoding="utf-8")
    named = re.findall(r'(?:src|href)="(/console/[^"]+)"', page)
    module_imports = {
        f"/console/{name}"
        for path in CONSOLE.glob("*.js")
        for name in re.findall(r'from "\./([^"]+)"', path.read_text(encoding="utf-8"))
    }
    assert len(named) >= 4
    assert module_imports >= {"/console/api.js", "/console/charts.js", "/console/stream.js"}
    types = {".js": "text/javascript", ".css": "text/css"}
    for path in [*named, *sorted(module_imports)]:
        r = await client.get(path)
        assert r.status_code == 200, path
        assert r.headers["content-type"].startswith(types[Path(path).suffix]), path
        assert r.content == (CONSOLE / path.removeprefix("/console/")).read_bytes()
    licence = await client.get("/console/vendor/uPlot.LICENSE")
    assert "MIT License" in licence.text
    assert "/console/vendor/uPlot.iife.min.js" in named


async def test_only_the_console_files_are_served(client: httpx.AsyncClient) -> None:
    assert "index.html" in FILES
    assert all(not name.endswith(".py") for name in FILES)
    for path in (
        "/console/nope.js",
        "/console/../app.py",
        "/console/%2e%2e/app.py",
        "/console/..%2fapp.py",
        "/console/vendor",
    ):
        r = await client.get(path)
        assert r.status_code == 404, (path, r.text)
        assert r.json()["error"]["code"] == "not_found"


def test_the_console_is_not_in_the_api_document(tmp_path: Path) -> None:
    app = create_app(make_settings(f"sqlite:///{tmp_path}/unused.sqlite3"))
    paths = app.openapi()["paths"]
    assert "/" not in paths
    assert not [p for p in paths if p.startswith("/console")]
    assert "/api/v1/devices" in paths
