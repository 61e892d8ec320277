from __future__ import annotations

from datetime import date, datetime
from typing import Any

from sqlalchemy import Column, Index
from sqlmodel import Field, SQLModel

from app.db_types import BigId, JSONType, UTCDateTime


class ChatGroup(SQLModel, table=True):
    """A chat group (社群) the tenant runs, bound to the bot's group id. Its settings (entry
    thresholds, moderation rules, role rules, the health floor) are validated by
    `app.mechanics.community.settings.GroupSettings`."""

    __tablename__ = "chat_group"

    tenant_id: int = Field(foreign_key="tenant.id", primary_key=True)
    group_id: str = Field(max_length=128, primary_key=True)
    name: str = Field(max_length=100)
    kind: str = Field(max_length=16)  # product | learning | interest | friends | flash
    purpose: str | None = Field(default=None, max_length=500)
    rules: str | None = Field(default=None, max_length=2000)
    welcome: str | None = Field(default=None, max_length=2000)
    capacity: int = 100
    settings: dict[str, Any] = Field(default_factory=dict, sa_type=JSONType)
    words_version: int = 0  # bumped when the sensitive words change: matchers rebuild
    created_at: datetime = Field(sa_type=UTCDateTime)
    updated_at: datetime = Field(sa_type=UTCDateTime)


class GroupMember(SQLModel, table=True):
    """Who is in which chat group, as the group bot reports it (`member.joined` and
    `member.left` with a `group_id`, or a message seen in the group), with their role and
    activity."""

    __tablename__ = "group_member"
    __table_args__ = (Index("ix_group_member_member", "tenant_id", "member_id"),)

    tenant_id: int = Field(foreign_key="tenant.id", primary_key=True)
    group_id: str = Field(max_length=128, primary_key=True)
    member_id: int = Field(foreign_key="member.id", primary_key=True)
    joined_at: datetime = Field(sa_type=UTCDateTime)
    # owner | admin | opinion_leader (named by the merchant; never pruned) | member
    role: str = Field(
        default="member", max_length=16, sa_column_kwargs={"server_default": "member"}
    )
    messages: int = Field(default=0, sa_column_kwargs={"server_default": "0"})
    last_seen_at: datetime | None = Field(default=None, sa_type=UTCDateTime)
    warned_at: datetime | None = Field(default=None, sa_type=UTCDateTime)  # pruning warning


class GroupDay(SQLModel, table=True):
    """A member's activity in a group on one local day: what windowed rules count ("fewer
    than 3 messages in 30 days", roles, the monthly top 3, the 20/80 health)."""

    __tablename__ = "group_day"
    __table_args__ = (Index("ix_group_day_group_day", "tenant_id", "group_id", "day"),)

    tenant_id: int = Field(foreign_key="tenant.id", primary_key=True)
    group_id: str = Field(max_length=128, primary_key=True)
    member_id: int = Field(foreign_key="member.id", primary_key=True)
    day: date = Field(primary_key=True)
    messages: int = 0
    shares: int = 0  # links, mini-program cards
    questions: int = 0


class SensitiveWord(SQLModel, table=True):
    """A group's sensitive word (matched as a substring, after normalising) or pattern (a
    regular expression)."""

    __tablename__ = "sensitive_word"

    tenant_id: int = Field(foreign_key="tenant.id", primary_key=True)
    group_id: str = Field(max_length=128, primary_key=True)
    word: str = Field(max_length=200, primary_key=True)
    pattern: bool = Field(default=False, primary_key=True)


class ModerationDecision(SQLModel, table=True):
    """A warning or a removal, with the message that caused it; `reversed` after an appeal."""

    __tablename__ = "moderation_decision"
    __table_args__ = (
        Index("ix_moderation_member", "tenant_id", "group_id", "member_id", "created_at"),
        {"sqlite_autoincrement": True},
    )

    id: int | None = Field(default=None, sa_column=Column(BigId, primary_key=True))
    tenant_id: int = Field(foreign_key="tenant.id")
    group_id: str = Field(max_length=128)
    member_id: int = Field(foreign_key="member.id")
    event_id: int | None = None
    message_id: str | None = Field(default=None, max_length=128)
    excerpt: str = Field(max_length=500)  # the evidence an appeal is judged on
    rule: str = Field(max_length=16)  # word | pattern | link | qr_code | mini_program
    matched: str = Field(max_length=200)
    action: str = Field(max_length=16)  # warn | remove
    status: str = Field(default="active", max_length=16)  # active | reversed
    note: str | None = Field(default=None, max_length=500)
    created_at: datetime = Field(sa_type=UTCDateTime)
    reversed_at: datetime | None = Field(default=None, sa_type=UTCDateTime)


class JoinRequest(SQLModel, table=True):
    """A request to join a group: approved, refused (a threshold failed, with the reasons),
    or pending the owner's approval."""

    __tablename__ = "join_request"
    __table_args__ = (
        Index("ix_join_request_group", "tenant_id", "group_id", "status"),
        {"sqlite_autoincrement": True},
    )

    id: int | None = Field(default=None, sa_column=Column(BigId, primary_key=True))
    tenant_id: int = Field(foreign_key="tenant.id")
    group_id: str = Field(max_length=128)
    member_id: int = Field(foreign_key="member.id")
    status: str = Field(max_length=16)  # approved | refused | pending | denied
    reasons: list[dict[str, Any]] = Field(default_factory=list, sa_type=JSONType)
    note: str | None = Field(default=None, max_length=500)
    created_at: datetime = Field(sa_type=UTCDateTime)
    decided_at: datetime | None = Field(default=None, sa_type=UTCDateTime)


class Once(SQLModel, table=True):
    """Something that happens once per key: a milestone red packet, a monthly top-3 reward,
    a day's health alert, a scheduled run. Inserted with ON CONFLICT DO NOTHING: the row that
    lands does it."""

    __tablename__ = "once_mark"

    tenant_id: int = Field(foreign_key="tenant.id", primary_key=True)
    key: str = Field(max_length=200, primary_key=True)
    created_at: datetime = Field(sa_type=UTCDateTime)
