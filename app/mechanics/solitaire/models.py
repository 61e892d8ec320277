from __future__ import annotations

from datetime import datetime
from typing import Any

from sqlalchemy import Column, Index, UniqueConstraint
from sqlmodel import Field, SQLModel

from app.db_types import BigId, JSONType, UTCDateTime


class SolitaireList(SQLModel, table=True):
    """One solitaire list (接龙): scheduled → open → closed → fulfilled | cancelled.

    `items` and `options` are the list's own copy of its menu and rules, taken when it was
    opened, so a new funnel version never changes a running list. `last_seq` hands out line
    numbers under the list's row lock: 1, 2, 3… with no gaps and no duplicates.

    `announced_at` is when the group's list message was last queued; while the list is open
    a change within `ANNOUNCE_EVERY` of it sets `announce_due` instead, and the sweep (or the
    next change after it) queues the message then (app/mechanics/solitaire/service.py)."""

    __tablename__ = "solitaire_list"
    __table_args__ = (
        # a scheduled opening happens once per campaign, group and time, however many workers
        UniqueConstraint("tenant_id", "funnel_id", "campaign", "group_id", "opens_at"),
        Index("ix_solitaire_list_open_due", "status", "opens_at"),
        Index("ix_solitaire_list_close_due", "status", "closes_at"),
        Index("ix_solitaire_list_announce_due", "announce_due"),
        {"sqlite_autoincrement": True},
    )

    id: int | None = Field(default=None, sa_column=Column(BigId, primary_key=True))
    public_id: str = Field(max_length=40, unique=True)
    tenant_id: int = Field(foreign_key="tenant.id")
    funnel_id: int | None = Field(default=None, foreign_key="funnel.id")
    campaign: str | None = Field(default=None, max_length=64)
    group_id: str = Field(max_length=128)
    title: str = Field(max_length=200)
    note: str | None = Field(default=None, max_length=2000)
    roster: bool = False
    items: list[dict[str, Any]] = Field(default_factory=list, sa_type=JSONType)
    options: dict[str, Any] = Field(default_factory=dict, sa_type=JSONType)
    status: str = Field(max_length=16)
    opens_at: datetime = Field(sa_type=UTCDateTime)
    join_until: datetime = Field(sa_type=UTCDateTime)
    closes_at: datetime = Field(sa_type=UTCDateTime)
    closed_at: datetime | None = Field(default=None, sa_type=UTCDateTime)
    close_reason: str | None = Field(default=None, max_length=64)
    last_seq: int = 0
    announced_at: datetime | None = Field(default=None, sa_type=UTCDateTime)
    announce_due: datetime | None = Field(default=None, sa_type=UTCDateTime)
    created_at: datetime = Field(sa_type=UTCDateTime)


class SolitaireLine(SQLModel, table=True):
    """A numbered line: live → withdrawn (its number stays, shown as withdrawn)."""

    __tablename__ = "solitaire_line"
    __table_args__ = (
        UniqueConstraint("list_id", "seq"),
        Index("ix_solitaire_line_member", "list_id", "member_id"),
        {"sqlite_autoincrement": True},
    )

    id: int | None = Field(default=None, sa_column=Column(BigId, primary_key=True))
    tenant_id: int = Field(foreign_key="tenant.id")
    list_id: int = Field(foreign_key="solitaire_list.id")
    seq: int
    member_id: int = Field(foreign_key="member.id")
    on_behalf_of: str | None = Field(default=None, max_length=100)
    items: list[dict[str, Any]] = Field(default_factory=list, sa_type=JSONType)
    note: str | None = Field(default=None, max_length=500)
    pickup: str | None = Field(default=None, max_length=100)
    address: str | None = Field(default=None, max_length=500)
    total_fen: int = 0
    status: str = Field(max_length=16)
    created_at: datetime = Field(sa_type=UTCDateTime)
    updated_at: datetime = Field(sa_type=UTCDateTime)


class SolitaireStock(SQLModel, table=True):
    """Reserved quantity per item of a list; `reserved <= stock` holds through a conditional
    UPDATE (and the list's row lock, which every change to the list takes first)."""

    __tablename__ = "solitaire_stock"

    list_id: int = Field(foreign_key="solitaire_list.id", primary_key=True)
    sku: str = Field(max_length=64, primary_key=True)
    stock: int | None = None
    reserved: int = 0
