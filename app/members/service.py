from __future__ import annotations

from datetime import datetime
from typing import Any

from sqlmodel import Session, select

from app.errors import NotFound
from app.members.models import Member


def upsert_member(
    session: Session,
    tenant_id: int,
    external_id: str,
    now: datetime,
    *,
    nickname: str | None = None,
    unionid: str | None = None,
    attributes: dict[str, Any] | None = None,
) -> tuple[Member, bool]:
    member = session.exec(
        select(Member).where(Member.tenant_id == tenant_id, Member.external_id == external_id)
    ).first()
    created = member is None
    if member is None:
        member = Member(tenant_id=tenant_id, external_id=external_id, created_at=now)
    if nickname is not None:
        member.nickname = nickname
    if unionid is not None:
        member.unionid = unionid
    if attributes is not None:
        member.attributes = {**member.attributes, **attributes}
    session.add(member)
    session.flush()
    return member, created


def get_member(session: Session, tenant_id: int, member_id: int) -> Member:
    member = session.get(Member, member_id)
    if member is None or member.tenant_id != tenant_id:
        raise NotFound(f"no member {member_id}")
    return member
