from __future__ import annotations

from datetime import datetime
from typing import Any

from sqlalchemy import Column, ForeignKey, Index
from sqlmodel import Field, SQLModel

from app.db_types import BigId, JSONType, UTCDateTime


class ActionEndpoint(SQLModel, table=True):
    """Where a tenant's actions are delivered, and the secret Flywheel signs them with."""

    __tablename__ = "action_endpoint"

    id: int | None = Field(default=None, primary_key=True)
    tenant_id: int = Field(foreign_key="tenant.id", unique=True)
    url: str = Field(max_length=2000)
    secret: str = Field(max_length=100)
    previous_secret: str | None = Field(default=None, max_length=100)
    previous_expires_at: datetime | None = Field(default=None, sa_type=UTCDateTime)
    disabled_at: datetime | None = Field(default=None, sa_type=UTCDateTime)
    disabled_reason: str | None = Field(default=None, max_length=200)
    created_at: datetime = Field(sa_type=UTCDateTime)
    updated_at: datetime = Field(sa_type=UTCDateTime)


class Outbox(SQLModel, table=True):
    """One action to deliver. Status: pending → delivering (leased) → delivered | dead;
    `suppressed` rows (send policy) are kept for the record and never sent.

    A member's actions are delivered in `(order_at, id)` order: a row waits while an
    earlier one of the same member is pending or being delivered."""

    __table_args__ = (
        Index("ix_outbox_due", "status", "next_attempt_at"),
        Index("ix_outbox_member_order", "tenant_id", "member_id", "status", "order_at"),
        Index("ix_outbox_tenant_id", "tenant_id", "id"),
        # AUTOINCREMENT on SQLite: `act_<id>` is the receivers' dedupe key, never reused.
        {"sqlite_autoincrement": True},
    )

    id: int | None = Field(default=None, sa_column=Column(BigId, primary_key=True))
    tenant_id: int = Field(foreign_key="tenant.id")
    member_id: int | None = Field(default=None, foreign_key="member.id")
    event_id: int | None = Field(default=None, description="the event log row that caused it")
    funnel_id: int | None = Field(default=None, foreign_key="funnel.id")
    source: str = Field(max_length=200, description="definition path: transitions[2].actions[0]")
    type: str = Field(max_length=64)
    payload: dict[str, Any] = Field(default_factory=dict, sa_type=JSONType)
    status: str = Field(max_length=16)
    order_at: datetime = Field(sa_type=UTCDateTime)
    next_attempt_at: datetime = Field(sa_type=UTCDateTime)
    attempts: int = 0
    lease_until: datetime | None = Field(default=None, sa_type=UTCDateTime)
    last_status: int | None = None
    last_error: str | None = Field(default=None, max_length=500)
    delivered_at: datetime | None = Field(default=None, sa_type=UTCDateTime)
    created_at: datetime = Field(sa_type=UTCDateTime)


class DeliveryAttempt(SQLModel, table=True):
    __tablename__ = "delivery_attempt"

    id: int | None = Field(default=None, sa_column=Column(BigId, primary_key=True))
    outbox_id: int = Field(
        sa_column=Column(BigId, ForeignKey("outbox.id", ondelete="CASCADE"), index=True)
    )
    attempt: int
    started_at: datetime = Field(sa_type=UTCDateTime)
    duration_ms: int
    status_code: int | None = None
    error: str | None = Field(default=None, max_length=500)
