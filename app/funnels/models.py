from __future__ import annotations

from datetime import datetime
from typing import Any

from sqlalchemy import Index, UniqueConstraint
from sqlmodel import Field, SQLModel

from app.db_types import JSONType, UTCDateTime


class Funnel(SQLModel, table=True):
    __table_args__ = (UniqueConstraint("tenant_id", "key"),)

    id: int | None = Field(default=None, primary_key=True)
    tenant_id: int = Field(foreign_key="tenant.id")
    key: str = Field(max_length=64)
    name: str = Field(max_length=200)
    created_at: datetime = Field(sa_type=UTCDateTime)


class FunnelVersion(SQLModel, table=True):
    """A published definition. Never updated, except to archive it (no new entries)."""

    __tablename__ = "funnel_version"
    __table_args__ = (UniqueConstraint("funnel_id", "version"),)

    id: int | None = Field(default=None, primary_key=True)
    tenant_id: int = Field(foreign_key="tenant.id", index=True)
    funnel_id: int = Field(foreign_key="funnel.id")
    version: int
    definition: dict[str, Any] = Field(sa_type=JSONType)
    digest: str = Field(max_length=64, description="SHA-256 of the canonical definition")
    created_at: datetime = Field(sa_type=UTCDateTime)
    archived_at: datetime | None = Field(default=None, sa_type=UTCDateTime)


class FunnelInstance(SQLModel, table=True):
    """One member's place in one funnel: which version, which state, its armed timers."""

    __tablename__ = "funnel_instance"
    __table_args__ = (
        UniqueConstraint("funnel_id", "member_id"),
        Index("ix_funnel_instance_version_state", "funnel_id", "version", "state"),
    )

    id: int | None = Field(default=None, primary_key=True)
    tenant_id: int = Field(foreign_key="tenant.id", index=True)
    funnel_id: int = Field(foreign_key="funnel.id")
    member_id: int = Field(foreign_key="member.id", index=True)
    version: int
    status: str = Field(max_length=16)
    state: str | None = Field(default=None, max_length=64)
    stage: str | None = Field(default=None, max_length=16)
    data: dict[str, Any] = Field(default_factory=dict, sa_type=JSONType)
    updated_at: datetime = Field(sa_type=UTCDateTime)


class StageHistory(SQLModel, table=True):
    """A member's stay in one AARRR stage: analytics are computed from these rows."""

    __tablename__ = "stage_history"
    __table_args__ = (
        # Reports read one funnel's entries in a date range.
        Index("ix_stage_history_report", "tenant_id", "funnel_id", "entered_at"),
    )

    id: int | None = Field(default=None, primary_key=True)
    tenant_id: int = Field(foreign_key="tenant.id")
    funnel_id: int = Field(foreign_key="funnel.id")
    member_id: int = Field(foreign_key="member.id", index=True)
    instance_id: int = Field(foreign_key="funnel_instance.id", index=True)
    version: int
    campaign: str | None = Field(
        default=None, max_length=100, description="the funnel's campaign at entry"
    )
    stage: str = Field(max_length=16)
    state: str = Field(max_length=64, description="the state the stage was entered through")
    entered_at: datetime = Field(sa_type=UTCDateTime)
    entered_by: str = Field(
        max_length=100, description="type of the event that moved the member in"
    )
    entered_event_id: str | None = Field(default=None, max_length=200)
    left_at: datetime | None = Field(default=None, sa_type=UTCDateTime)
    left_by: str | None = Field(default=None, max_length=100)
