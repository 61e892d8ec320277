"""Lottery (抽奖): a seeded, auditable draw whose odds are exactly the configuration's.

Each draw gets a fresh random seed (stored with the draw). The roll is
`int(SHA-256(seed)) mod 1,000,000` — uniform over [0, 1,000,000) to within 2⁻²³⁶ — and the
prizes take consecutive slices of that range, `odds_ppm` wide, in the order configured; a
roll past the last slice wins nothing. Anyone holding the seed can recompute the roll and
the prize (GET /v1/rewards/{funnel}/{campaign}/draws lists them).

A mall engine we studied drew from `rand(1, total)` against slices starting at 0 — an
off-by-one that starved the first prize and could roll past the last — and read, then
wrote, the prize stock. Here the range is half-open and the stock is taken by a
conditional UPDATE (`remaining > 0`): a prize whose stock is gone is not won (the member
is told), so stock never goes negative and the other prizes keep their configured odds.
"""

from __future__ import annotations

import hashlib
import secrets
from collections.abc import Sequence
from typing import Any

from sqlalchemy import Connection, Table, func, select, update

from app.db import insert_or_skip, row_json
from app.errors import Refused
from app.mechanics.commands import Context, Effects, Emit
from app.mechanics.rewards.campaigns import reward_campaign
from app.mechanics.rewards.cards import take_supply
from app.mechanics.rewards.grant import grant_campaign_reward
from app.mechanics.rewards.models import LotteryDraw, PrizeStock

draw_t: Table = LotteryDraw.__table__  # type: ignore[attr-defined]
stock_t: Table = PrizeStock.__table__  # type: ignore[attr-defined]
RANGE = 1_000_000
_NEW_STOCK = insert_or_skip(stock_t, ["tenant_id", "funnel_id", "campaign", "prize"])


def new_seed() -> str:
    return secrets.token_hex(16)


def roll_of(seed: str) -> int:
    return int.from_bytes(hashlib.sha256(seed.encode()).digest(), "big") % RANGE


def pick(odds: Sequence[int], roll: int) -> int | None:
    """The index of the slice of [0, RANGE) that holds `roll`, or None past the last."""
    edge = 0
    for i, width in enumerate(odds):
        edge += width
        if roll < edge:
            return i
    return None


def take_prize(
    conn: Connection, tenant_id: int, funnel_id: int, campaign: str, prize: str, stock: int
) -> bool:
    key = {"tenant_id": tenant_id, "funnel_id": funnel_id, "campaign": campaign, "prize": prize}
    conn.execute(_NEW_STOCK[conn.dialect.name], {**key, "remaining": stock})
    return bool(
        conn.execute(
            update(stock_t)
            .where(*(stock_t.c[k] == v for k, v in key.items()), stock_t.c.remaining > 0)
            .values(remaining=stock_t.c.remaining - 1)
        ).rowcount
    )


def draw(ctx: Context) -> Effects:
    """Draw once: within the member's daily limit and the campaign's daily draws."""
    ref, cfg, funnel = reward_campaign(ctx, ("lottery",))
    name = ctx.data["campaign"]
    m = ctx.member()
    day = ctx.now.astimezone(funnel.zone).date()
    mine = ctx.conn.execute(
        select(func.count()).where(
            draw_t.c.tenant_id == ctx.tenant_id,
            draw_t.c.funnel_id == ref.funnel_id,
            draw_t.c.campaign == name,
            draw_t.c.member_id == m.id,
            draw_t.c.local_date == day,
        )
    ).scalar_one()
    if mine >= (cfg.per_member_daily_limit or 1):
        raise Refused("daily_limit_reached", "no draws left for you today")
    if cfg.daily_limit is not None and not take_supply(
        ctx.conn, ctx.tenant_id, ref.funnel_id, f"lottery:{name}", day, cfg.daily_limit
    ):
        raise Refused("sold_out", f"today's {cfg.daily_limit} draws are all taken")
    seed = new_seed()
    roll = roll_of(seed)
    index = pick([p.odds_ppm for p in cfg.prizes], roll)
    drawn = cfg.prizes[index] if index is not None else None
    won = drawn
    if (
        drawn is not None
        and drawn.stock is not None
        and not take_prize(ctx.conn, ctx.tenant_id, ref.funnel_id, name, drawn.name, drawn.stock)
    ):
        won = None
    draw_id = ctx.conn.execute(
        draw_t.insert().returning(draw_t.c.id),
        {
            "tenant_id": ctx.tenant_id,
            "funnel_id": ref.funnel_id,
            "campaign": name,
            "member_id": m.id,
            "local_date": day,
            "seed": seed,
            "roll": roll,
            "drawn": drawn.name if drawn else None,
            "prize": won.name if won else None,
            "created_at": ctx.now,
        },
    ).scalar_one()
    effects = Effects(m.id, {})
    voucher = None
    if won is not None:
        voucher = grant_campaign_reward(
            ctx.conn,
            ctx.tenant_id,
            m.id,
            ref.funnel_id,
            name,
            won.reward,
            f"lottery:{draw_id}",
            ctx.now,
            effects,
            reason=f"{cfg.title}: {won.name}",
        )
        effects.emits.append(
            Emit(m.id, "lottery.won", {"campaign": name, "prize": won.name, "draw_id": draw_id})
        )
    effects.result = {
        "draw_id": draw_id,
        "prize": won.name if won else None,
        "out_of_stock": drawn is not None and won is None,
        "voucher": voucher.code if voucher is not None else None,
        "seed": seed,
        "roll": roll,
        "draws_left_today": (cfg.per_member_daily_limit or 1) - mine - 1,
    }
    return effects


def draw_json(r: Any) -> dict[str, Any]:
    return row_json(r, ("tenant_id", "funnel_id", "campaign"))
