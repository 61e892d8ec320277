from __future__ import annotations

from datetime import datetime

from sqlalchemy import Column, UniqueConstraint
from sqlmodel import Field, SQLModel

from app.db_types import BigId, UTCDateTime


class Timer(SQLModel, table=True):
    """One armed timer of one funnel instance (the engine's `ArmedTimer`, made durable).

    Firing deletes the row in the same transaction that applies the timer event, so a timer
    fires at most once; a worker that dies mid-way rolls back and the row is claimed again."""

    # AUTOINCREMENT on SQLite: a fired timer's id is never given to a new timer.
    __table_args__ = (UniqueConstraint("instance_id", "key"), {"sqlite_autoincrement": True})

    id: int | None = Field(default=None, sa_column=Column(BigId, primary_key=True))
    tenant_id: int = Field(foreign_key="tenant.id")
    member_id: int = Field(foreign_key="member.id")
    funnel_id: int = Field(foreign_key="funnel.id")
    instance_id: int = Field(foreign_key="funnel_instance.id")
    key: str = Field(max_length=32)
    due_at: datetime = Field(sa_type=UTCDateTime, index=True)
    attempts: int = 0
    last_error: str | None = Field(default=None, max_length=500)
    created_at: datetime = Field(sa_type=UTCDateTime)
