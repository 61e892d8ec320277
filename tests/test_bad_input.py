"""Bad input, on SQLite and PostgreSQL: every refusal is a 4xx problem document with the
place at fault, costs bounded CPU, and leaves nothing written."""

from __future__ import annotations

import copy
import time

import pytest
from sqlalchemy import Engine, func, select

from app.api.deps import MAX_ID
from app.engine.guards import MAX_MACRO_DEPTH
from app.events.models import EventLog
from app.funnels.store import funnel_t
from app.members.models import Member
from tests.conftest import Client, Source, event, new_tenant
from tests.factories import office_lunch

PROBLEM = "application/problem+json"
event_t = EventLog.__table__  # type: ignore[attr-defined]
member_t = Member.__table__  # type: ignore[attr-defined]


def counts(engine: Engine) -> tuple[int, int, int]:
    with engine.connect() as conn:
        return tuple(  # type: ignore[return-value]
            conn.execute(select(func.count()).select_from(t)).scalar_one()
            for t in (funnel_t, member_t, event_t)
        )


def refused(r, status: int, code: str | None = None) -> dict:
    assert r.status_code == status, r.text
    assert r.headers["content-type"].startswith(PROBLEM), r.headers
    doc = r.json()
    assert doc["status"] == status and doc["title"] and doc["detail"]
    if code is not None:
        assert doc["code"] == code, doc
    return doc


@pytest.fixture
def tenant(client: Client, engine: Engine) -> dict[str, str]:
    return new_tenant(engine)[1]


@pytest.mark.parametrize("depth", [5_000, 100_000])
def test_deeply_nested_json_is_a_4xx(client, engine, tenant, clock, depth):
    before = counts(engine)
    deep = b"[" * depth + b"]" * depth
    ok = {**tenant, "content-type": "application/json"}
    r = client.post("/v1/members", content=deep, headers=ok)
    assert r.status_code in (400, 422), r.text
    refused(r, r.status_code)
    body = b'{"type": "member.joined", "member": {"id": "m"}, "data": ' + deep + b"}"
    doc = refused(Source(client, tenant, clock).send(body=body), 422, "invalid_event")
    assert "depth limit" in doc["detail"]
    assert counts(engine) == before


def test_invalid_utf8_is_400(client, engine, tenant):
    before = counts(engine)
    bad = b'{"external_id": "\xff\xfe"}'
    ok = {**tenant, "content-type": "application/json"}
    refused(client.post("/v1/members", content=bad, headers=ok), 400)
    assert counts(engine) == before


@pytest.mark.parametrize("kind", ["text/plain", "application/x-www-form-urlencoded", "image/png"])
def test_a_body_that_is_not_json_is_415(client, engine, tenant, kind):
    before = counts(engine)
    r = client.post(
        "/v1/members", content=b'{"external_id": "a"}', headers={**tenant, "content-type": kind}
    )
    assert kind in refused(r, 415, "unsupported_media_type")["detail"]
    ok = {**tenant, "content-type": "application/json; charset=utf-8"}
    assert (
        client.post("/v1/members", content=b'{"external_id": "a"}', headers=ok).status_code == 201
    )
    assert counts(engine)[1] == before[1] + 1


@pytest.mark.parametrize(
    ("path", "where"),
    [
        (f"/v1/members/{MAX_ID + 1}", "path:member_id"),
        (f"/v1/members/{2**31}", "path:member_id"),  # an INTEGER column on PostgreSQL
        (f"/v1/api-keys/{2**31}", "path:key_id"),
        ("/v1/members/340282366920938463463374607431768211456", "path:member_id"),
        (f"/v1/funnels/f/versions/{2**64}", "path:number"),
        (f"/v1/deliveries?member_id={2**70}", "query:member_id"),
    ],
)
def test_ids_past_their_columns_are_422_with_their_place(client, tenant, path, where):
    method = "DELETE" if path.startswith("/v1/api-keys/") else "GET"
    doc = refused(client.request(method, path, headers=tenant), 422, "validation_failed")
    assert [e["path"] for e in doc["errors"]] == [where]


def test_an_amount_past_any_order_is_422_and_not_stored(client, engine, tenant, clock):
    source = Source(client, tenant, clock)
    before = counts(engine)
    r = source.send(event("order.paid", order_id="o-1", amount_fen=2**70))
    doc = refused(r, 422)
    assert any(e["path"].endswith("amount_fen") for e in doc["errors"]), doc
    assert counts(engine) == before


def _publish(client: Client, tenant: dict[str, str], doc: dict) -> object:
    return client.put(f"/v1/funnels/{doc['key']}", json=doc, headers=tenant)


def test_huge_definitions_are_refused_at_their_limits(client, engine, tenant):
    before = counts(engine)
    doc = office_lunch()
    many = {f"s{i}": {"stage": "acquire"} for i in range(300)}
    big = {**copy.deepcopy(doc), "states": {**doc["states"], **many}}
    assert any(e["path"] == "states" for e in refused(_publish(client, tenant, big), 422)["errors"])
    long = copy.deepcopy(doc)
    long["transitions"][0]["guard"] = "1 + " * 400 + "1 == 1"
    errors = refused(_publish(client, tenant, long), 422)["errors"]
    assert errors[0]["path"] == "transitions[0].guard", errors
    assert counts(engine) == before


def test_nested_comprehensions_are_refused_so_a_guard_stays_linear(client, engine, tenant):
    """Two nested macros over a member's list would be quadratic in its size."""
    doc = office_lunch()
    doc["transitions"][0]["guard"] = "event.tags.all(a, event.tags.exists(b, a == b))"
    t = time.perf_counter()
    errors = refused(_publish(client, tenant, doc), 422)["errors"]
    assert time.perf_counter() - t < 5  # refused while compiling, never evaluated
    assert errors[0]["path"] == "transitions[0].guard"
    assert "one level" in errors[0]["message"] and MAX_MACRO_DEPTH == 1
    doc["transitions"][0]["guard"] = (
        "event.tags.all(a, event.tags.exists" + " " * 40 + "(b, a == b))"
    )
    assert "one level" in refused(_publish(client, tenant, doc), 422)["errors"][0]["message"]
    doc["transitions"][0]["guard"] = 'event.tags.map(t, t + "!").exists(t, t == "vip!")'
    assert _publish(client, tenant, doc).status_code == 201  # chained, not nested: linear
    assert counts(engine)[0] == 1


def test_a_guard_reads_only_its_inputs(client, engine, tenant):
    doc = office_lunch()
    for guard in ('os.system("ls")', "__import__", "globals.secret_key"):
        doc["transitions"][0]["guard"] = guard
        errors = refused(_publish(client, tenant, doc), 422)["errors"]
        assert errors[0]["path"] == "transitions[0].guard", errors
    assert counts(engine)[0] == 0


def test_a_nul_character_is_422_at_its_path_on_both_databases(client, engine, tenant, clock):
    """PostgreSQL's text and jsonb cannot hold U+0000 (SQLite can): refused at the edge, with
    the field, on both, instead of a 500 from one of them."""
    before = counts(engine)
    source = Source(client, tenant, clock)
    nul = "ok\u0000no"
    r = source.send(event("message.posted", "m-1", group_id="g", message_id="1", text=nul))
    doc = refused(r, 422)
    assert [e["path"] for e in doc["errors"]] == ["data.text"]
    r = client.post("/v1/members", json={"external_id": "m-2", "nickname": nul}, headers=tenant)
    doc = refused(r, 422, "validation_failed")
    assert [e["path"] for e in doc["errors"]] == ["nickname"]
    r = client.post(
        "/v1/members", json={"external_id": "m-2", "attributes": {"k": [nul]}}, headers=tenant
    )
    doc = refused(r, 422, "validation_failed")
    assert [e["path"] for e in doc["errors"]] == ["attributes"] and "k[0]" in doc["errors"][0][
        "message"
    ]
    ok = source.send(event("message.posted", "m-1", group_id="g", message_id="2", text="\\u0000"))
    assert ok.status_code == 200  # the six characters \u0000 are ordinary text
    assert counts(engine)[1] == before[1] + 1
