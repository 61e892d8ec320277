from __future__ import annotations

from datetime import datetime
from typing import Any

from sqlalchemy import UniqueConstraint
from sqlmodel import Field, SQLModel

from app.db_types import JSONType, UTCDateTime


class Member(SQLModel, table=True):
    __table_args__ = (UniqueConstraint("tenant_id", "external_id"),)

    id: int | None = Field(default=None, primary_key=True)
    tenant_id: int = Field(foreign_key="tenant.id")
    external_id: str = Field(max_length=128, description="openid, or the integration's member id")
    unionid: str | None = Field(default=None, max_length=128)
    nickname: str | None = Field(default=None, max_length=100)
    attributes: dict[str, Any] = Field(default_factory=dict, sa_type=JSONType)
    created_at: datetime = Field(sa_type=UTCDateTime)
    # First-touch attribution, set once from the first event that says it (member.scanned,
    # member.joined, invite.accepted) and never overwritten: the report's breakdowns.
    acquired_channel: str | None = Field(default=None, max_length=64)
    acquired_group: str | None = Field(default=None, max_length=128)
    invited_by: str | None = Field(default=None, max_length=128, description="inviter's id")

    def profile(self) -> dict[str, Any]:
        """What funnel guards and templates see as `member`."""
        return {
            **self.attributes,
            "id": self.id,
            "external_id": self.external_id,
            "nickname": self.nickname or "",
        }
