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


class CardBalance(SQLModel, table=True):
    """How many of a card (霸王餐卡) a member holds: the sum of their card ledger, kept beside it
    so spending is one conditional UPDATE (`count >= n`)."""

    __tablename__ = "card_balance"

    tenant_id: int = Field(foreign_key="tenant.id", primary_key=True)
    member_id: int = Field(foreign_key="member.id", primary_key=True)
    card: str = Field(max_length=64, primary_key=True)
    count: int = 0


class CardEntry(SQLModel, table=True):
    """The card ledger, append-only: +1 for a card collected (a drop, a review), -n for cards
    redeemed. `origin` is unique per tenant, so one cause hands out one card."""

    __tablename__ = "card_entry"
    __table_args__ = (
        UniqueConstraint("tenant_id", "origin"),
        Index("ix_card_entry_member", "tenant_id", "member_id", "id"),
        {"sqlite_autoincrement": True},
    )

    id: int | None = Field(default=None, sa_column=Column(BigId, primary_key=True))
    tenant_id: int = Field(foreign_key="tenant.id")
    member_id: int = Field(foreign_key="member.id")
    card: str = Field(max_length=64)
    delta: int
    via: str = Field(max_length=32)  # drop | review | redeem
    origin: str = Field(max_length=200)
    created_at: datetime = Field(sa_type=UTCDateTime)


class DailySupply(SQLModel, table=True):
    """A campaign's supply used on one local day (cards dropped, lottery draws): claimed by a
    conditional UPDATE (`used < limit`), so concurrent claimants never oversell."""

    __tablename__ = "daily_supply"

    tenant_id: int = Field(foreign_key="tenant.id", primary_key=True)
    funnel_id: int = Field(foreign_key="funnel.id", primary_key=True)
    campaign: str = Field(max_length=64, primary_key=True)
    local_date: date = Field(primary_key=True)
    used: int = 0


class PrizeStock(SQLModel, table=True):
    """A lottery prize's remaining stock, seeded from the campaign on the first draw and
    taken by a conditional UPDATE (`remaining > 0`): never negative."""

    __tablename__ = "prize_stock"

    tenant_id: int = Field(foreign_key="tenant.id", primary_key=True)
    funnel_id: int = Field(foreign_key="funnel.id", primary_key=True)
    campaign: str = Field(max_length=64, primary_key=True)
    prize: str = Field(max_length=64, primary_key=True)
    remaining: int


class LotteryDraw(SQLModel, table=True):
    """One draw, auditable: `roll` = int(SHA-256(seed)) mod 1,000,000, and the prize is the one
    whose slice of [0, 1,000,000) holds it (`app.mechanics.rewards.lottery.pick`)."""

    __tablename__ = "lottery_draw"
    __table_args__ = (
        Index("ix_lottery_draw_member", "tenant_id", "funnel_id", "campaign", "member_id"),
        {"sqlite_autoincrement": True},
    )

    id: int | None = Field(default=None, sa_column=Column(BigId, primary_key=True))
    tenant_id: int = Field(foreign_key="tenant.id")
    funnel_id: int = Field(foreign_key="funnel.id")
    campaign: str = Field(max_length=64)
    member_id: int = Field(foreign_key="member.id")
    local_date: date
    seed: str = Field(max_length=64)
    roll: int
    drawn: str | None = Field(default=None, max_length=64)  # the prize the roll landed on
    prize: str | None = Field(default=None, max_length=64)  # what was won (None: out of stock)
    created_at: datetime = Field(sa_type=UTCDateTime)
