"""Scheduled lists: a campaign with `opens` (cron, in the funnel's zone) and `groups` gets a
list per group for each opening, created up to LOOKAHEAD before it opens (so the group can
see it coming) and opened by the open sweep at its time.

Each opening is a `solitaire.open` command through the write path with an idempotency key
naming the campaign, group and opening time, so however many workers run this (or how
often), each opening makes one list; the list table's unique key says the same again.
A service that was down at the opening time still opens the list while its window lasts.
"""

from __future__ import annotations

from datetime import datetime, timedelta

from sqlalchemy import Connection, select

from app.engine.schedule import next_cron, parse_duration
from app.events.dispatch import TIMER_SOURCE, Inbound
from app.funnels import store

LOOKAHEAD = timedelta(hours=1)
EVERY = timedelta(seconds=30)  # how often a worker looks (openings are minutes apart)


def due_openings(conn: Connection, now: datetime) -> list[Inbound]:
    tenants = conn.execute(select(store.funnel_t.c.tenant_id).distinct()).scalars().all()
    out: list[Inbound] = []
    for tenant_id in tenants:
        for ref in store.open_versions(conn, tenant_id):
            funnel = store.compiled_version(conn, ref)
            for name, cfg in funnel.definition.mechanics.solitaire.items():
                if not cfg.opens or not cfg.groups:
                    continue
                window = parse_duration(cfg.open_for)
                fire = next_cron(now - window, cfg.opens, funnel.zone)
                if fire - now > LOOKAHEAD:
                    continue
                for group in cfg.groups:
                    key = f"schedule:{ref.funnel_id}:{name}:{group}:{fire.isoformat()}"
                    out.append(
                        Inbound(
                            tenant_id=tenant_id,
                            source=TIMER_SOURCE,
                            type="solitaire.open",
                            data={
                                "funnel": ref.key,
                                "campaign": name,
                                "group": group,
                                "opens_at": fire.isoformat(),
                            },
                            key=key,
                            digest=key,
                        )
                    )
    return out
