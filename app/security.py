"""Short-lived HS256 JWTs the service issues: member tokens for mini-program members, and
console tokens for marketers (a one-time sign-in link and the session cookie it sets).

A member token names its member and its tenant; `MemberDep` refuses a token whose tenant or
member no longer matches, so a member of tenant A can never act in tenant B. Each kind has
its own audience: a member token never opens the console, nor a link the API.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
from dataclasses import dataclass
from datetime import datetime, timedelta
from functools import lru_cache
from typing import Any

import jwt
import orjson

AUDIENCE = "flywheel-member"
CONSOLE_LINK = "flywheel-console-link"  # in a sign-in URL: minutes
CONSOLE_SESSION = "flywheel-console"  # in the console's cookie: hours
ALGORITHM = "HS256"


@dataclass(frozen=True)
class MemberClaims:
    tenant_id: int
    member_id: int
    expires_at: datetime


def _issue(
    secret: str, audience: str, tenant_id: int, subject: str, now: datetime, ttl_seconds: int
) -> tuple[str, datetime]:
    expires = now + timedelta(seconds=ttl_seconds)
    token = jwt.encode(
        {
            "sub": subject,
            "tid": tenant_id,
            "aud": audience,
            "iat": int(now.timestamp()),
            "exp": int(expires.timestamp()),
        },
        secret,
        algorithm=ALGORITHM,
    )
    return token, expires


# Reading a token: PyJWT's decode cost ~98 µs of the service's CPU per request (it checks
# each character of every segment in Python), where all else the service does for an append
# costs it ~200 µs. A token exactly as `_issue` makes it is read here instead (the whole
# read ~9 µs): our own header, byte for byte; the signature compared as text with the one
# `secret` makes for the exact bytes signed (so only a holder of the secret can make a token
# this accepts); the payload in canonical base64 and exactly our claims. Anything else
# (another header, other claims, a list of audiences, a bad signature) goes to PyJWT, which
# decides; what is read here PyJWT would read the same (tests/test_tokens.py holds the two
# to it).
_HEADER = jwt.encode({}, "h" * 64, algorithm=ALGORITHM).split(".")[0]
_CLAIMS = frozenset({"sub", "tid", "aud", "iat", "exp"})


@lru_cache(maxsize=8)
def _signer(secret: str) -> Any:
    return hmac.new(secret.encode(), digestmod=hashlib.sha256)


def _b64(raw: bytes) -> bytes:
    return base64.urlsafe_b64encode(raw).rstrip(b"=")


def _issued_claims(secret: str, audience: str, token: str) -> dict[str, Any] | None:
    """The claims of a token made by `_issue` with `secret` for `audience`, or None for any
    other token (valid or not: PyJWT reads those)."""
    parts = token.split(".")
    if len(parts) != 3 or parts[0] != _HEADER or not token.isascii():
        return None
    signer = _signer(secret).copy()
    signer.update(f"{parts[0]}.{parts[1]}".encode())
    if not hmac.compare_digest(_b64(signer.digest()), parts[2].encode()):
        return None
    try:
        payload = base64.urlsafe_b64decode(parts[1] + "=" * (-len(parts[1]) % 4))
        claims = orjson.loads(payload)
    except ValueError:
        return None
    if (
        _b64(payload) != parts[1].encode()
        or not isinstance(claims, dict)
        or claims.keys() != _CLAIMS
        or claims["aud"] != audience
        or not isinstance(claims["sub"], str)
    ):
        return None
    return claims


def _read(secret: str, audience: str, token: str, now: datetime) -> MemberClaims | None:
    """The claims of a valid, unexpired token for `audience`, or None."""
    try:
        claims = _issued_claims(secret, audience, token) or jwt.decode(
            token,
            secret,
            algorithms=[ALGORITHM],
            audience=audience,
            options={
                "require": ["exp", "sub", "tid", "aud"],
                "verify_exp": False,
                "verify_iat": False,
                "verify_nbf": False,
            },
        )
        expires = datetime.fromtimestamp(int(claims["exp"]), tz=now.tzinfo)
        if expires <= now:  # checked against the service's clock, which tests can freeze
            return None
        return MemberClaims(int(claims["tid"]), int(claims["sub"]), expires)
    except (jwt.PyJWTError, KeyError, ValueError, TypeError):
        return None


def issue_member_token(
    secret: str, tenant_id: int, member_id: int, now: datetime, ttl_seconds: int
) -> tuple[str, datetime]:
    return _issue(secret, AUDIENCE, tenant_id, str(member_id), now, ttl_seconds)


def read_member_token(secret: str, token: str, now: datetime) -> MemberClaims | None:
    return _read(secret, AUDIENCE, token, now)


def issue_console_token(
    secret: str, audience: str, tenant_id: int, now: datetime, ttl_seconds: int
) -> str:
    return _issue(secret, audience, tenant_id, "0", now, ttl_seconds)[0]


def read_console_token(secret: str, audience: str, token: str, now: datetime) -> int | None:
    """The tenant a valid console token (link or session) signs in, or None."""
    claims = _read(secret, audience, token, now)
    return claims.tenant_id if claims else None
