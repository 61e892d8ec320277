"""Group-buy, vouchers and referral codes for the mini-program, with the member token.

Opening, joining and leaving go through the write path (the answer carries the team's live
state and the member's funnel outcomes). Reading a team needs only its id, which is the
share token the leader passes to friends; listings show the member's own teams and
vouchers only. Send an `Idempotency-Key` to make a retried tap safe.
"""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Body, Request, Response
from pydantic import Field
from sqlalchemy import Connection, select

from app.api.deps import Input, MemberClaimsDep
from app.api.submit import IdempotencyKey, member_command, read_only, submit
from app.errors import NotFound
from app.events.schemas import Profile
from app.mechanics.groupbuy.service import seat_t, team_json, team_t
from app.mechanics.rewards import points
from app.mechanics.vouchers.service import to_json as voucher_json
from app.mechanics.vouchers.service import voucher_t
from app.problems import responses

router = APIRouter(prefix="/v1/member", tags=["member (mini-program)"])


class TeamAction(Input):
    profile: Profile | None = Field(default=None, description="how teammates see you")


def team_data(data: dict[str, Any], body: TeamAction | None) -> dict[str, Any]:
    """A team command's data: what the path names, and the profile the member sent."""
    if body is None or body.profile is None:
        return data
    return {**data, "profile": body.profile.model_dump(exclude_none=True)}


@router.post(
    "/groupbuy/{funnel}/{campaign}/teams",
    status_code=200,
    responses=responses(401, 404, 409, 422, 429),
)
async def open_team(
    funnel: str,
    campaign: str,
    request: Request,
    claims: MemberClaimsDep,
    idempotency_key: IdempotencyKey = None,
    body: Annotated[TeamAction | None, Body()] = None,
) -> Response:
    """Open a team of the campaign with you as its leader. 409 with a reason code when you
    may not: `campaign_not_started`, `campaign_ended`, `in_another_team`,
    `lead_limit_reached`, `sold_out`, `too_many_open_teams`."""
    request.app.state.rate_limiter.check(claims.tenant_id)
    data = team_data({"funnel": funnel, "campaign": campaign}, body)
    return await submit(
        request,
        member_command(claims, "groupbuy.open", data, idempotency_key),
    )


@router.post("/teams/{team}/join", responses=responses(401, 404, 409, 422, 429))
async def join_team(
    team: str,
    request: Request,
    claims: MemberClaimsDep,
    idempotency_key: IdempotencyKey = None,
    body: Annotated[TeamAction | None, Body()] = None,
) -> Response:
    """Join a team through its share. 409 reasons: `team_full`, `team_closed`,
    `team_expired`, `already_joined`, `in_another_team`, `join_limit_reached`,
    `new_customers_only`, `sold_out`. Pay-to-join campaigns hold your seat until the
    payment window passes; the shop's `order.paid` with this `team_id` confirms it."""
    request.app.state.rate_limiter.check(claims.tenant_id)
    data = team_data({"team": team}, body)
    return await submit(
        request,
        member_command(claims, "groupbuy.join", data, idempotency_key),
    )


@router.post("/teams/{team}/leave", responses=responses(401, 404, 409, 422, 429))
async def leave_team(
    team: str, request: Request, claims: MemberClaimsDep, idempotency_key: IdempotencyKey = None
) -> Response:
    """Leave an open team (a paid seat is refunded; a leader's place passes to the earliest
    remaining member; a leader alone cancels the team)."""
    request.app.state.rate_limiter.check(claims.tenant_id)
    return await submit(
        request,
        member_command(claims, "groupbuy.leave", {"team": team}, idempotency_key),
    )


@router.get("/teams/{team}", responses=responses(401, 404))
async def read_team(team: str, request: Request, claims: MemberClaimsDep) -> dict[str, Any]:
    """A team's live state: members (nickname, avatar), seats left, deadline."""
    now = request.app.state.clock.now()

    def read(conn: Connection) -> dict[str, Any]:
        row = conn.execute(
            select(team_t).where(team_t.c.public_id == team, team_t.c.tenant_id == claims.tenant_id)
        ).first()
        if row is None:
            raise NotFound(f'no group-buy team "{team}"')
        out = team_json(conn, row, now)
        mine = conn.execute(
            select(seat_t.c.status, seat_t.c.role).where(
                seat_t.c.team_id == row.id, seat_t.c.member_id == claims.member_id
            )
        ).first()
        out["you"] = {"status": mine.status, "role": mine.role} if mine else None
        return out

    return await read_only(request, read)


@router.get("/teams", responses=responses(401))
async def my_teams(
    request: Request, claims: MemberClaimsDep, limit: Annotated[int, Field(ge=1, le=100)] = 20
) -> dict[str, Any]:
    """Your teams, newest first."""
    now = request.app.state.clock.now()

    def read(conn: Connection) -> dict[str, Any]:
        rows = conn.execute(
            select(team_t)
            .join(seat_t, seat_t.c.team_id == team_t.c.id)
            .where(seat_t.c.member_id == claims.member_id, seat_t.c.tenant_id == claims.tenant_id)
            .order_by(team_t.c.opened_at.desc(), team_t.c.id.desc())
            .limit(limit)
        ).all()
        return {"teams": [team_json(conn, r, now) for r in rows]}

    return await read_only(request, read)


@router.get("/vouchers", responses=responses(401))
async def my_vouchers(
    request: Request, claims: MemberClaimsDep, limit: Annotated[int, Field(ge=1, le=200)] = 50
) -> dict[str, Any]:
    """Your vouchers, newest first, with the code and QR payload a cashier scans."""
    now = request.app.state.clock.now()

    def read(conn: Connection) -> dict[str, Any]:
        rows = conn.execute(
            select(voucher_t)
            .where(
                voucher_t.c.tenant_id == claims.tenant_id,
                voucher_t.c.member_id == claims.member_id,
            )
            .order_by(voucher_t.c.issued_at.desc(), voucher_t.c.id.desc())
            .limit(limit)
        ).all()
        return {"vouchers": [voucher_json(r, now) for r in rows]}

    return await read_only(request, read)


@router.post("/referral/{funnel}/{campaign}", responses=responses(401, 404, 429))
async def my_referral(
    funnel: str, campaign: str, request: Request, claims: MemberClaimsDep
) -> Response:
    """Your invite code for a referral campaign (made on first ask, the same ever after), its
    share path, the friends who accepted it and whether they qualified, and your rewards
    (pending through the hold, then paid; voided by a refund)."""
    request.app.state.rate_limiter.check(claims.tenant_id)
    data = {"funnel": funnel, "campaign": campaign}
    return await submit(
        request,
        member_command(claims, "referral.mine", data, None),
    )


@router.get("/points", responses=responses(401))
async def my_points(request: Request, claims: MemberClaimsDep) -> dict[str, Any]:
    """Your points balance and latest ledger entries (credits, debits, reversals)."""

    def read(conn: Connection) -> dict[str, Any]:
        return {
            "balance": points.balance(conn, claims.tenant_id, claims.member_id),
            "entries": points.entries(conn, claims.tenant_id, claims.member_id),
        }

    return await read_only(request, read)
