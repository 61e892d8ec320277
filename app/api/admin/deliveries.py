"""The action endpoint (where a tenant's actions go) and its deliveries: list, inspect, replay."""

from __future__ import annotations

from datetime import datetime, timedelta
from typing import Annotated, Any, Literal

from fastapi import APIRouter, Query, status
from pydantic import AnyHttpUrl, BaseModel, Field
from sqlmodel import Session, col, select

from app.api.deps import MAX_INT, Input, NowDep, SessionDep, SettingsDep, TenantDep
from app.errors import DomainError, FieldProblem, NotFound
from app.events.sources import new_secret
from app.outbox.delivery import private_address
from app.outbox.models import ActionEndpoint, DeliveryAttempt, Outbox
from app.outbox.service import DEAD, DELIVERED, PENDING, SUPPRESSED, delivery_id
from app.problems import responses

router = APIRouter(tags=["actions"], responses=responses(401))


class ReplayConflict(DomainError):
    status, code, title = 409, "not_replayable", "Delivery not replayable"


class UnsafeUrl(DomainError):
    status, code, title = 422, "unsafe_url", "Action endpoint not allowed"


class EndpointIn(Input):
    url: AnyHttpUrl = Field(description="receives actions as signed Standard Webhooks POSTs")


class EndpointOut(BaseModel):
    url: str
    created_at: datetime
    updated_at: datetime
    disabled_at: datetime | None
    disabled_reason: str | None
    previous_secret_expires_at: datetime | None


class EndpointSecret(EndpointOut):
    secret: str | None = Field(
        description="verify deliveries with it (Standard Webhooks, whsec_…); shown only in "
        "the answer that made it (the first PUT, each rotation), null in the others"
    )


def _out(e: ActionEndpoint) -> EndpointOut:
    return EndpointOut(
        url=e.url,
        created_at=e.created_at,
        updated_at=e.updated_at,
        disabled_at=e.disabled_at,
        disabled_reason=e.disabled_reason,
        previous_secret_expires_at=e.previous_expires_at,
    )


def _with_secret(e: ActionEndpoint, shown: bool = True) -> EndpointSecret:
    return EndpointSecret(**_out(e).model_dump(), secret=e.secret if shown else None)


def _endpoint(session: Session, tenant_id: int) -> ActionEndpoint | None:
    return session.exec(select(ActionEndpoint).where(ActionEndpoint.tenant_id == tenant_id)).first()


@router.put("/v1/action-endpoint", responses=responses(422))
def put_endpoint(
    body: EndpointIn, tenant: TenantDep, session: SessionDep, settings: SettingsDep, now: NowDep
) -> EndpointSecret:
    """Set where actions are delivered (this also re-enables a disabled endpoint). The
    signing secret is generated on first use, shown in that answer only, and kept across
    URL changes."""
    assert tenant.id is not None
    url = str(body.url)
    if not settings.private_action_urls_allowed:
        why = private_address(url)
        if why:
            raise UnsafeUrl(
                f"{why}; action endpoints must be public outside development",
                errors=[FieldProblem("url", why)],
            )
    e = _endpoint(session, tenant.id)
    created = e is None
    if e is None:
        e = ActionEndpoint(
            tenant_id=tenant.id, url=url, secret=new_secret(), created_at=now, updated_at=now
        )
    e.url, e.updated_at, e.disabled_at, e.disabled_reason = url, now, None, None
    session.add(e)
    session.flush()
    return _with_secret(e, shown=created)


@router.get("/v1/action-endpoint", responses=responses(404))
def get_endpoint(tenant: TenantDep, session: SessionDep) -> EndpointOut:
    """Where actions go, without the secret (rotate it to get a new one)."""
    assert tenant.id is not None
    e = _endpoint(session, tenant.id)
    if e is None:
        raise NotFound("no action endpoint yet: PUT /v1/action-endpoint with its url")
    return _out(e)


@router.post("/v1/action-endpoint/rotate-secret", responses=responses(404))
def rotate_endpoint_secret(
    tenant: TenantDep, session: SessionDep, settings: SettingsDep, now: NowDep
) -> EndpointSecret:
    """A new signing secret. During the grace period deliveries carry two signatures, one
    per secret, so the receiver verifies with either."""
    e = get_endpoint_row(session, tenant.id)
    grace = timedelta(seconds=settings.secret_rotation_grace_seconds)
    e.previous_secret, e.previous_expires_at = (e.secret, now + grace) if grace else (None, None)
    e.secret, e.updated_at = new_secret(), now
    session.add(e)
    session.flush()
    return _with_secret(e)


def get_endpoint_row(session: Any, tenant_id: int | None) -> ActionEndpoint:
    assert tenant_id is not None
    e = _endpoint(session, tenant_id)
    if e is None:
        raise NotFound("no action endpoint yet: PUT /v1/action-endpoint with its url")
    return e


# ── deliveries ────────────────────────────────────────────────────────────────────────────
class AttemptOut(BaseModel):
    attempt: int
    started_at: datetime
    duration_ms: int
    status_code: int | None
    error: str | None


class DeliveryOut(BaseModel):
    id: str
    type: str
    status: str
    member_id: int | None
    funnel_id: int | None
    event_id: int | None
    source: str
    attempts: int
    next_attempt_at: datetime | None
    last_status: int | None
    last_error: str | None
    delivered_at: datetime | None
    created_at: datetime


class DeliveryDetail(DeliveryOut):
    payload: dict[str, Any]
    history: list[AttemptOut]


def _delivery(o: Outbox) -> dict[str, Any]:
    assert o.id is not None
    waiting = o.status == PENDING
    return {
        **o.model_dump(exclude={"id", "payload", "tenant_id", "order_at", "lease_until"}),
        "id": delivery_id(o.id),
        "next_attempt_at": o.next_attempt_at if waiting else None,
    }


def _row(session: Any, tenant_id: int | None, delivery: str) -> Outbox:
    number = delivery.removeprefix("act_")
    row = session.get(Outbox, int(number)) if number.isdigit() else None
    if row is None or row.tenant_id != tenant_id:
        raise NotFound(f'no delivery "{delivery}"')
    return row  # type: ignore[no-any-return]


Status = Literal["pending", "delivering", "delivered", "dead", "suppressed"]


@router.get("/v1/deliveries")
def list_deliveries(
    tenant: TenantDep,
    session: SessionDep,
    status_: Annotated[Status | None, Query(alias="status")] = None,
    member_id: Annotated[int | None, Query(ge=1, le=MAX_INT)] = None,
    type_: Annotated[
        str | None,
        Query(
            alias="type",
            max_length=64,
            description="an action type: `?type=refund&status=dead` lists the refunds that "
            "were never acknowledged, for manual handling",
        ),
    ] = None,
    before: Annotated[
        str | None,
        Query(pattern=r"^(act_)?[0-9]{1,18}$", description="a delivery id: older ones only"),
    ] = None,
    limit: Annotated[int, Query(ge=1, le=500)] = 50,
) -> list[DeliveryOut]:
    """Newest first; page with `before` = the last id of the previous page."""
    query = select(Outbox).where(Outbox.tenant_id == tenant.id)
    if status_:
        query = query.where(Outbox.status == status_)
    if member_id is not None:
        query = query.where(Outbox.member_id == member_id)
    if type_:
        query = query.where(Outbox.type == type_)
    if before:
        query = query.where(col(Outbox.id) < int(before.removeprefix("act_")))
    rows = session.exec(query.order_by(col(Outbox.id).desc()).limit(limit)).all()
    return [DeliveryOut(**_delivery(o)) for o in rows]


@router.get("/v1/deliveries/{delivery}", responses=responses(404))
def get_delivery(delivery: str, tenant: TenantDep, session: SessionDep) -> DeliveryDetail:
    o = _row(session, tenant.id, delivery)
    attempts = session.exec(
        select(DeliveryAttempt)
        .where(DeliveryAttempt.outbox_id == o.id)
        .order_by(col(DeliveryAttempt.attempt))
    ).all()
    return DeliveryDetail(
        **_delivery(o),
        payload=o.payload,
        history=[AttemptOut(**a.model_dump()) for a in attempts],
    )


@router.post(
    "/v1/deliveries/{delivery}/replay",
    status_code=status.HTTP_202_ACCEPTED,
    responses=responses(404, 409),
)
def replay_delivery(
    delivery: str, tenant: TenantDep, session: SessionDep, now: NowDep
) -> DeliveryOut:
    """Send a dead-lettered (or already delivered) action again, with a fresh set of
    attempts. It keeps its id, so a receiver that saw it already can tell."""
    return DeliveryOut(**_delivery(replay(session, tenant.id, delivery, now)))


def replay(session: Any, tenant_id: int | None, delivery: str, now: datetime) -> Outbox:
    """Put a dead, delivered or suppressed action back in the queue (the API and the
    console's replay button)."""
    o = _row(session, tenant_id, delivery)
    if o.status not in (DEAD, DELIVERED, SUPPRESSED):
        raise ReplayConflict(
            f"delivery {delivery} is {o.status}; only dead, delivered or suppressed ones replay"
        )
    o.status, o.attempts, o.next_attempt_at, o.lease_until = PENDING, 0, now, None
    session.add(o)
    session.flush()
    return o
