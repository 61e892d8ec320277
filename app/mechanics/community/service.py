"""Group membership, kept from the bot's events inside the write path."""

from __future__ import annotations

from datetime import datetime
from typing import Any

from sqlalchemy import Connection, Table, delete, select

from app.db import insert_or_skip
from app.mechanics.community.models import GroupMember

group_member_t: Table = GroupMember.__table__  # type: ignore[attr-defined]
_JOIN = insert_or_skip(group_member_t, ["tenant_id", "group_id", "member_id"])


def joined(conn: Connection, tenant_id: int, group_id: str, member_id: int, now: datetime) -> None:
    conn.execute(
        _JOIN[conn.dialect.name],
        {"tenant_id": tenant_id, "group_id": group_id, "member_id": member_id, "joined_at": now},
    )


def left(conn: Connection, tenant_id: int, group_id: str, member_id: int) -> None:
    conn.execute(
        delete(group_member_t).where(
            group_member_t.c.tenant_id == tenant_id,
            group_member_t.c.group_id == group_id,
            group_member_t.c.member_id == member_id,
        )
    )


def is_member(conn: Connection, tenant_id: int, group_id: str, member_id: int) -> bool:
    return (
        conn.execute(
            select(group_member_t.c.member_id).where(
                group_member_t.c.tenant_id == tenant_id,
                group_member_t.c.group_id == group_id,
                group_member_t.c.member_id == member_id,
            )
        ).first()
        is not None
    )


def observe(
    conn: Connection, tenant_id: int, m: Any, event_type: str, data: dict[str, Any], now: datetime
) -> None:
    """What a plain event says about group membership."""
    group = data.get("group_id")
    if not group:
        return
    if event_type == "member.joined":
        joined(conn, tenant_id, str(group), m.id, now)
    elif event_type == "member.left":
        left(conn, tenant_id, str(group), m.id)
