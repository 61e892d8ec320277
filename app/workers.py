"""Background work: fire due timers, deliver the outbox, roll up the report's first entries,
prune old idempotency keys.

Runs inside the service (FLYWHEEL_WORKERS=on, the default) or as its own process
(`flywheel worker`). Any number may run against one PostgreSQL; claims never overlap.
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any

import httpx
from sqlalchemy import Engine, delete, func, select, update
from sqlalchemy.exc import OperationalError

from app.clock import Clock
from app.config import Settings
from app.db import read_connection
from app.events.dispatch import Reply
from app.events.models import EventLog, EventResponse
from app.funnels import entries
from app.mechanics.sweeps import SWEEPS, sweep_due
from app.observability import Metrics, gauge
from app.outbox import delivery
from app.outbox.service import DEAD, DELIVERED, DELIVERING, PENDING, outbox_t
from app.timers.worker import fire_due, timer_t

log = logging.getLogger("flywheel.workers")
event_t = EventLog.__table__  # type: ignore[attr-defined]
response_t = EventResponse.__table__  # type: ignore[attr-defined]
PRUNE_EVERY = timedelta(hours=1)
PRUNE_CHUNK = 5000


@dataclass
class Totals:
    timers_fired: int = 0
    deliveries: int = 0
    rolled_up: int = 0
    pruned: dict[str, int] = field(default_factory=dict)


class Workers:
    def __init__(self, engine: Engine, settings: Settings, clock: Clock, metrics: Metrics) -> None:
        self.engine, self.settings, self.clock, self.metrics = engine, settings, clock, metrics
        self.totals = Totals()
        self._wake: asyncio.Event | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._last_prune: datetime | None = None

    # ── one round of each ─────────────────────────────────────────────────────────────────
    def fire_timers(self) -> list[Reply]:
        """Funnel timers, then mechanic timers (team deadlines, payment holds, expiries)."""
        now = self.clock.now()
        replies = fire_due(self.engine, now, self.settings.timer_batch, self.metrics)
        replies += sweep_due(self.engine, now, self.settings.timer_batch, self.metrics)
        self.totals.timers_fired += len(replies)
        if any(r.actions for r in replies):
            self.notify()
        return replies

    def new_client(self) -> httpx.AsyncClient:
        """The delivery client these settings call for (public addresses only, outside
        development)."""
        return delivery.new_client(
            self.settings.delivery_timeout_seconds,
            self.settings.outbox_concurrency,
            public_only=not self.settings.private_action_urls_allowed,
        )

    async def deliver(self, client: httpx.AsyncClient) -> int:
        n = await delivery.deliver_due(
            self.engine,
            client,
            self.clock.now(),
            limit=self.settings.outbox_batch,
            lease=timedelta(seconds=self.settings.outbox_lease_seconds),
            metrics=self.metrics,
        )
        self.totals.deliveries += n
        return n

    def roll_up(self) -> int:
        """Count a chunk of new first entries into the funnel report's roll-up. When the
        writer is busy (SQLite's lock under load, a deadlock, a lost connection) nothing
        was committed; the next round takes the same pairs."""
        try:
            n = entries.roll_up(self.engine, entries.ROLL_CHUNK)
        except OperationalError as exc:
            log.warning("roll-up rolled back: %s", exc.orig)
            return 0
        self.totals.rolled_up += n
        return n

    def prune(self) -> dict[str, int]:
        """Forget idempotency keys (and stored responses) after the retention window; delete
        events, and delivered outbox rows, after the event retention."""
        now = self.clock.now()
        keys_before = now - timedelta(hours=self.settings.idempotency_retention_hours)
        out = {"keys": 0, "events": 0, "deliveries": 0}
        with self.engine.begin() as conn:
            while True:  # in chunks, so no transaction holds the writer for long
                ids = list(
                    conn.execute(
                        select(event_t.c.id)
                        .where(
                            event_t.c.received_at < keys_before, event_t.c.dedupe_key.is_not(None)
                        )
                        .limit(PRUNE_CHUNK)
                    ).scalars()
                )
                if ids:
                    conn.execute(delete(response_t).where(response_t.c.event_id.in_(ids)))
                    conn.execute(
                        update(event_t)
                        .where(event_t.c.id.in_(ids))
                        .values(dedupe_key=None, digest=None)
                    )
                out["keys"] += len(ids)
                if len(ids) < PRUNE_CHUNK:
                    break
            if self.settings.event_retention_days:
                before = now - timedelta(days=self.settings.event_retention_days)
                old = select(event_t.c.id).where(event_t.c.received_at < before)
                conn.execute(delete(response_t).where(response_t.c.event_id.in_(old)))
                out["events"] = conn.execute(
                    delete(event_t).where(event_t.c.received_at < before)
                ).rowcount
                out["deliveries"] = conn.execute(
                    delete(outbox_t).where(
                        outbox_t.c.status == DELIVERED, outbox_t.c.delivered_at < before
                    )
                ).rowcount
        for k, v in out.items():
            self.totals.pruned[k] = self.totals.pruned.get(k, 0) + v
        if any(out.values()):
            log.info("pruned", extra={"fields": out})
        return out

    # ── scheduling ────────────────────────────────────────────────────────────────────────
    def notify(self) -> None:
        """Wake the delivery loop (new outbox rows); safe from any thread."""
        if self._loop is not None and self._wake is not None and not self._loop.is_closed():
            self._loop.call_soon_threadsafe(self._wake.set)

    async def run(self, stop: asyncio.Event) -> None:
        self._loop, self._wake = asyncio.get_running_loop(), asyncio.Event()
        client = self.new_client()
        try:
            await asyncio.gather(
                self._every(stop, self._timers_round),
                self._every(stop, lambda: self.deliver(client), wake=self._wake),
                self._every(stop, self._roll_up_round),
                self._every(stop, self._prune_round),
            )
        finally:
            await client.aclose()

    async def _timers_round(self) -> int:
        return len(await asyncio.to_thread(self.fire_timers))

    async def _roll_up_round(self) -> bool:
        """Go again at once only after a whole chunk (more may be waiting): pairs that
        trickle in under load wait for the next poll, not a round each (on SQLite, each
        round is a turn the dispatcher's writer gives way for)."""
        return await asyncio.to_thread(self.roll_up) >= entries.ROLL_CHUNK

    async def _prune_round(self) -> int:
        now = self.clock.now()
        if self._last_prune is None or now - self._last_prune >= PRUNE_EVERY:
            self._last_prune = now
            await asyncio.to_thread(self.prune)
        return 0

    async def _every(
        self, stop: asyncio.Event, round_: Any, wake: asyncio.Event | None = None
    ) -> None:
        poll = self.settings.worker_poll_seconds
        while not stop.is_set():
            try:
                busy = await round_()
            except OperationalError as exc:
                # The database was busy or away (SQLite's writer lock under load, a lost
                # connection): nothing of the round was committed; one line, and again.
                log.warning("worker round rolled back, retrying: %s", exc.orig)
                busy = 0
            except Exception:
                log.exception("worker round failed; retrying")
                busy = 0
            if busy:
                continue  # more may be due: go again at once
            waiters = [asyncio.ensure_future(stop.wait())]
            if wake is not None:
                waiters.append(asyncio.ensure_future(wake.wait()))
            _, pending = await asyncio.wait(
                waiters, timeout=poll, return_when=asyncio.FIRST_COMPLETED
            )
            for w in pending:
                w.cancel()
            if wake is not None:
                wake.clear()

    async def until_idle(self) -> Totals:
        """Fire and deliver until nothing is due (the CLI's --until-idle, tests)."""
        client = self.new_client()
        try:
            while True:
                fired = len(await asyncio.to_thread(self.fire_timers))
                sent = await self.deliver(client)
                rolled = await asyncio.to_thread(self.roll_up)
                if not fired and not sent and not rolled:
                    return self.totals
        finally:
            await client.aclose()

    # ── gauges ────────────────────────────────────────────────────────────────────────────
    def install_gauges(self) -> None:
        def collect() -> list[Any]:
            now = self.clock.now()
            with read_connection(self.engine) as conn:
                by_status: dict[str, int] = dict(
                    conn.execute(
                        select(outbox_t.c.status, func.count())
                        .where(outbox_t.c.status.in_([PENDING, DELIVERING, DEAD]))
                        .group_by(outbox_t.c.status)
                    ).all()
                )
                due, oldest = conn.execute(
                    select(func.count(), func.min(timer_t.c.due_at)).where(timer_t.c.due_at <= now)
                ).one()
                mechanic = {s.kind: s.backlog(conn, now) for s in SWEEPS}
                unrolled = entries.unrolled(conn)
            backlog: dict[tuple[str, ...], float] = {
                (s,): float(by_status.get(s, 0)) for s in (PENDING, DELIVERING, DEAD)
            }
            late = (now - oldest).total_seconds() if oldest is not None else 0.0
            return [
                gauge("flywheel_outbox_rows", "Outbox rows by status", ["status"], backlog),
                gauge("flywheel_timers_due", "Timers due and not yet fired", [], {(): due}),
                gauge(
                    "flywheel_timers_late_seconds", "Age of the oldest due timer", [], {(): late}
                ),
                gauge(
                    "flywheel_report_entries_unrolled",
                    "First entries not yet counted into the funnel report's roll-up (its lag)",
                    [],
                    {(): float(unrolled)},
                ),
                gauge(
                    "flywheel_mechanic_timers_due",
                    "Mechanic timers due and not yet run, by kind",
                    ["kind"],
                    {(k,): float(n) for k, (n, _) in mechanic.items()},
                ),
                gauge(
                    "flywheel_mechanic_timers_late_seconds",
                    "Age of the oldest due mechanic timer, by kind (the deadline lag)",
                    ["kind"],
                    {
                        (k,): (now - first).total_seconds() if first else 0.0
                        for k, (_, first) in mechanic.items()
                    },
                ),
            ]

        self.metrics.add_gauges(collect)
