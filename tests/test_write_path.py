"""The write path's statement budget: no N+1. A batch reads its members and their funnel
instances once, and what one event costs does not grow with the data around it.

Statements are counted with SQLAlchemy's `before_cursor_execute` (the per-event SAVEPOINTs
go to the driver's cursor directly and are not counted here)."""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import replace
from datetime import UTC, datetime
from itertools import pairwise
from typing import Any

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from sqlalchemy import Engine, event, select

from app.events.dispatch import Inbound, apply_batch
from app.funnels.models import FunnelInstance, StageHistory
from bench.scenarios import funnel as bench_funnel
from tests.conftest import T0, tenant_with_funnel
from tests.factories import welcome

instance_t = FunnelInstance.__table__  # type: ignore[attr-defined]
history_t = StageHistory.__table__  # type: ignore[attr-defined]


@contextmanager
def counted(engine: Engine) -> Iterator[Counter[str]]:
    seen: Counter[str] = Counter()

    def count(_conn, _cursor, statement: str, *_args) -> None:  # type: ignore[no-untyped-def]
        words = statement.split()
        table = next(
            (w for prev, w in pairwise(words) if prev in ("FROM", "INTO")),
            words[1] if len(words) > 1 else "",
        )
        seen[f"{words[0]} {table}"] += 1

    event.listen(engine, "before_cursor_execute", count)
    try:
        yield seen
    finally:
        event.remove(engine, "before_cursor_execute", count)


def _events(tenant_id: int, kind: str, members: range, tag: str) -> list[Inbound]:
    return [
        Inbound(
            tenant_id,
            "bot",
            kind,
            data={"group_id": "g1", "message_id": f"{tag}-{i}"},
            key=f"{tag}-{i}",
            digest=f"{tag}-{i}",
            member={"id": f"wx-{i}"},
        )
        for i in members
    ]


def _messages_after(engine: Engine, tenant_id: int, members: int) -> Counter[str]:
    """Statements of one batch of ten `message.posted`, with `members` in the funnel."""
    for start in range(0, members, 100):
        joined = _events(tenant_id, "member.joined", range(start, min(members, start + 100)), "j")
        assert all(r.ok for r in apply_batch(engine, joined, T0))
    with counted(engine) as seen:
        replies = apply_batch(engine, _events(tenant_id, "message.posted", range(10), "m"), T0)
    assert all(r.ok for r in replies)
    assert {f["state"] for r in replies for f in r.body["funnels"]} == {"active"}
    return seen


def test_a_batch_reads_its_members_and_their_instances_once(engine):
    tenant_id = tenant_with_funnel(engine, "welcome", welcome(), T0)
    seen = _messages_after(engine, tenant_id, 10)
    assert seen["SELECT member"] == 1, seen
    assert seen["SELECT funnel_instance"] == 1, seen
    assert seen["UPDATE event"] == 1, seen  # the responses, one executemany for the batch
    per_event = sum(seen.values()) / 10
    assert per_event <= 12, seen  # claim, two activity rows, instance, stage rows, outbox…


def test_what_an_event_costs_does_not_grow_with_the_members_around_it(engine):
    small = _messages_after(engine, tenant_with_funnel(engine, "welcome", welcome(), T0), 10)
    other = tenant_with_funnel(engine, "welcome", welcome(), T0, name="big")
    big = _messages_after(engine, other, 300)
    assert big == small


def test_a_key_repeated_in_the_same_batch_answers_the_first_response_or_409(engine):
    """Responses reach their rows with the batch's last statement: a repeat of a key in
    the same batch is answered from the batch, byte for byte, as a later one is from the row."""
    tenant_id = tenant_with_funnel(engine, "welcome", welcome(), T0)
    (first,) = _events(tenant_id, "member.joined", range(1), "d")
    other_body = replace(first, digest="another body")
    replies = apply_batch(engine, [first, first, other_body], T0)
    assert replies[0].ok and not replies[0].replayed
    assert replies[1].replayed and replies[1].raw == replies[0].raw
    assert replies[2].status == 409
    later = apply_batch(engine, [first], T0)[0]
    assert later.replayed and later.raw == replies[0].raw


# ── group commit is invisible ─────────────────────────────────────────────────────────────
MEMBERS = [f"wx-{i}" for i in range(6)]
OPS = st.lists(
    st.tuples(st.sampled_from(["join", "post", "bad", "leave"]), st.integers(1, 5)),
    min_size=1,
    max_size=14,
)


def _lunch_tenant(engine: Engine, now: datetime) -> tuple[int, dict[str, int], str]:
    """A tenant with office-lunch's group-buy running (teams of five), six members in the
    group, and a team opened by wx-0; its member ids and the team's share id."""
    tenant_id = tenant_with_funnel(engine, "office-lunch", bench_funnel(), now)
    joined = [
        Inbound(tenant_id, "bot", "member.joined", data={"group_id": "g1"}, member={"id": m})
        for m in MEMBERS
    ]
    replies = apply_batch(engine, joined, now)
    ids = {m: r.body["member"]["id"] for m, r in zip(MEMBERS, replies, strict=True)}
    [opened] = apply_batch(engine, [_op(tenant_id, ids, "", ("open", 0))], now)
    return tenant_id, ids, opened.body["result"]["team"]["id"]


def _op(tenant_id: int, ids: dict[str, int], team: str, op: tuple[str, int]) -> Inbound:
    kind, i = op
    who = MEMBERS[i]
    if kind == "post":
        return Inbound(
            tenant_id, "bot", "message.posted", {"group_id": "g1", "length": 3}, member={"id": who}
        )
    if kind == "bad":
        return Inbound(tenant_id, "bot", "no.such.event", {}, member={"id": who})
    command = {"open": "groupbuy.open", "join": "groupbuy.join", "leave": "groupbuy.leave"}[kind]
    data = (
        {"funnel": "office-lunch", "campaign": "lunch-team"} if kind == "open" else {"team": team}
    )
    return Inbound(tenant_id, "member", command, data, member_id=ids[who])


def _outcome(engine: Engine, tenant_id: int, ids: dict[str, int]) -> dict[str, Any]:
    by_id = {v: k for k, v in ids.items()}
    with engine.connect() as conn:
        instances = conn.execute(
            select(instance_t.c.member_id, instance_t.c.state, instance_t.c.status).where(
                instance_t.c.tenant_id == tenant_id
            )
        ).all()
        stays = conn.execute(
            select(history_t.c.member_id, history_t.c.stage, history_t.c.left_at.is_(None)).where(
                history_t.c.tenant_id == tenant_id
            )
        ).all()
    return {
        "instances": sorted((by_id[m], s, st_) for m, s, st_ in instances),
        "stays": sorted((by_id[m], stage, bool(open_)) for m, stage, open_ in stays),
    }


@settings(suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(ops=OPS)
def test_events_committed_together_end_as_if_committed_one_by_one(engine, ops):
    """A batch (one transaction, a savepoint each; rows prefetched and a member's instances
    reused between steps) answers and leaves exactly what the same events leave applied one
    transaction each: joins that fill a team (a cascade of steps for every member), refused
    joins and leaves, messages, unknown events."""
    now = datetime.now(UTC)
    together, ids_a, team_a = _lunch_tenant(engine, now)
    alone, ids_b, team_b = _lunch_tenant(engine, now)
    batch = apply_batch(engine, [_op(together, ids_a, team_a, op) for op in ops], now)
    singles = [apply_batch(engine, [_op(alone, ids_b, team_b, op)], now)[0] for op in ops]
    assert [(r.status, r.error and r.error.code) for r in batch] == [
        (r.status, r.error and r.error.code) for r in singles
    ]
    assert [r.body.get("result") and r.body["result"]["outcome"] for r in batch] == [
        r.body.get("result") and r.body["result"]["outcome"] for r in singles
    ]
    assert _outcome(engine, together, ids_a) == _outcome(engine, alone, ids_b)
