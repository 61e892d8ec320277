from __future__ import annotations

from datetime import datetime

from sqlmodel import Field, SQLModel

from app.db_types import UTCDateTime


class WeChatApp(SQLModel, table=True):
    """A tenant's WeChat mini-program: its app id (which names the tenant at login) and the
    app secret `code2Session` needs. The secret is write-only through the API."""

    __tablename__ = "wechat_app"

    id: int | None = Field(default=None, primary_key=True)
    tenant_id: int = Field(foreign_key="tenant.id", unique=True)
    app_id: str = Field(max_length=64, unique=True)
    app_secret: str = Field(max_length=128)
    created_at: datetime = Field(sa_type=UTCDateTime)
    updated_at: datetime = Field(sa_type=UTCDateTime)
