"""Rewards: what a member does in the mini-program (claim today's card, redeem cards, draw
the lottery, exchange points, see their cards), and the merchant's audit of the draws.

Member operations are commands through the write path; a refusal is a 409 with a reason
code (`drop_not_open`, `daily_limit_reached`, `sold_out`, `not_enough_cards`,
`not_enough_points`, `campaign_not_started`, `campaign_ended`, `wrong_campaign_kind`).
"""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Query, Request, Response
from sqlalchemy import Connection, select

from app.api.deps import MemberClaimsDep, TenantIdDep
from app.api.submit import IdempotencyKey, member_command, read_only, submit
from app.errors import NotFound
from app.funnels.store import funnel_t
from app.mechanics.rewards import cards
from app.mechanics.rewards.lottery import draw_json, draw_t, stock_t
from app.problems import responses

member = APIRouter(prefix="/v1/member", tags=["member (mini-program)"])
admin = APIRouter(prefix="/v1/rewards", tags=["rewards"], responses=responses(401))

OPERATIONS = {
    "claim": ("card.claim", "Claim today's card from a card drop (first come, while it lasts)"),
    "redeem": ("card.redeem", "Spend the campaign's cards_for_reward cards for its reward"),
    "draw": ("lottery.draw", "Draw the lottery once (within your daily limit)"),
    "exchange": ("points.exchange", "Spend points_cost points for the campaign's reward"),
}


def _operation(kind: str) -> Any:
    async def route(
        funnel: str,
        campaign: str,
        request: Request,
        claims: MemberClaimsDep,
        idempotency_key: IdempotencyKey = None,
    ) -> Response:
        request.app.state.rate_limiter.check(claims.tenant_id)
        data = {"funnel": funnel, "campaign": campaign}
        return await submit(request, member_command(claims, kind, data, idempotency_key))

    return route


for _op, (_kind, _summary) in OPERATIONS.items():
    member.add_api_route(
        "/rewards/{funnel}/{campaign}/" + _op,
        _operation(_kind),
        methods=["POST"],
        summary=_summary,
        responses=responses(401, 404, 409, 429),
    )


@member.get("/cards", responses=responses(401))
async def my_cards(request: Request, claims: MemberClaimsDep) -> dict[str, Any]:
    """The cards you hold, by name."""

    def read(conn: Connection) -> dict[str, Any]:
        return {"cards": cards.holdings(conn, claims.tenant_id, claims.member_id)}

    return await read_only(request, read)


@admin.get("/{funnel}/{campaign}/draws", responses=responses(404))
async def draws(
    funnel: str,
    campaign: str,
    request: Request,
    tenant_id: TenantIdDep,
    limit: int = Query(default=500, ge=1, le=5000),
) -> dict[str, Any]:
    """Every draw with its seed and roll (roll = int(SHA-256(seed)) mod 1,000,000, the prize
    is the configured slice that holds it), and the prizes' remaining stock: an audit
    anyone can recompute."""

    def read(conn: Connection) -> dict[str, Any]:
        funnel_id = conn.execute(
            select(funnel_t.c.id).where(funnel_t.c.tenant_id == tenant_id, funnel_t.c.key == funnel)
        ).scalar()
        if funnel_id is None:
            raise NotFound(f'no funnel "{funnel}"')
        where = (
            draw_t.c.tenant_id == tenant_id,
            draw_t.c.funnel_id == funnel_id,
            draw_t.c.campaign == campaign,
        )
        rows = conn.execute(select(draw_t).where(*where).order_by(draw_t.c.id.desc()).limit(limit))
        stock = conn.execute(
            select(stock_t.c.prize, stock_t.c.remaining).where(
                stock_t.c.tenant_id == tenant_id,
                stock_t.c.funnel_id == funnel_id,
                stock_t.c.campaign == campaign,
            )
        ).all()
        return {"draws": [draw_json(r) for r in rows], "stock": dict(stock)}

    return await read_only(request, read)
