"""Durable timers and outbound delivery, with a real HTTP receiver — SQLite and PostgreSQL."""

from __future__ import annotations

import base64
import json
import os
import socket
import subprocess
import sys
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest

from app.clock import FrozenClock
from app.events.dispatch import Inbound, apply_batch
from app.events.models import EventLog
from app.funnels.models import FunnelInstance
from app.outbox.delivery import BACKOFF, MAX_ATTEMPTS, decide
from app.outbox.models import Outbox
from app.timers.models import Timer
from tests.conftest import Client, Source, app_for, count, deliver, event, new_tenant
from tests.factories import welcome
from tests.servers import Receiver


@pytest.fixture
def setup(engine, clock):
    app = app_for(engine, clock)
    client = Client(app)
    _, h = new_tenant(engine)
    assert client.put("/v1/funnels/welcome", json=welcome(), headers=h).status_code == 201
    return app, client, h, Source(client, h, clock)


# ── timers ────────────────────────────────────────────────────────────────────────────────
def test_a_timer_fires_once_when_due_and_survives_a_restart(setup, engine, clock):
    app, _client, _h, source = setup
    source.send(event("member.joined", "wx-1"))
    assert count(engine, Timer) == 1
    assert app.state.workers.fire_timers() == []  # not due yet
    clock.advance(timedelta(minutes=59))
    assert app.state.workers.fire_timers() == []

    clock.advance(timedelta(minutes=1))
    restarted = app_for(engine, clock)  # a fresh process over the same database
    (reply,) = restarted.state.workers.fire_timers()
    (f,) = reply.body["funnels"]
    assert (f["from_state"], f["state"]) == ("joined", "nudged")
    assert [a["params"]["text"] for a in f["actions"]] == ["Say hello!"]
    assert count(engine, Timer) == 0
    assert count(engine, EventLog, EventLog.type == "timer.fired") == 1
    assert restarted.state.workers.fire_timers() == [] and app.state.workers.fire_timers() == []


def test_leaving_a_state_cancels_its_timer(setup, engine, clock):
    app, _client, _h, source = setup
    source.send(event("member.joined", "wx-1"))
    source.send(event("message.posted", "wx-1", group_id="g", message_id="1"))
    clock.advance(timedelta(hours=2))
    assert app.state.workers.fire_timers() == []
    assert count(engine, FunnelInstance, FunnelInstance.state == "active") == 1


# ── delivery decisions (pure) ─────────────────────────────────────────────────────────────
def test_backoff_spans_more_than_a_day_then_dead_letters():
    now = datetime(2026, 12, 1, tzinfo=UTC)
    waits = []
    for attempt in range(1, MAX_ATTEMPTS):
        d = decide(attempt, 500, None, now)
        assert d.kind == "retry" and d.at is not None
        waits.append((d.at - now).total_seconds())
    assert waits == list(BACKOFF) and sum(waits) > 24 * 3600
    assert decide(MAX_ATTEMPTS, 500, None, now).kind == "dead"
    assert decide(1, 204, None, now).kind == "delivered"
    assert decide(3, 410, None, now).kind == "disable"
    slow = decide(1, 429, None, now, retry_after=timedelta(minutes=10))
    assert slow.at == now + timedelta(minutes=10)


# ── a real receiver ───────────────────────────────────────────────────────────────────────
@pytest.fixture
def receiver() -> Iterator[Receiver]:
    with Receiver() as r:
        yield r


def _connect(client, h, receiver) -> str:
    r = client.put("/v1/action-endpoint", json={"url": receiver.url}, headers=h)
    assert r.status_code == 200, r.text
    receiver.secrets = [r.json()["secret"]]
    return r.json()["secret"]


def _action(response) -> dict[str, Any]:
    (f,) = response.json()["funnels"]
    (action,) = f["actions"]
    return action


def test_failed_deliveries_retry_with_backoff_then_arrive_signed(setup, engine, clock, receiver):
    app, client, h, source = setup
    _connect(client, h, receiver)
    receiver.script = [500, 503]
    action = _action(source.send(event("member.joined", "wx-1")))

    assert deliver(app) == 1  # attempt 1: 500
    assert deliver(app) == 0  # the next is 5 s away
    clock.advance(timedelta(seconds=5))
    assert deliver(app) == 1  # attempt 2: 503
    clock.advance(timedelta(seconds=299))
    assert deliver(app) == 0
    clock.advance(timedelta(seconds=1))
    assert deliver(app) == 1  # attempt 3: delivered

    assert [c["headers"]["webhook-id"] for c in receiver.calls] == [action["id"]] * 3
    assert all(c["valid"] for c in receiver.calls)
    assert receiver.calls[-1]["body"]["params"]["text"] == "Welcome "
    assert receiver.calls[-1]["body"]["member"] == {"id": "wx-1"}
    detail = client.get(f"/v1/deliveries/{action['id']}", headers=h).json()
    assert detail["status"] == "delivered" and detail["attempts"] == 3
    assert [a["status_code"] for a in detail["history"]] == [500, 503, 200]
    assert deliver(app) == 0


def test_a_dead_endpoint_dead_letters_after_the_last_try_and_replay_resends(
    setup, engine, clock, receiver
):
    app, client, h, source = setup
    _connect(client, h, receiver)
    receiver.script = [500] * MAX_ATTEMPTS
    action = _action(source.send(event("member.joined", "wx-1")))
    for wait in (0, *BACKOFF):
        clock.advance(timedelta(seconds=wait))
        assert deliver(app) == 1
    row = client.get(f"/v1/deliveries/{action['id']}", headers=h).json()
    assert row["status"] == "dead" and row["attempts"] == MAX_ATTEMPTS
    assert [d["id"] for d in client.get("/v1/deliveries?status=dead", headers=h).json()] == [
        action["id"]
    ]
    clock.advance(timedelta(days=2))
    assert deliver(app) == 0  # dead letters stay put

    r = client.post(f"/v1/deliveries/{action['id']}/replay", headers=h)
    assert r.status_code == 202 and r.json()["status"] == "pending"
    assert deliver(app) == 1
    assert client.get(f"/v1/deliveries/{action['id']}", headers=h).json()["status"] == "delivered"
    assert client.post(f"/v1/deliveries/{action['id']}/replay", headers=h).status_code == 202
    r = client.post("/v1/deliveries/act_999999/replay", headers=h)
    assert r.status_code == 404


def test_a_members_actions_are_delivered_in_order(setup, engine, clock, receiver):
    app, client, h, source = setup
    _connect(client, h, receiver)
    failed: list[str] = []

    def wx1s_first(body: Any) -> bool:  # deliveries run concurrently: fail by member, not turn
        if body["member"]["id"] == "wx-1" and not failed:
            failed.append(body["id"])
            return True
        return False

    receiver.refuse = wx1s_first
    source.send(event("member.joined", "wx-1"))
    source.send(event("message.posted", "wx-1", group_id="g", message_id="1"))
    source.send(event("order.paid", "wx-1", order_id="o1", amount_fen=4000))
    source.send(event("member.joined", "wx-2"))
    assert deliver(app) == 2  # wx-1's welcome (fails) and wx-2's welcome; not wx-1's voucher
    assert [c["body"]["member"]["id"] for c in receiver.calls] in (
        ["wx-1", "wx-2"],
        ["wx-2", "wx-1"],
    )
    assert deliver(app) == 0  # the voucher waits behind the welcome
    clock.advance(timedelta(seconds=5))
    assert deliver(app) == 1 and deliver(app) == 1
    mine = [c["body"]["type"] for c in receiver.calls if c["body"]["member"]["id"] == "wx-1"]
    assert mine == ["send_message", "send_message", "issue_voucher"]


def test_a_receiver_down_for_an_hour_gets_every_action_after_in_member_order(
    setup, engine, clock, receiver
):
    app, client, h, source = setup
    _connect(client, h, receiver)
    back_at = clock.now() + timedelta(hours=1)
    answered: list[tuple[str, str]] = []  # (member, action type) of each accepted delivery

    def down_for_an_hour(body: Any) -> bool:
        if clock.now() < back_at:
            return True  # 500 to everything
        answered.append((body["member"]["id"], body["type"]))
        return False

    receiver.refuse = down_for_an_hour
    members = [f"wx-{i}" for i in range(4)]
    for m in members:
        source.send(event("member.joined", m))
        source.send(event("message.posted", m, group_id="g", message_id=f"{m}-1"))
        source.send(event("order.paid", m, order_id=f"{m}-o", amount_fen=4000))
    expected = count(engine, Outbox)
    assert expected == 2 * len(members)  # a welcome and a voucher each
    end = clock.now() + timedelta(hours=4)
    while clock.now() < end:  # the workers' loop, on the fake clock, five minutes a step
        deliver(app)
        clock.advance(timedelta(minutes=5))
    assert count(engine, Outbox, Outbox.status == "delivered") == expected
    assert len(answered) == expected  # each accepted exactly once
    for m in members:  # and each member's in the order they were caused
        assert [kind for who, kind in answered if who == m] == ["send_message", "issue_voucher"]
    refused = [c for c in receiver.calls if c["body"]["type"] == "send_message"]
    assert len(refused) > len(members)  # it did try while the receiver was down


def test_410_disables_the_endpoint_until_it_is_set_again(setup, engine, clock, receiver):
    app, client, h, source = setup
    _connect(client, h, receiver)
    receiver.script = [410]
    action = _action(source.send(event("member.joined", "wx-1")))
    assert deliver(app) == 1
    endpoint = client.get("/v1/action-endpoint", headers=h).json()
    assert endpoint["disabled_at"] and "410" in endpoint["disabled_reason"]
    clock.advance(timedelta(hours=1))
    assert deliver(app) == 0
    client.put("/v1/action-endpoint", json={"url": receiver.url}, headers=h)
    assert deliver(app) == 1
    row = client.get(f"/v1/deliveries/{action['id']}", headers=h).json()
    assert row["status"] == "delivered" and row["attempts"] == 1  # the 410 try is not counted


def test_a_rotated_endpoint_secret_signs_with_both_during_the_grace(setup, clock, receiver):
    app, client, h, source = setup
    old = _connect(client, h, receiver)
    new = client.post("/v1/action-endpoint/rotate-secret", headers=h).json()["secret"]
    source.send(event("member.joined", "wx-1"))
    deliver(app)
    call = receiver.calls[-1]
    assert len(call["headers"]["webhook-signature"].split()) == 2
    for secrets in ([old], [new]):  # a receiver holding either secret verifies
        receiver.secrets = secrets
        assert receiver.verify(call["headers"], call["raw"])
    receiver.secrets = ["whsec_" + base64.b64encode(b"x" * 32).decode()]
    assert not receiver.verify(call["headers"], call["raw"])


def test_no_action_is_lost_without_an_endpoint(setup, engine, clock, receiver):
    app, client, h, source = setup
    source.send(event("member.joined", "wx-1"))
    assert deliver(app) == 0 and count(engine, Outbox, Outbox.status == "pending") == 1
    _connect(client, h, receiver)
    assert deliver(app) == 1 and count(engine, Outbox, Outbox.status == "delivered") == 1


def test_a_round_with_nowhere_to_deliver_takes_no_write_lock(setup, engine, clock):
    """Pending actions of a tenant without an endpoint must not make every delivery round
    take SQLite's write lock (it woke after each commit under load and stalled the writer)."""
    if engine.dialect.name != "sqlite":
        pytest.skip("SQLite's single write lock; PostgreSQL claims with SKIP LOCKED")
    from app.db import make_engine
    from app.outbox.delivery import claim

    _app, _client, _h, source = setup
    source.send(event("member.joined", "wx-1"))
    impatient = make_engine(engine.url.render_as_string(hide_password=False), busy_timeout_ms=0)
    with engine.connect() as writer, writer.begin():  # BEGIN IMMEDIATE: the write lock, held
        assert claim(impatient, clock.now(), 50, timedelta(minutes=2)) == []
    impatient.dispose()
    assert count(engine, Outbox, Outbox.status == "pending") == 1


def test_private_action_urls_are_refused_in_production(engine, clock):
    from app.main import create_app
    from tests.conftest import settings_for

    url = engine.url.render_as_string(hide_password=False)
    settings = settings_for(url).model_copy(update={"allow_private_action_urls": False})
    client = Client(create_app(settings, engine=engine, clock=clock))
    _, h = new_tenant(engine)
    r = client.put("/v1/action-endpoint", json={"url": "http://127.0.0.1:9/x"}, headers=h)
    assert r.status_code == 422 and r.json()["errors"][0]["path"] == "url"


# ── several worker processes ──────────────────────────────────────────────────────────────
@pytest.mark.postgres
@pytest.mark.slow
def test_two_worker_processes_fire_1000_due_timers_exactly_once(postgres_url):
    from app.db import make_engine
    from tests.conftest import _truncate

    engine = make_engine(postgres_url)
    try:
        _run_two_workers(engine, postgres_url)
    finally:
        _truncate(engine)
        engine.dispose()


def _run_two_workers(engine, url: str) -> None:
    tenant_id, h = new_tenant(engine)
    past = FrozenClock(datetime.now(UTC) - timedelta(hours=2))
    client = Client(app_for(engine, past))
    assert client.put("/v1/funnels/welcome", json=welcome(), headers=h).status_code == 201
    items = [
        Inbound(tenant_id, "test", "member.joined", member={"id": f"m{i}"}) for i in range(1000)
    ]
    assert all(r.ok for r in apply_batch(engine, items, past.now()))
    assert count(engine, Timer) == 1000

    env = {**os.environ, "FLYWHEEL_DATABASE_URL": url, "FLYWHEEL_TIMER_BATCH": "25"}
    env["FLYWHEEL_LOG_LEVEL"] = "WARNING"
    cmd = [sys.executable, "-m", "app.cli", "worker", "--until-idle"]
    procs = [
        subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        for _ in range(2)
    ]
    fired = []
    for p in procs:
        out, err = p.communicate(timeout=300)
        assert p.returncode == 0, err
        fired.append(json.loads(out.strip().splitlines()[-1])["timers_fired"])
    print(f"timers fired per worker process: {fired}")
    assert sum(fired) == 1000, fired
    assert count(engine, Timer) == 0
    assert count(engine, EventLog, EventLog.type == "timer.fired") == 1000
    assert count(engine, FunnelInstance, FunnelInstance.state == "nudged") == 1000
    assert count(engine, Outbox, Outbox.source == "transitions[2].actions[0]") == 1000


def test_deliveries_page_newest_first_and_refuse_bad_cursors(setup, engine, clock):
    _app, client, h, source = setup
    for i in range(3):
        source.send(event("member.joined", f"wx-{i}"))
    page = client.get("/v1/deliveries?limit=2", headers=h).json()
    newest, older = (int(d["id"].removeprefix("act_")) for d in page)
    assert len(page) == 2 and newest > older  # ids, not their text: ids may skip
    rest = client.get(f"/v1/deliveries?before={page[-1]['id']}", headers=h).json()
    assert len(rest) == 1 and rest[0]["status"] == "pending"
    r = client.get("/v1/deliveries?before=abc", headers=h)
    assert r.status_code == 422 and r.json()["errors"][0]["path"] == "query:before"


def test_private_addresses_are_refused_again_at_send_time(engine, clock, receiver):
    """An endpoint set while allowed (or a name that now resolves inside the network) is
    not called when private addresses are refused: the attempt fails and is retried."""
    from app.main import create_app
    from tests.conftest import settings_for

    app = app_for(engine, clock)
    client = Client(app)
    _, h = new_tenant(engine)
    client.put("/v1/funnels/welcome", json=welcome(), headers=h)
    _connect(client, h, receiver)
    Source(client, h, clock).send(event("member.joined", "wx-1"))
    url = engine.url.render_as_string(hide_password=False)
    strict = create_app(
        settings_for(url).model_copy(update={"allow_private_action_urls": False}),
        engine=engine,
        clock=clock,
    )
    assert deliver(strict) == 1 and receiver.calls == []
    row = client.get("/v1/deliveries", headers=h).json()[0]
    assert row["status"] == "pending" and "non-public address" in row["last_error"]


def test_a_name_that_rebinds_to_a_private_address_after_the_check_is_not_called(
    engine, clock, receiver, monkeypatch
):
    """DNS rebinding: the tenant's name resolves to a public address when the URL is saved,
    then to the receiver on loopback. The delivery checks the address it dials, not an
    earlier answer, so the receiver is never called."""
    from app.main import create_app
    from tests.conftest import settings_for

    real = socket.getaddrinfo
    lookups: list[str] = []

    def rebinding(host: Any, *args: Any, **kwargs: Any) -> Any:
        if host != "hooks.rebind.test":
            return real(host, *args, **kwargs)
        lookups.append(host)
        address = "93.184.216.34" if len(lookups) == 1 else "127.0.0.1"
        return [(socket.AF_INET, socket.SOCK_STREAM, 6, "", (address, 80))]

    monkeypatch.setattr(socket, "getaddrinfo", rebinding)
    url = engine.url.render_as_string(hide_password=False)
    settings = settings_for(url).model_copy(update={"allow_private_action_urls": False})
    app = create_app(settings, engine=engine, clock=clock)
    client = Client(app)
    _, h = new_tenant(engine)
    client.put("/v1/funnels/welcome", json=welcome(), headers=h)
    port = receiver.url.split(":")[2].split("/")[0]
    endpoint = f"http://hooks.rebind.test:{port}/actions"
    r = client.put("/v1/action-endpoint", json={"url": endpoint}, headers=h)
    assert r.status_code == 200, r.text  # public when saved
    Source(client, h, clock).send(event("member.joined", "wx-1"))
    assert deliver(app) == 1 and len(lookups) == 2
    assert receiver.calls == []
    row = client.get("/v1/deliveries", headers=h).json()[0]
    assert row["status"] == "pending" and "127.0.0.1, a non-public address" in row["last_error"]


# ── the report's roll-up ─────────────────────────────────────────────────────────────────────
def test_a_roll_up_round_that_finds_the_writer_busy_waits_for_the_next(
    setup, engine, clock, caplog
):
    """SQLite under load: the round gives up after its busy timeout, logs one warning line,
    and the next round counts the same pairs."""
    if engine.dialect.name != "sqlite":
        pytest.skip("PostgreSQL writers queue on row locks; SQLite's single writer times out")
    from app.db import make_engine
    from app.workers import Workers

    app, _client, _h, source = setup
    source.send(event("member.joined", "wx-1"))
    impatient = make_engine(engine.url.render_as_string(), busy_timeout_ms=50)
    workers = Workers(impatient, app.state.settings, clock, app.state.metrics)
    with engine.connect() as holder:
        holder.begin()  # BEGIN IMMEDIATE: the write lock
        assert workers.roll_up() == 0
    assert "roll-up rolled back: database is locked" in caplog.text
    assert workers.roll_up() == 2  # acquire, in version 1 and in every version
    impatient.dispose()


def test_a_roll_up_round_goes_again_at_once_only_after_a_whole_chunk(setup, monkeypatch):
    """Under load pairs trickle in: a round that took fewer than a chunk waits for the next
    poll instead of taking the writer's turn again and again."""
    import asyncio

    from app.funnels import entries

    app, _client, _h, source = setup
    workers = app.state.workers
    monkeypatch.setattr(entries, "ROLL_CHUNK", 2)
    source.send(event("member.joined", "wx-1"))  # acquire, in version 1 and in every version
    source.send(event("member.joined", "wx-2"))
    assert asyncio.run(workers._roll_up_round()) is True  # a whole chunk: maybe more
    assert asyncio.run(workers._roll_up_round()) is True
    assert asyncio.run(workers._roll_up_round()) is False  # none left: wait for the poll
    source.send(event("member.joined", "wx-3"))
    monkeypatch.setattr(entries, "ROLL_CHUNK", 5)
    assert asyncio.run(workers._roll_up_round()) is False  # two of five: wait
    assert workers.totals.rolled_up == 6
