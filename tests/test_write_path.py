"""The write path's statement budget: no N+1. A batch reads its members and their funnel
instances once, and what one event costs does not grow with the data around it.

Statements are counted with SQLAlchemy's `before_cursor_execute` (the per-event SAVEPOINTs
go to the driver's cursor directly and are not counted here)."""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from itertools import pairwise

from sqlalchemy import Engine, event

from app.events.dispatch import Inbound, apply_batch
from tests.conftest import T0, tenant_with_funnel
from tests.factories import welcome


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
    per_event = sum(seen.values()) / 10
    assert per_event <= 12, seen  # claim, two activity rows, instance, stage rows, outbox…


def test_what_an_event_costs_does_not_grow_with_the_members_around_it(engine):
    small = _messages_after(engine, tenant_with_funnel(engine, "welcome", welcome(), T0), 10)
    other = tenant_with_funnel(engine, "welcome", welcome(), T0, name="big")
    big = _messages_after(engine, other, 300)
    assert big == small
