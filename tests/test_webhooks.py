"""Signed webhook ingestion, end to end through the app — on SQLite and PostgreSQL."""

from __future__ import annotations

import json
from datetime import timedelta

import pytest

from app.events.ingest import signed_headers
from app.events.models import EventLog
from app.funnels.models import StageHistory
from app.members.models import Member
from app.outbox.models import Outbox
from app.timers.models import Timer
from tests.conftest import Client, Source, app_for, count, event, new_tenant, settings_for
from tests.factories import welcome

PROBLEM = "application/problem+json"


@pytest.fixture
def source(client, engine, clock) -> Source:
    _, h = new_tenant(engine)
    assert client.put("/v1/funnels/welcome", json=welcome(), headers=h).status_code == 201
    return Source(client, h, clock)


def test_a_signed_event_moves_a_member_and_answers_the_outcome(source, engine):
    r = source.send(
        event("member.joined", "wx-1", group_id="g1") | {"member": {"id": "wx-1", "nickname": "Li"}}
    )
    assert r.status_code == 200, r.text
    body = r.json()
    (f,) = body["funnels"]
    assert (f["funnel"], f["from_state"], f["state"], f["stage"]) == (
        "welcome",
        None,
        "joined",
        "acquire",
    )
    (action,) = f["actions"]
    assert action["type"] == "send_message" and action["params"]["text"] == "Welcome Li"
    assert action["id"].startswith("act_") and action["disposition"] == "send"
    assert [t["key"] for t in f["timers"]] == ["t2"]

    r = source.send(event("message.posted", "wx-1", group_id="g1", message_id="x1", length=12))
    (f,) = r.json()["funnels"]
    assert (f["from_state"], f["state"], f["stage"]) == ("joined", "active", "activate")
    assert count(engine, Timer) == 0  # leaving "joined" cancelled the nudge
    assert count(engine, Outbox) == 1 and count(engine, StageHistory) == 2


def test_a_replayed_delivery_returns_the_first_response_and_changes_nothing(source, engine):
    first = source.send(event("member.joined", "wx-1"), msg_id="msg_1")
    tables = [EventLog, Member, StageHistory, Outbox, Timer]
    before = [count(engine, t) for t in tables]
    again = source.send(event("member.joined", "wx-1"), msg_id="msg_1")
    assert again.status_code == 200 and again.json() == first.json()
    assert again.headers["idempotent-replayed"] == "true"
    assert [count(engine, t) for t in tables] == before


def test_the_same_id_with_another_body_is_a_conflict(source, engine):
    source.send(event("member.joined", "wx-1"), msg_id="msg_1")
    r = source.send(event("member.joined", "wx-2"), msg_id="msg_1")
    assert r.status_code == 409 and r.headers["content-type"] == PROBLEM
    assert "different body" in r.json()["detail"]
    assert count(engine, Member) == 1


def test_ids_are_scoped_per_source(client, source, engine, clock):
    other = Source(client, source.headers, clock, name="shop")
    a = source.send(event("member.joined", "wx-1"), msg_id="same")
    b = other.send(event("member.joined", "wx-2"), msg_id="same")
    assert a.status_code == b.status_code == 200 and count(engine, EventLog) == 2


@pytest.mark.parametrize(
    "case, header",
    [
        ("tampered body", "webhook-signature"),
        ("wrong secret", "webhook-signature"),
        ("old timestamp", "webhook-timestamp"),
        ("future timestamp", "webhook-timestamp"),
        ("bad timestamp", "webhook-timestamp"),
        ("missing webhook-id", "webhook-id"),
        ("missing webhook-timestamp", "webhook-timestamp"),
        ("missing webhook-signature", "webhook-signature"),
        ("garbage signature", "webhook-signature"),
    ],
)
def test_bad_signatures_are_401_and_store_nothing(source, engine, clock, case, header):
    body = b'{"type": "member.joined", "member": {"id": "wx-1"}}'
    if case == "tampered body":
        from app.events.ingest import signed_headers

        headers = signed_headers([source.secret], "m1", clock.now(), body)
        r = source.client.post(source.path, content=body.replace(b"wx-1", b"wx-2"), headers=headers)
    elif case == "wrong secret":
        r = source.send(body=body, secrets=["whsec_" + "A" * 43 + "="])
    elif case == "old timestamp":
        r = source.send(body=body, at=clock.now() - timedelta(minutes=5, seconds=1))
    elif case == "future timestamp":
        r = source.send(body=body, at=clock.now() + timedelta(minutes=5, seconds=1))
    elif case == "bad timestamp":
        from app.events.ingest import signed_headers

        headers = signed_headers([source.secret], "m1", clock.now(), body)
        r = source.client.post(
            source.path, content=body, headers={**headers, "webhook-timestamp": "soon"}
        )
    elif case == "garbage signature":
        from app.events.ingest import signed_headers

        headers = signed_headers([source.secret], "m1", clock.now(), body)
        r = source.client.post(
            source.path, content=body, headers={**headers, "webhook-signature": "v1"}
        )
    else:
        r = source.send(body=body, drop=(case.removeprefix("missing "),))
    assert r.status_code == 401 and r.headers["content-type"] == PROBLEM
    assert r.json()["errors"][0]["path"] == f"header:{header}"
    assert count(engine, EventLog) == count(engine, Member) == 0


def test_timestamps_within_five_minutes_either_way_are_accepted(source, clock):
    for skew in (timedelta(minutes=-4, seconds=-59), timedelta(minutes=4, seconds=59)):
        assert source.send(event("member.joined", "wx-1"), at=clock.now() + skew).status_code == 200


def test_a_rotated_secret_works_with_both_keys_during_the_grace_period(client, engine, clock):
    _, h = new_tenant(engine)
    client.put("/v1/funnels/welcome", json=welcome(), headers=h)
    source = Source(client, h, clock)
    old = source.secret
    rotated = client.post(f"/v1/webhook-sources/{source.name}/rotate-secret", headers=h).json()
    new = rotated["secret"]
    assert new != old and rotated["previous_secret_expires_at"]
    assert source.send(event("member.joined", "a"), secrets=[old]).status_code == 200
    assert source.send(event("member.joined", "b"), secrets=[new]).status_code == 200
    # a sender mid-switch signs with both; any one matching is enough
    assert source.send(event("member.joined", "c"), secrets=[new, old]).status_code == 200
    clock.advance(timedelta(hours=24, seconds=1))
    assert source.send(event("member.joined", "d"), secrets=[old]).status_code == 401
    assert source.send(event("member.joined", "e"), secrets=[new]).status_code == 200


def test_event_types_are_validated(source, engine):
    r = source.send(event("order.payed", "wx-1"))
    assert r.status_code == 422 and r.headers["content-type"] == PROBLEM
    assert r.json()["errors"][0]["path"] == "type"
    assert '"order.paid"' in r.json()["errors"][0]["message"]  # did you mean

    r = source.send(event("groupbuy.succeeded", "wx-1"))
    assert r.status_code == 422 and "emitted by Flywheel" in r.json()["detail"]

    r = source.send(event("order.paid", "wx-1", order_id="o1", amount_fen=-5))
    assert r.status_code == 422
    assert [e["path"] for e in r.json()["errors"]] == ["data.amount_fen"]

    r = source.send({"type": "member.joined", "member": {}, "extra": 1})
    assert {e["path"] for e in r.json()["errors"]} == {"member.id", "extra"}
    assert count(engine, EventLog) == 0


def test_custom_events_declared_by_a_funnel_are_accepted(source):
    source.send(event("member.joined", "wx-1"))
    r = source.send(event("poll.answered", "wx-1", choice="noodles"))
    assert r.status_code == 200 and r.json()["funnels"][0]["state"] == "active"


def test_malformed_json_is_422_with_the_position(source):
    r = source.send(body=b'{"type": "member.joined",, }')
    assert r.status_code == 422
    assert "line 1 column 26" in r.json()["detail"]


def test_unknown_source_is_404(source, engine):
    r = source.client.post("/v1/webhooks/src_nope", content=b"{}")
    assert r.status_code == 404 and r.headers["content-type"] == PROBLEM


def test_oversized_webhook_is_413(source):
    r = source.send(event("member.joined", "wx-1", note="x" * (300 * 1024)))
    assert r.status_code == 413


def test_rate_limit_answers_429_with_retry_after(engine, clock):
    url = engine.url.render_as_string(hide_password=False)
    settings = settings_for(url).model_copy(
        update={"rate_limit_per_second": 1, "rate_limit_burst": 2}
    )
    from app.main import create_app

    client = Client(create_app(settings, engine=engine, clock=clock))
    _, h = new_tenant(engine)
    source = Source(client, h, clock)
    codes = [source.send(event("member.joined", f"m{i}")).status_code for i in range(3)]
    assert codes == [200, 200, 429]
    r = source.send(event("member.joined", "m9"))
    assert r.status_code == 429 and int(r.headers["retry-after"]) >= 1


def test_members_report_their_own_events_with_an_idempotency_key(client, engine, source):
    member_id = source.send(event("member.joined", "wx-1")).json()["member"]["id"]
    token = client.post(f"/v1/members/{member_id}/tokens", headers=source.headers).json()["token"]
    auth = {"Authorization": f"Bearer {token}"}
    checkin = {"type": "member.checked_in", "data": {"streak": 3}}
    first = client.post("/v1/member/events", json=checkin, headers=auth | {"Idempotency-Key": "k1"})
    assert first.status_code == 200, first.text
    assert first.json()["member"] == {"id": member_id, "external_id": "wx-1"}
    again = client.post("/v1/member/events", json=checkin, headers=auth | {"Idempotency-Key": "k1"})
    assert again.json() == first.json() and again.headers["idempotent-replayed"] == "true"
    other = {"type": "member.checked_in", "data": {"streak": 4}}
    clash = client.post("/v1/member/events", json=other, headers=auth | {"Idempotency-Key": "k1"})
    assert clash.status_code == 409
    # members cannot report payments, nor events about someone else
    paid = {"type": "order.paid", "data": {"order_id": "o1", "amount_fen": 9000}}
    r = client.post("/v1/member/events", json=paid, headers=auth)
    assert r.status_code == 422 and r.json()["errors"][0]["path"] == "type"
    spoof = checkin | {"member": {"id": "wx-2"}}
    r = client.post("/v1/member/events", json=spoof, headers=auth)
    assert r.status_code == 422 and r.json()["errors"][0]["path"] == "member"
    assert client.post("/v1/member/events", json=checkin).status_code == 401


def test_metrics_count_accepted_and_refused_events(source):
    source.send(event("member.joined", "wx-1"))
    source.send(body=b"{}", drop=("webhook-signature",))
    text = source.client.get("/metrics").text
    assert 'flywheel_events_total{reason="",result="accepted"} 1.0' in text
    assert 'flywheel_events_total{reason="unauthorized",result="refused"} 1.0' in text
    assert "flywheel_dispatch_seconds_bucket" in text
    assert "flywheel_dispatch_batch_events_count 1.0" in text  # one commit, of one event
    assert "flywheel_dispatch_batch_events_sum 1.0" in text
    assert 'flywheel_outbox_rows{status="pending"} 1.0' in text
    # The join's first entries wait for the workers' roll-up: the report's lag, in pairs.
    assert "flywheel_report_entries_unrolled 2.0" in text  # acquire, in version 1 and in all


def test_app_factory_is_usable_twice_in_one_process(engine, clock):
    # each app has its own metrics registry
    app_for(engine, clock)
    app_for(engine, clock)


def test_concurrent_duplicates_apply_once_across_two_instances(client, engine, clock):
    """The same webhook-id delivered 20 times at once, to two service instances over one
    database (two dispatchers, separate transactions): one event, one state change, and
    every delivery answered with the same body."""
    import asyncio

    import httpx

    _, h = new_tenant(engine)
    client.put("/v1/funnels/welcome", json=welcome(), headers=h)
    source = Source(client, h, clock)
    apps = [app_for(engine, clock), app_for(engine, clock)]
    body = json.dumps(event("member.joined", "wx-1")).encode()
    headers = signed_headers([source.secret], "msg_dup", clock.now(), body)

    async def burst() -> list[httpx.Response]:
        clients = [
            httpx.AsyncClient(transport=httpx.ASGITransport(app=a), base_url="http://t")
            for a in apps
        ]
        try:
            return await asyncio.gather(
                *(
                    clients[i % 2].post(source.path, content=body, headers=headers)
                    for i in range(20)
                )
            )
        finally:
            for c in clients:
                await c.aclose()

    responses = asyncio.run(burst())
    assert {r.status_code for r in responses} == {200}
    assert len({r.content for r in responses}) == 1
    assert sum(r.headers.get("idempotent-replayed") == "true" for r in responses) == 19
    assert count(engine, EventLog) == count(engine, Member) == count(engine, Outbox) == 1
    assert count(engine, StageHistory) == 1 and count(engine, Timer) == 1


def test_concurrent_events_of_one_member_all_apply(client, engine, clock):
    """Different events for one member at once, through two instances: none lost, each
    applied once, in some order the member's lock serialized."""
    import asyncio

    import httpx

    _, h = new_tenant(engine)
    client.put("/v1/funnels/welcome", json=welcome(), headers=h)
    source = Source(client, h, clock)
    source.send(event("member.joined", "wx-1"))
    apps = [app_for(engine, clock), app_for(engine, clock)]

    async def burst() -> list[httpx.Response]:
        clients = [
            httpx.AsyncClient(transport=httpx.ASGITransport(app=a), base_url="http://t")
            for a in apps
        ]
        try:
            calls = []
            for i in range(30):
                b = json.dumps(event("message.posted", "wx-1", group_id="g", message_id=str(i)))
                hs = signed_headers([source.secret], f"m{i}", clock.now(), b.encode())
                calls.append(clients[i % 2].post(source.path, content=b, headers=hs))
            return await asyncio.gather(*calls)
        finally:
            for c in clients:
                await c.aclose()

    responses = asyncio.run(burst())
    assert [r.status_code for r in responses] == [200] * 30
    moved = [r for r in responses if r.json()["funnels"][0]["from_state"] == "joined"]
    assert len(moved) == 1  # exactly one event saw the member in "joined"
    assert count(engine, EventLog) == 31
