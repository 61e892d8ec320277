"""Firing due timers: claim, apply through the write path, all in one transaction.

`SELECT … FOR UPDATE SKIP LOCKED` lets several workers (processes or instances) on
PostgreSQL take disjoint sets of due timers; firing deletes the row in the transaction that
applies the timer event, so a timer fires at most once, and a worker that dies mid-way
leaves its rows to the next claim (no lease is needed: the row locks end with the
transaction). SQLite has no row locks and serializes writers (BEGIN IMMEDIATE): one
instance there.
"""

from __future__ import annotations

import logging
from datetime import datetime, timedelta

from sqlalchemy import Engine, Table, select, update
from sqlalchemy.exc import OperationalError

from app.events.dispatch import TIMER_SOURCE, BatchCache, Inbound, Reply, apply_one
from app.observability import Metrics
from app.timers.models import Timer

log = logging.getLogger("flywheel.timers")
timer_t: Table = Timer.__table__  # type: ignore[attr-defined]
TIMER_EVENT = "timer.fired"
RETRY_CAP = timedelta(hours=1)


def retry_delay(attempts: int) -> timedelta:
    """A timer whose event failed (a bug, not a business outcome) is tried again later:
    30 s, 1 min, 2 min … up to an hour; it is never dropped."""
    return min(RETRY_CAP, timedelta(seconds=30 * 2 ** max(0, attempts - 1)))


def fire_due(
    engine: Engine, now: datetime, limit: int = 200, metrics: Metrics | None = None
) -> list[Reply]:
    """Fire up to `limit` timers due at `now`; return the replies of those applied."""
    replies: list[Reply] = []
    lateness: list[float] = []
    try:
        with engine.connect() as conn, conn.begin():
            rows = conn.execute(
                select(
                    timer_t.c.id,
                    timer_t.c.tenant_id,
                    timer_t.c.member_id,
                    timer_t.c.instance_id,
                    timer_t.c.key,
                    timer_t.c.due_at,
                    timer_t.c.attempts,
                )
                .where(timer_t.c.due_at <= now)
                .order_by(timer_t.c.due_at, timer_t.c.id)
                .limit(limit)
                .with_for_update(skip_locked=True)
            ).all()
            cache = BatchCache()
            for r in rows:
                item = Inbound(
                    tenant_id=r.tenant_id,
                    source=TIMER_SOURCE,
                    type=TIMER_EVENT,
                    data={"timer": r.key, "timer_id": r.id, "due_at": r.due_at.isoformat()},
                    member_id=r.member_id,
                    timer_id=r.id,
                    instance_id=r.instance_id,
                    timer_key=r.key,
                )
                savepoint = conn.begin_nested()
                try:
                    reply = apply_one(conn, item, now, cache)
                except OperationalError:
                    raise
                except Exception as exc:
                    savepoint.rollback()
                    log.exception("timer %s failed; will retry", r.id)
                    conn.execute(
                        update(timer_t)
                        .where(timer_t.c.id == r.id)
                        .values(
                            attempts=r.attempts + 1,
                            due_at=now + retry_delay(r.attempts + 1),
                            last_error=f"{type(exc).__name__}: {exc}"[:500],
                        )
                    )
                    continue
                savepoint.commit()
                replies.append(reply)
                lateness.append(max(0.0, (now - r.due_at).total_seconds()))
            cache.run_deferred(conn)
    except OperationalError as exc:
        # A deadlock or lost connection: nothing committed; the rows are claimed again.
        log.warning("timer batch rolled back: %s", exc.orig)
        return []
    if metrics is not None:
        for seconds in lateness:
            metrics.timers_fired.inc()
            metrics.timer_lateness.observe(seconds)
    return replies
