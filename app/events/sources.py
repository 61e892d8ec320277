"""Webhook sources: create, rotate, list, delete; and a short-lived lookup cache for ingestion."""

from __future__ import annotations

import base64
import secrets
import time
from dataclasses import dataclass
from datetime import datetime, timedelta

import sqlalchemy as sa
from sqlalchemy import Engine
from sqlmodel import Session, col, select

from app.db import read_connection
from app.errors import Conflict, NotFound
from app.events.models import WebhookSource

NAME_PATTERN = r"^[a-z][a-z0-9_-]{1,63}$"


def new_secret() -> str:
    """A Standard Webhooks secret: `whsec_` and 32 random bytes in base64."""
    return "whsec_" + base64.b64encode(secrets.token_bytes(32)).decode()


def create_source(session: Session, tenant_id: int, name: str, now: datetime) -> WebhookSource:
    exists = session.exec(
        select(WebhookSource).where(
            WebhookSource.tenant_id == tenant_id, WebhookSource.name == name
        )
    ).first()
    if exists is not None:
        raise Conflict(f'a webhook source named "{name}" already exists; rotate its secret instead')
    source = WebhookSource(
        tenant_id=tenant_id,
        public_id="src_" + secrets.token_hex(10),
        name=name,
        secret=new_secret(),
        created_at=now,
    )
    session.add(source)
    session.flush()
    return source


def get_source(session: Session, tenant_id: int, name: str) -> WebhookSource:
    source = session.exec(
        select(WebhookSource).where(
            WebhookSource.tenant_id == tenant_id, WebhookSource.name == name
        )
    ).first()
    if source is None:
        raise NotFound(f'no webhook source named "{name}"')
    return source


def list_sources(session: Session, tenant_id: int) -> list[WebhookSource]:
    return list(
        session.exec(
            select(WebhookSource)
            .where(WebhookSource.tenant_id == tenant_id)
            .order_by(col(WebhookSource.name))
        )
    )


def rotate_secret(
    session: Session, source: WebhookSource, now: datetime, grace: timedelta
) -> WebhookSource:
    """A new secret; the current one keeps verifying for `grace` so senders can switch."""
    source.previous_secret = source.secret if grace.total_seconds() > 0 else None
    source.previous_expires_at = now + grace if grace.total_seconds() > 0 else None
    source.secret, source.rotated_at = new_secret(), now
    session.add(source)
    session.flush()
    return source


@dataclass(frozen=True)
class SourceInfo:
    id: int
    tenant_id: int
    name: str
    public_id: str
    secret: str
    previous_secret: str | None
    previous_expires_at: datetime | None

    def secrets(self, now: datetime) -> list[str]:
        if self.previous_secret and self.previous_expires_at and now < self.previous_expires_at:
            return [self.secret, self.previous_secret]
        return [self.secret]


class SourceCache:
    """Sources by public id, for a few seconds: ingestion reads them on every request. A
    rotation on another instance is seen within `ttl` (the old secret stays valid far longer,
    and this instance's own changes clear the cache at once)."""

    def __init__(self, engine: Engine, ttl: float = 5.0) -> None:
        self.engine, self.ttl = engine, ttl
        self._hits: dict[str, tuple[float, SourceInfo]] = {}

    def cached(self, public_id: str) -> SourceInfo | None:
        """The source if this process read it within `ttl`; never touches the database."""
        hit = self._hits.get(public_id)
        return hit[1] if hit is not None and hit[0] > time.monotonic() else None

    def get(self, public_id: str) -> SourceInfo | None:
        hit = self.cached(public_id)
        if hit is not None:
            return hit
        now = time.monotonic()
        t = WebhookSource.__table__  # type: ignore[attr-defined]
        with read_connection(self.engine) as conn:
            row = conn.execute(
                sa.select(
                    t.c.id,
                    t.c.tenant_id,
                    t.c.name,
                    t.c.public_id,
                    t.c.secret,
                    t.c.previous_secret,
                    t.c.previous_expires_at,
                ).where(t.c.public_id == public_id)
            ).first()
        if row is None:
            self._hits.pop(public_id, None)
            return None
        info = SourceInfo(*row)
        if len(self._hits) > 10_000:
            self._hits.clear()
        self._hits[public_id] = (now + self.ttl, info)
        return info

    def forget(self, public_id: str) -> None:
        self._hits.pop(public_id, None)
