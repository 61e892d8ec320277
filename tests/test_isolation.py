"""Tenant and member isolation, generated from the OpenAPI — SQLite and PostgreSQL.

Tenant A has one of every object the API names (a funnel, members, teams, vouchers, a
solitaire list and its lines, referral rewards, a group with its join requests and
moderation decisions, deliveries, keys, sources). Tenant B has the same funnel and group
ids, so every name A uses also means something in B's namespace. Then, for every operation
the OpenAPI lists (a new route joins the test by itself, and fails it until the plan below
says how to call it):

- BOLA: B's API key with A's ids and names, and B's member token on A's member routes;
  member Y's token on member X's own objects. Refused (an id of A's is a 404 to B, as if it
  did not exist), A's rows unchanged, and none of A's strings in the answer.
- Mass assignment: A's own valid request plus one field a caller must not set (tenant id,
  ids, balances, states, sequence numbers, timestamps): a 422 naming that field, nothing
  changed.
"""

from __future__ import annotations

import copy
import json
import re
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import quote

import pytest
from sqlalchemy import select

from app.db import metadata
from app.events.ingest import signed_headers
from app.members.models import Member
from tests.conftest import event, new_tenant, ok
from tests.test_community import Club
from tests.test_groupbuy import GROUP, LUNCH

# Path parameters that name one object by an id the service minted: another tenant's id is
# a 404 (never a 403, which would confirm the object exists). The other parameters are
# names in the caller's own namespace (funnel keys, group ids, external ids): B resolves
# them among B's own objects.
ID_PARAMS = {
    "member_id",
    "key_id",
    "delivery",
    "source_id",
    "team",
    "code",
    "reward_id",
    "list_id",
    "line",
    "request_id",
    "decision_id",
}
NAME_PARAMS = {"key", "number", "funnel", "campaign", "name", "group_id", "member", "external_id"}

# Operations that take no credentials, so there is nobody to isolate from.
PUBLIC = {
    ("GET", "/healthz"): "liveness for the load balancer",
    ("POST", "/v1/member/session"): "the login that mints a member token",
}

# Required query parameters without an enum to pick from.
QUERY: dict[tuple[str, str], dict[str, str]] = {}

# A valid body for every operation that takes one (A's own call with it succeeds or is
# refused for a business reason, never for its shape).
LINE = {"items": [{"sku": "braised-pork", "qty": 1}], "note": "zq7 no coriander"}
BODIES: dict[tuple[str, str], Any] = {
    ("POST", "/v1/funnels/validate"): LUNCH,
    ("PUT", "/v1/funnels/{key}"): LUNCH,
    ("POST", "/v1/api-keys"): {"name": "till"},
    ("POST", "/v1/members"): {"external_id": "newcomer"},
    ("POST", "/v1/webhook-sources"): {"name": "crm"},
    ("PUT", "/v1/action-endpoint"): {"url": "http://127.0.0.1:9/actions"},
    ("PUT", "/v1/wechat-app"): {"app_id": "wxrival001", "app_secret": "s" * 32},
    ("POST", "/v1/webhooks/{source_id}"): {"type": "member.joined", "member": {"id": "m"}},
    ("POST", "/v1/member/events"): {"type": "member.scanned", "data": {"channel": "poster"}},
    ("POST", "/v1/member/groupbuy/{funnel}/{campaign}/teams"): {"profile": {"nickname": "n"}},
    ("POST", "/v1/member/teams/{team}/join"): {"profile": {"nickname": "n"}},
    ("POST", "/v1/groupbuy/teams/{team}/cancel"): {"reason": "stock"},
    ("POST", "/v1/vouchers/{code}/redeem"): {"till": "till-1"},
    ("POST", "/v1/referral/{funnel}/{campaign}/channels"): {"channel": "flyer"},
    ("POST", "/v1/solitaire/lists"): {
        "group": GROUP,
        "funnel": "office-lunch",
        "campaign": "lunch",
    },
    ("POST", "/v1/solitaire/lists/{list_id}/close"): {},
    ("POST", "/v1/solitaire/lists/{list_id}/fulfil"): {},
    ("POST", "/v1/solitaire/lists/{list_id}/cancel"): {},
    ("POST", "/v1/member/solitaire/{list_id}/lines"): LINE,
    ("PATCH", "/v1/member/solitaire/{list_id}/lines/{line}"): {"note": "changed"},
    ("PUT", "/v1/groups/{group_id}"): {"name": "rival group"},
    ("PUT", "/v1/groups/{group_id}/words"): {"words": ["spam"]},
    ("PUT", "/v1/groups/{group_id}/members/{member}/role"): {"role": "admin"},
    ("POST", "/v1/groups/join-requests/{request_id}/approve"): {},
    ("POST", "/v1/groups/join-requests/{request_id}/deny"): {"note": "no"},
    ("POST", "/v1/groups/moderation/{decision_id}/reverse"): {"note": "appeal"},
    ("POST", "/v1/broadcasts"): {"groups": [GROUP], "text": "hello"},
    ("POST", "/v1/reports/funnels/{key}/replay"): {
        "definition": LUNCH,
        "from": "2026-12-01",
        "to": "2026-12-01",
    },
}

# Fields no caller sets: the service owns them.
OWNED = ["tenant_id", "id", "member_id", "balance", "points", "state", "status", "seq"]
OWNED += ["version", "created_at"]

CAMPAIGNS = {"groupbuy": "lunch-team", "referral": "colleagues", "rewards": "free-meal-card"}
CANARY = "zq7"  # in every string of A's that B must never see


@dataclass
class World:
    club: Club
    b_admin: dict[str, str]
    b_member: dict[str, str]
    b_source: tuple[str, str]  # B's webhook path and secret
    members: dict[str, dict[str, str]]  # A's member tokens by openid
    ids: dict[str, str]  # A's object for each path parameter
    x_private: set[str]  # strings only member X (and A's admins) may see
    a_strings: set[str] = field(default_factory=set)  # strings only A may see

    @property
    def tenant_id(self) -> int:
        return self.club.tenant_id


def build(engine: Any, clock: Any) -> World:
    club = Club(engine, clock)
    client, admin = club.client, club.admin
    club.group(name=f"午餐福利群 {CANARY}", settings={"entry": {"approval": "owner"}})
    ok(client.put(f"/v1/groups/{GROUP}/words", json={"words": ["代购"]}, headers=admin))
    who = {o: club.login(o) for o in ("xavier-zq7", "yolanda-zq7", "zoe-zq7", "wanda-zq7")}
    x = who["xavier-zq7"]
    # a team that succeeded (vouchers for all three) and one still open
    team = ok(club.open(x))["result"]["team"]["id"]
    for o in ("yolanda-zq7", "zoe-zq7"):
        ok(club.join(who[o], team))
    open_team = ok(club.open(who["wanda-zq7"]))["result"]["team"]["id"]
    code = club.vouchers(x)[0]["code"]
    # a solitaire list with X's line
    sl = ok(
        client.post(
            "/v1/solitaire/lists", json=BODIES[("POST", "/v1/solitaire/lists")], headers=admin
        )
    )
    list_id = sl["result"]["list"]["id"]
    line = ok(client.post(f"/v1/member/solitaire/{list_id}/lines", json=LINE, headers=x))
    # X invites Vic, who joins: rewards for both
    ref = ok(client.post("/v1/member/referral/office-lunch/colleagues", headers=x))["result"]
    club.login("vic-zq7", in_group=False)
    ok(club.bot.send(event("invite.accepted", "vic-zq7", code=ref["code"])))
    club.joins("vic-zq7")
    rewards = ok(client.get("/v1/referral/office-lunch/colleagues/rewards", headers=admin))
    # a join request waiting for the owner, and a moderation decision
    ok(club.bot.send(event("member.join_requested", "uma-zq7", group_id=GROUP)))
    [request] = club.get(f"/v1/groups/{GROUP}/join-requests?status=pending")
    club.says("zoe-zq7", f"{CANARY} 代购 名牌包")
    [decision] = club.get(f"/v1/groups/{GROUP}/moderation")
    ok(client.put("/v1/action-endpoint", json={"url": "http://127.0.0.1:9/zq7"}, headers=admin))
    ok(
        client.put(
            "/v1/wechat-app", json={"app_id": "wxzq7a1b2c3", "app_secret": "z" * 32}, headers=admin
        )
    )
    ok(
        client.post(
            "/v1/referral/office-lunch/colleagues/channels", json={"channel": "zq7"}, headers=admin
        )
    )
    [key] = club.get("/v1/api-keys")
    [delivery, *_] = club.get("/v1/deliveries")
    with engine.connect() as conn:
        member_id = conn.execute(
            select(Member.id).where(Member.external_id == "xavier-zq7")  # type: ignore[arg-type]
        ).scalar_one()
    ids = {
        "key": "office-lunch",
        "number": "1",
        "funnel": "office-lunch",
        "name": "group-bot",
        "group_id": GROUP,
        "member": "xavier-zq7",
        "external_id": "xavier-zq7",
        "member_id": str(member_id),
        "key_id": str(key["id"]),
        "delivery": delivery["id"],
        "source_id": club.bot.path.rsplit("/", 1)[1],
        "team": open_team,
        "closed_team": team,
        "code": code,
        "reward_id": str(rewards["rewards"][0]["id"]),
        "list_id": list_id,
        "line": str(line["result"]["line"]),
        "request_id": str(request["id"]),
        "decision_id": str(decision["id"]),
    }
    # B: the same funnel and group ids, a member, a webhook source of its own
    _, b_admin = new_tenant(engine, "rival")
    ok(client.put("/v1/funnels/office-lunch", json=LUNCH, headers=b_admin))
    ok(client.put(f"/v1/groups/{GROUP}", json={"name": "rival group"}, headers=b_admin))
    b = ok(
        client.post(
            "/v1/member/session", json={"provider": "dev", "tenant": "rival", "openid": "bo"}
        )
    )
    source = ok(client.post("/v1/webhook-sources", json={"name": "bot"}, headers=b_admin))
    vouchers = {v["code"] for v in club.vouchers(x)}
    return World(
        club=club,
        b_admin=b_admin,
        b_member={"Authorization": f"Bearer {b['token']}"},
        b_source=("/v1/webhooks/" + source["id"], source["secret"]),
        members=who,
        ids=ids,
        # a solitaire list shows every line to the group (that is the point of 接龙), so
        # X's line is not private; X's vouchers and invite code are
        x_private=vouchers | {ref["code"]},
        a_strings={
            *who,
            "vic-zq7",
            "uma-zq7",
            f"午餐福利群 {CANARY}",
            code,
            team,
            open_team,
            list_id,
            ref["code"],
            club.bot.path.rsplit("/", 1)[1],
            "wxzq7a1b2c3",
            "http://127.0.0.1:9/zq7",
            f"{CANARY} 代购 名牌包",
        },
    )


@pytest.fixture
def world(engine: Any, clock: Any) -> World:
    return build(engine, clock)


# ── the operations ────────────────────────────────────────────────────────────────────────
@dataclass(frozen=True)
class Operation:
    method: str
    path: str
    spec: dict[str, Any]

    @property
    def key(self) -> tuple[str, str]:
        return (self.method, self.path)

    @property
    def params(self) -> set[str]:
        return set(re.findall(r"\{(\w+)\}", self.path))

    @property
    def for_members(self) -> bool:
        return self.path.startswith("/v1/member/")


def operations(app: Any) -> Iterator[Operation]:
    for path, ops in app.openapi()["paths"].items():
        for method, spec in ops.items():
            if (method.upper(), path) not in PUBLIC:
                yield Operation(method.upper(), path, spec)


def request_for(op: Operation, ids: dict[str, str]) -> tuple[str, dict[str, Any]]:
    """A's ids in the path, required query parameters, and the plan's body."""

    def fill(m: re.Match[str]) -> str:
        name = m.group(1)
        if name == "campaign":
            kind = next(k for k in CAMPAIGNS if f"/{k}/" in op.path)
            return CAMPAIGNS[kind]
        return quote(ids[name], safe="")

    url = re.sub(r"\{(\w+)\}", fill, op.path)
    query = dict(QUERY.get(op.key, {}))
    for p in op.spec.get("parameters", []):
        if p["in"] == "query" and p.get("required") and p["name"] not in query:
            enum = p["schema"].get("enum")
            assert enum, f"{op.key}: say in QUERY what to send as {p['name']}"
            query[p["name"]] = enum[0]
    kwargs: dict[str, Any] = {"params": query}
    if "requestBody" in op.spec:
        required = op.spec["requestBody"].get("required", False)
        assert op.key in BODIES or not required, f"{op.key}: add a valid body to BODIES"
        if op.key in BODIES:
            kwargs["json"] = BODIES[op.key]
    return url, kwargs


def test_the_plan_names_every_operation_and_parameter(world: World) -> None:
    """The generated tests below cover a new route only if its parameters are known here."""
    for op in operations(world.club.app):
        unknown = op.params - ID_PARAMS - NAME_PARAMS
        assert not unknown, f"{op.key}: say whether {unknown} are ids or names"
        request_for(op, world.ids)
    stale = set(BODIES) - {op.key for op in operations(world.club.app)}
    assert not stale, f"BODIES names operations that no longer exist: {stale}"


# ── what must not change, and what must not be seen ───────────────────────────────────────
def snapshot(engine: Any, tenant_id: int) -> dict[str, list[Any]]:
    """Every row of the tenant's, table by table (children through their parents)."""
    t = {table.name: table for table in metadata.sorted_tables}
    mine: dict[str, Any] = {
        name: table.c.tenant_id == tenant_id for name, table in t.items() if "tenant_id" in table.c
    }
    mine["tenant"] = t["tenant"].c.id == tenant_id
    outbox, lists = t["outbox"], t["solitaire_list"]
    mine["delivery_attempt"] = t["delivery_attempt"].c.outbox_id.in_(
        select(outbox.c.id).where(outbox.c.tenant_id == tenant_id)
    )
    mine["solitaire_stock"] = t["solitaire_stock"].c.list_id.in_(
        select(lists.c.id).where(lists.c.tenant_id == tenant_id)
    )
    mine["event_response"] = t["event_response"].c.event_id.in_(
        select(t["event"].c.id).where(t["event"].c.tenant_id == tenant_id)
    )
    assert set(mine) == set(t), f"say how these tables belong to a tenant: {set(t) - set(mine)}"
    with engine.connect() as conn:
        return {
            name: sorted(
                (tuple(row) for row in conn.execute(select(t[name]).where(where))), key=repr
            )
            for name, where in mine.items()
        }


def changed(before: dict[str, list[Any]], after: dict[str, list[Any]]) -> list[str]:
    return [name for name in before if before[name] != after[name]]


def leaked(response: Any, secrets: set[str], sent: str) -> set[str]:
    """The strings of `secrets` in the answer that the request did not carry itself."""
    return {s for s in secrets if s in response.text and s not in sent}


def sent_text(url: str, kwargs: dict[str, Any]) -> str:
    return url + json.dumps(kwargs.get("json"), ensure_ascii=False) + json.dumps(kwargs["params"])


# ── BOLA ──────────────────────────────────────────────────────────────────────────────────
def test_another_tenants_key_reaches_none_of_a_tenants_objects(world: World) -> None:
    client, engine = world.club.client, world.club.engine
    before = snapshot(engine, world.tenant_id)
    checked = 0
    for op in operations(world.club.app):
        if op.for_members or op.path.startswith("/v1/webhooks/"):
            continue
        url, kwargs = request_for(op, world.ids)
        r = client.request(op.method, url, headers=world.b_admin, **kwargs)
        where = f"{op.method} {url} as tenant B: {r.status_code} {r.text[:300]}"
        if op.params & ID_PARAMS:
            assert r.status_code == 404, where
        else:  # B's own namespace: B's answer about B's objects
            assert r.status_code < 500 and r.status_code not in (401, 403), where
        assert not leaked(r, world.a_strings, sent_text(url, kwargs)), where
        assert not changed(before, snapshot(engine, world.tenant_id)), where
        checked += 1
    assert checked >= 60


def test_another_tenants_webhook_secret_cannot_post_to_a_tenants_source(world: World) -> None:
    client, engine = world.club.client, world.club.engine
    before = snapshot(engine, world.tenant_id)
    body = json.dumps(event("member.joined", "intruder", group_id=GROUP)).encode()
    _b_path, b_secret = world.b_source
    a_path = "/v1/webhooks/" + world.ids["source_id"]
    headers = signed_headers([b_secret], "msg-1", world.club.clock.now(), body)
    r = client.post(a_path, content=body, headers=headers)
    assert r.status_code == 401, r.text
    assert not changed(before, snapshot(engine, world.tenant_id))


def test_a_member_token_reaches_only_its_own_tenant_and_its_own_objects(world: World) -> None:
    client, engine = world.club.client, world.club.engine
    y = world.members["yolanda-zq7"]
    before = snapshot(engine, world.tenant_id)
    checked = 0
    for op in operations(world.club.app):
        if not op.for_members:
            continue
        url, kwargs = request_for(op, world.ids)
        sent = sent_text(url, kwargs)
        # a member of tenant B, with A's ids: as if they did not exist
        r = client.request(op.method, url, headers=world.b_member, **kwargs)
        where = f"{op.method} {url} as B's member: {r.status_code} {r.text[:300]}"
        if op.params & ID_PARAMS:
            assert r.status_code == 404, where
        else:
            assert r.status_code < 500 and r.status_code not in (401, 403), where
        assert not leaked(r, world.a_strings | world.x_private, sent), where
        assert not changed(before, snapshot(engine, world.tenant_id)), where
        # member Y of the same tenant, on X's own objects: refused, nothing changed
        if "line" in op.params:
            r = client.request(op.method, url, headers=y, **kwargs)
            where = f"{op.method} {url} as Y on X's line: {r.status_code} {r.text[:300]}"
            assert r.status_code in (403, 404, 409), where
            assert not changed(before, snapshot(engine, world.tenant_id)), where
        elif op.method == "GET":  # what Y reads of its own never shows X's
            r = client.request(op.method, url, headers=y, **kwargs)
            where = f"{op.method} {url} as Y: {r.status_code} {r.text[:300]}"
            assert r.status_code < 500, where
            assert not leaked(r, world.x_private, sent), where
        checked += 1
    assert checked >= 15


# ── mass assignment ───────────────────────────────────────────────────────────────────────
def declared(schema: dict[str, Any], components: dict[str, Any]) -> set[str]:
    """Every property name a body schema declares, through refs and unions."""
    if "$ref" in schema:
        return declared(components[schema["$ref"].rsplit("/", 1)[1]], components)
    names = set(schema.get("properties", {}))
    for union in ("anyOf", "oneOf", "allOf"):
        for part in schema.get(union, []):
            names |= declared(part, components)
    return names


def test_fields_a_caller_may_not_set_are_refused_with_their_path(world: World) -> None:
    client, engine = world.club.client, world.club.engine
    app = world.club.app
    components = app.openapi()["components"]["schemas"]
    x = world.members["xavier-zq7"]
    before = snapshot(engine, world.tenant_id)
    tried = 0
    for op in operations(app):
        if "requestBody" not in op.spec or op.path.startswith("/v1/webhooks/"):
            continue
        [content] = op.spec["requestBody"]["content"].values()
        own = declared(content.get("schema", {}), components)
        url, kwargs = request_for(op, world.ids)
        for name in OWNED:
            if name in own:
                continue
            body = {**copy.deepcopy(kwargs.get("json") or {}), name: 1}
            who = x if op.for_members else world.club.admin
            r = client.request(op.method, url, headers=who, params=kwargs["params"], json=body)
            where = f"{op.method} {url} with {name}: {r.status_code} {r.text[:300]}"
            assert r.status_code == 422, where
            assert name in {e["path"] for e in r.json()["errors"]}, where
            tried += 1
        assert not changed(before, snapshot(engine, world.tenant_id)), op.key
    assert tried >= 100
