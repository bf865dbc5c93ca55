"""Operator and admin tokens over HTTP: list, issue (with an optional expiry), revoke. Admin
only. Device tokens are not here: they come and go with their devices (/devices)."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Path, Request
from fastapi.responses import Response

from devices.models import Role
from gateway.api.deps import JSON, RuntimeDep, json_body_doc, read_json
from gateway.api.schemas import TokenCreate, TokenCreated, TokenList
from gateway.auth import AdminAuth
from gateway.store import registry
from gateway.timespec import now_us
from gateway.token_views import expiry_us, token_view

router = APIRouter(prefix="/tokens", tags=["tokens"])


@router.get("", response_model=TokenList)
async def list_tokens(_: AdminAuth) -> JSON:
    """List operator and admin tokens, oldest first: id, role, name, created, last used,
    expires (never a token's value)."""
    return JSON({"tokens": [token_view(t) for t in await registry.list_tokens()]})


# The body is read in the handler, after the token check (see gateway.api.deps.read_json).
@router.post(
    "", status_code=201, response_model=TokenCreated, openapi_extra=json_body_doc(TokenCreate)
)
async def create_token(request: Request, _: AdminAuth, runtime: RuntimeDep) -> JSON:
    """Issue an operator or admin token, optionally expiring; the answer holds its value,
    shown only this once."""
    body = await read_json(request, TokenCreate, runtime.settings.max_request_body_bytes)
    until = expiry_us(at=body.expires_at, within=body.expires_in, now_us=now_us())
    row, token = await registry.issue_token(Role(body.role), body.name, expires_us=until)
    return JSON({**token_view(row), "token": token}, status_code=201)


@router.delete("/{token_id}", status_code=204, response_class=Response)
async def revoke_token(
    token_id: Annotated[int, Path(description="the id GET /tokens shows")],
    _: AdminAuth,
    runtime: RuntimeDep,
) -> Response:
    """Revoke an operator or admin token: refused at once on this gateway, and within
    FIELDGATE_AUTH_SYNC_INTERVAL_S (0.5 s) on every other one sharing its database."""
    await runtime.revoke_token(token_id)
    return Response(status_code=204)
