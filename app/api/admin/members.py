"""Members as the merchant's integration sees them, and member tokens for mini-programs."""

from __future__ import annotations

from datetime import datetime
from typing import Any

from fastapi import APIRouter, Response, status
from pydantic import BaseModel, Field
from sqlmodel import col, select

from app.api.deps import Input, IntId, NowDep, SessionDep, SettingsDep, TenantDep
from app.funnels.models import Funnel, FunnelInstance, StageHistory
from app.members import service
from app.members.models import Member
from app.problems import responses
from app.security import issue_member_token

router = APIRouter(prefix="/v1/members", tags=["members"], responses=responses(401))


class MemberUpsert(Input):
    external_id: str = Field(min_length=1, max_length=128, description="openid or your member id")
    unionid: str | None = Field(default=None, max_length=128)
    nickname: str | None = Field(default=None, max_length=100)
    attributes: dict[str, Any] | None = Field(
        default=None, description="merged into the profile guards read"
    )


class MemberPublic(BaseModel):
    id: int
    external_id: str
    unionid: str | None
    nickname: str | None
    attributes: dict[str, Any]
    created_at: datetime


class StageStay(BaseModel):
    stage: str
    state: str
    entered_at: datetime
    entered_by: str
    left_at: datetime | None
    left_by: str | None


class FunnelPlace(BaseModel):
    funnel: str
    version: int
    status: str
    state: str | None
    stage: str | None
    history: list[StageStay]


class MemberDetail(MemberPublic):
    funnels: list[FunnelPlace]


class MemberToken(BaseModel):
    token: str
    token_type: str = "Bearer"  # noqa: S105 - a scheme name, not a secret
    expires_at: datetime


def public(member: Member) -> MemberPublic:
    assert member.id is not None
    return MemberPublic(
        id=member.id,
        external_id=member.external_id,
        unionid=member.unionid,
        nickname=member.nickname,
        attributes=member.attributes,
        created_at=member.created_at,
    )


@router.post(
    "",
    status_code=status.HTTP_201_CREATED,
    responses={200: {"model": MemberPublic, "description": "An existing member, updated"}},
)
def upsert_member(
    body: MemberUpsert, response: Response, tenant: TenantDep, session: SessionDep, now: NowDep
) -> MemberPublic:
    """Create a member, or update the one with this external id (200)."""
    assert tenant.id is not None
    member, created = service.upsert_member(
        session,
        tenant.id,
        body.external_id,
        now,
        nickname=body.nickname,
        unionid=body.unionid,
        attributes=body.attributes,
    )
    if not created:
        response.status_code = status.HTTP_200_OK
    return public(member)


@router.get("/{member_id}", responses=responses(404))
def get_member(member_id: IntId, tenant: TenantDep, session: SessionDep) -> MemberDetail:
    """A member with their place in every funnel and their stage history."""
    assert tenant.id is not None
    member = service.get_member(session, tenant.id, member_id)
    places = []
    rows = session.exec(
        select(FunnelInstance, Funnel)
        .join(Funnel)
        .where(FunnelInstance.member_id == member.id)
        .order_by(Funnel.key)
    ).all()
    for instance, funnel in rows:
        history = session.exec(
            select(StageHistory)
            .where(StageHistory.instance_id == instance.id)
            .order_by(col(StageHistory.id))
        ).all()
        places.append(
            FunnelPlace(
                funnel=funnel.key,
                version=instance.version,
                status=instance.status,
                state=instance.state,
                stage=instance.stage,
                history=[StageStay(**h.model_dump()) for h in history],
            )
        )
    return MemberDetail(**public(member).model_dump(), funnels=places)


@router.post("/{member_id}/tokens", status_code=status.HTTP_201_CREATED, responses=responses(404))
def issue_token(
    member_id: IntId, tenant: TenantDep, session: SessionDep, settings: SettingsDep, now: NowDep
) -> MemberToken:
    """A short-lived member token for a mini-program, for integrations that run their own login.
    Mini-programs on WeChat log in with `POST /v1/member/session` instead."""
    assert tenant.id is not None
    member = service.get_member(session, tenant.id, member_id)
    assert member.id is not None
    token, expires = issue_member_token(
        settings.secret_key, tenant.id, member.id, now, settings.member_token_ttl_seconds
    )
    return MemberToken(token=token, expires_at=expires)
