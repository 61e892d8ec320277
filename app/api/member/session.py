"""`POST /v1/member/session`: a mini-program's login code in, a member token out."""

from __future__ import annotations

from datetime import datetime
from typing import Annotated, Literal

import httpx
from fastapi import APIRouter, Request
from fastapi.concurrency import run_in_threadpool
from pydantic import BaseModel, ConfigDict, Field, field_validator
from sqlalchemy import Engine
from sqlmodel import select

from app.api.admin.members import MemberPublic, public
from app.api.deps import NowDep, SettingsDep, storable
from app.db import session_scope
from app.errors import DomainError, FieldProblem, NotFound, Unauthorized
from app.identity.models import WeChatApp
from app.identity.wechat import Identity, code2session
from app.members.service import upsert_member
from app.problems import responses
from app.security import issue_member_token
from app.tenancy.service import find_tenant_by_name

router = APIRouter(prefix="/v1/member", tags=["member (mini-program)"])


class _Login(BaseModel):
    """Input's rules, except that `provider` discriminates the union and pydantic allows no
    before-validator on a discriminator: each login names the fields it checks."""

    model_config = ConfigDict(extra="forbid")


class WeChatLogin(_Login):
    provider: Literal["wechat"]
    app_id: str = Field(min_length=1, max_length=64, description="the mini-program's appid")
    code: str = Field(min_length=1, max_length=256, description="from wx.login()")

    _storable = field_validator("app_id", "code", mode="before")(storable)


class DevLogin(_Login):
    """Development only (FLYWHEEL_DEV_LOGIN, on by default in development): log in as any
    openid of a tenant named here, without WeChat."""

    provider: Literal["dev"]
    tenant: str = Field(min_length=1, max_length=200, description="the tenant's name")
    openid: str = Field(min_length=1, max_length=128)
    nickname: str | None = Field(default=None, max_length=100)

    _storable = field_validator("tenant", "openid", "nickname", mode="before")(storable)


class MemberSession(BaseModel):
    token: str = Field(description="send as `Authorization: Bearer <token>`")
    expires_at: datetime
    member: MemberPublic
    created: bool = Field(description="true when this login created the member")


class DevLoginDisabled(DomainError):
    status, code, title = 403, "dev_login_disabled", "Development login is off"


@router.post("/session", responses=responses(401, 403, 404, 422, 429, 502))
async def create_session(
    body: Annotated[WeChatLogin | DevLogin, Field(discriminator="provider")],
    request: Request,
    settings: SettingsDep,
    now: NowDep,
) -> MemberSession:
    """Exchange a mini-program login code (WeChat `code2Session`) for a short-lived member
    token. The member is created on first login, by openid."""
    engine = request.app.state.engine
    if isinstance(body, DevLogin):
        if not settings.dev_login_enabled:
            raise DevLoginDisabled("development login is off here; log in with WeChat")
        tenant_id = await run_in_threadpool(_tenant_by_name, engine, body.tenant)
        identity, nickname = Identity(body.openid), body.nickname
    else:
        tenant_id, secret = await run_in_threadpool(_wechat_app, engine, body.app_id)
        async with httpx.AsyncClient(timeout=5.0, follow_redirects=False) as client:
            identity = await code2session(
                client, settings.wechat_api_base, body.app_id, secret, body.code
            )
        nickname = None

    def login() -> MemberSession:
        with session_scope(engine) as session:
            member, created = upsert_member(
                session,
                tenant_id,
                identity.openid,
                now,
                nickname=nickname,
                unionid=identity.unionid,
            )
            assert member.id is not None
            token, expires = issue_member_token(
                settings.secret_key, tenant_id, member.id, now, settings.member_token_ttl_seconds
            )
            return MemberSession(
                token=token, expires_at=expires, member=public(member), created=created
            )

    return await run_in_threadpool(login)


def _tenant_by_name(engine: Engine, name: str) -> int:
    with session_scope(engine) as session:
        tenant = find_tenant_by_name(session, name)
        if tenant is None or tenant.id is None:
            raise NotFound(f'no tenant named "{name}"', errors=[FieldProblem("tenant", "unknown")])
        return tenant.id


def _wechat_app(engine: Engine, app_id: str) -> tuple[int, str]:
    with session_scope(engine) as session:
        app = session.exec(select(WeChatApp).where(WeChatApp.app_id == app_id)).first()
        if app is None:
            raise Unauthorized(
                f'no tenant has registered the mini-program "{app_id}"',
                errors=[FieldProblem("app_id", "unknown app id")],
            )
        return app.tenant_id, app.app_secret
