"""The member API's fast path (app/api/member/fast.py): joining, opening and appending answer
as FastAPI's routes do, byte for byte where nothing differs but ids, and every request it
does not take whole (no token, a bad body, a long key, another content type) goes on to the
route, which answers it as before. Run on SQLite and PostgreSQL."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import pytest
from fastapi import FastAPI

from app.api.deps import member_claims
from app.api.member.fast import MemberFastPath
from app.errors import Unauthorized
from app.limits import RateLimiter
from tests.test_groupbuy import TEAMS, Shop
from tests.test_solitaire import open_list


@pytest.fixture
def shop(engine, clock) -> Shop:
    return Shop(engine, clock)


@contextmanager
def routes_only(app: FastAPI) -> Iterator[None]:
    """FastAPI's routes answer everything while inside: the fast path is taken out."""
    kept = list(app.user_middleware)
    app.user_middleware = [m for m in kept if m.cls is not MemberFastPath]
    app.middleware_stack = None  # rebuilt on the next request
    try:
        yield
    finally:
        app.user_middleware, app.middleware_stack = kept, None


@contextmanager
def fast_only(app: FastAPI) -> Iterator[None]:
    """A request that reaches FastAPI's member routes fails while inside: whatever succeeds
    was answered by the fast path."""

    async def refused() -> None:
        raise Unauthorized("answered by FastAPI, not the fast path")

    app.dependency_overrides[member_claims] = refused
    try:
        yield
    finally:
        del app.dependency_overrides[member_claims]


def shape(doc: Any) -> Any:
    """A JSON document's keys and value types, not its values (ids and times differ)."""
    if isinstance(doc, dict):
        return {k: shape(v) for k, v in doc.items()}
    if isinstance(doc, list):
        return [shape(x) for x in doc[:1]]
    return type(doc).__name__


def test_the_fast_path_answers_as_the_routes_do(shop):
    ann, bea, cai, dan = (shop.login(o) for o in ("ann", "bea", "cai", "dan"))
    sl = open_list(shop)
    line = {"items": [{"sku": "veg-set", "qty": 1}], "pickup": "A座大堂"}
    lines = f"/v1/member/solitaire/{sl['id']}/lines"

    def three(leader: dict[str, str], friend: dict[str, str], key: str) -> list[Any]:
        opened = shop.open(leader, json={"profile": {"nickname": "团长"}})
        assert opened.status_code == 200, opened.text
        team = opened.json()["result"]["team"]["id"]
        keyed = {**friend, "Idempotency-Key": key}
        joined, again = (shop.join(keyed, team) for _ in range(2))
        appended = shop.client.post(lines, json=line, headers=leader)
        return [opened, joined, again, appended]

    with fast_only(shop.app):
        fast = three(ann, bea, "k1")
    with routes_only(shop.app):
        routed = three(cai, dan, "k1")  # the same key from another member is another key
    for f, r in zip(fast, routed, strict=True):
        assert f.status_code == r.status_code
        assert f.headers["content-type"] == r.headers["content-type"]
        assert shape(f.json()) == shape(r.json())
        assert f.json()["result"].get("outcome") == r.json()["result"].get("outcome")
    assert fast[2].headers["idempotent-replayed"] == routed[2].headers["idempotent-replayed"]
    assert fast[2].content == fast[1].content and routed[2].content == routed[1].content
    assert [fast[3].json()["result"]["line"], routed[3].json()["result"]["line"]] == [1, 2]
    assert fast[1].json()["result"]["team"]["seats_taken"] == 2


def test_what_the_fast_path_does_not_take_the_routes_answer_as_before(shop):
    ann, bea = shop.login("ann"), shop.login("bea")
    team = shop.open(ann).json()["result"]["team"]["id"]
    sl = open_list(shop)
    lines = f"/v1/member/solitaire/{sl['id']}/lines"
    join = f"/v1/member/teams/{team}/join"
    line = {"items": [{"sku": "veg-set", "qty": 1}]}
    requests: list[tuple[str, dict[str, Any]]] = [
        (lines, {"json": line}),  # no token
        (lines, {"json": line, "headers": {"Authorization": "Bearer not-a-token"}}),
        (lines, {"json": line, "headers": {**shop.admin}}),  # the tenant's key, not a member's
        (lines, {"json": {**line, "price_fen": 1}, "headers": bea}),  # a field it may not set
        (lines, {"json": {"items": [{"sku": "veg-set", "qty": 0}]}, "headers": bea}),
        (lines, {"content": b"", "headers": bea}),  # an append needs a line
        (lines, {"content": b"{", "headers": bea}),
        (lines, {"content": b'{"items": []}', "headers": {**bea, "Content-Type": "text/plain"}}),
        (lines, {"json": line, "headers": {**bea, "Idempotency-Key": "k" * 129}}),
        (join, {"json": {"profile": {"nickname": "x" * 500}}, "headers": bea}),
        (join, {"json": [], "headers": bea}),
        (TEAMS, {"json": {"team": "mine"}, "headers": bea}),
    ]
    for path, kw in requests:
        with routes_only(shop.app):
            routed = shop.client.post(path, **kw)
        fast = shop.client.post(path, **kw)
        assert routed.status_code in (401, 415, 422), (path, kw, routed.text)
        assert (fast.status_code, fast.content) == (routed.status_code, routed.content), kw
        assert fast.headers["content-type"] == "application/problem+json"


def test_refusals_and_the_rate_limit_are_the_routes_problems(shop):
    ann, bea, cai = (shop.login(o) for o in ("ann", "bea", "cai"))
    team = shop.open(ann).json()["result"]["team"]["id"]
    with fast_only(shop.app):
        fast = shop.join(ann, team)  # the leader is in it already
    with routes_only(shop.app):
        routed = shop.join(ann, team)
    assert fast.status_code == 409 and (fast.content, fast.status_code) == (
        routed.content,
        routed.status_code,
    )
    shop.app.state.rate_limiter = RateLimiter(0.001, 1)  # one request, then a long wait
    with fast_only(shop.app):
        assert shop.join(bea, team).status_code == 200
        limited = shop.join(cai, team)
    assert limited.status_code == 429 and int(limited.headers["retry-after"]) >= 1
    assert limited.json()["code"] == "rate_limited", limited.json()
    with routes_only(shop.app):
        assert shop.join(cai, team).content == limited.content
