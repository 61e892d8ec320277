from __future__ import annotations

from datetime import datetime

from sqlalchemy import Column, Index, UniqueConstraint
from sqlmodel import Field, SQLModel

from app.db_types import BigId, UTCDateTime


class Voucher(SQLModel, table=True):
    """A single-use entitlement: issued → redeemed | expired | voided.

    `origin` says what issued it ("groupbuy:<team>:<member>", "action:<outbox id>") and is
    unique per tenant, so whatever issues a voucher twice (a retried batch, a replayed
    event) still holds one. Redemption is a conditional UPDATE on `status = 'issued'`, so
    two tills redeeming at the same moment succeed exactly once."""

    __table_args__ = (
        UniqueConstraint("tenant_id", "code"),
        UniqueConstraint("tenant_id", "origin"),
        Index("ix_voucher_member", "tenant_id", "member_id", "issued_at"),
        Index("ix_voucher_due", "status", "expires_at"),
        {"sqlite_autoincrement": True},
    )

    id: int | None = Field(default=None, sa_column=Column(BigId, primary_key=True))
    tenant_id: int = Field(foreign_key="tenant.id")
    member_id: int = Field(foreign_key="member.id")
    code: str = Field(max_length=32)
    name: str = Field(max_length=100)
    value_fen: int | None = None
    discount_percent: int | None = None
    status: str = Field(max_length=16)
    origin: str = Field(max_length=200)
    mechanic: str | None = Field(default=None, max_length=100)
    funnel_id: int | None = Field(default=None, foreign_key="funnel.id")
    team_id: int | None = Field(default=None)
    issued_at: datetime = Field(sa_type=UTCDateTime)
    expires_at: datetime = Field(sa_type=UTCDateTime)
    redeemed_at: datetime | None = Field(default=None, sa_type=UTCDateTime)
    redeemed_by: str | None = Field(default=None, max_length=100)
    voided_at: datetime | None = Field(default=None, sa_type=UTCDateTime)
