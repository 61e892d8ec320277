"""Granting a reward (a `Reward` of a funnel's mechanics: a voucher, points, actions), the one
way every mechanic does it: check-in streaks, referral payouts, early solitaire orders."""

from __future__ import annotations

from datetime import datetime
from typing import Any

from sqlalchemy import Connection

from app.engine.schedule import parse_duration
from app.mechanics.commands import DirectAction, Effects, Emit
from app.mechanics.rewards import points
from app.mechanics.vouchers import service as vouchers


def grant_reward(
    conn: Connection,
    tenant_id: int,
    member_id: int,
    reward: dict[str, Any],
    origin: str,
    source: str,
    funnel_id: int | None,
    now: datetime,
    effects: Effects,
    reason: str | None = None,
) -> Any | None:
    """Grant `reward` once per `origin`: the voucher is issued (and `voucher.issued`
    emitted), the points are posted to the ledger (and `grant_points` queued for the
    merchant, with `origin` as its idempotency key), the actions are queued. Returns the
    voucher row, if the reward has one."""
    row = None
    if reward.get("voucher"):
        v = reward["voucher"]
        row, created = vouchers.issue(
            conn,
            vouchers.new_voucher(
                tenant_id=tenant_id,
                member_id=member_id,
                name=v["voucher"],
                value_fen=v.get("value_fen"),
                discount_percent=v.get("discount_percent"),
                valid_for=parse_duration(v.get("valid_for", "P7D")),
                origin=origin,
                mechanic=source,
                funnel_id=funnel_id,
                now=now,
            ),
        )
        if created:
            effects.emits.append(
                Emit(member_id, "voucher.issued", vouchers.event_data(row, source))
            )
    amount = int(reward.get("points") or 0)
    if amount and points.post(conn, tenant_id, member_id, amount, origin, now, reason or source):
        effects.actions.append(
            DirectAction(
                member_id,
                "grant_points",
                {"points": amount, "reason": reason or source, "idempotency_key": origin},
                source,
            )
        )
    for action in reward.get("actions") or []:
        params = {k: v for k, v in action.items() if k != "type"}
        effects.actions.append(DirectAction(member_id, action["type"], params, source))
    return row


def grant_campaign_reward(
    conn: Connection,
    tenant_id: int,
    member_id: int,
    funnel_id: int,
    name: str,
    reward: Any,
    origin: str,
    now: datetime,
    effects: Effects,
    reason: str | None = None,
) -> Any | None:
    """`grant_reward` for the `Reward` of rewards campaign `name`."""
    return grant_reward(
        conn,
        tenant_id,
        member_id,
        reward.model_dump(mode="json"),
        origin,
        f"rewards.{name}",
        funnel_id,
        now,
        effects,
        reason,
    )
