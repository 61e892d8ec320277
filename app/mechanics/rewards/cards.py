"""Cards (集卡): a daily limited drop claimed first-come in a time window (抢霸王餐卡), cards for
a photo review, and N cards redeemed for the reward (the free meal).

A card is a count per member and card name, kept by an append-only ledger (`card_entry`,
one `origin` per cause) and a balance beside it. The day's supply is one row per campaign
and local day taken by a conditional UPDATE (`used < daily_limit`), after the member's row
lock: 200 members claiming 50 cards at once get exactly 50.
"""

from __future__ import annotations

from datetime import date, datetime, timedelta
from typing import Any

from sqlalchemy import Connection, Table, func, select, update

from app.db import insert_or_skip
from app.engine.schedule import parse_duration, parse_local_time
from app.errors import Refused
from app.funnels import store
from app.mechanics.commands import Context, Effects, Emit
from app.mechanics.rewards.campaigns import reward_campaign, running
from app.mechanics.rewards.grant import grant_campaign_reward
from app.mechanics.rewards.models import CardBalance, CardEntry, DailySupply

card_balance_t: Table = CardBalance.__table__  # type: ignore[attr-defined]
card_entry_t: Table = CardEntry.__table__  # type: ignore[attr-defined]
supply_t: Table = DailySupply.__table__  # type: ignore[attr-defined]

_NEW_BALANCE = insert_or_skip(card_balance_t, ["tenant_id", "member_id", "card"])
_NEW_ENTRY = insert_or_skip(card_entry_t, ["tenant_id", "origin"], card_entry_t.c.id)
_NEW_SUPPLY = insert_or_skip(supply_t, ["tenant_id", "funnel_id", "campaign", "local_date"])


# ── the ledger ────────────────────────────────────────────────────────────────────────────
def post(
    conn: Connection,
    tenant_id: int,
    member_id: int,
    card: str,
    delta: int,
    via: str,
    origin: str,
    now: datetime,
) -> int | None:
    """Add (delta > 0) or spend (< 0) cards once per `origin`; None if this origin was posted
    already. Spending more than the member holds is refused (409 not_enough_cards)."""
    entry_id = conn.execute(
        _NEW_ENTRY[conn.dialect.name],
        {
            "tenant_id": tenant_id,
            "member_id": member_id,
            "card": card,
            "delta": delta,
            "via": via,
            "origin": origin[:200],
            "created_at": now,
        },
    ).scalar()
    if entry_id is None:
        return None
    key = {"tenant_id": tenant_id, "member_id": member_id, "card": card}
    conn.execute(_NEW_BALANCE[conn.dialect.name], key)
    moved = conn.execute(
        update(card_balance_t)
        .where(*(card_balance_t.c[k] == v for k, v in key.items()))
        .where(card_balance_t.c.count + delta >= 0)
        .values(count=card_balance_t.c.count + delta)
    ).rowcount
    if not moved:
        raise Refused(
            "not_enough_cards",
            f"{-delta} × {card} needed, {count(conn, tenant_id, member_id, card)} held",
        )
    return int(entry_id)


def count(conn: Connection, tenant_id: int, member_id: int, card: str) -> int:
    found = conn.execute(
        select(card_balance_t.c.count).where(
            card_balance_t.c.tenant_id == tenant_id,
            card_balance_t.c.member_id == member_id,
            card_balance_t.c.card == card,
        )
    ).scalar()
    return int(found or 0)


def holdings(conn: Connection, tenant_id: int, member_id: int) -> dict[str, int]:
    rows = conn.execute(
        select(card_balance_t.c.card, card_balance_t.c.count).where(
            card_balance_t.c.tenant_id == tenant_id, card_balance_t.c.member_id == member_id
        )
    ).all()
    return {card: n for card, n in rows if n}


def _today(funnel: Any, now: datetime) -> date:
    return now.astimezone(funnel.zone).date()


def _day_bounds(funnel: Any, day: date) -> tuple[datetime, datetime]:
    start = datetime.combine(day, datetime.min.time(), funnel.zone)
    return start, start + timedelta(days=1)


def entries_today(
    conn: Connection, tenant_id: int, member_id: int, prefix: str, funnel: Any, now: datetime
) -> int:
    start, end = _day_bounds(funnel, _today(funnel, now))
    return int(
        conn.execute(
            select(func.count()).where(
                card_entry_t.c.tenant_id == tenant_id,
                card_entry_t.c.member_id == member_id,
                card_entry_t.c.origin.startswith(prefix, autoescape=True),
                card_entry_t.c.created_at >= start,
                card_entry_t.c.created_at < end,
            )
        ).scalar_one()
    )


def take_supply(
    conn: Connection, tenant_id: int, funnel_id: int, campaign: str, day: date, limit: int
) -> bool:
    """One unit of the campaign's supply for `day`, if any is left."""
    key = {"tenant_id": tenant_id, "funnel_id": funnel_id, "campaign": campaign, "local_date": day}
    conn.execute(_NEW_SUPPLY[conn.dialect.name], key)
    return bool(
        conn.execute(
            update(supply_t)
            .where(*(supply_t.c[k] == v for k, v in key.items()), supply_t.c.used < limit)
            .values(used=supply_t.c.used + 1)
        ).rowcount
    )


def supply_used(conn: Connection, tenant_id: int, funnel_id: int, campaign: str, day: date) -> int:
    found = conn.execute(
        select(supply_t.c.used).where(
            supply_t.c.tenant_id == tenant_id,
            supply_t.c.funnel_id == funnel_id,
            supply_t.c.campaign == campaign,
            supply_t.c.local_date == day,
        )
    ).scalar()
    return int(found or 0)


# ── commands ──────────────────────────────────────────────────────────────────────────────
def claim(ctx: Context) -> Effects:
    """Claim today's card from a drop: within the drop window, one (or the campaign's
    per-member limit) per member per day, while the day's supply lasts."""
    ref, cfg, funnel = reward_campaign(ctx, ("card_drop",))
    name = ctx.data["campaign"]
    local = ctx.now.astimezone(funnel.zone)
    opens = datetime.combine(local.date(), parse_local_time(cfg.drop_at), funnel.zone)
    closes = opens + parse_duration(cfg.drop_for)
    if not opens <= local < closes:
        when = opens if local < opens else opens + timedelta(days=1)
        raise Refused(
            "drop_not_open",
            f"today's drop opens at {cfg.drop_at} for {cfg.drop_for}; next: {when.isoformat()}",
        )
    m = ctx.member()
    day = local.date()
    prefix = f"drop:{ref.funnel_id}:{name}:{day}:{m.id}:"
    mine = entries_today(ctx.conn, ctx.tenant_id, m.id, prefix, funnel, ctx.now)
    if mine >= (cfg.per_member_daily_limit or 1):
        raise Refused("daily_limit_reached", f"you have claimed today's {cfg.card} already")
    if cfg.daily_limit is not None and not take_supply(
        ctx.conn, ctx.tenant_id, ref.funnel_id, name, day, cfg.daily_limit
    ):
        raise Refused("sold_out", f"today's {cfg.daily_limit} × {cfg.card} are all claimed")
    post(ctx.conn, ctx.tenant_id, m.id, cfg.card, 1, "drop", f"{prefix}{mine + 1}", ctx.now)
    held = count(ctx.conn, ctx.tenant_id, m.id, cfg.card)
    effects = Effects(m.id, _card_result(cfg, held))
    effects.emits.append(
        Emit(m.id, "card.collected", {"card": cfg.card, "via": "drop", "campaign": name})
    )
    return effects


def _card_result(cfg: Any, held: int) -> dict[str, Any]:
    out: dict[str, Any] = {"card": cfg.card, "held": held}
    if cfg.cards_for_reward:
        out["needed_for_reward"] = cfg.cards_for_reward
    return out


def redeem(ctx: Context) -> Effects:
    """Spend `cards_for_reward` cards for the campaign's reward (the free meal)."""
    # cards collected while it ran may be redeemed after it ends
    ref, cfg, _ = reward_campaign(ctx, ("card_drop", "review_for_card"), must_run=False)
    if not cfg.cards_for_reward or not cfg.reward:
        raise Refused("nothing_to_redeem", f'"{cfg.title}" has no reward to redeem its cards for')
    m = ctx.member()
    origin = f"redeem:{ref.funnel_id}:{ctx.data['campaign']}:{m.id}:{ctx.event_id}"
    post(ctx.conn, ctx.tenant_id, m.id, cfg.card, -cfg.cards_for_reward, "redeem", origin, ctx.now)
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
        **_card_result(cfg, count(ctx.conn, ctx.tenant_id, m.id, cfg.card)),
        "redeemed": cfg.cards_for_reward,
        "voucher": voucher.code if voucher is not None else None,
    }
    return effects


def observe(
    conn: Connection,
    tenant_id: int,
    m: Any,
    event_type: str,
    data: dict[str, Any],
    event_id: int,
    now: datetime,
    versions: list[store.VersionRef],
) -> Effects | None:
    """A `review.posted` earns each review_for_card campaign's card (and reward) once per
    order (or per review, without an order), within the member's daily limit."""
    if event_type != "review.posted":
        return None
    effects = Effects(m.id, {})
    for ref, funnel, name, cfg in running(conn, versions, "review_for_card", now):
        if int(data.get("photos") or 0) < cfg.min_photos:
            continue
        prefix = f"review:{ref.funnel_id}:{name}:"
        if cfg.per_member_daily_limit is not None and (
            entries_today(conn, tenant_id, m.id, prefix, funnel, now) >= cfg.per_member_daily_limit
        ):
            continue
        order = data.get("order_id") or f"review-{data.get('review_id')}"
        origin = f"{prefix}{order}"  # one card per order, whoever reviews it
        if post(conn, tenant_id, m.id, str(cfg.card), 1, "review", origin, now) is None:
            continue
        effects.emits.append(
            Emit(m.id, "card.collected", {"card": cfg.card, "via": "review", "campaign": name})
        )
        if cfg.reward and not cfg.cards_for_reward:
            grant_campaign_reward(
                conn, tenant_id, m.id, ref.funnel_id, name, cfg.reward, origin, now, effects
            )
    return effects if effects.emits or effects.actions else None
