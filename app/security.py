"""Short-lived HS256 JWTs the service issues: member tokens for mini-program members, and
console tokens for marketers (a one-time sign-in link and the session cookie it sets).

A member token names its member and its tenant; `MemberDep` refuses a token whose tenant or
member no longer matches, so a member of tenant A can never act in tenant B. Each kind has
its own audience: a member token never opens the console, nor a link the API.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timedelta

import jwt

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


def _read(secret: str, audience: str, token: str, now: datetime) -> MemberClaims | None:
    """The claims of a valid, unexpired token for `audience`, or None."""
    try:
        claims = jwt.decode(
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
