"""Tenants and API keys. Services flush; the caller's unit of work commits."""

from __future__ import annotations

import hashlib
import hmac
import secrets
from datetime import datetime

from sqlmodel import Session, col, select

from app.errors import NotFound
from app.tenancy.models import ApiKey, Tenant

KEY_PREFIX = "fw"


def _hash(secret: str) -> str:
    # The secret is 256 random bits, so a fast hash is enough: there is nothing to brute-force.
    return hashlib.sha256(secret.encode()).hexdigest()


def create_tenant(session: Session, name: str, now: datetime) -> tuple[Tenant, ApiKey, str]:
    tenant = Tenant(name=name, created_at=now)
    session.add(tenant)
    session.flush()
    key, plaintext = create_api_key(session, tenant, "default", now)
    return tenant, key, plaintext


def create_api_key(
    session: Session, tenant: Tenant, name: str, now: datetime
) -> tuple[ApiKey, str]:
    assert tenant.id is not None
    prefix = secrets.token_hex(6)
    secret = secrets.token_urlsafe(32)
    key = ApiKey(
        tenant_id=tenant.id, name=name, prefix=prefix, secret_hash=_hash(secret), created_at=now
    )
    session.add(key)
    session.flush()
    return key, f"{KEY_PREFIX}_{prefix}_{secret}"


def authenticate(session: Session, presented: str) -> Tenant | None:
    """The tenant whose live key this is, or None. Compared in constant time."""
    parts = presented.split("_", 2)
    if len(parts) != 3 or parts[0] != KEY_PREFIX:
        return None
    key = session.exec(select(ApiKey).where(ApiKey.prefix == parts[1])).first()
    if key is None or key.revoked_at is not None:
        hmac.compare_digest(_hash(parts[2]), "0" * 64)  # same work whether or not the key exists
        return None
    if not hmac.compare_digest(_hash(parts[2]), key.secret_hash):
        return None
    return session.get(Tenant, key.tenant_id)


def list_api_keys(session: Session, tenant_id: int) -> list[ApiKey]:
    return list(
        session.exec(select(ApiKey).where(ApiKey.tenant_id == tenant_id).order_by(col(ApiKey.id)))
    )


def revoke_api_key(session: Session, tenant_id: int, key_id: int, now: datetime) -> ApiKey:
    key = session.get(ApiKey, key_id)
    if key is None or key.tenant_id != tenant_id:
        raise NotFound(f"no API key {key_id}")
    if key.revoked_at is None:
        key.revoked_at = now
        session.add(key)
        session.flush()
    return key


def find_tenant_by_name(session: Session, name: str) -> Tenant | None:
    return session.exec(select(Tenant).where(Tenant.name == name).order_by(col(Tenant.id))).first()
