"""Path and query parameters no database can store as text are refused before any route runs.

A NUL (`%00`) is text to Python and SQLite but an error to PostgreSQL ("invalid byte sequence
for encoding UTF8"), and a lone surrogate cannot be encoded as UTF-8 at all: either would fail
deep in a query, as a 500, on one database only. One check here answers 400 invalid_parameter for
every endpoint, present and future, instead of one check per parameter. (JSON bodies are checked
by their pydantic models; telemetry payloads by their parser.)
"""

from __future__ import annotations

import re
from typing import Final
from urllib.parse import parse_qsl

from starlette.types import ASGIApp, Receive, Scope, Send

from gateway.errors import error_response

UNSTORABLE: Final = re.compile("[\x00\ud800-\udfff]")


def unstorable_parameter(scope: Scope) -> list[str] | None:
    """The location (["path"] or ["query", name]) of the first parameter holding a NUL or a lone
    surrogate, or None. The query is parsed as Starlette parses it for the routes."""
    if UNSTORABLE.search(scope["path"]):
        return ["path"]
    query: bytes = scope.get("query_string", b"")
    # Only a raw NUL or a percent escape (%00) can make a NUL; latin-1 and unquote's "replace"
    # make no lone surrogate. A plain query is not parsed (~3% of a 100-reading line protocol
    # write, whose query names its precision).
    if b"%" in query or b"\x00" in query:
        for name, value in parse_qsl(query.decode("latin-1"), keep_blank_values=True):
            if UNSTORABLE.search(name) or UNSTORABLE.search(value):
                return ["query", UNSTORABLE.sub("?", name)]
    return None


class RefuseUnstorableText:
    """A plain ASGI middleware: 400 invalid_parameter for a NUL or lone surrogate in the path or
    the query string (cheap: one regex search over the path; the query only when there is one)."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            loc = unstorable_parameter(scope)
            if loc is not None:
                message = "a NUL character or a lone surrogate cannot be stored or looked up"
                where = ".".join(loc)
                response = error_response(
                    400,
                    "invalid_parameter",
                    f"invalid request: {where}: {message}",
                    [{"loc": loc, "message": message}],
                )
                await response(scope, receive, send)
                return
        await self.app(scope, receive, send)
