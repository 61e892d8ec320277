from __future__ import annotations

from datetime import date, datetime

from sqlalchemy import Column, Index, UniqueConstraint
from sqlmodel import Field, SQLModel

from app.db_types import BigId, UTCDateTime


class PointsBalance(SQLModel, table=True):
    """A member's points balance: the sum of their ledger, kept beside it so a debit is one
    conditional UPDATE (`balance + delta >= 0`): a balance never goes negative."""

    __tablename__ = "points_balance"

    tenant_id: int = Field(foreign_key="tenant.id", primary_key=True)
    member_id: int = Field(foreign_key="member.id", primary_key=True)
    balance: int = 0


class PointsEntry(SQLModel, table=True):
    """The points ledger: append-only. A credit is taken back by a `reversal` entry naming
    it, never by editing it; `origin` is unique per tenant, so one cause credits once."""

    __tablename__ = "points_entry"
    __table_args__ = (
        UniqueConstraint("tenant_id", "origin"),
        Index("ix_points_entry_member", "tenant_id", "member_id", "id"),
        {"sqlite_autoincrement": True},
    )

    id: int | None = Field(default=None, sa_column=Column(BigId, primary_key=True))
    tenant_id: int = Field(foreign_key="tenant.id")
    member_id: int = Field(foreign_key="member.id")
    kind: str = Field(max_length=16)  # credit | debit | reversal
    points: int
    reason: str | None = Field(default=None, max_length=200)
    origin: str = Field(max_length=200)
    reverses: int | None = Field(default=None)
    created_at: datetime = Field(sa_type=UTCDateTime)


class CheckIn(SQLModel, table=True):
    """One check-in per member, campaign and local day (the unique key), with its streak."""

    __tablename__ = "check_in"
    __table_args__ = (
        UniqueConstraint("tenant_id", "funnel_id", "campaign", "member_id", "local_date"),
        {"sqlite_autoincrement": True},
    )

    id: int | None = Field(default=None, sa_column=Column(BigId, primary_key=True))
    tenant_id: int = Field(foreign_key="tenant.id")
    funnel_id: int = Field(foreign_key="funnel.id")
    campaign: str = Field(max_length=64)
    member_id: int = Field(foreign_key="member.id")
    local_date: date
    streak: int
    created_at: datetime = Field(sa_type=UTCDateTime)
