"""An operator or admin token as admins see it (never its value nor its hash), and the expiry
they ask for. The HTTP API (GET, POST /tokens) and the CLI (`fieldgate tokens list|create`)
show the same view and take the same expiries, from here."""

from __future__ import annotations

from typing import Any

from devices.models import ApiToken, Role
from gateway.errors import BadRequest, Unprocessable
from gateway.timespec import MAX_US, format_ts, is_duration, parse_duration, parse_instant


def token_view(token: ApiToken) -> dict[str, Any]:
    return {
        "id": token.id,
        "role": Role(token.role).value,
        "name": token.name,
        "created_at": format_ts(int(token.created_at.timestamp() * 1_000_000)),
        "last_used_at": _ts_or_none(token.last_used_us),
        "expires_at": _ts_or_none(token.expires_us),
    }


def _ts_or_none(us: int | None) -> str | None:
    return None if us is None else format_ts(us)


def expiry_us(*, at: str | None = None, within: str | None = None, now_us: int) -> int | None:
    """When a new token expires (epoch microseconds; None: never): at an RFC 3339 time `at`, or
    a duration `within` (`30d`, `12h`) from `now_us`. Refused with 422 `invalid_expiry`: both
    given, neither readable, or not in the future."""
    if at is not None and within is not None:
        raise Unprocessable("give expires_at or expires_in, not both", code="invalid_expiry")
    try:
        if within is not None:
            until = now_us + parse_duration(within, name="expires_in")
        elif at is not None:
            until = parse_instant(at, now_us, name="expires_at")
        else:
            return None
    except BadRequest as exc:  # the parsers speak of query parameters; this is a body's field
        raise Unprocessable(exc.message, code="invalid_expiry") from None
    if until <= now_us:
        raise Unprocessable(
            f"the expiry {format_ts(until)} is not in the future", code="invalid_expiry"
        )
    if until > MAX_US:
        raise Unprocessable("the expiry is after the year 9999", code="invalid_expiry")
    return until


def expiry_of_text(text: str, now_us: int) -> int:
    """`--expires` of the CLI: a duration from now (`30d`) or an RFC 3339 time."""
    if is_duration(text):
        until = expiry_us(within=text, now_us=now_us)
    else:
        until = expiry_us(at=text, now_us=now_us)
    assert until is not None  # one of them was given
    return until
