"""Funnels: publish versions, list and read them, archive, migrate members, validate."""

from __future__ import annotations

from datetime import datetime
from typing import Any

from fastapi import APIRouter, Request, Response, status
from pydantic import BaseModel, Field

from app.api.deps import IntId, NowDep, SessionDep, TenantDep
from app.engine import compile_document
from app.engine.definition import FunnelDefinition
from app.engine.lint import platform_warnings
from app.engine.paths import JsonSyntaxError, loads_checked
from app.errors import DomainError, FieldProblem, InvalidDefinition
from app.funnels import service
from app.funnels.models import Funnel, FunnelVersion
from app.problems import responses

router = APIRouter(prefix="/v1/funnels", tags=["funnels"], responses=responses(401))

DEFINITION_BODY: dict[str, Any] = {
    "requestBody": {
        "required": True,
        "content": {
            "application/json": {"schema": {"$ref": "#/components/schemas/FunnelDefinition"}}
        },
    }
}


class UnsupportedMediaType(DomainError):
    status, code, title = 415, "unsupported_media_type", "Unsupported media type"


class VersionPublic(BaseModel):
    version: int
    digest: str
    created_at: datetime
    archived_at: datetime | None


class LintWarning(BaseModel):
    path: str = Field(description="JSON path in the definition")
    message: str


class VersionDetail(VersionPublic):
    key: str
    definition: dict[str, Any]
    warnings: list[LintWarning] = Field(
        default=[], description="platform rules the definition may break (see app.engine.lint)"
    )


class FunnelSummary(BaseModel):
    key: str
    name: str
    created_at: datetime
    latest_version: int | None
    versions: list[VersionPublic] = []


class ValidationResult(BaseModel):
    valid: bool
    key: str
    states: int
    transitions: int
    warnings: list[LintWarning] = []


class MigrationResult(BaseModel):
    version: int
    migrated: int
    by_move: dict[str, int]
    active_on_older_versions: int


def _version(v: FunnelVersion) -> VersionPublic:
    return VersionPublic(
        version=v.version, digest=v.digest, created_at=v.created_at, archived_at=v.archived_at
    )


def _warnings(definition: FunnelDefinition) -> list[LintWarning]:
    return [LintWarning(path=w.path, message=w.message) for w in platform_warnings(definition)]


def _detail(funnel: Funnel, v: FunnelVersion) -> VersionDetail:
    return VersionDetail(
        key=funnel.key,
        definition=v.definition,
        warnings=_warnings(FunnelDefinition.model_validate(v.definition)),
        **_version(v).model_dump(),
    )


async def _document(request: Request) -> tuple[Any, list[FieldProblem]]:
    media = request.headers.get("content-type", "application/json").split(";")[0].strip().lower()
    if media not in ("application/json", "") and not media.endswith("+json"):
        raise UnsupportedMediaType(f"send the definition as application/json, not {media}")
    try:
        return loads_checked(await request.body())
    except JsonSyntaxError as exc:
        raise InvalidDefinition([exc.problem]) from exc


@router.get("")
def list_funnels(tenant: TenantDep, session: SessionDep) -> list[FunnelSummary]:
    assert tenant.id is not None
    return [
        FunnelSummary(
            key=f.key, name=f.name, created_at=f.created_at, latest_version=v.version if v else None
        )
        for f, v in service.list_funnels(session, tenant.id)
    ]


@router.post("/validate", openapi_extra=DEFINITION_BODY, responses=responses(415, 422))
async def validate_funnel(request: Request, tenant: TenantDep) -> ValidationResult:
    """Check a definition (schema and semantics) without publishing it."""
    document, duplicates = await _document(request)
    definition = compile_document(document, extra_problems=duplicates).definition
    return ValidationResult(
        valid=True,
        key=definition.key,
        states=len(definition.states),
        transitions=len(definition.transitions),
        warnings=_warnings(definition),
    )


@router.put(
    "/{key}",
    status_code=status.HTTP_201_CREATED,
    openapi_extra=DEFINITION_BODY,
    responses={
        200: {"description": "identical to the latest version, which is returned"},
        **responses(409, 415, 422),
    },
)
async def publish_funnel(
    key: str,
    request: Request,
    response: Response,
    tenant: TenantDep,
    session: SessionDep,
    now: NowDep,
) -> VersionDetail:
    """Publish a new immutable version (the latest version's own document is not a new one)."""
    assert tenant.id is not None
    document, duplicates = await _document(request)
    version, created = service.publish(session, tenant.id, key, document, now, duplicates)
    if not created:
        response.status_code = status.HTTP_200_OK
    response.headers["Location"] = f"/v1/funnels/{key}/versions/{version.version}"
    return _detail(service.get_funnel(session, tenant.id, key), version)


@router.get("/{key}", responses=responses(404))
def get_funnel(key: str, tenant: TenantDep, session: SessionDep) -> FunnelSummary:
    assert tenant.id is not None
    funnel = service.get_funnel(session, tenant.id, key)
    versions = service.list_versions(session, funnel)
    return FunnelSummary(
        key=funnel.key,
        name=funnel.name,
        created_at=funnel.created_at,
        latest_version=versions[-1].version if versions else None,
        versions=[_version(v) for v in versions],
    )


@router.get("/{key}/versions", responses=responses(404))
def list_versions(key: str, tenant: TenantDep, session: SessionDep) -> list[VersionPublic]:
    assert tenant.id is not None
    funnel = service.get_funnel(session, tenant.id, key)
    return [_version(v) for v in service.list_versions(session, funnel)]


@router.get("/{key}/versions/{number}", responses=responses(404))
def get_version(key: str, number: IntId, tenant: TenantDep, session: SessionDep) -> VersionDetail:
    assert tenant.id is not None
    funnel = service.get_funnel(session, tenant.id, key)
    return _detail(funnel, service.get_version(session, funnel, number))


@router.post("/{key}/versions/{number}/archive", responses=responses(404))
def archive_version(
    key: str, number: IntId, tenant: TenantDep, session: SessionDep, now: NowDep
) -> VersionPublic:
    """No new member enters an archived version; members already in it carry on."""
    assert tenant.id is not None
    funnel = service.get_funnel(session, tenant.id, key)
    return _version(service.archive_version(session, funnel, number, now))


@router.post("/{key}/versions/{number}/migrate", responses=responses(404, 409))
def migrate_members(
    key: str, number: IntId, tenant: TenantDep, session: SessionDep, now: NowDep
) -> MigrationResult:
    """Apply the `migrations` maps declared by this version: members of the older versions
    named there, in a mapped state, move to this version. Everyone else stays where they are."""
    assert tenant.id is not None
    funnel = service.get_funnel(session, tenant.id, key)
    return MigrationResult(**service.migrate(session, funnel, number, now))
