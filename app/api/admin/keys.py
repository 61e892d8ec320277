from __future__ import annotations

from datetime import datetime

from fastapi import APIRouter, status
from pydantic import BaseModel, Field

from app.api.deps import Input, IntId, NowDep, SessionDep, TenantDep
from app.problems import responses
from app.tenancy import service

router = APIRouter(prefix="/v1/api-keys", tags=["api keys"], responses=responses(401))


class ApiKeyCreate(Input):
    name: str = Field(min_length=1, max_length=100)


class ApiKeyPublic(BaseModel):
    id: int
    name: str
    prefix: str
    created_at: datetime
    revoked_at: datetime | None


class ApiKeyCreated(ApiKeyPublic):
    key: str = Field(description="the key itself: shown this once, never again")


@router.post("", status_code=status.HTTP_201_CREATED, responses=responses(422))
def create_api_key(
    body: ApiKeyCreate, tenant: TenantDep, session: SessionDep, now: NowDep
) -> ApiKeyCreated:
    key, plaintext = service.create_api_key(session, tenant, body.name, now)
    return ApiKeyCreated(**key.model_dump(), key=plaintext)


@router.get("")
def list_api_keys(tenant: TenantDep, session: SessionDep) -> list[ApiKeyPublic]:
    assert tenant.id is not None
    return [ApiKeyPublic(**k.model_dump()) for k in service.list_api_keys(session, tenant.id)]


@router.delete("/{key_id}", responses=responses(404))
def revoke_api_key(
    key_id: IntId, tenant: TenantDep, session: SessionDep, now: NowDep
) -> ApiKeyPublic:
    assert tenant.id is not None
    return ApiKeyPublic(**service.revoke_api_key(session, tenant.id, key_id, now).model_dump())
