"""Member tokens: short-lived HS256 JWTs the service issues to mini-program members.

A token names its member and its tenant; `MemberDep` refuses a token whose tenant or member
no longer matches, so a member of tenant A can never act in tenant B.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timedelta

import jwt

AUDIENCE = "flywheel-member"
ALGORITHM = "HS256"


@dataclass(frozen=True)
class MemberClaims:
    tenant_id: int
    member_id: int
    expires_at: datetime


def issue_member_token(
    secret: str, tenant_id: int, member_id: int, now: datetime, ttl_seconds: int
) -> tuple[str, datetime]:
    expires = now + timedelta(seconds=ttl_seconds)
    token = jwt.encode(
        {
            "sub": str(member_id),
            "tid": tenant_id,
            "aud": AUDIENCE,
            "iat": int(now.timestamp()),
            "exp": int(expires.timestamp()),
        },
        secret,
        algorithm=ALGORITHM,
    )
    return token, expires


def read_member_token(secret: str, token: str, now: datetime) -> MemberClaims | None:
    """The claims of a valid, unexpired token, or None."""
    try:
        claims = jwt.decode(
            token,
            secret,
            algorithms=[ALGORITHM],
            audience=AUDIENCE,
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
