"""API keys, tenant isolation, member tokens, health — on SQLite and PostgreSQL."""

from __future__ import annotations

from datetime import timedelta

from sqlalchemy import select

from app.db import session_scope
from app.tenancy.models import ApiKey
from tests.conftest import new_tenant
from tests.factories import minimal

PROBLEM = "application/problem+json"


def test_healthz_reports_the_database(client):
    r = client.get("/healthz")
    assert r.status_code == 200 and r.json()["status"] == "ok"


def test_missing_and_bad_keys_are_401_problems(client, engine):
    r = client.get("/v1/funnels")
    assert r.status_code == 401 and r.headers["content-type"] == PROBLEM
    assert r.json()["errors"] == [{"path": "header:Authorization", "message": "missing"}]
    r = client.get("/v1/funnels", headers={"Authorization": "Bearer fw_nope_nope"})
    assert r.status_code == 401 and r.json()["code"] == "unauthorized"


def test_key_is_shown_once_and_only_its_hash_is_stored(client, engine):
    _, headers = new_tenant(engine)
    r = client.post("/v1/api-keys", json={"name": "ops"}, headers=headers)
    assert r.status_code == 201
    key = r.json()["key"]
    assert client.get("/v1/funnels", headers={"X-API-Key": key}).status_code == 200
    listed = client.get("/v1/api-keys", headers=headers).json()
    assert all("key" not in k for k in listed) and len(listed) == 2
    with session_scope(engine) as s:
        stored = s.execute(select(ApiKey.secret_hash)).scalars().all()
    assert all(key.split("_", 2)[2] not in h for h in stored)


def test_revoked_key_stops_working(client, engine):
    _, headers = new_tenant(engine)
    created = client.post("/v1/api-keys", json={"name": "temp"}, headers=headers).json()
    other = {"Authorization": f"Bearer {created['key']}"}
    assert client.delete(f"/v1/api-keys/{created['id']}", headers=headers).json()["revoked_at"]
    assert client.get("/v1/funnels", headers=other).status_code == 401


def test_tenant_b_gets_404_for_tenant_a_objects(client, engine):
    _, a = new_tenant(engine, "a")
    _, b = new_tenant(engine, "b")
    assert client.put("/v1/funnels/mini", json=minimal(), headers=a).status_code == 201
    member = client.post("/v1/members", json={"external_id": "o-1"}, headers=a).json()
    a_key = client.get("/v1/api-keys", headers=a).json()[0]
    for method, url in [
        ("GET", "/v1/funnels/mini"),
        ("GET", "/v1/funnels/mini/versions"),
        ("GET", "/v1/funnels/mini/versions/1"),
        ("POST", "/v1/funnels/mini/versions/1/archive"),
        ("POST", "/v1/funnels/mini/versions/1/migrate"),
        ("GET", f"/v1/members/{member['id']}"),
        ("POST", f"/v1/members/{member['id']}/tokens"),
        ("DELETE", f"/v1/api-keys/{a_key['id']}"),
    ]:
        r = client.request(method, url, headers=b)
        assert r.status_code == 404, (method, url, r.text)
    assert client.get("/v1/funnels", headers=b).json() == []
    # and nothing of A's changed
    assert client.get("/v1/funnels/mini/versions/1", headers=a).json()["archived_at"] is None
    assert client.get("/v1/api-keys", headers=a).json()[0]["revoked_at"] is None


def test_same_external_id_in_two_tenants_is_two_members(client, engine):
    _, a = new_tenant(engine, "a")
    _, b = new_tenant(engine, "b")
    ma = client.post("/v1/members", json={"external_id": "openid-1"}, headers=a)
    mb = client.post("/v1/members", json={"external_id": "openid-1"}, headers=b)
    assert ma.status_code == mb.status_code == 201 and ma.json()["id"] != mb.json()["id"]
    again = client.post(
        "/v1/members", json={"external_id": "openid-1", "nickname": "Li"}, headers=a
    )
    assert again.status_code == 200 and again.json()["nickname"] == "Li"


def test_member_token_reads_only_its_own_member_and_expires(client, engine, clock):
    _, a = new_tenant(engine, "a")
    m = client.post("/v1/members", json={"external_id": "o-9", "nickname": "Mei"}, headers=a).json()
    token = client.post(f"/v1/members/{m['id']}/tokens", headers=a).json()
    me = client.get("/v1/member/me", headers={"Authorization": f"Bearer {token['token']}"})
    assert me.status_code == 200 and me.json()["nickname"] == "Mei"
    # a tenant key is not a member token, and a member token is not a tenant key
    assert client.get("/v1/member/me", headers=a).status_code == 401
    member_headers = {"Authorization": f"Bearer {token['token']}"}
    assert client.get("/v1/funnels", headers=member_headers).status_code == 401
    clock.set(clock.now() + timedelta(hours=3))
    assert client.get("/v1/member/me", headers=member_headers).status_code == 401


def test_tampered_member_token_is_refused(client, engine):
    _, a = new_tenant(engine, "a")
    m = client.post("/v1/members", json={"external_id": "o-9"}, headers=a).json()
    token = client.post(f"/v1/members/{m['id']}/tokens", headers=a).json()["token"]
    head, body, sig = token.split(".")
    forged = f"{head}.{body}.{sig[:-2]}{'A' if sig[-2] != 'A' else 'B'}{sig[-1]}"
    assert (
        client.get("/v1/member/me", headers={"Authorization": f"Bearer {forged}"}).status_code
        == 401
    )


def test_request_validation_errors_carry_paths(client, engine):
    _, a = new_tenant(engine)
    r = client.post("/v1/members", json={"external_id": "", "tenant_id": 7}, headers=a)
    assert r.status_code == 422 and r.headers["content-type"] == PROBLEM
    paths = {e["path"] for e in r.json()["errors"]}
    assert paths == {"external_id", "tenant_id"}


def test_oversized_body_is_413(client, engine):
    _, a = new_tenant(engine)
    r = client.put("/v1/funnels/big", content=b"{" + b" " * 1_100_000 + b"}", headers=a)
    assert r.status_code == 413 and r.json()["code"] == "body_too_large"
