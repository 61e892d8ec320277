"""Check-in (签到/打卡): once per member and local day, with streaks and streak rewards.

A `member.checked_in` event checks the member in to every `check_in` campaign of the funnels
open to the tenant: one row per local day in the funnel's zone (a unique key, so a second
check-in that day changes nothing), its streak one more than yesterday's or 1. Each time the
streak reaches a multiple of `streak_days`, the campaign's reward is granted once.
"""

from __future__ import annotations

from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import Connection, Table, select

from app.db import insert_or_skip
from app.funnels import store
from app.mechanics.commands import Effects
from app.mechanics.rewards.campaigns import running
from app.mechanics.rewards.grant import grant_campaign_reward
from app.mechanics.rewards.models import CheckIn

checkin_t: Table = CheckIn.__table__  # type: ignore[attr-defined]
_NEW = insert_or_skip(
    checkin_t,
    ["tenant_id", "funnel_id", "campaign", "member_id", "local_date"],
    checkin_t.c.id,
)


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
    if event_type != "member.checked_in":
        return None
    effects = Effects(m.id, {})
    for ref, funnel, name, cfg in running(conn, versions, "check_in", now):
        day = now.astimezone(funnel.zone).date()  # the member's day in the funnel's zone
        key = {
            "tenant_id": tenant_id,
            "funnel_id": ref.funnel_id,
            "campaign": name,
            "member_id": m.id,
        }
        before = conn.execute(
            select(checkin_t.c.streak).where(
                *(checkin_t.c[k] == v for k, v in key.items()),
                checkin_t.c.local_date == day - timedelta(days=1),
            )
        ).scalar()
        streak = (before or 0) + 1
        made = conn.execute(
            _NEW[conn.dialect.name],
            {**key, "local_date": day, "streak": streak, "created_at": now},
        ).scalar()
        if made is None:
            continue  # checked in today already
        if cfg.streak_days and cfg.reward and streak % cfg.streak_days == 0:
            origin = f"checkin:{ref.funnel_id}:{name}:{m.id}:{day.isoformat()}"
            grant_campaign_reward(
                conn, tenant_id, m.id, ref.funnel_id, name, cfg.reward, origin, now, effects
            )
    return effects if effects.emits or effects.actions else None
