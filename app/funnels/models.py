from __future__ import annotations

from datetime import datetime
from typing import Any

from sqlalchemy import BigInteger, Index, SmallInteger, UniqueConstraint, text
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


class StagePair(SQLModel, table=True):
    """The funnel report's index of first entries (see app/funnels/entries.py). Entering
    stage b for the first time writes (b, b) and, for every stage a entered before, the pair
    (a, b) in AARRR order: when a was entered and how long after it b was. Written once,
    never changed but for `rolled` (counted into stage_rollup)."""

    __tablename__ = "stage_pair"
    __table_args__ = (
        # A range of first entries (the report's ragged ends, the breakdowns, daily series).
        Index("ix_stage_pair_at", "funnel_id", "version", "a", "b", "at_us", "delay_us"),
        # A range of delays (the bucket the window cuts through, the percentiles' buckets).
        Index(
            "ix_stage_pair_delay", "funnel_id", "version", "a", "b", "delay_us", "at_us", "rolled"
        ),
        # What the roll-up has still to count: few rows, read by the report and the worker.
        Index(
            "ix_stage_pair_unrolled",
            "funnel_id",
            "version",
            "a",
            "b",
            "at_us",
            sqlite_where=text("NOT rolled"),
            postgresql_where=text("NOT rolled"),
        ),
    )

    funnel_id: int = Field(foreign_key="funnel.id", primary_key=True)
    member_id: int = Field(foreign_key="member.id", primary_key=True)
    version: int = Field(primary_key=True, description="0: every version's entries")
    a: int = Field(sa_type=SmallInteger, primary_key=True, description="index in STAGES")
    b: int = Field(sa_type=SmallInteger, primary_key=True, description="a, or a later stage")
    tenant_id: int = Field(foreign_key="tenant.id")
    at_us: int = Field(sa_type=BigInteger, description="first entry into a, µs since 1970 UTC")
    delay_us: int = Field(sa_type=BigInteger, description="first entry into b minus at_us")
    campaign: str | None = Field(default=None, max_length=100, description="at entry into a")
    rolled: bool = Field(default=False)


class StageRollup(SQLModel, table=True):
    """Pairs counted by UTC hour and by UTC day of the first entry, and by delay bucket
    (entries.BOUNDS): a month's range sums about 30 day slots and the hours at its ends."""

    __tablename__ = "stage_rollup"

    funnel_id: int = Field(foreign_key="funnel.id", primary_key=True)
    version: int = Field(primary_key=True)
    a: int = Field(sa_type=SmallInteger, primary_key=True)
    b: int = Field(sa_type=SmallInteger, primary_key=True)
    span: int = Field(sa_type=SmallInteger, primary_key=True, description="slot length, hours")
    slot: int = Field(primary_key=True, description="at_us // (span × 3,600,000,000)")
    bucket: int = Field(sa_type=SmallInteger, primary_key=True)
    tenant_id: int = Field(foreign_key="tenant.id")
    n: int = Field(sa_type=BigInteger)
