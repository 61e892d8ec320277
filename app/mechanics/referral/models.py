from __future__ import annotations

from datetime import datetime
from typing import Any

from sqlalchemy import Column, Index, UniqueConstraint
from sqlmodel import Field, SQLModel

from app.db_types import BigId, JSONType, UTCDateTime


class ReferralCode(SQLModel, table=True):
    """A member's invite code for one campaign (stable: one per member and campaign), or a
    channel's (a poster, a staff member) with `channel` naming it and no member."""

    __tablename__ = "referral_code"
    __table_args__ = (
        UniqueConstraint("tenant_id", "code"),
        UniqueConstraint("tenant_id", "funnel_id", "campaign", "owner_member_id"),
        UniqueConstraint("tenant_id", "funnel_id", "campaign", "channel"),
    )

    id: int | None = Field(default=None, primary_key=True)
    tenant_id: int = Field(foreign_key="tenant.id")
    funnel_id: int = Field(foreign_key="funnel.id")
    campaign: str = Field(max_length=64)
    code: str = Field(max_length=16)
    owner_member_id: int | None = Field(default=None, foreign_key="member.id")
    channel: str | None = Field(default=None, max_length=64)
    created_at: datetime = Field(sa_type=UTCDateTime)


class ReferralLink(SQLModel, table=True):
    """An invitee's one inviter in a campaign: the edge of the referral forest. Unique per
    invitee, so nobody is attributed twice; `inviter_member_id` is NULL for channel codes."""

    __tablename__ = "referral_link"
    __table_args__ = (
        UniqueConstraint("tenant_id", "funnel_id", "campaign", "invitee_member_id"),
        Index(
            "ix_referral_link_inviter", "tenant_id", "funnel_id", "campaign", "inviter_member_id"
        ),
    )

    id: int | None = Field(default=None, primary_key=True)
    tenant_id: int = Field(foreign_key="tenant.id")
    funnel_id: int = Field(foreign_key="funnel.id")
    campaign: str = Field(max_length=64)
    invitee_member_id: int = Field(foreign_key="member.id")
    inviter_member_id: int | None = Field(default=None, foreign_key="member.id")
    code_id: int = Field(foreign_key="referral_code.id")
    accepted_at: datetime = Field(sa_type=UTCDateTime)
    qualified_at: datetime | None = Field(default=None, sa_type=UTCDateTime)
    qualified_by: str | None = Field(default=None, max_length=128)  # the order id, if any


class ReferralReward(SQLModel, table=True):
    """One reward: pending → approved → paid | voided. `reward_key` is unique per tenant
    ("<funnel>:<campaign>:inviter:1:<invitee>", "…:tier:<inviter>:<n>"), so whatever path
    grants a reward, it is granted once."""

    __tablename__ = "referral_reward"
    __table_args__ = (
        UniqueConstraint("tenant_id", "reward_key"),
        Index("ix_referral_reward_due", "status", "hold_until"),
        Index("ix_referral_reward_member", "tenant_id", "beneficiary_member_id", "created_at"),
        Index("ix_referral_reward_order", "tenant_id", "cause_order_id"),
        {"sqlite_autoincrement": True},
    )

    id: int | None = Field(default=None, sa_column=Column(BigId, primary_key=True))
    tenant_id: int = Field(foreign_key="tenant.id")
    funnel_id: int = Field(foreign_key="funnel.id")
    campaign: str = Field(max_length=64)
    reward_key: str = Field(max_length=200)
    beneficiary_member_id: int = Field(foreign_key="member.id")
    invitee_member_id: int | None = Field(default=None, foreign_key="member.id")
    kind: str = Field(max_length=16)  # inviter | invitee | tier
    level: int = 0  # 1 or 2 for inviter rewards up the chain
    reward: dict[str, Any] = Field(default_factory=dict, sa_type=JSONType)
    status: str = Field(max_length=16)
    flags: list[str] = Field(default_factory=list, sa_type=JSONType)
    cause_order_id: str | None = Field(default=None, max_length=128)
    hold_until: datetime = Field(sa_type=UTCDateTime)
    voucher_code: str | None = Field(default=None, max_length=32)
    created_at: datetime = Field(sa_type=UTCDateTime)
    approved_at: datetime | None = Field(default=None, sa_type=UTCDateTime)
    paid_at: datetime | None = Field(default=None, sa_type=UTCDateTime)
    voided_at: datetime | None = Field(default=None, sa_type=UTCDateTime)
    void_reason: str | None = Field(default=None, max_length=64)


class RewardLedger(SQLModel, table=True):
    """What was paid out and taken back: a paid reward is one entry, its reversal (a refund
    after payment) a second, negative one. Never updated, only appended."""

    __tablename__ = "reward_ledger"
    __table_args__ = (
        UniqueConstraint("reward_id", "entry"),
        Index("ix_reward_ledger_member", "tenant_id", "member_id"),
        {"sqlite_autoincrement": True},
    )

    id: int | None = Field(default=None, sa_column=Column(BigId, primary_key=True))
    tenant_id: int = Field(foreign_key="tenant.id")
    member_id: int = Field(foreign_key="member.id")
    reward_id: int = Field(foreign_key="referral_reward.id")
    entry: str = Field(max_length=16)  # payment | reversal
    points: int = 0
    value_fen: int = 0
    created_at: datetime = Field(sa_type=UTCDateTime)
