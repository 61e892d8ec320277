"""The event log and the tenant-owned webhook sources that feed it."""

from __future__ import annotations

from datetime import datetime
from typing import Any

from sqlalchemy import Column, Index, Text, UniqueConstraint
from sqlmodel import Field, SQLModel

from app.db_types import BigId, JSONType, UTCDateTime


class WebhookSource(SQLModel, table=True):
    """An inbound endpoint (`POST /v1/webhooks/{public_id}`) with its own signing secret.

    The secret must be readable to verify HMACs, so it is stored as issued; after a
    rotation the previous secret keeps working until `previous_expires_at`."""

    __tablename__ = "webhook_source"
    __table_args__ = (UniqueConstraint("tenant_id", "name"),)

    id: int | None = Field(default=None, primary_key=True)
    tenant_id: int = Field(foreign_key="tenant.id")
    public_id: str = Field(max_length=40, unique=True)
    name: str = Field(max_length=64)
    secret: str = Field(max_length=100)
    previous_secret: str | None = Field(default=None, max_length=100)
    previous_expires_at: datetime | None = Field(default=None, sa_type=UTCDateTime)
    created_at: datetime = Field(sa_type=UTCDateTime)
    rotated_at: datetime | None = Field(default=None, sa_type=UTCDateTime)


class EventLog(SQLModel, table=True):
    """Every accepted event, once. `(tenant_id, source, dedupe_key)` is the idempotency key:
    a webhook-id, an Idempotency-Key, or a timer's id. The stored response answers a
    repeated delivery; pruning clears keys and responses after the retention window and
    deletes rows after the event retention."""

    __tablename__ = "event"
    __table_args__ = (
        UniqueConstraint("tenant_id", "source", "dedupe_key"),
        Index("ix_event_member_type_time", "member_id", "type", "occurred_at"),
        {"sqlite_autoincrement": True},  # ids are never reused, even after pruning
    )

    id: int | None = Field(default=None, sa_column=Column(BigId, primary_key=True))
    tenant_id: int = Field(foreign_key="tenant.id")
    source: str = Field(max_length=64)
    dedupe_key: str | None = Field(default=None, max_length=200)
    digest: str | None = Field(default=None, max_length=64)
    type: str = Field(max_length=100)
    member_id: int | None = Field(default=None, foreign_key="member.id")
    occurred_at: datetime = Field(sa_type=UTCDateTime)
    received_at: datetime = Field(sa_type=UTCDateTime, index=True)
    data: dict[str, Any] = Field(default_factory=dict, sa_type=JSONType)
    status_code: int | None = None
    # The first response's exact bytes (text, not JSONB, which would reorder the keys): a
    # repeated delivery gets the identical body. Kept for events with an idempotency key,
    # the only ones that can be repeated; one without has status 200 and no response.
    response: str | None = Field(default=None, sa_type=Text)
