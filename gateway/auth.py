"""Bearer-token authentication and the role checks, as FastAPI dependencies.

Roles: admin > operator (reads everything) > device (writes its own telemetry only). The header
is parsed by FastAPI's `HTTPBearer` (which also declares the scheme in the OpenAPI document); its
absence or a malformed header is our own 401 `unauthorized` with `WWW-Authenticate: Bearer`.
Resolved tokens (valid or not) are cached for `auth_cache_ttl_s` in a cachetools `TTLCache`, so
the ingest hot path does not query the database per request; rotating or deleting a token on
this instance drops it from the cache at once.
"""

from __future__ import annotations

import hmac
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from typing import Annotated

from cachetools import TTLCache
from fastapi import Depends, Request
from fastapi.security import HTTPBearer

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
    def __init__(self, admin_token: str | None, ttl_s: float, max_tokens: int = _CACHE_MAX) -> None:
        self._admin_hash = hash_token(admin_token) if admin_token else None
        # token hash -> its principal, or None for a token that is not valid. Bounded in size
        # (the least recently used go first) and in time (an entry lapses after `ttl_s`).
        self._cache: TTLCache[str, Principal | None] = TTLCache(max_tokens, ttl=ttl_s)

    async def authenticate(
        self, token: str, before_lookup: Callable[[], None] | None = None
    ) -> Principal:
        """The principal of `token`, or Unauthorized. `before_lookup` runs (and may raise) only
        when the database must be asked: the admin token and cached tokens never meet it."""
        token_hash = hash_token(token)
        if self._admin_hash is not None and hmac.compare_digest(token_hash, self._admin_hash):
            return Principal(Role.ADMIN)
        try:
            principal = self._cache[token_hash]
        except KeyError:
            if before_lookup is not None:
                before_lookup()
            found = await registry.find_token(token_hash)
            principal = Principal(*found) if found else None
            self._cache[token_hash] = principal
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


class BearerPrincipal(HTTPBearer):
    """The principal of the request's bearer token, as one FastAPI security dependency.

    HTTPBearer parses the header and declares the scheme in the OpenAPI document. With
    `auto_error=False` it answers None instead of its own 401 (a `{"detail": ...}` body), and we
    raise ours. A subclass, not HTTPBearer as a sub-dependency of a function of ours: that
    second dependency cost ~10 us of CPU per request (~2% of a 100-reading POST); as one it
    costs ~2.5 us more than the hand-made parser did (bench/auth_overhead.py; bench/README.md,
    "Library parts (issue 9)")."""

    async def __call__(self, request: Request) -> Principal:  # type: ignore[override]
        credentials = await super().__call__(request)
        if credentials is None:
            if not request.headers.get("authorization"):
                raise Unauthorized("missing Authorization: Bearer <token> header")
            raise Unauthorized("the Authorization header must be 'Bearer <token>'")
        runtime = request.app.state.runtime
        authenticator: Authenticator = runtime.authenticator
        throttle: AuthThrottle = runtime.auth_throttle
        address = request.client.host if request.client else None
        try:
            # An address with many recent failures gets 429 instead of a lookup; a token already
            # known (cached) costs no lookup and passes, so its valid clients are not slowed.
            return await authenticator.authenticate(
                credentials.credentials, partial(throttle.check, address)
            )
        except Unauthorized:
            throttle.failed(address)
            raise


_principal = BearerPrincipal(
    auto_error=False,
    scheme_name="bearerAuth",
    description="A device, operator or admin token: `Authorization: Bearer <token>`.",
)


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
