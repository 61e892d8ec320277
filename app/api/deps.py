"""Request dependencies, as `Annotated` aliases used in route signatures.

The ones that only read app state or check a token are `async def`: FastAPI runs a plain
`def` dependency in its thread pool, and the hop cost more than the work (a member's join
went through four of them). Those that open a database connection stay `def`.
"""

from __future__ import annotations

from collections.abc import Iterator
from datetime import datetime
from typing import Annotated, Any

from fastapi import Depends, Path, Request
from pydantic import BaseModel, ConfigDict, field_validator
from sqlalchemy import Engine
from sqlmodel import Session

from app.clock import Clock
from app.config import Settings
from app.db import read_connection
from app.db_types import nul_at
from app.errors import FieldProblem, Unauthorized
from app.members.models import Member
from app.security import MemberClaims, read_member_token
from app.tenancy.models import Tenant
from app.tenancy.service import KEY_PREFIX, authenticate

# Ids and numbers in paths are bounded by the column they name: 64-bit for the tables that
# grow with traffic (BigId: events, outbox, teams, vouchers, requests, decisions, rewards),
# 32-bit for the others (members, API keys, version and line numbers), which are INTEGER on
# PostgreSQL. A larger number is a 422 with its path, not an overflow in the driver (SQLite
# stores every integer in 64 bits; fuzzing PostgreSQL found the difference).
MAX_ID = 2**63 - 1
MAX_INT = 2**31 - 1
RowId = Annotated[int, Path(ge=1, le=MAX_ID)]
IntId = Annotated[int, Path(ge=1, le=MAX_INT)]


class Input(BaseModel):
    """The base of every request body: a field the operation does not declare is a 422 at
    its path, never silently dropped. A caller who sends `tenant_id`, a balance, a state or
    a sequence number learns it cannot set them (mass assignment), and a misspelt option is
    an error rather than a default quietly used (the OpenAPI says `additionalProperties:
    false`)."""

    model_config = ConfigDict(extra="forbid")

    @field_validator("*", mode="before")
    @classmethod
    def _storable(cls, value: Any) -> Any:
        return storable(value)


def storable(value: Any) -> Any:
    """Text PostgreSQL can store: no U+0000 anywhere in a field (nested models check their own
    fields, so the error names the innermost one)."""
    where = nul_at(value)
    if where is not None:
        inside = f" (at {where})" if where else ""
        raise ValueError(f"text may not contain the NUL character (U+0000){inside}")
    return value


async def get_settings_dep(request: Request) -> Settings:
    settings: Settings = request.app.state.settings
    return settings


async def get_clock(request: Request) -> Clock:
    clock: Clock = request.app.state.clock
    return clock


async def get_engine(request: Request) -> Engine:
    engine: Engine = request.app.state.engine
    return engine


def get_session(engine: Annotated[Engine, Depends(get_engine)]) -> Iterator[Session]:
    """The unit of work for plain admin writes: commits once, after the route returns, before
    the response is sent (scope="function"); any error rolls everything back."""
    with Session(engine, expire_on_commit=False) as session:
        try:
            yield session
            session.commit()
        except BaseException:
            session.rollback()
            raise


SettingsDep = Annotated[Settings, Depends(get_settings_dep)]
ClockDep = Annotated[Clock, Depends(get_clock)]
SessionDep = Annotated[Session, Depends(get_session, scope="function")]


async def now_dep(clock: ClockDep) -> datetime:
    return clock.now()


NowDep = Annotated[datetime, Depends(now_dep)]


def _bearer(request: Request) -> tuple[str, str] | None:
    header = request.headers.get("authorization")
    if header:
        scheme, _, value = header.partition(" ")
        if scheme.lower() == "bearer" and value.strip():
            return "Authorization", value.strip()
    key = request.headers.get("x-api-key")
    return ("X-API-Key", key.strip()) if key else None


def _authenticated(request: Request, session: Session) -> Tenant:
    presented = _bearer(request)
    if presented is None:
        raise Unauthorized(
            "send the tenant API key as `Authorization: Bearer fw_…`",
            errors=[FieldProblem("header:Authorization", "missing")],
        )
    header, value = presented
    tenant = authenticate(session, value)
    if tenant is None:
        raise Unauthorized(
            "the API key is unknown or revoked",
            errors=[FieldProblem(f"header:{header}", "unknown or revoked API key")],
        )
    return tenant


def current_tenant(request: Request, session: SessionDep) -> Tenant:
    return _authenticated(request, session)


def current_tenant_id(request: Request, engine: Annotated[Engine, Depends(get_engine)]) -> int:
    """The tenant, for routes that write through the dispatcher: the key is checked on a
    read-only connection that is closed before the route runs, so no transaction of the
    request's own waits on (or blocks, on SQLite) the write path."""
    with read_connection(engine) as conn, Session(bind=conn) as session:
        tenant = _authenticated(request, session)
    assert tenant.id is not None
    return tenant.id


TenantDep = Annotated[Tenant, Depends(current_tenant)]
TenantIdDep = Annotated[int, Depends(current_tenant_id)]


def _invalid_member_token() -> Unauthorized:
    return Unauthorized(
        "the member token is invalid or expired",
        errors=[FieldProblem("header:Authorization", "invalid or expired member token")],
    )


async def member_claims(request: Request, settings: SettingsDep, now: NowDep) -> MemberClaims:
    """A valid member token's claims, without touching the database (the event path looks
    the member up inside its own transaction)."""
    presented = _bearer(request)
    if presented is None or presented[1].startswith(f"{KEY_PREFIX}_"):
        raise Unauthorized(
            "send the member token as `Authorization: Bearer <token>`",
            errors=[FieldProblem("header:Authorization", "missing member token")],
        )
    claims = read_member_token(settings.secret_key, presented[1], now)
    if claims is None:
        raise _invalid_member_token()
    return claims


MemberClaimsDep = Annotated[MemberClaims, Depends(member_claims)]


def current_member(claims: MemberClaimsDep, session: SessionDep) -> Member:
    member = session.get(Member, claims.member_id)
    if member is None or member.tenant_id != claims.tenant_id:
        raise _invalid_member_token()
    return member


MemberDep = Annotated[Member, Depends(current_member)]
