"""Mechanic timers: a team's deadline, a seat's payment hold, a voucher's expiry, a solitaire
list's paced message.

Each is a due-time column on the mechanic's own row (indexed with its status), so there is
no second copy of the deadline to keep in step: the sweep finds open rows whose time has
come and hands each to the write path as a command ("groupbuy.deadline"…), which settles
it under the row's lock and emits the events. Several workers may sweep one PostgreSQL:
`FOR UPDATE SKIP LOCKED` gives each a disjoint set (for seats, on the team row, the lock
every group-buy command takes first). Handlers check the state again under the lock, so a
row swept twice changes once. How late each ran is in /metrics.
"""

from __future__ import annotations

import logging
import weakref
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import ColumnElement, Connection, Engine, Select, func, select
from sqlalchemy.exc import OperationalError

from app.events.dispatch import TIMER_SOURCE, BatchCache, Inbound, Reply, apply_one
from app.mechanics.community import schedule as community_schedule
from app.mechanics.groupbuy.service import HELD, OPEN, seat_t, team_t
from app.mechanics.referral.service import PENDING, reward_t
from app.mechanics.solitaire import schedule
from app.mechanics.solitaire.service import OPEN as LIST_OPEN
from app.mechanics.solitaire.service import SCHEDULED, list_t
from app.mechanics.vouchers.service import ISSUED, voucher_t
from app.observability import Metrics

log = logging.getLogger("flywheel.sweeps")


@dataclass(frozen=True)
class Sweep:
    kind: str
    command: str
    due: Any  # the due-time column
    open: ColumnElement[bool]  # rows still waiting for it
    data: Callable[[Any], dict[str, Any]]
    # A claim of its own, where the due rows are not simply the due column's table's rows
    # (a seat's hold locks its team's row, the lock every group-buy command takes first).
    query: Callable[[datetime, int], Select[Any]] | None = None

    def due_rows(self, now: datetime, limit: int) -> Select[Any]:
        """The rows waiting whose time has come, oldest first, locked; rows another worker
        holds are skipped."""
        if self.query is not None:
            return self.query(now, limit)
        table = self.due.table
        return (
            select(table.c.id, table.c.tenant_id, self.due.label("due"))
            .where(self.open, self.due <= now)
            .order_by(self.due, table.c.id)
            .limit(limit)
            .with_for_update(skip_locked=True)
        )

    def backlog(self, conn: Connection, now: datetime) -> tuple[int, datetime | None]:
        n, first = conn.execute(
            select(func.count(), func.min(self.due)).where(self.open, self.due <= now)
        ).one()
        return int(n), first


def _holds(now: datetime, limit: int) -> Select[Any]:
    return (
        select(seat_t.c.id, seat_t.c.tenant_id, seat_t.c.hold_until.label("due"))
        .join(team_t, team_t.c.id == seat_t.c.team_id)
        .where(seat_t.c.status == HELD, seat_t.c.hold_until <= now)
        .order_by(seat_t.c.hold_until, seat_t.c.id)
        .limit(limit)
        .with_for_update(of=team_t, skip_locked=True)
    )


SWEEPS = (
    Sweep(
        "groupbuy_deadline",
        "groupbuy.deadline",
        team_t.c.deadline,
        team_t.c.status == OPEN,
        lambda r: {"team_id": r.id},
    ),
    Sweep(
        "groupbuy_payment_hold",
        "groupbuy.hold_expired",
        seat_t.c.hold_until,
        seat_t.c.status == HELD,
        lambda r: {"seat_id": r.id},
        _holds,
    ),
    Sweep(
        "solitaire_open",
        "solitaire.open_due",
        list_t.c.opens_at,
        list_t.c.status == SCHEDULED,
        lambda r: {"list_id": r.id},
    ),
    Sweep(
        "solitaire_close",
        "solitaire.close_due",
        list_t.c.closes_at,
        list_t.c.status == LIST_OPEN,
        lambda r: {"list_id": r.id},
    ),
    Sweep(
        "solitaire_announce",
        "solitaire.announce",
        list_t.c.announce_due,
        list_t.c.announce_due.is_not(None),
        lambda r: {"list_id": r.id},
    ),
    Sweep(
        "referral_reward_hold",
        "referral.pay_due",
        reward_t.c.hold_until,
        reward_t.c.status == PENDING,
        lambda r: {"reward_id": r.id},
    ),
    Sweep(
        "voucher_expiry",
        "voucher.expire",
        voucher_t.c.expires_at,
        voucher_t.c.status == ISSUED,
        lambda r: {"voucher_id": r.id},
    ),
)


def sweep_due(
    engine: Engine, now: datetime, limit: int = 200, metrics: Metrics | None = None
) -> list[Reply]:
    """Apply every mechanic timer due at `now` (up to `limit` of each kind)."""
    replies: list[Reply] = _scheduled(engine, now)
    for sweep in SWEEPS:
        replies.extend(_sweep(engine, sweep, now, limit, metrics))
    return replies


def _try_apply(conn: Connection, item: Inbound, now: datetime, cache: BatchCache) -> Reply | None:
    """Apply one item under its own savepoint. A failure (a bug, not a business outcome)
    rolls back that item alone, is logged, and leaves it due: None. A deadlock or a lost
    connection aborts the whole transaction and propagates."""
    savepoint = conn.begin_nested()
    try:
        reply = apply_one(conn, item, now, cache)
    except OperationalError:
        raise
    except Exception:
        savepoint.rollback()
        log.exception("%s %s failed; it stays due", item.type, item.key or item.data)
        return None
    savepoint.commit()
    return reply


_last_schedule: weakref.WeakKeyDictionary[Engine, datetime] = weakref.WeakKeyDictionary()


def _scheduled(engine: Engine, now: datetime) -> list[Reply]:
    """Create the solitaire lists campaigns schedule, and run the daily community runs that
    are due (at most every `schedule.EVERY`)."""
    last = _last_schedule.get(engine)
    if last is not None and timedelta(0) <= now - last < schedule.EVERY:
        return []
    _last_schedule[engine] = now
    try:
        with engine.connect() as conn, conn.begin():
            cache = BatchCache()
            replies = []
            due = schedule.due_openings(conn, now) + community_schedule.due_runs(conn, now)
            for item in due:
                reply = _try_apply(conn, item, now, cache)
                if reply is not None and not reply.replayed:
                    replies.append(reply)
            cache.run_deferred(conn)
            return replies
    except OperationalError as exc:
        log.warning("schedule rolled back: %s", exc.orig)
        return []


def _sweep(
    engine: Engine, sweep: Sweep, now: datetime, limit: int, metrics: Metrics | None
) -> list[Reply]:
    replies: list[Reply] = []
    lateness: list[float] = []
    try:
        with engine.connect() as conn, conn.begin():
            cache = BatchCache()
            for r in conn.execute(sweep.due_rows(now, limit)).all():
                item = Inbound(
                    tenant_id=r.tenant_id,
                    source=TIMER_SOURCE,
                    type=sweep.command,
                    data=sweep.data(r),
                )
                reply = _try_apply(conn, item, now, cache)
                if reply is None:
                    if metrics is not None:
                        metrics.sweep_errors.labels(sweep.kind).inc()
                    continue
                replies.append(reply)
                lateness.append(max(0.0, (now - r.due).total_seconds()))
            cache.run_deferred(conn)
    except OperationalError as exc:
        log.warning("%s sweep rolled back: %s", sweep.kind, exc.orig)
        return []
    if metrics is not None:
        for seconds in lateness:
            metrics.sweep_lateness.labels(sweep.kind).observe(seconds)
    return replies
