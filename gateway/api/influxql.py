"""InfluxDB 1.x's query endpoint (`GET|POST /query`, no /api/v1 prefix) for the InfluxQL
subset Grafana's built-in InfluxDB data source sends (gateway/influxql.py parses it,
gateway/influxql_executor.py answers it).

HTTP only, and InfluxDB's conventions rather than fieldgate's, because the client acts on them:
`q` (query string, or the form body of a POST), `epoch`, `db`/`rp` (accepted, ignored: one
database); the operator token as the password (`p`, or HTTP basic auth as Grafana sends its data
source user and password) or as `Authorization: Bearer|Token <token>`; errors as
`{"error": "..."}` (400 unparsable or unsupported syntax, 401/403/429) and a failed statement
as `{"results": [{"statement_id": 0, "error": "..."}]}` with 200.
"""

from __future__ import annotations

import base64
import binascii
from typing import Annotated, Any, Final
from urllib.parse import parse_qs

from fastapi import APIRouter, Query, Request

from devices.models import Role
from gateway import influxql
from gateway.api.deps import JSON, RuntimeDep, read_body
from gateway.auth import principal_of
from gateway.errors import FieldgateError, Unauthorized
from gateway.influxql_executor import EPOCH_US, execute
from gateway.timespec import now_us

router = APIRouter(tags=["influxdb"])

# InfluxDB clients read the server's version from this header (Grafana does not need it).
_HEADERS: Final = {"X-Influxdb-Version": "1.8-fieldgate"}

_ANSWERS: Final[dict[int | str, dict[str, Any]]] = {
    200: {
        "description": "InfluxDB 1.x results: one per statement, each with `series` or `error`",
        "content": {
            "application/json": {
                "example": {
                    "results": [
                        {
                            "statement_id": 0,
                            "series": [
                                {
                                    "name": "cpu",
                                    "tags": {"device": "pump-1"},
                                    "columns": ["time", "mean"],
                                    "values": [[1700000000000, 21.5]],
                                }
                            ],
                        }
                    ]
                }
            }
        },
    },
    400: {"description": 'unparsable or unsupported InfluxQL: `{"error": "..."}`'},
    401: {"description": 'no valid token: `{"error": "..."}`'},
    403: {"description": 'not an operator or admin token: `{"error": "..."}`'},
}


_REFUSED: Final = {
    "unauthorized": "the token (password) is not valid",
    "token_expired": "the token (password) has expired",
}


def _error(status: int, message: str, headers: dict[str, str] | None = None) -> JSON:
    return JSON({"error": message}, status_code=status, headers={**_HEADERS, **(headers or {})})


def _token(request: Request, form: dict[str, list[str]]) -> str | None:
    """The token: the Authorization header's (Bearer, Token, or Basic's password), else `p`."""
    header = request.headers.get("authorization")
    if header:
        scheme, _, value = header.strip().partition(" ")
        if scheme.lower() in ("bearer", "token"):
            return value.strip() or None
        if scheme.lower() == "basic":
            try:
                decoded = base64.b64decode(value.strip(), validate=True).decode()
            except (binascii.Error, UnicodeDecodeError):
                return None
            return decoded.partition(":")[2] or None
        return None
    p = request.query_params.get("p") or next(iter(form.get("p", [])), None)
    return p or None


async def _query(request: Request, runtime: RuntimeDep, epoch: str | None) -> JSON:
    form: dict[str, list[str]] = {}
    if request.method == "POST":
        body = await read_body(request, runtime.settings.max_request_body_bytes)
        form = parse_qs(body.decode("utf-8", "replace"))
    token = _token(request, form)
    if token is None:
        return _error(
            401,
            "unable to parse authentication credentials: send the operator token "
            "as the password (p, or basic auth) or as Authorization: Bearer <token>",
        )
    address = request.client.host if request.client else None
    try:
        principal = await principal_of(runtime, f"Bearer {token}", address)
    except Unauthorized as exc:  # its message speaks of bearer tokens; this may be a password
        return _error(401, f"authorization failed: {_REFUSED.get(exc.code, exc.message)}")
    except FieldgateError as exc:  # 429: too many failures from this address
        return _error(exc.status_code, exc.message, exc.headers)
    if not principal.role.may(Role.OPERATOR):
        return _error(403, f"/query needs an operator or admin token, not {principal.role.value}")
    text = request.query_params.get("q") or next(iter(form.get("q", [])), None)
    if not text:
        return _error(400, 'missing required parameter "q"')
    if epoch and epoch not in EPOCH_US:
        return _error(400, f"epoch={epoch!r} is unknown; use one of: {', '.join(EPOCH_US)}")
    try:
        statements = influxql.parse(text)
        results = await execute(statements, now_us=now_us(), epoch=epoch)
    except influxql.InfluxQLError as exc:
        return _error(400, f"error parsing query: {exc}; {influxql.SUPPORTED}")
    return JSON({"results": results}, headers=_HEADERS)


Epoch = Annotated[str | None, Query(description="ns, u, ms, s, m or h; absent: RFC 3339 times")]
Q = Annotated[str | None, Query(description="InfluxQL statements separated by ';'")]
Db = Annotated[str | None, Query(description="accepted and ignored (fieldgate has one database)")]


@router.get("/query", responses=_ANSWERS)
async def query_get(
    request: Request, runtime: RuntimeDep, q: Q = None, epoch: Epoch = None, db: Db = None
) -> JSON:
    """InfluxQL subset over fieldgate's series, as InfluxDB 1.x answers it (Grafana)."""
    return await _query(request, runtime, epoch)


@router.post("/query", responses=_ANSWERS)
async def query_post(
    request: Request, runtime: RuntimeDep, q: Q = None, epoch: Epoch = None, db: Db = None
) -> JSON:
    """The same, with `q` in the query string or an application/x-www-form-urlencoded body."""
    return await _query(request, runtime, epoch)
