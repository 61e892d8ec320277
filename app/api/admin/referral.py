"""Referral for the marketer (tenant key): channel codes, the review queue, statistics and
a member's referral tree. Writes go through the write path; reads use a read-only
connection."""

from __future__ import annotations

from collections import Counter
from datetime import timedelta
from typing import Annotated, Any, Literal

from fastapi import APIRouter, Request, Response
from pydantic import Field
from sqlalchemy import Connection, func, select

from app.api.deps import Input, RowId, TenantIdDep
from app.api.submit import IdempotencyKey, command, read_only, submit
from app.errors import NotFound
from app.funnels.store import funnel_t
from app.mechanics.referral.service import code_t, event_t, link_t, member_t, reward_json, reward_t
from app.problems import responses

router = APIRouter(prefix="/v1/referral", tags=["referral"], responses=responses(401))


class Channel(Input):
    channel: str = Field(min_length=1, max_length=64, description="lobby-poster-A, staff-li…")


@router.post("/{funnel}/{campaign}/channels", responses=responses(404))
async def channel_code(
    funnel: str,
    campaign: str,
    body: Channel,
    request: Request,
    tenant_id: TenantIdDep,
    idempotency_key: IdempotencyKey = None,
) -> Response:
    """A code for a channel (a poster, a lobby, a staff member): the same code every time
    for the same channel; members it brings are attributed to the channel."""
    data = {"funnel": funnel, "campaign": campaign, "channel": body.channel}
    return await submit(
        request, command(tenant_id, "referral.channel", data, source="admin", key=idempotency_key)
    )


def _review(decision: str) -> Any:
    async def route(
        reward_id: RowId,
        request: Request,
        tenant_id: TenantIdDep,
        idempotency_key: IdempotencyKey = None,
    ) -> Response:
        data = {"reward_id": reward_id, "decision": decision}
        return await submit(
            request,
            command(tenant_id, "referral.review", data, source="admin", key=idempotency_key),
        )

    return route


router.add_api_route(
    "/rewards/{reward_id}/release",
    _review("release"),
    methods=["POST"],
    summary="Release a flagged reward (paid now if its hold has passed, else when it does)",
    responses=responses(404, 409),
)
router.add_api_route(
    "/rewards/{reward_id}/void",
    _review("void"),
    methods=["POST"],
    summary="Void a pending or flagged reward",
    responses=responses(404, 409),
)


def _funnel_id(conn: Connection, tenant_id: int, key: str) -> int:
    found = conn.execute(
        select(funnel_t.c.id).where(funnel_t.c.tenant_id == tenant_id, funnel_t.c.key == key)
    ).scalar()
    if found is None:
        raise NotFound(f'no funnel "{key}"')
    return int(found)


@router.get("/{funnel}/{campaign}/rewards", responses=responses(404))
async def rewards(
    funnel: str,
    campaign: str,
    request: Request,
    tenant_id: TenantIdDep,
    status: Literal["pending", "flagged", "paid", "voided"] | None = None,
    limit: Annotated[int, Field(ge=1, le=500)] = 100,
) -> dict[str, Any]:
    """Rewards, newest first; `status=flagged` is the review queue (each with its flags)."""

    def read(conn: Connection) -> dict[str, Any]:
        fid = _funnel_id(conn, tenant_id, funnel)
        q = (
            select(reward_t, member_t.c.external_id)
            .join(member_t, member_t.c.id == reward_t.c.beneficiary_member_id)
            .where(
                reward_t.c.tenant_id == tenant_id,
                reward_t.c.funnel_id == fid,
                reward_t.c.campaign == campaign,
            )
        )
        if status is not None:
            q = q.where(reward_t.c.status == status)
        rows = conn.execute(q.order_by(reward_t.c.id.desc()).limit(limit)).all()
        return {"rewards": [{**reward_json(r), "member": r.external_id} for r in rows]}

    return await read_only(request, read)


def _nickname(conn: Connection, member_id: int | None) -> str | None:
    if member_id is None:
        return None  # a channel code
    return conn.execute(select(member_t.c.nickname).where(member_t.c.id == member_id)).scalar()


@router.get("/{funnel}/{campaign}/stats", responses=responses(404))
async def stats(
    funnel: str,
    campaign: str,
    request: Request,
    tenant_id: TenantIdDep,
    period: Literal["week", "month", "all"] = "week",
) -> dict[str, Any]:
    """The leaderboard (top inviters by invitees who qualified in the period: the seeds'
    "top 3 get a gift"), the k-factor (acceptances per member holding a code), conversions
    per acceptance, and how deep the referral trees go."""
    now = request.app.state.clock.now()

    def read(conn: Connection) -> dict[str, Any]:
        fid = _funnel_id(conn, tenant_id, funnel)
        where = (
            link_t.c.tenant_id == tenant_id,
            link_t.c.funnel_id == fid,
            link_t.c.campaign == campaign,
        )
        links = conn.execute(
            select(
                link_t.c.invitee_member_id, link_t.c.inviter_member_id, link_t.c.qualified_at
            ).where(*where)
        ).all()
        holders = conn.execute(
            select(func.count())
            .select_from(code_t)
            .where(
                code_t.c.tenant_id == tenant_id,
                code_t.c.funnel_id == fid,
                code_t.c.campaign == campaign,
                code_t.c.owner_member_id.is_not(None),
            )
        ).scalar_one()
        since = {"week": now - timedelta(days=7), "month": now - timedelta(days=30)}.get(period)
        top = Counter(
            inviter
            for _, inviter, qualified_at in links
            if inviter is not None
            and qualified_at is not None
            and (since is None or qualified_at >= since)
        ).most_common(10)
        names = dict(
            conn.execute(
                select(member_t.c.id, member_t.c.nickname).where(
                    member_t.c.id.in_([m for m, _ in top] or [0])
                )
            ).all()
        )
        parent = {invitee: inviter for invitee, inviter, _ in links}
        depths: Counter[int] = Counter()
        for invitee in parent:
            depth, node = 1, parent[invitee]
            while node is not None and node in parent and depth < 100:
                depth, node = depth + 1, parent[node]
            depths[depth] += 1
        silent = conn.execute(  # invitees with no event of their own since accepting
            select(link_t.c.inviter_member_id, func.count())
            .where(
                *where,
                ~select(event_t.c.id)
                .where(
                    event_t.c.member_id == link_t.c.invitee_member_id,
                    event_t.c.received_at >= link_t.c.accepted_at,
                    event_t.c.type != "invite.accepted",
                )
                .exists(),
            )
            .group_by(link_t.c.inviter_member_id)
        ).all()
        accepted = sum(1 for _, inviter, _ in links if inviter is not None)
        qualified = sum(1 for _, _, q in links if q is not None)
        return {
            "period": period,
            "leaderboard": [
                {"rank": i, "nickname": names.get(m) or "", "qualified_invitees": n}
                for i, (m, n) in enumerate(top, start=1)
            ],
            "code_holders": holders,
            "acceptances": len(links),
            "member_acceptances": accepted,
            "k_factor": round(accepted / holders, 3) if holders else 0.0,
            "conversion": round(qualified / len(links), 3) if links else 0.0,
            "depths": {str(d): n for d, n in sorted(depths.items())},
            # a code whose invitees never show up again is worth a look (fraud, or a
            # poster in the wrong place)
            "never_active_invitees": sum(n for _, n in silent),
            "never_active_by_inviter": [
                {"inviter": _nickname(conn, inviter), "invitees": n}
                for inviter, n in sorted(silent, key=lambda x: -x[1])[:10]
            ],
        }

    return await read_only(request, read)


@router.get("/{funnel}/{campaign}/members/{external_id}/tree", responses=responses(404))
async def tree(
    funnel: str, campaign: str, external_id: str, request: Request, tenant_id: TenantIdDep
) -> dict[str, Any]:
    """Who a member brought in, and whom those brought in (the member's subtree)."""

    def read(conn: Connection) -> dict[str, Any]:
        fid = _funnel_id(conn, tenant_id, funnel)
        root = conn.execute(
            select(member_t.c.id, member_t.c.nickname).where(
                member_t.c.tenant_id == tenant_id, member_t.c.external_id == external_id
            )
        ).first()
        if root is None:
            raise NotFound(f'no member "{external_id}"')
        rows = conn.execute(
            select(
                link_t.c.invitee_member_id,
                link_t.c.inviter_member_id,
                link_t.c.qualified_at,
                member_t.c.external_id,
                member_t.c.nickname,
            )
            .join(member_t, member_t.c.id == link_t.c.invitee_member_id)
            .where(
                link_t.c.tenant_id == tenant_id,
                link_t.c.funnel_id == fid,
                link_t.c.campaign == campaign,
            )
        ).all()
        children: dict[int, list[Any]] = {}
        for r in rows:
            children.setdefault(r.inviter_member_id, []).append(r)

        def node(member_id: int, depth: int) -> list[dict[str, Any]]:
            if depth > 50:
                return []
            return [
                {
                    "member": c.external_id,
                    "nickname": c.nickname or "",
                    "qualified": c.qualified_at is not None,
                    "invitees": node(c.invitee_member_id, depth + 1),
                }
                for c in children.get(member_id, [])
            ]

        return {
            "member": external_id,
            "nickname": root.nickname or "",
            "invitees": node(root.id, 1),
        }

    return await read_only(request, read)
