from __future__ import annotations

from datetime import datetime

from sqlalchemy import Column, Index, UniqueConstraint, text
from sqlmodel import Field, SQLModel

from app.db_types import BigId, UTCDateTime


class Team(SQLModel, table=True):
    """One group-buy team (团): open → succeeded | failed | cancelled.

    `seats_taken` counts seats held or confirmed; it only changes under the team's row lock
    and with a conditional UPDATE (`seats_taken < capacity`), so a team never overfills.
    `deadline` is the team's timer: the sweep closes open teams whose deadline passed."""

    __tablename__ = "groupbuy_team"
    __table_args__ = (
        Index("ix_groupbuy_team_due", "status", "deadline"),
        Index("ix_groupbuy_team_campaign", "tenant_id", "funnel_id", "campaign", "status"),
        {"sqlite_autoincrement": True},
    )

    id: int | None = Field(default=None, sa_column=Column(BigId, primary_key=True))
    public_id: str = Field(max_length=40, unique=True, description="share token: tm_…")
    tenant_id: int = Field(foreign_key="tenant.id")
    funnel_id: int = Field(foreign_key="funnel.id")
    version_id: int = Field(foreign_key="funnel_version.id")
    campaign: str = Field(max_length=64)
    status: str = Field(max_length=16)
    leader_member_id: int = Field(foreign_key="member.id")
    capacity: int
    min_size: int
    seats_taken: int = 0
    seats_paid: int = 0
    virtual_seats: int = 0
    price_fen: int | None = None
    opened_at: datetime = Field(sa_type=UTCDateTime)
    deadline: datetime = Field(sa_type=UTCDateTime)
    closed_at: datetime | None = Field(default=None, sa_type=UTCDateTime)
    close_reason: str | None = Field(default=None, max_length=64)


class Seat(SQLModel, table=True):
    """A member's place in a team: held (awaiting payment) → active | released | left.

    `live_key` is "<funnel id>:<campaign>" while the seat is held or active in an open team,
    and NULL otherwise; unique with the member, it makes "one open team per member and
    campaign" a database invariant (NULLs never collide)."""

    __tablename__ = "groupbuy_seat"
    __table_args__ = (
        UniqueConstraint("team_id", "member_id"),
        UniqueConstraint("tenant_id", "member_id", "live_key"),
        # The sweep's: seats waiting for their payment, by when the wait ends. Partial, so
        # that it holds only those: on (status, hold_until) SQLite, without statistics,
        # read a team's active seats through it (every active seat of every team, at each
        # team's success), and every seat paid its entry.
        Index(
            "ix_groupbuy_seat_hold",
            "hold_until",
            sqlite_where=text("status = 'held'"),
            postgresql_where=text("status = 'held'"),
        ),
        Index("ix_groupbuy_seat_member", "tenant_id", "member_id", "campaign_key"),
        {"sqlite_autoincrement": True},
    )

    id: int | None = Field(default=None, sa_column=Column(BigId, primary_key=True))
    tenant_id: int = Field(foreign_key="tenant.id")
    team_id: int = Field(foreign_key="groupbuy_team.id")
    member_id: int = Field(foreign_key="member.id")
    campaign_key: str = Field(max_length=100)
    live_key: str | None = Field(default=None, max_length=100)
    role: str = Field(max_length=16)
    status: str = Field(max_length=16)
    price_fen: int | None = None
    joined_at: datetime = Field(sa_type=UTCDateTime)
    hold_until: datetime | None = Field(default=None, sa_type=UTCDateTime)
    order_id: str | None = Field(default=None, max_length=128)
    paid_fen: int | None = None
    ended_at: datetime | None = Field(default=None, sa_type=UTCDateTime)


class CampaignCounter(SQLModel, table=True):
    """Campaign-wide limits (stock of teams or seats, teams open at once), taken with a
    conditional UPDATE so concurrent openings never exceed them. Only campaigns that set a
    limit touch this row (it would otherwise serialize every join of the campaign)."""

    __tablename__ = "groupbuy_campaign"
    __table_args__ = (UniqueConstraint("tenant_id", "funnel_id", "campaign"),)

    id: int | None = Field(default=None, primary_key=True)
    tenant_id: int = Field(foreign_key="tenant.id")
    funnel_id: int = Field(foreign_key="funnel.id")
    campaign: str = Field(max_length=64)
    teams_used: int = 0
    seats_used: int = 0
    teams_open: int = 0
