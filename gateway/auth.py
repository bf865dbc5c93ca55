"""Bearer-token authentication and the role checks, as FastAPI dependencies.

Roles: admin > operator (reads everything) > device (writes its own telemetry only). Resolved
tokens are cached for `auth_cache_ttl_s` so the ingest hot path does not query the database per
request; rotating or deleting a token on this instance drops it from the cache at once.
"""

from __future__ import annotations

import hmac
import time
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from typing import Annotated

from fastapi import Depends, Request

from devices.credentials import hash_token
from devices.models import Role
from gateway.errors import Forbidden, Unauthorized
from gateway.store import registry
from gateway.throttle import AuthThrottle

_CACHE_MAX = 100_000


@dataclass(frozen=True, slots=True)
class Principal:
    role: Role
    device_id: str | None = None
    device_enabled: bool = True


class Authenticator:
    def __init__(self, admin_token: str | None, ttl_s: float) -> None:
        self._admin_hash = hash_token(admin_token) if admin_token else None
        self._ttl_s = ttl_s
        self._cache: dict[str, tuple[float, Principal | None]] = {}

    async def authenticate(
        self, token: str, before_lookup: Callable[[], None] | None = None
    ) -> Principal:
        """The principal of `token`, or Unauthorized. `before_lookup` runs (and may raise) only
        when the database must be asked: the admin token and cached tokens never meet it."""
        token_hash = hash_token(token)
        if self._admin_hash is not None and hmac.compare_digest(token_hash, self._admin_hash):
            return Principal(Role.ADMIN)
        now = time.monotonic()
        hit = self._cache.get(token_hash)
        if hit is not None and hit[0] > now:
            principal = hit[1]
        else:
            if before_lookup is not None:
                before_lookup()
            found = await registry.find_token(token_hash)
            principal = Principal(*found) if found else None
            if len(self._cache) >= _CACHE_MAX:
                self._cache.clear()
            self._cache[token_hash] = (now + self._ttl_s, principal)
        if principal is None:
            raise Unauthorized("the bearer token is not valid")
        return principal

    def forget(self, token_hashes: list[str] | None = None) -> None:
        """Drop cached tokens (all of them when None): after a rotation, delete or disable."""
        if token_hashes is None:
            self._cache.clear()
        else:
            for h in token_hashes:
                self._cache.pop(h, None)


def _bearer(request: Request) -> str:
    header = request.headers.get("authorization")
    if not header:
        raise Unauthorized("missing Authorization: Bearer <token> header")
    scheme, _, token = header.partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        raise Unauthorized("the Authorization header must be 'Bearer <token>'")
    return token.strip()


async def _principal(request: Request) -> Principal:
    runtime = request.app.state.runtime
    authenticator: Authenticator = runtime.authenticator
    throttle: AuthThrottle = runtime.auth_throttle
    token = _bearer(request)
    address = request.client.host if request.client else None
    try:
        # An address with many recent failures gets 429 instead of a lookup; a token already
        # known (cached) costs no lookup and passes, so its valid clients are not slowed.
        return await authenticator.authenticate(token, partial(throttle.check, address))
    except Unauthorized:
        throttle.failed(address)
        raise


def _require(role: Role):  # type: ignore[no-untyped-def]
    async def check(principal: Annotated[Principal, Depends(_principal)]) -> Principal:
        if not principal.role.may(role):
            held = principal.role.value
            raise Forbidden(f"this needs a token with role {role.value}, not {held}")
        return principal

    return check


async def _device_writer(
    device_id: str, principal: Annotated[Principal, Depends(_principal)]
) -> Principal:
    if principal.role is not Role.DEVICE:
        raise Forbidden("only the device's own token may write its telemetry")
    if principal.device_id != device_id:
        raise Forbidden(f"this token belongs to another device, not {device_id!r}")
    if not principal.device_enabled:
        raise Forbidden(f"device {device_id!r} is disabled", code="device_disabled")
    return principal


DeviceAuth = Annotated[Principal, Depends(_device_writer)]
OperatorAuth = Annotated[Principal, Depends(_require(Role.OPERATOR))]
AdminAuth = Annotated[Principal, Depends(_require(Role.ADMIN))]
