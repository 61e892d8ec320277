"""Points exchange (积分兑换): spend points for a reward, never past the balance."""

from __future__ import annotations

from app.mechanics.commands import Context, Effects
from app.mechanics.rewards import points
from app.mechanics.rewards.campaigns import reward_campaign
from app.mechanics.rewards.grant import grant_campaign_reward


def exchange(ctx: Context) -> Effects:
    ref, cfg, _ = reward_campaign(ctx, ("points_exchange",))
    m = ctx.member()
    origin = f"exchange:{ref.funnel_id}:{ctx.data['campaign']}:{m.id}:{ctx.event_id}"
    points.post(ctx.conn, ctx.tenant_id, m.id, -cfg.points_cost, origin, ctx.now, cfg.title)
    effects = Effects(m.id, {})
    voucher = grant_campaign_reward(
        ctx.conn,
        ctx.tenant_id,
        m.id,
        ref.funnel_id,
        ctx.data["campaign"],
        cfg.reward,
        origin,
        ctx.now,
        effects,
    )
    effects.result = {
        "spent": cfg.points_cost,
        "balance": points.balance(ctx.conn, ctx.tenant_id, m.id),
        "voucher": voucher.code if voucher is not None else None,
    }
    return effects
