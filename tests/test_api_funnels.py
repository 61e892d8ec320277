"""Publishing funnels, immutable versions, archive, migration — on SQLite and PostgreSQL."""

from __future__ import annotations

import json

from sqlmodel import select

from app.db import session_scope
from app.engine import Event
from app.events.dispatch import Inbound, apply_batch
from app.funnels.models import Funnel, StageHistory
from tests.conftest import T0, new_tenant
from tests.factories import minimal, office_lunch

PROBLEM = "application/problem+json"


def test_publish_list_and_read_versions(client, engine):
    _, h = new_tenant(engine)
    r = client.put("/v1/funnels/office-lunch", json=office_lunch(), headers=h)
    assert r.status_code == 201 and r.json()["version"] == 1
    assert r.headers["location"] == "/v1/funnels/office-lunch/versions/1"
    same = client.put("/v1/funnels/office-lunch", json=office_lunch(), headers=h)
    assert same.status_code == 200 and same.json()["version"] == 1
    changed = office_lunch()
    changed["name"] = "Office lunch, week 2"
    assert client.put("/v1/funnels/office-lunch", json=changed, headers=h).json()["version"] == 2
    assert [
        v["version"] for v in client.get("/v1/funnels/office-lunch/versions", headers=h).json()
    ] == [1, 2]
    v1 = client.get("/v1/funnels/office-lunch/versions/1", headers=h).json()
    assert v1["definition"] == office_lunch()  # immutable: version 1 still holds the original
    listed = client.get("/v1/funnels", headers=h).json()
    assert listed == [
        {
            "key": "office-lunch",
            "name": "Office lunch, week 2",
            "created_at": listed[0]["created_at"],
            "latest_version": 2,
            "versions": [],
        }
    ]


def test_invalid_definition_is_422_with_every_problem_and_writes_nothing(client, engine):
    _, h = new_tenant(engine)
    doc = minimal()
    doc["transitions"][1]["to"] = "payed"
    doc["states"]["active"]["stage"] = "activation"
    r = client.put("/v1/funnels/mini", json=doc, headers=h)
    assert r.status_code == 422 and r.headers["content-type"] == PROBLEM
    body = r.json()
    assert body["code"] == "invalid_funnel" and body["status"] == 422
    assert [e["path"] for e in body["errors"]] == ["states.active.stage"]  # structure first
    doc["states"]["active"]["stage"] = "activate"
    r = client.put("/v1/funnels/mini", json=doc, headers=h)
    assert {e["path"] for e in r.json()["errors"]} == {"transitions[1].to", "states.buyer"}
    assert client.get("/v1/funnels/mini", headers=h).status_code == 404
    with session_scope(engine) as s:
        assert s.exec(select(Funnel)).all() == []


def test_duplicate_keys_and_bad_json_in_the_body(client, engine):
    _, h = new_tenant(engine)
    text = json.dumps(minimal()).replace('"name": "Minimal"', '"name": "Minimal", "name": "Other"')
    r = client.put(
        "/v1/funnels/mini", content=text, headers={**h, "content-type": "application/json"}
    )
    assert r.status_code == 422 and r.json()["errors"][0]["path"] == "name"
    r = client.put(
        "/v1/funnels/mini", content=b"{\xff", headers={**h, "content-type": "application/json"}
    )
    assert r.status_code == 422 and r.json()["errors"][0]["path"] == ""
    r = client.put(
        "/v1/funnels/mini", content=b"key: x", headers={**h, "content-type": "text/yaml"}
    )
    assert r.status_code == 415


def test_url_key_must_match_the_document(client, engine):
    _, h = new_tenant(engine)
    r = client.put("/v1/funnels/other", json=minimal(), headers=h)
    assert r.status_code == 422 and r.json()["errors"][0]["path"] == "key"


def test_validate_endpoint_does_not_publish(client, engine):
    _, h = new_tenant(engine)
    r = client.post("/v1/funnels/validate", json=office_lunch(), headers=h)
    assert r.json() == {
        "valid": True,
        "key": "office-lunch",
        "states": 8,
        "transitions": 13,
        "warnings": [],
    }
    assert client.get("/v1/funnels", headers=h).json() == []


def _enter(engine, tenant_id, external_id, events):
    """Apply events through the write path (the dispatcher, as ingestion does)."""
    items = [
        Inbound(tenant_id, "test", e.type, dict(e.data), member={"id": external_id}) for e in events
    ]
    replies = apply_batch(engine, items, T0)
    assert all(r.ok for r in replies), [r.error for r in replies]
    return replies[0].body["member"]["id"]


def test_stage_history_records_each_stage_with_its_event(client, engine):
    tid, h = new_tenant(engine)
    client.put("/v1/funnels/mini", json=minimal(), headers=h)
    mid = _enter(
        engine,
        tid,
        "o-1",
        [
            Event("member.joined", id="e1"),
            Event("message.posted", id="e2"),
            Event("order.paid", {"amount_fen": 5000}, id="e3"),
        ],
    )
    detail = client.get(f"/v1/members/{mid}", headers=h).json()
    (place,) = detail["funnels"]
    assert (place["state"], place["stage"], place["status"]) == ("buyer", "revenue", "completed")
    assert [(x["stage"], x["entered_by"], x["left_by"]) for x in place["history"]] == [
        ("acquire", "member.joined", "message.posted"),
        ("activate", "message.posted", "order.paid"),
        ("revenue", "order.paid", None),
    ]


def test_archived_version_takes_no_new_members_but_keeps_its_own(client, engine):
    tid, h = new_tenant(engine)
    client.put("/v1/funnels/mini", json=minimal(), headers=h)
    inside = _enter(engine, tid, "early", [Event("member.joined")])
    assert client.post("/v1/funnels/mini/versions/1/archive", headers=h).json()["archived_at"]
    late = _enter(engine, tid, "late", [Event("member.joined")])
    assert client.get(f"/v1/members/{late}", headers=h).json()["funnels"] == []
    _enter(engine, tid, "early", [Event("message.posted")])
    assert client.get(f"/v1/members/{inside}", headers=h).json()["funnels"][0]["state"] == "active"


def test_members_stay_on_their_version_until_a_migration_is_applied(client, engine):
    tid, h = new_tenant(engine)
    client.put("/v1/funnels/mini", json=minimal(), headers=h)
    a = _enter(engine, tid, "a", [Event("member.joined")])  # joined
    b = _enter(engine, tid, "b", [Event("member.joined"), Event("message.posted")])  # active
    v2 = minimal(migrations=[{"from_version": 1, "states": {"active": "engaged"}}])
    v2["states"] = {
        "joined": {"stage": "acquire"},
        "engaged": {"stage": "activate"},
        "buyer": {"stage": "revenue", "final": True},
    }
    v2["transitions"] = [
        {"from": "joined", "to": "engaged", "event": "message.posted"},
        {"from": "engaged", "to": "buyer", "event": "order.paid"},
    ]
    assert client.put("/v1/funnels/mini", json=v2, headers=h).json()["version"] == 2
    assert client.get(f"/v1/members/{b}", headers=h).json()["funnels"][0]["version"] == 1
    r = client.post("/v1/funnels/mini/versions/2/migrate", headers=h)
    assert r.json() == {
        "version": 2,
        "migrated": 1,
        "by_move": {"1:active->engaged": 1},
        "active_on_older_versions": 1,
    }
    place_b = client.get(f"/v1/members/{b}", headers=h).json()["funnels"][0]
    assert (place_b["version"], place_b["state"]) == (2, "engaged")
    place_a = client.get(f"/v1/members/{a}", headers=h).json()["funnels"][0]
    assert (place_a["version"], place_a["state"]) == (1, "joined")
    again = client.post("/v1/funnels/mini/versions/2/migrate", headers=h).json()
    assert again["migrated"] == 0


def test_migration_map_must_name_real_versions_and_states(client, engine):
    _, h = new_tenant(engine)
    client.put("/v1/funnels/mini", json=minimal(), headers=h)
    bad = minimal(
        name="v2",
        migrations=[
            {"from_version": 1, "states": {"ghost": "active"}},
            {"from_version": 7, "states": {"joined": "active"}},
        ],
    )
    r = client.put("/v1/funnels/mini", json=bad, headers=h)
    assert r.status_code == 422
    assert {e["path"] for e in r.json()["errors"]} == {
        "migrations[0].states.ghost",
        "migrations[1].from_version",
    }


def test_stage_history_is_closed_on_migration_when_the_stage_changes(client, engine):
    tid, h = new_tenant(engine)
    client.put("/v1/funnels/mini", json=minimal(), headers=h)
    b = _enter(engine, tid, "b", [Event("member.joined"), Event("message.posted")])
    v2 = minimal(name="v2", migrations=[{"from_version": 1, "states": {"active": "joined"}}])
    client.put("/v1/funnels/mini", json=v2, headers=h)
    client.post("/v1/funnels/mini/versions/2/migrate", headers=h)
    with session_scope(engine) as s:
        rows = s.exec(
            select(StageHistory).where(StageHistory.member_id == b).order_by(StageHistory.id)
        ).all()
        assert [(r.stage, r.version, r.left_by) for r in rows] == [
            ("acquire", 1, "message.posted"),
            ("activate", 1, "funnel.migrated"),
            ("acquire", 2, None),
        ]
