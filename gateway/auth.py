"""Bearer-token authentication and the role checks, as FastAPI dependencies.

Roles: admin > operator (reads everything) > device (writes its own telemetry only). The header
is split by FastAPI's parser (the one its `HTTPBearer` uses; `HTTPBearer` also declares the scheme
in the OpenAPI document); its absence or a malformed header is our own 401 `unauthorized` with
`WWW-Authenticate: Bearer`. `principal_of` is the one check, used by the dependencies here and by
the telemetry lane (gateway/api/writes.py), which answers device posts without FastAPI's routing.
Resolved tokens (valid or not) are cached for `auth_cache_ttl_s` in a cachetools `TTLCache`, so
the ingest hot path does not query the database per request; rotating or deleting a token on
this instance drops it from the cache at once. A token is looked up once however many of its
requests wait, and one in use is refreshed in the background before it lapses
(`Authenticator.authenticate`).

A token with an expiry carries it in its principal, cached or not, and is checked against the
wall clock on every use: a cached entry never outlives its token. Uses of operator and admin
tokens are noted in memory (token hash -> latest use) and written in batches by the runtime
(`Runtime.record_token_uses`), never by the request.
"""

from __future__ import annotations

import asyncio
import hmac
import time
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from typing import TYPE_CHECKING, Annotated

from cachetools import TTLCache
from fastapi import Depends, Request
from fastapi.security import HTTPBearer
from fastapi.security.utils import get_authorization_scheme_param

from devices.credentials import hash_token
from devices.models import Role
from gateway.errors import Forbidden, Unauthorized
from gateway.store import registry
from gateway.timespec import now_us

if TYPE_CHECKING:
    from gateway.runtime import Runtime

_CACHE_MAX = 100_000


@dataclass(frozen=True, slots=True)
class Principal:
    role: Role
    device_id: str | None = None
    device_enabled: bool = True
    expires_us: int | None = None  # epoch microseconds; None: never


class Authenticator:
    def __init__(
        self,
        admin_token: str | None,
        ttl_s: float,
        max_tokens: int = _CACHE_MAX,
        clock: Callable[[], float] = time.monotonic,
        wall_clock: Callable[[], int] = now_us,
    ) -> None:
        """`clock` times the cache (monotonic seconds); `wall_clock` (epoch microseconds) is
        what expiries and uses are measured against."""
        self._admin_hash = hash_token(admin_token) if admin_token else None
        # token hash -> (its principal, or None for a token that is not valid; when to refresh
        # it). Bounded in size (the least recently used go first) and in time (an entry lapses
        # after `ttl_s`).
        self._cache: TTLCache[str, tuple[Principal | None, float]] = TTLCache(
            max_tokens, ttl=ttl_s, timer=clock
        )
        self._clock = clock
        self._wall_clock = wall_clock
        self._refresh_after = ttl_s / 2
        # token hash -> its latest use (epoch microseconds), operator and admin tokens only,
        # until `take_uses` hands them to the batch that writes them
        self._uses: dict[str, int] = {}
        # token hash -> (generation, the lookup in flight), which its requests wait for
        self._lookups: dict[str, tuple[int, asyncio.Task[Principal | None]]] = {}
        self._tasks: set[asyncio.Task[Principal | None]] = set()  # held until done
        self._generation = 0  # moved on by `forget`: a lookup begun before it is not cached

    async def authenticate(
        self, token: str, before_lookup: Callable[[], None] | None = None
    ) -> Principal:
        """The principal of `token`, or Unauthorized. `before_lookup` runs (and may raise) only
        when the database must be asked: the admin token and cached tokens never meet it.

        A token is looked up once however many of its requests wait for it. A cached token used
        past half its time to live is looked up again in the background while its requests go on
        with the cached answer: a token in steady use is never older than the TTL and its
        requests never wait for the database (a lookup queues behind the writer's commits: on
        PostgreSQL they took 46 ms, up to 147, bench/README.md, issue 11)."""
        token_hash = hash_token(token)
        if self._admin_hash is not None and hmac.compare_digest(token_hash, self._admin_hash):
            return Principal(Role.ADMIN)
        try:
            principal, refresh_at = self._cache[token_hash]
        except KeyError:
            if before_lookup is not None:
                before_lookup()
            # shielded: a caller that goes away does not cancel the others' lookup
            principal = await asyncio.shield(self._lookup_once(token_hash))
        else:
            # (a token that is not valid is not refreshed: its requests may wait, and a client
            # repeating one must not make queries past the failure throttle)
            if principal is not None and refresh_at <= self._clock():
                self._lookup_once(token_hash)
        if principal is None:
            raise Unauthorized("the token is not valid")  # a bearer token, or a path's
        if principal.expires_us is not None or principal.role is not Role.DEVICE:
            self._check_and_note(token_hash, principal)
        return principal

    def _check_and_note(self, token_hash: str, principal: Principal) -> None:
        """Refuse an expired token; note a use of an operator or admin token. (A device
        token's use is its device's `last_seen`: the telemetry lane's requests pay only the
        two attribute checks before this.)"""
        now = self._wall_clock()
        if principal.expires_us is not None and principal.expires_us <= now:
            raise Unauthorized("the bearer token has expired", code="token_expired")
        if principal.role is not Role.DEVICE:
            self._uses[token_hash] = now

    def take_uses(self) -> dict[str, int]:
        """The uses noted since the last call (token hash -> latest use), for writing."""
        uses, self._uses = self._uses, {}
        return uses

    def give_back_uses(self, uses: dict[str, int]) -> None:
        """Uses that could not be written (the database is away): kept for the next batch,
        unless a later use of the same token was noted meanwhile."""
        for token_hash, used_us in uses.items():
            if self._uses.get(token_hash, 0) < used_us:
                self._uses[token_hash] = used_us

    def _lookup_once(self, token_hash: str) -> asyncio.Task[Principal | None]:
        """The lookup of `token_hash` in flight (begun since the last `forget`), or a new one."""
        current = self._lookups.get(token_hash)
        if current is not None and current[0] == self._generation:
            return current[1]
        task = asyncio.create_task(self._lookup(token_hash, self._generation))
        self._lookups[token_hash] = (self._generation, task)
        self._tasks.add(task)
        task.add_done_callback(partial(self._looked_up, token_hash))
        return task

    async def _lookup(self, token_hash: str, generation: int) -> Principal | None:
        found = await registry.find_token(token_hash)
        principal = Principal(*found) if found else None
        if generation == self._generation:
            self._cache[token_hash] = (principal, self._clock() + self._refresh_after)
        return principal

    def _looked_up(self, token_hash: str, task: asyncio.Task[Principal | None]) -> None:
        self._tasks.discard(task)
        current = self._lookups.get(token_hash)
        if current is not None and current[1] is task:
            del self._lookups[token_hash]
        if not task.cancelled():
            # A background refresh that failed (database unavailable) is nobody's error: the
            # entry lapses at its time and the next request meets the failure itself.
            task.exception()

    def forget(self, token_hashes: list[str] | None = None) -> None:
        """Drop cached tokens (all of them when None): after a rotation, delete or disable.
        Lookups in flight finish for their callers but are not cached, and later requests start
        their own."""
        self._generation += 1
        if token_hashes is None:
            self._cache.clear()
        else:
            for h in token_hashes:
                self._cache.pop(h, None)


async def principal_of(
    runtime: Runtime, authorization: str | None, address: str | None
) -> Principal:
    """The principal of an `Authorization` header's bearer token, or Unauthorized: the one
    check every request meets, through the `BearerPrincipal` dependency or the telemetry lane
    (gateway/api/writes.py). The header is split by FastAPI's own parser, the one HTTPBearer
    uses; a missing or malformed header is our 401 (HTTPBearer's would be `{"detail": ...}`).

    An address with many recent failures gets 429 instead of a lookup; a token already known
    (cached) costs no lookup and passes, so its valid clients are not slowed."""
    scheme, token = get_authorization_scheme_param(authorization)
    if not (scheme and token) or scheme.lower() != "bearer":
        if not authorization:
            raise Unauthorized("missing Authorization: Bearer <token> header")
        raise Unauthorized("the Authorization header must be 'Bearer <token>'")
    return await token_principal(runtime, token, address)


async def token_principal(runtime: Runtime, token: str, address: str | None) -> Principal:
    """The principal of `token` however it came (a bearer header, through `principal_of`; the
    path of ThingsBoard's device API, gateway/api/thingsboard.py), or Unauthorized: cached by
    the Authenticator, and behind the failure throttle of `address` (429) like every token."""
    throttle = runtime.auth_throttle
    try:
        return await runtime.authenticator.authenticate(token, partial(throttle.check, address))
    except Unauthorized:
        throttle.failed(address)
        raise


class BearerPrincipal(HTTPBearer):
    """The principal of the request's bearer token, as one FastAPI security dependency.

    A subclass of HTTPBearer for the scheme it declares in the OpenAPI document; the check is
    `principal_of`. One dependency, not HTTPBearer as a sub-dependency of a function of ours:
    that second dependency cost ~10 us of CPU per request (bench/auth_overhead.py;
    bench/README.md, "Library parts (issue 9)")."""

    async def __call__(self, request: Request) -> Principal:  # type: ignore[override]
        address = request.client.host if request.client else None
        return await principal_of(
            request.app.state.runtime, request.headers.get("authorization"), address
        )


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


def device_writer(principal: Principal, device_id: str) -> Principal:
    """`principal`, if it may write `device_id`'s telemetry (its own device's token, enabled);
    else Forbidden."""
    if principal.role is not Role.DEVICE:
        raise Forbidden("only the device's own token may write its telemetry")
    if principal.device_id != device_id:
        raise Forbidden(f"this token belongs to another device, not {device_id!r}")
    if not principal.device_enabled:
        raise Forbidden(f"device {device_id!r} is disabled", code="device_disabled")
    return principal


async def _device_writer(
    device_id: str, principal: Annotated[Principal, Depends(_principal)]
) -> Principal:
    return device_writer(principal, device_id)


DeviceAuth = Annotated[Principal, Depends(_device_writer)]
OperatorAuth = Annotated[Principal, Depends(_require(Role.OPERATOR))]
AdminAuth = Annotated[Principal, Depends(_require(Role.ADMIN))]
