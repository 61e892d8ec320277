"""The tenant's WeChat mini-program credentials, used by `POST /v1/member/session`."""

from __future__ import annotations

from datetime import datetime

from fastapi import APIRouter
from pydantic import BaseModel, Field
from sqlmodel import select

from app.api.deps import Input, NowDep, SessionDep, TenantDep
from app.errors import Conflict, NotFound
from app.identity.models import WeChatApp
from app.problems import responses

router = APIRouter(prefix="/v1/wechat-app", tags=["member login"], responses=responses(401))


class WeChatAppIn(Input):
    app_id: str = Field(pattern=r"^wx[0-9a-zA-Z]{6,62}$", examples=["wx1234567890abcdef"])
    app_secret: str = Field(min_length=8, max_length=128, description="write-only")


class WeChatAppOut(BaseModel):
    app_id: str
    created_at: datetime
    updated_at: datetime


@router.put("", responses=responses(409, 422))
def put_wechat_app(
    body: WeChatAppIn, tenant: TenantDep, session: SessionDep, now: NowDep
) -> WeChatAppOut:
    """Register (or change) the mini-program members log in from."""
    taken = session.exec(select(WeChatApp).where(WeChatApp.app_id == body.app_id)).first()
    if taken is not None and taken.tenant_id != tenant.id:
        raise Conflict(f'the mini-program "{body.app_id}" belongs to another tenant')
    app = session.exec(select(WeChatApp).where(WeChatApp.tenant_id == tenant.id)).first()
    if app is None:
        assert tenant.id is not None
        app = WeChatApp(
            tenant_id=tenant.id, app_id=body.app_id, app_secret="", created_at=now, updated_at=now
        )
    app.app_id, app.app_secret, app.updated_at = body.app_id, body.app_secret, now
    session.add(app)
    session.flush()
    return WeChatAppOut(app_id=app.app_id, created_at=app.created_at, updated_at=app.updated_at)


@router.get("", responses=responses(404))
def get_wechat_app(tenant: TenantDep, session: SessionDep) -> WeChatAppOut:
    app = session.exec(select(WeChatApp).where(WeChatApp.tenant_id == tenant.id)).first()
    if app is None:
        raise NotFound("no mini-program registered: PUT /v1/wechat-app")
    return WeChatAppOut(app_id=app.app_id, created_at=app.created_at, updated_at=app.updated_at)
