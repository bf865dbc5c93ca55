"""Bearer tokens: random values shown once, stored as SHA-256 hashes.

Tokens carry 256 random bits, so a fast hash is the right tool (a slow password hash guards
guessable secrets; nobody guesses 2**256). A presented token is hashed and looked up by its hash
(gateway/auth.py: in a cache, then by the database's index; neither is constant-time, and what
their timing could leak is part of a stored hash, which does not give back its token). Only the
admin token, held in the settings rather than the database, is compared, with
`hmac.compare_digest` on the hashes.
"""

from __future__ import annotations

import hashlib
import secrets

from devices.models import Role

_PREFIX = {Role.ADMIN: "fga_", Role.OPERATOR: "fgo_", Role.DEVICE: "fgd_", Role.WRITER: "fgw_"}


def generate_token(role: Role) -> str:
    """A new token for `role`; the prefix lets secret scanners and people tell them apart."""
    return _PREFIX[role] + secrets.token_urlsafe(32)


def hash_token(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()
