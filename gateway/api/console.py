"""The operator console (gateway/console/): a static page and its assets, served without a token
(they hold no data; every call they make to /api/v1 carries the operator's own token) and left
out of the OpenAPI document (they are not the API).

The files are read once, at import: a fixed set, so a path can only name one of them (no file
system lookup from a request path), each answered with a Content-Security-Policy that lets the
page load and call only its own origin (no CDN, no inline script, no framing)."""

from __future__ import annotations

from importlib import resources
from typing import Final

from fastapi import APIRouter
from fastapi.responses import Response

from gateway.errors import NotFound

router = APIRouter(include_in_schema=False)

CONSOLE_PATH: Final = "/console"
_TYPES: Final = {
    ".html": "text/html; charset=utf-8",
    ".js": "text/javascript; charset=utf-8",
    ".css": "text/css; charset=utf-8",
    ".svg": "image/svg+xml",
    ".LICENSE": "text/plain; charset=utf-8",
}
HEADERS: Final = {
    # uPlot sets element.style properties (CSSOM), which 'self' allows; it injects no <style>.
    "Content-Security-Policy": (
        "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
        "connect-src 'self'; base-uri 'none'; form-action 'self'; frame-ancestors 'none'"
    ),
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "X-Frame-Options": "DENY",
    "Cache-Control": "no-cache",  # small files; a new version is seen at the next load
}


def _load() -> dict[str, tuple[bytes, str]]:
    """Name (relative to gateway/console/) -> (content, media type), for every console file."""
    files: dict[str, tuple[bytes, str]] = {}
    root = resources.files("gateway") / "console"
    stack = [(root, "")]
    while stack:
        folder, prefix = stack.pop()
        for entry in folder.iterdir():
            name = prefix + entry.name
            if entry.is_dir():
                stack.append((entry, name + "/"))
                continue
            media_type = next((t for s, t in _TYPES.items() if entry.name.endswith(s)), None)
            if media_type is not None:
                files[name] = (entry.read_bytes(), media_type)
    return files


FILES: Final = _load()


def _answer(name: str) -> Response:
    found = FILES.get(name)
    if found is None:
        raise NotFound(f"the console has no file {name!r}")
    content, media_type = found
    return Response(content, media_type=media_type, headers=HEADERS)


@router.get("/")
async def console_page() -> Response:
    """The console's page (sign in, devices, a device)."""
    return _answer("index.html")


@router.get(CONSOLE_PATH + "/{name:path}")
async def console_file(name: str) -> Response:
    """One of the console's scripts, style sheets or vendored files."""
    return _answer(name)
