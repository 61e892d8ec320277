from __future__ import annotations

from datetime import datetime

from sqlalchemy import Index
from sqlmodel import Field, SQLModel

from app.db_types import UTCDateTime


class GroupMember(SQLModel, table=True):
    """Who is in which chat group, as the group bot reports it (`member.joined` and
    `member.left` with a `group_id`, or a solitaire reply seen in the group)."""

    __tablename__ = "group_member"
    __table_args__ = (Index("ix_group_member_member", "tenant_id", "member_id"),)

    tenant_id: int = Field(foreign_key="tenant.id", primary_key=True)
    group_id: str = Field(max_length=128, primary_key=True)
    member_id: int = Field(foreign_key="member.id", primary_key=True)
    joined_at: datetime = Field(sa_type=UTCDateTime)
