"""A hypothesis state machine over the whole event path: deliveries, duplicates, conflicting
replays, clock moves, timer firings, outbound deliveries to a flaky receiver, and restarts
(a fresh app over the same database). After every step:

- each webhook id was applied exactly once (one event row; a repeat returns the first body);
- no timer fired twice, and no instance has two open stage rows;
- every action any response or timer reported is in the outbox, and none is lost: at the
  end, with the receiver healthy and time running on, each is delivered or dead-lettered.
"""

from __future__ import annotations

import json
import shutil
import uuid
from collections import Counter
from datetime import timedelta
from pathlib import Path

import pytest
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    invariant,
    precondition,
    rule,
    run_state_machine_as_test,
)
from sqlalchemy import Engine, func, select

from app.clock import FrozenClock
from app.db import make_engine
from app.events.models import EventLog
from app.funnels.models import StageHistory
from app.outbox.models import Outbox
from tests.conftest import T0, Client, Source, _truncate, app_for, deliver, event, new_tenant
from tests.factories import welcome
from tests.servers import Receiver

MEMBERS = ("m1", "m2", "m3")
EVENTS = {
    "joined": lambda m: event("member.joined", m),
    "posted": lambda m: event("message.posted", m, group_id="g", message_id=uuid.uuid4().hex),
    "paid": lambda m: event("order.paid", m, order_id=uuid.uuid4().hex, amount_fen=5000),
}


class IngestMachine(RuleBasedStateMachine):
    template: Path
    workdir: Path
    receiver: Receiver

    def __init__(self) -> None:
        super().__init__()
        self.engine = self.fresh_engine()
        self.clock = FrozenClock(T0)
        self._start()
        _, self.headers = new_tenant(self.engine)
        assert self.client.put(
            "/v1/funnels/welcome", json=welcome(), headers=self.headers
        ).is_success
        self.source = Source(self.client, self.headers, self.clock)
        r = self.client.put(
            "/v1/action-endpoint", json={"url": self.receiver.url}, headers=self.headers
        )
        self.receiver.secrets = [r.json()["secret"]]
        self.receiver.script = []
        self.sent: dict[str, tuple[bytes, dict]] = {}  # webhook id -> (body, first response)
        self.actions: set[str] = set()  # every action id reported

    def fresh_engine(self) -> Engine:
        path = self.workdir / f"{uuid.uuid4().hex}.db"
        shutil.copy(self.template, path)
        return make_engine(f"sqlite:///{path}")

    def _start(self) -> None:
        self.app = app_for(self.engine, self.clock)
        self.client = Client(self.app)
        if hasattr(self, "source"):
            self.source.client = self.client

    def teardown(self) -> None:
        self.engine.dispose()

    def _remember(self, body: dict) -> None:
        for f in body["funnels"]:
            self.actions.update(a["id"] for a in f["actions"])

    # ── rules ─────────────────────────────────────────────────────────────────────────────
    @rule(member=st.sampled_from(MEMBERS), kind=st.sampled_from(sorted(EVENTS)))
    def deliver_event(self, member: str, kind: str) -> None:
        msg_id = f"msg_{uuid.uuid4().hex}"
        body = json.dumps(EVENTS[kind](member)).encode()
        r = self.source.send(body=body, msg_id=msg_id)
        assert r.status_code == 200, r.text
        self.sent[msg_id] = (body, r.json())
        self._remember(r.json())

    @precondition(lambda self: self.sent)
    @rule(data=st.data())
    def redeliver(self, data: st.DataObject) -> None:
        msg_id = data.draw(st.sampled_from(sorted(self.sent)))
        body, first = self.sent[msg_id]
        r = self.source.send(body=body, msg_id=msg_id)
        assert r.status_code == 200 and r.json() == first
        assert r.headers["idempotent-replayed"] == "true"

    @precondition(lambda self: self.sent)
    @rule(data=st.data())
    def redeliver_another_body(self, data: st.DataObject) -> None:
        msg_id = data.draw(st.sampled_from(sorted(self.sent)))
        r = self.source.send(event("member.joined", "intruder"), msg_id=msg_id)
        assert r.status_code == 409

    @rule(minutes=st.sampled_from([1, 30, 61, 600]))
    def time_passes(self, minutes: int) -> None:
        self.clock.advance(timedelta(minutes=minutes))

    @rule()
    def fire_timers(self) -> None:
        for reply in self.app.state.workers.fire_timers():
            self._remember(reply.body)

    @rule(failures=st.integers(0, 3))
    def deliver_actions(self, failures: int) -> None:
        self.receiver.script = [500] * failures
        deliver(self.app)
        self.receiver.script = []

    @rule()
    def restart(self) -> None:
        self._start()

    # ── invariants ────────────────────────────────────────────────────────────────────────
    def _scalar(self, query):  # type: ignore[no-untyped-def]
        with self.engine.connect() as conn:
            return conn.execute(query)

    @invariant()
    def each_webhook_is_applied_once(self) -> None:
        n = self._scalar(
            select(func.count()).select_from(EventLog).where(EventLog.source == "group-bot")
        ).scalar_one()
        assert n == len(self.sent)

    @invariant()
    def no_timer_fires_twice(self) -> None:
        rows = self._scalar(select(EventLog.data).where(EventLog.type == "timer.fired")).all()
        fired = Counter(r[0]["timer_id"] for r in rows)
        assert all(n == 1 for n in fired.values()), fired

    @invariant()
    def one_open_stage_per_instance(self) -> None:
        rows = self._scalar(
            select(StageHistory.instance_id, func.count())
            .where(StageHistory.left_at.is_(None))  # type: ignore[union-attr]
            .group_by(StageHistory.instance_id)
        ).all()
        assert all(n == 1 for _, n in rows)

    @invariant()
    def every_reported_action_is_in_the_outbox(self) -> None:
        ids = {f"act_{i}" for (i,) in self._scalar(select(Outbox.id)).all()}
        assert ids == self.actions

    def drain(self) -> None:
        """The receiver recovers and time runs on: nothing may stay undelivered."""
        for _ in range(12):  # the backoff schedule ends within 28 hours
            self.clock.advance(timedelta(hours=12))
            self.fire_timers()
            while deliver(self.app):
                pass
            waiting = self._scalar(
                select(func.count())
                .select_from(Outbox)
                .where(Outbox.status.in_(["pending", "delivering"]))  # type: ignore[attr-defined]
            ).scalar_one()
            if not waiting:
                break
        statuses = dict(
            self._scalar(select(Outbox.status, func.count()).group_by(Outbox.status)).all()
        )
        assert set(statuses) <= {"delivered", "dead", "suppressed"}, statuses
        delivered = {c["headers"]["webhook-id"] for c in self.receiver.calls}
        ids = {
            f"act_{i}"
            for (i,) in self._scalar(select(Outbox.id).where(Outbox.status == "delivered")).all()
        }
        assert ids <= delivered


class DrainingMachine(IngestMachine):
    def teardown(self) -> None:
        try:
            self.drain()
        finally:
            super().teardown()


class PostgresMachine(DrainingMachine):
    """The same machine on PostgreSQL: one database, emptied before each example."""

    pg_engine: Engine

    def fresh_engine(self) -> Engine:
        _truncate(self.pg_engine)
        return self.pg_engine

    def teardown(self) -> None:
        self.drain()  # the shared engine stays open


def test_ingestion_timers_and_delivery_keep_their_invariants(sqlite_template, tmp_path):
    with Receiver() as receiver:
        DrainingMachine.template, DrainingMachine.workdir = sqlite_template, tmp_path
        DrainingMachine.receiver = receiver
        run_state_machine_as_test(DrainingMachine, settings=settings(stateful_step_count=25))


@pytest.mark.postgres
def test_the_same_invariants_hold_on_postgresql(postgres_url):
    engine = make_engine(postgres_url, pool_size=5)
    try:
        with Receiver() as receiver:
            PostgresMachine.pg_engine, PostgresMachine.receiver = engine, receiver
            # Fewer examples than on SQLite (5 quick, 25 in CI): each one empties the database.
            budget = settings(
                max_examples=max(5, settings.default.max_examples // 8), stateful_step_count=25
            )
            run_state_machine_as_test(PostgresMachine, settings=budget)
    finally:
        _truncate(engine)
        engine.dispose()
