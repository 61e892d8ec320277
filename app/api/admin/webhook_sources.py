"""Webhook sources: each integration (group bot, mini-program backend, shop) gets its own
endpoint and signing secret. A secret is shown once, in the answer that made it (creation
or rotation); lost, it is rotated, never read back."""

from __future__ import annotations

from datetime import datetime, timedelta

from fastapi import APIRouter, Request, status
from pydantic import BaseModel, Field

from app.api.deps import Input, NowDep, SessionDep, SettingsDep, TenantDep
from app.events import sources as service
from app.events.models import WebhookSource
from app.problems import responses

router = APIRouter(prefix="/v1/webhook-sources", tags=["webhooks"], responses=responses(401))


class SourceCreate(Input):
    name: str = Field(
        pattern=service.NAME_PATTERN,
        description="your name for it: group-bot, miniprogram, shop…",
        examples=["group-bot"],
    )


class SourcePublic(BaseModel):
    name: str
    id: str = Field(description="the public id in the endpoint's URL")
    url: str = Field(description="where to POST signed events")
    created_at: datetime
    rotated_at: datetime | None
    previous_secret_expires_at: datetime | None


class SourceSecret(SourcePublic):
    secret: str = Field(
        description="the Standard Webhooks signing secret (whsec_…), shown only here: keep it"
    )


def _public(request: Request, s: WebhookSource) -> SourcePublic:
    return SourcePublic(
        name=s.name,
        id=s.public_id,
        url=str(request.url_for("receive_webhook", source_id=s.public_id)),
        created_at=s.created_at,
        rotated_at=s.rotated_at,
        previous_secret_expires_at=s.previous_expires_at,
    )


def _secret(request: Request, s: WebhookSource) -> SourceSecret:
    return SourceSecret(**_public(request, s).model_dump(), secret=s.secret)


@router.post("", status_code=status.HTTP_201_CREATED, responses=responses(409, 422))
def create_source(
    body: SourceCreate, request: Request, tenant: TenantDep, session: SessionDep, now: NowDep
) -> SourceSecret:
    assert tenant.id is not None
    return _secret(request, service.create_source(session, tenant.id, body.name, now))


@router.get("")
def list_sources(request: Request, tenant: TenantDep, session: SessionDep) -> list[SourcePublic]:
    assert tenant.id is not None
    return [_public(request, s) for s in service.list_sources(session, tenant.id)]


@router.get("/{name}", responses=responses(404))
def get_source(name: str, request: Request, tenant: TenantDep, session: SessionDep) -> SourcePublic:
    """The source, without its secret (rotate it to get a new one)."""
    assert tenant.id is not None
    return _public(request, service.get_source(session, tenant.id, name))


@router.post("/{name}/rotate-secret", responses=responses(404))
def rotate_secret(
    name: str,
    request: Request,
    tenant: TenantDep,
    session: SessionDep,
    settings: SettingsDep,
    now: NowDep,
) -> SourceSecret:
    """Issue a new secret. The old one keeps verifying for the rotation grace period
    (FLYWHEEL_SECRET_ROTATION_GRACE_SECONDS, a day by default), so senders can switch."""
    assert tenant.id is not None
    source = service.get_source(session, tenant.id, name)
    grace = timedelta(seconds=settings.secret_rotation_grace_seconds)
    service.rotate_secret(session, source, now, grace)
    request.app.state.sources.forget(source.public_id)
    return _secret(request, source)
