"""Bearer tokens: random values shown once, stored as SHA-256 hashes.

Tokens carry 256 random bits, so a fast hash is the right tool (a slow password hash guards
guessable secrets; nobody guesses 2**256). Lookups go by hash, and the final comparison is
constant-time.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets

from devices.models import Role

_PREFIX = {Role.ADMIN: "fga_", Role.OPERATOR: "fgo_", Role.DEVICE: "fgd_"}


def generate_token(role: Role) -> str:
    """A new token for `role`; the prefix lets secret scanners and people tell them apart."""
    return _PREFIX[role] + secrets.token_urlsafe(32)


def hash_token(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


def tokens_match(token: str, token_hash: str) -> bool:
    return hmac.compare_digest(hash_token(token), token_hash)
