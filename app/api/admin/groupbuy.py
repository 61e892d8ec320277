"""The merchant's view of group-buy teams and vouchers (tenant API key).

`POST /v1/vouchers/{code}/redeem` is the till: it succeeds exactly once per voucher, even
when two tills try at the same moment; the loser gets a 409 saying when it was redeemed.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from fastapi import APIRouter, Body, Request, Response
from pydantic import Field
from sqlalchemy import Connection, select

from app.api.deps import Input, TenantIdDep
from app.api.submit import IdempotencyKey, command, read_only, submit
from app.errors import NotFound
from app.funnels.store import funnel_t
from app.mechanics.groupbuy.service import team_json, team_t
from app.mechanics.vouchers import service as vouchers
from app.problems import responses

router = APIRouter(prefix="/v1", tags=["group-buy and vouchers"], responses=responses(401))


class Cancel(Input):
    reason: str | None = Field(default=None, max_length=64)


class Redeem(Input):
    till: str | None = Field(default=None, max_length=100, description="which till or cashier")
    order_id: str | None = Field(default=None, max_length=128)


@router.get("/groupbuy/teams")
async def list_teams(
    request: Request,
    tenant_id: TenantIdDep,
    funnel: str | None = None,
    campaign: str | None = None,
    status: Literal["open", "succeeded", "failed", "cancelled"] | None = None,
    limit: Annotated[int, Field(ge=1, le=200)] = 50,
) -> dict[str, Any]:
    now = request.app.state.clock.now()

    def read(conn: Connection) -> dict[str, Any]:
        q = select(team_t).where(team_t.c.tenant_id == tenant_id)
        if funnel is not None:
            q = q.join(funnel_t, funnel_t.c.id == team_t.c.funnel_id).where(
                funnel_t.c.key == funnel
            )
        if campaign is not None:
            q = q.where(team_t.c.campaign == campaign)
        if status is not None:
            q = q.where(team_t.c.status == status)
        rows = conn.execute(q.order_by(team_t.c.id.desc()).limit(limit)).all()
        return {"teams": [team_json(conn, r, now) for r in rows]}

    return await read_only(request, read)


@router.get("/groupbuy/teams/{team}", responses=responses(404))
async def read_team(team: str, request: Request, tenant_id: TenantIdDep) -> dict[str, Any]:
    now = request.app.state.clock.now()

    def read(conn: Connection) -> dict[str, Any]:
        row = conn.execute(
            select(team_t).where(team_t.c.public_id == team, team_t.c.tenant_id == tenant_id)
        ).first()
        if row is None:
            raise NotFound(f'no group-buy team "{team}"')
        return team_json(conn, row, now)

    return await read_only(request, read)


@router.post("/groupbuy/teams/{team}/cancel", responses=responses(404, 409, 422))
async def cancel_team(
    team: str,
    request: Request,
    tenant_id: TenantIdDep,
    idempotency_key: IdempotencyKey = None,
    body: Annotated[Cancel | None, Body()] = None,
) -> Response:
    """Cancel an open team: every member is told (`groupbuy.cancelled`), paid seats refunded."""
    data = {"team": team, "reason": body.reason if body else None}
    return await submit(
        request, command(tenant_id, "groupbuy.cancel", data, source="admin", key=idempotency_key)
    )


@router.get("/vouchers/{code}", responses=responses(404))
async def check_voucher(code: str, request: Request, tenant_id: TenantIdDep) -> dict[str, Any]:
    """What a till sees before redeeming: name, value, status (an expired voucher shows as
    expired even before the expiry sweep ran)."""
    now = request.app.state.clock.now()

    def read(conn: Connection) -> dict[str, Any]:
        return vouchers.to_json(vouchers.by_code(conn, tenant_id, vouchers.normalize(code)), now)

    return await read_only(request, read)


@router.post("/vouchers/{code}/redeem", responses=responses(404, 409, 422))
async def redeem_voucher(
    code: str,
    request: Request,
    tenant_id: TenantIdDep,
    idempotency_key: IdempotencyKey = None,
    body: Annotated[Redeem | None, Body()] = None,
) -> Response:
    """Redeem at the till, exactly once. 409 reasons: `voucher_already_redeemed`,
    `voucher_expired`, `voucher_voided`. The code may be typed with dashes or spaces, or be
    the scanned QR payload. With an `Idempotency-Key`, a till's retry gets the first answer."""
    data = {"code": code, **(body.model_dump(exclude_none=True) if body else {})}
    return await submit(
        request, command(tenant_id, "voucher.redeem", data, source="till", key=idempotency_key)
    )


@router.post("/vouchers/{code}/void", responses=responses(404, 409))
async def void_voucher(
    code: str, request: Request, tenant_id: TenantIdDep, idempotency_key: IdempotencyKey = None
) -> Response:
    """Void an issued voucher (it can no longer be redeemed)."""
    return await submit(
        request,
        command(tenant_id, "voucher.void", {"code": code}, source="admin", key=idempotency_key),
    )
