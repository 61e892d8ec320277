"""When the daily community runs are due.

`due_runs` (the worker calls it with the solitaire schedule, every 30 s) lists each pruning
policy, birthday or holiday milestone and monthly top whose local time has come today, and
each group's health check (09:00 in the group's zone), as commands whose idempotency key
names the run and the day: however many workers look, and however often, each runs once a
day, and a worker that was down at the time runs it when it is back, the same day.
"""

from __future__ import annotations

from datetime import datetime
from zoneinfo import ZoneInfo

from sqlalchemy import Connection, select

from app.engine.schedule import parse_local_time
from app.events.dispatch import TIMER_SOURCE, Inbound
from app.funnels import store
from app.mechanics.community.service import group_t
from app.mechanics.community.settings import GroupSettings

HEALTH_AT = parse_local_time("09:00")


def _run(tenant_id: int, kind: str, data: dict[str, str], key: str) -> Inbound:
    return Inbound(
        tenant_id=tenant_id, source=TIMER_SOURCE, type=kind, data=data, key=key, digest=key
    )


def due_runs(conn: Connection, now: datetime) -> list[Inbound]:
    out: list[Inbound] = []
    tenants = conn.execute(select(store.funnel_t.c.tenant_id).distinct()).scalars().all()
    for tenant_id in tenants:
        for ref in store.open_versions(conn, tenant_id):
            funnel = store.compiled_version(conn, ref)
            local = now.astimezone(funnel.zone)
            mechanics = funnel.definition.mechanics
            runs = [("pruning", name, p.at) for name, p in mechanics.pruning.items()] + [
                ("rewards", name, r.at)
                for name, r in mechanics.rewards.items()
                if r.kind == "monthly_top"
                or (r.kind == "milestone" and r.on in ("birthday", "holiday"))
            ]
            for kind, name, at in runs:
                if local.time() >= parse_local_time(at):
                    key = f"daily:{ref.funnel_id}:{kind}:{name}:{local.date()}"
                    data = {"funnel": ref.key, "kind": kind, "name": name}
                    out.append(_run(tenant_id, "community.daily", data, key))
    for tenant_id, group_id, settings in conn.execute(
        select(group_t.c.tenant_id, group_t.c.group_id, group_t.c.settings)
    ).all():
        local = now.astimezone(ZoneInfo(GroupSettings.model_validate(settings or {}).timezone))
        if local.time() >= HEALTH_AT:
            key = f"health:{group_id}:{local.date()}"
            out.append(_run(tenant_id, "group.health", {"group_id": group_id}, key))
    return out
