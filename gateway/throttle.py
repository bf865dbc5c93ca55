"""Failed authentication, throttled per client address.

Every wrong bearer token costs a database lookup (a token never seen before misses the
Authenticator's cache), so one client guessing tokens could keep the database busy: 5,000 wrong
tokens were 5,000 lookups. `AuthThrottle` counts failures per client address; once an address
has `limit` failures, each less than `window_s` after the one before, its requests are answered
429 `too_many_auth_failures` with Retry-After, without a lookup, until `window_s` after its last
failure. The check guards the lookup only: the admin token and tokens the Authenticator has
cached as valid pass, so a device behind the same address (a NAT) that keeps posting goes on.
Successes are not counted and do not reset the count (a client holding one valid token must not
be able to keep guessing others); other addresses are not affected.

The address is the one the HTTP server reports (uvicorn honours X-Forwarded-For only from
`FORWARDED_ALLOW_IPS`, 127.0.0.1 by default: a client on the gateway's own host can name any
address): behind a proxy that is not trusted, all clients share its address.
The per-address state is a cachetools TTLCache: bounded in size (the least recently failed
addresses go first) and in time (an address's entry lapses `window_s` after its last failure).
"""

from __future__ import annotations

import math

from cachetools import TTLCache

from gateway.errors import FieldgateError

_MAX_ADDRESSES = 100_000


class TooManyAuthFailures(FieldgateError):
    status_code = 429
    code = "too_many_auth_failures"

    def __init__(self, message: str, *, retry_after_s: int) -> None:
        super().__init__(message, headers={"Retry-After": str(retry_after_s)})


class AuthThrottle:
    def __init__(self, *, limit: int, window_s: float, max_addresses: int = _MAX_ADDRESSES) -> None:
        self.limit = limit
        self.window_s = window_s
        # address -> (failures, monotonic time of the last one)
        self._failures: TTLCache[str, tuple[int, float]] = TTLCache(max_addresses, ttl=window_s)

    def check(self, address: str | None) -> None:
        """Raise TooManyAuthFailures when `address` has failed too often of late."""
        if not self.limit or address is None or not self._failures:
            return
        entry = self._failures.get(address)
        if entry is not None and entry[0] >= self.limit:
            wait = entry[1] + self.window_s - self._failures.timer()
            raise TooManyAuthFailures(
                f"{entry[0]} failed authentications from {address}; try again later",
                retry_after_s=max(1, math.ceil(wait)),
            )

    def failed(self, address: str | None) -> None:
        """Count one failed authentication of `address`."""
        if not self.limit or address is None:
            return
        count = self._failures.get(address, (0, 0.0))[0]
        self._failures[address] = (count + 1, self._failures.timer())
