"""The write path's statement budget: no N+1. A batch reads its members and their funnel
instances once, and what one event costs does not grow with the data around it.

Statements are counted with SQLAlchemy's `before_cursor_execute` (the per-event SAVEPOINTs
go to the driver's cursor directly and are not counted here)."""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import replace
from datetime import UTC, datetime, timedelta
from itertools import pairwise
from typing import Any

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from sqlalchemy import Engine, event, select, text

from app.events.dispatch import Inbound, apply_batch
from app.events.models import EventLog, EventResponse
from app.funnels.models import FunnelInstance, StageHistory, StagePair
from app.mechanics.groupbuy.models import Seat, Team
from app.mechanics.vouchers.models import Voucher
from app.outbox.models import Outbox
from app.timers.models import Timer
from bench.scenarios import funnel as bench_funnel
from tests.conftest import T0, tenant_with_funnel
from tests.factories import welcome
from tests.test_groupbuy import OPENS

instance_t = FunnelInstance.__table__  # type: ignore[attr-defined]
history_t = StageHistory.__table__  # type: ignore[attr-defined]
pair_t = StagePair.__table__  # type: ignore[attr-defined]
timer_t = Timer.__table__  # type: ignore[attr-defined]
event_t = EventLog.__table__  # type: ignore[attr-defined]
outbox_t = Outbox.__table__  # type: ignore[attr-defined]
seat_t = Seat.__table__  # type: ignore[attr-defined]
team_t = Team.__table__  # type: ignore[attr-defined]
voucher_t = Voucher.__table__  # type: ignore[attr-defined]


def _writes(words: list[str]) -> list[str]:
    """What a data-modifying WITH writes, one "INSERT table" (or UPDATE, DELETE) each; an
    upsert's DO UPDATE SET is not one."""
    out = []
    for i, w in enumerate(words[:-2]):
        if w in ("INSERT", "DELETE") and words[i + 1] in ("INTO", "FROM"):
            out.append(f"{w} {words[i + 2]}")
        elif w == "UPDATE" and words[i + 1] != "SET":
            out.append(f"UPDATE {words[i + 1]}")
    return out


@contextmanager
def counted(engine: Engine) -> Iterator[Counter[str]]:
    """Statements run on the engine while the block runs, as "VERB table"; a data-modifying
    WITH (app.db.insert_numbered, a message run's counters) as each write it makes."""
    seen: Counter[str] = Counter()

    def count(_conn, _cursor, statement: str, *_args) -> None:  # type: ignore[no-untyped-def]
        words = statement.split()
        if words and words[0] == "WITH":
            seen.update(_writes([w.lstrip("(") for w in words]))
            return
        table = next(
            (w for prev, w in pairwise(words) if prev in ("FROM", "INTO", "UPDATE")),
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
    assert seen["INSERT event_response"] == 1, seen  # the responses: one for the batch
    assert seen["UPDATE event"] == 0, seen  # every row was claimed with its member
    per_event = sum(seen.values()) / 10
    # Each message moves its member to a new stage: the steps' rows (instance, stage rows,
    # pairs, timers) are written at the batch's end, one statement per table for all ten.
    assert per_event <= 2, seen
    assert seen["UPDATE funnel_instance"] == 1 and seen["INSERT stage_history"] == 1, seen


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


def test_an_event_that_fails_leaves_its_key_free(engine):
    """A batch claims its events' rows together before the first event; one that fails
    gives its claim back (nothing of it is stored), so its key may be sent again, and is
    applied then, not answered as a repeat."""
    tenant_id = tenant_with_funnel(engine, "welcome", welcome(), T0)
    first, second = _events(tenant_id, "member.joined", range(2), "f")
    bad = replace(first, type="no.such.event", key="bad-1", digest="bad-1")
    replies = apply_batch(engine, [first, bad, second], T0)
    assert [r.ok for r in replies] == [True, False, True]
    assert replies[1].status == 422
    fixed = replace(bad, type="member.joined")
    again = apply_batch(engine, [fixed, first], T0)
    assert again[0].ok and not again[0].replayed
    assert again[1].replayed and again[1].raw == replies[0].raw
    with engine.connect() as conn:
        keys = conn.execute(select(EventLog.dedupe_key).where(EventLog.tenant_id == tenant_id))  # type: ignore[arg-type]
        assert sorted(keys.scalars()) == ["bad-1", "f-0", "f-1"]


def test_only_an_event_that_can_be_repeated_keeps_its_response(engine):
    """An event with an idempotency key keeps its response's bytes for a repeat; one
    without cannot be repeated, so it keeps none, and its row (claimed with status 200) is
    not written again unless the event made its member; one that fails leaves no row."""
    tenant_id = tenant_with_funnel(engine, "welcome", welcome(), T0)
    (joined,) = _events(tenant_id, "member.joined", range(1), "k")
    (posted,) = _events(tenant_id, "message.posted", range(1), "p")
    (newcomer,) = _events(tenant_id, "message.posted", range(1, 2), "n")
    keyless = [replace(e, key=None, digest=None) for e in (posted, newcomer)]
    bad = replace(keyless[0], type="no.such.event")
    first = apply_batch(engine, [joined], T0)[0]
    replies = apply_batch(engine, [*keyless, bad], T0)
    assert [r.status for r in replies] == [200, 200, 422]
    with engine.connect() as conn:
        columns = (EventLog.dedupe_key, EventLog.member_id, EventLog.status_code)
        rows = conn.execute(
            select(*columns, EventResponse.response)  # type: ignore[call-overload]
            .outerjoin(EventResponse, EventResponse.event_id == EventLog.id)
            .where(EventLog.tenant_id == tenant_id, EventLog.source == "bot")
            .order_by(EventLog.id)
        ).all()
    members = [r.body["member"]["id"] for r in replies[:2]]
    assert [(r.dedupe_key, r.member_id, r.status_code) for r in rows] == [
        ("k-0", members[0], 200),
        (None, members[0], 200),
        (None, members[1], 200),  # the row learnt the member the event made
    ]  # and none for the event that failed: its claim was given back
    assert rows[0].response == first.raw.decode()  # the key's: a repeat is answered from it
    assert rows[1].response is None and rows[2].response is None


def test_the_migration_moves_stored_responses_to_their_table(engine):
    """Responses stored on event rows before `event_response` existed answer repeats after
    the upgrade, and go back to the rows on a downgrade."""
    from alembic import command
    from app.migrations import alembic_config

    tenant_id = tenant_with_funnel(engine, "welcome", welcome(), T0)
    (joined,) = _events(tenant_id, "member.joined", range(1), "m")
    first = apply_batch(engine, [joined], T0)[0]
    config = alembic_config(engine.url.render_as_string(hide_password=False))
    command.downgrade(config, "02d088a72112")  # the revision before the table
    with engine.connect() as conn:
        kept = conn.execute(text("SELECT response FROM event WHERE dedupe_key = 'm-0'"))
        assert kept.scalar_one() == first.raw.decode()
    command.upgrade(config, "head")
    again = apply_batch(engine, [joined], T0)[0]
    assert again.replayed and again.raw == first.raw


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
    """Every row a batch's funnel steps write (most held for the batch's end: the instances,
    stage stays, report pairs, timers, emitted events and actions), by member name."""
    by_id = {v: k for k, v in ids.items()}
    with engine.connect() as conn:

        def rows(*columns: Any) -> list[tuple[Any, ...]]:
            table = columns[0].table
            found = conn.execute(select(*columns).where(table.c.tenant_id == tenant_id)).all()
            return sorted((by_id.get(r[0], r[0]), *r[1:]) for r in found)

        return {
            "instances": rows(instance_t.c.member_id, instance_t.c.state, instance_t.c.status),
            "stays": rows(
                history_t.c.member_id,
                history_t.c.stage,
                history_t.c.state,
                history_t.c.entered_by,
                history_t.c.left_at.is_(None),
                history_t.c.left_by,
            ),
            "pairs": rows(pair_t.c.member_id, pair_t.c.version, pair_t.c.a, pair_t.c.b),
            "timers": rows(timer_t.c.member_id, timer_t.c.key),
            "emitted": rows(event_t.c.member_id, event_t.c.type, event_t.c.source),
            "actions": rows(outbox_t.c.member_id, outbox_t.c.type, outbox_t.c.status),
            "seats": rows(
                seat_t.c.member_id,
                seat_t.c.role,
                seat_t.c.status,
                seat_t.c.live_key.is_(None),
            ),
            "teams": rows(team_t.c.leader_member_id, team_t.c.status, team_t.c.seats_taken),
            "vouchers": rows(voucher_t.c.member_id, voucher_t.c.name, voucher_t.c.status),
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


def _fail_before_answering(monkeypatch: Any, kind: str, members: set[int], why: str) -> None:
    """Events of `kind` for these members fail just before their answer is made: after
    every write of theirs (their funnel steps, a run's seat), as a bug would."""
    from app.events import dispatch

    body = dispatch._body

    def failing(event_id, item, m, funnels):  # type: ignore[no-untyped-def]
        if item.type == kind and m is not None and m.id in members:
            raise RuntimeError(why)
        return body(event_id, item, m, funnels)

    monkeypatch.setattr(dispatch, "_body", failing)


def test_an_event_that_fails_after_its_steps_leaves_none_of_their_rows(engine, monkeypatch):
    """The join that fills a team steps five members' funnels (their rows held for the
    batch's end) and then fails: none of those rows is written, and the batch's other events
    are, as if the join had never come."""
    now = datetime.now(UTC)
    failed, ids_a, team_a = _lunch_tenant(engine, now)
    never, ids_b, team_b = _lunch_tenant(engine, now)
    first = [("join", 1), ("join", 2), ("join", 3)]
    for tenant, ids, team in ((failed, ids_a, team_a), (never, ids_b, team_b)):
        assert all(
            r.ok for r in apply_batch(engine, [_op(tenant, ids, team, o) for o in first], now)
        )
    _fail_before_answering(monkeypatch, "groupbuy.join", {ids_a["wx-4"]}, "after the steps")
    ops = [("join", 4), ("post", 5), ("post", 1)]
    replies = apply_batch(engine, [_op(failed, ids_a, team_a, o) for o in ops], now)
    assert [r.status for r in replies] == [500, 200, 200]
    rest = apply_batch(engine, [_op(never, ids_b, team_b, o) for o in ops[1:]], now)
    assert all(r.ok for r in rest)
    assert _outcome(engine, failed, ids_a) == _outcome(engine, never, ids_b)


def test_a_join_that_fails_after_its_run_took_the_seat_gives_it_back(engine, monkeypatch):
    """In a batch, joins are decided by the batch's run of joins and their seats written at
    its end: a join that fails after the run gave it a seat (here, in its cascade) leaves no
    seat, and the next joiner takes the place it would have had."""
    now = datetime.now(UTC)
    failed, ids_a, team_a = _lunch_tenant(engine, now)
    never, ids_b, team_b = _lunch_tenant(engine, now)
    _fail_before_answering(monkeypatch, "groupbuy.join", {ids_a["wx-2"]}, "after the seat")
    ops = [("join", 1), ("join", 2), ("join", 3), ("join", 4), ("join", 5)]
    replies = apply_batch(engine, [_op(failed, ids_a, team_a, o) for o in ops], now)
    assert [r.status for r in replies] == [200, 500, 200, 200, 200]
    assert replies[-1].body["result"]["team"]["status"] == "succeeded"
    rest = apply_batch(engine, [_op(never, ids_b, team_b, o) for o in ops if o[1] != 2], now)
    assert all(r.ok for r in rest)
    assert _outcome(engine, failed, ids_a) == _outcome(engine, never, ids_b)


def test_a_batch_of_joins_locks_each_team_once_and_writes_their_seats_together(engine):
    """The hot-team case: a batch's joins to one team lock and read it once, the join that
    fills it succeeds it from memory, and the seats, the team and its seats' release are
    written one statement each; a join after the success is refused as after a commit."""
    now = datetime.now(UTC)
    tenant_id, ids, team = _lunch_tenant(engine, now)
    joins = [_op(tenant_id, ids, team, ("join", i)) for i in (1, 2, 3, 4, 5)]
    with counted(engine) as seen:
        replies = apply_batch(engine, joins, now)
    assert [r.status for r in replies] == [200] * 4 + [409]
    shown = [r.body["result"]["team"] for r in replies[:4]]
    assert [t["seats_taken"] for t in shown] == [2, 3, 4, 5]
    assert [len(t["members"]) for t in shown] == [2, 3, 4, 5]
    assert [t["status"] for t in shown] == ["open"] * 3 + ["succeeded"]
    assert replies[4].error is not None and replies[4].error.code == "team_closed"
    emitted = [e["type"] for e in replies[3].body["emitted"]]
    assert emitted == ["groupbuy.joined"] + ["groupbuy.succeeded", "voucher.issued"] * 5
    assert seen["SELECT groupbuy_team"] == 1, seen
    assert seen["INSERT groupbuy_seat"] == 1, seen
    assert seen["UPDATE groupbuy_team"] == 1, seen
    assert seen["UPDATE groupbuy_seat"] == 1, seen  # the seats of the team no longer live


def test_after_a_failure_later_events_see_the_steps_held_for_the_batch_end(engine, monkeypatch):
    """An event failing unexpectedly makes the batch forget what it read; a later event of
    the batch then reads a member's instances from the table, which does not hold the steps
    earlier events made yet: it must see them all the same (the team's success moved wx-1
    to `activated`, from where an order makes a customer)."""
    now = datetime.now(UTC)
    together, ids_a, team_a = _lunch_tenant(engine, now)
    apart, ids_b, team_b = _lunch_tenant(engine, now)
    both = {ids_a["wx-5"], ids_b["wx-5"]}  # the same failure in the batch and one by one
    _fail_before_answering(monkeypatch, "message.posted", both, "unexpected")

    def ops(tenant: int, ids: dict[str, int], team: str) -> list[Inbound]:
        joins = [_op(tenant, ids, team, ("join", i)) for i in range(1, 5)]
        order = Inbound(tenant, "bot", "order.placed", {"sequence": 1}, member={"id": "wx-1"})
        return [*joins, _op(tenant, ids, team, ("post", 5)), order]

    batch = apply_batch(engine, ops(together, ids_a, team_a), now)
    singles = [apply_batch(engine, [item], now)[0] for item in ops(apart, ids_b, team_b)]
    assert [r.status for r in batch] == [r.status for r in singles] == [200] * 4 + [500, 200]
    assert {f["state"] for f in batch[-1].body["funnels"]} == {"customer"}
    assert _outcome(engine, together, ids_a) == _outcome(engine, apart, ids_b)


# ── a batch's appends to one list, applied together ──────────────────────────────────────
LIST = {
    "title": "午餐",
    "join_until": "PT20M",
    "open_for": "PT30M",
    "max_lines_per_member": 2,
    "items": [
        {"sku": "pork", "name": "红烧肉饭", "price_fen": 3200, "stock": 3},
        {"sku": "egg", "name": "番茄炒蛋饭", "price_fen": 2600, "stock": 2, "max_per_member": 2},
    ],
}
DINERS = [f"d{i}" for i in range(5)]  # d4 never joins the group
LINE_OPS = st.lists(
    st.one_of(
        st.tuples(
            st.just("append"),
            st.integers(0, 4),
            st.lists(
                st.fixed_dictionaries(
                    {"sku": st.sampled_from(["pork", "egg", "fish"]), "qty": st.integers(1, 3)}
                ),
                min_size=1,
                max_size=2,
            ),
            st.booleans(),  # by the member's id (the member API) or the bot's reference
        ),
        st.tuples(st.just("withdraw"), st.integers(0, 4), st.integers(1, 6)),
        st.tuples(st.just("post"), st.integers(0, 4)),
        st.tuples(st.just("elsewhere"), st.integers(0, 4)),  # another list's append
    ),
    min_size=1,
    max_size=16,
)


def _diners_tenant(engine: Engine, now: datetime) -> tuple[int, dict[str, int], list[str]]:
    tenant_id = tenant_with_funnel(engine, "office-lunch", None, now)
    joined = [
        Inbound(tenant_id, "bot", "member.joined", data={"group_id": "g"}, member={"id": m})
        for m in DINERS[:4]
    ]
    seen = [Inbound(tenant_id, "bot", "member.scanned", data={}, member={"id": DINERS[4]})]
    replies = apply_batch(engine, [*joined, *seen], now)
    ids = {m: r.body["member"]["id"] for m, r in zip(DINERS, replies, strict=True)}
    lists = [
        apply_batch(
            engine,
            [Inbound(tenant_id, "admin", "solitaire.open", {"group": "g", "definition": LIST})],
            now,
        )[0].body["result"]["list"]["id"]
        for _ in range(2)
    ]
    return tenant_id, ids, lists


def _line_op(tenant_id: int, ids: dict[str, int], lists: list[str], op: tuple[Any, ...]) -> Inbound:
    kind, i = op[0], op[1]
    who: dict[str, Any] = {"member_id": ids[DINERS[i]]}
    if kind == "append" and not op[3]:
        who = {"member": {"id": DINERS[i]}}
    if kind == "post":
        return Inbound(tenant_id, "bot", "message.posted", {"group_id": "g"}, **who)
    if kind == "withdraw":
        return Inbound(
            tenant_id, "member", "solitaire.withdraw", {"list": lists[0], "line": op[2]}, **who
        )
    target, items = (lists[0], op[2]) if kind == "append" else (lists[1], [{"sku": "egg"}])
    return Inbound(tenant_id, "member", "solitaire.append", {"list": target, "items": items}, **who)


def _lines_outcome(engine: Engine, tenant_id: int, ids: dict[str, int]) -> dict[str, Any]:
    from app.mechanics.solitaire.models import SolitaireLine, SolitaireList, SolitaireStock

    by_id = {v: k for k, v in ids.items()}
    line_t, list_t, stock_t = (
        t.__table__  # type: ignore[attr-defined]
        for t in (SolitaireLine, SolitaireList, SolitaireStock)
    )
    with engine.connect() as conn:
        lists = conn.execute(
            select(list_t.c.id, list_t.c.status, list_t.c.last_seq, list_t.c.close_reason)
            .where(list_t.c.tenant_id == tenant_id)
            .order_by(list_t.c.id)
        ).all()
        order = {row.id: n for n, row in enumerate(lists)}
        lines = conn.execute(
            select(line_t.c.list_id, line_t.c.seq, line_t.c.member_id, line_t.c["items"])
            .add_columns(line_t.c.status, line_t.c.total_fen)
            .where(line_t.c.list_id.in_(order))
            .order_by(line_t.c.list_id, line_t.c.seq)
        ).all()
        stock = conn.execute(
            select(stock_t.c.list_id, stock_t.c.sku, stock_t.c.reserved)
            .where(stock_t.c.list_id.in_(order))
            .order_by(stock_t.c.list_id, stock_t.c.sku)
        ).all()
    return {
        "lists": [(s, n, why) for _, s, n, why in lists],
        "lines": [(order[x.list_id], x.seq, by_id[x.member_id], x[3], *x[4:]) for x in lines],
        "stock": [(order[lst], sku, n) for lst, sku, n in stock],
    }


@settings(suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(ops=LINE_OPS)
def test_appends_applied_together_end_as_if_applied_one_by_one(engine, ops):
    """A batch's appends to a list are decided in memory and written together (a run); the
    batch answers and leaves exactly what the same commands leave one transaction each:
    refusals (not in the group, line and item limits, sold out, no such item) mixed in,
    the last portion that closes the list, and other events between the appends, which see
    the lines written before them (a withdrawal of a line appended earlier in the batch)."""
    now = OPENS + timedelta(minutes=1)
    together, ids_a, lists_a = _diners_tenant(engine, now)
    alone, ids_b, lists_b = _diners_tenant(engine, now)
    batch = apply_batch(engine, [_line_op(together, ids_a, lists_a, op) for op in ops], now)
    singles = [apply_batch(engine, [_line_op(alone, ids_b, lists_b, op)], now)[0] for op in ops]

    def answer(r: Any) -> Any:
        result = r.body.get("result") or {}
        left = [(i["sku"], i["left"]) for i in result.get("list", {}).get("items", [])]
        return r.status, r.error and (r.error.code, r.error.detail), result.get("line"), left

    assert [answer(r) for r in batch] == [answer(r) for r in singles]
    assert all(r.status != 500 for r in batch)
    assert _lines_outcome(engine, together, ids_a) == _lines_outcome(engine, alone, ids_b)


def test_a_batch_of_appends_to_one_list_writes_each_table_once(engine):
    """Appends to one list in one batch: one statement per table for the events' claims,
    the list, its stock and its lines, however many appends the batch holds."""
    now = OPENS + timedelta(minutes=1)

    def appends(n: int) -> Counter[str]:
        tenant_id, ids, lists = _diners_tenant(engine, now)
        ops = [("append", i, [{"sku": "pork", "qty": 1}], True) for i in range(n)]
        items = [_line_op(tenant_id, ids, lists, op) for op in ops]
        with counted(engine) as seen:
            replies = apply_batch(engine, items, now)
        assert [r.body["result"]["line"] for r in replies] == list(range(1, n + 1))
        return seen

    one, three = appends(1), appends(3)
    assert three["INSERT event"] == 1, three  # the batch's claims: one executemany
    assert three["INSERT solitaire_line"] == 1, three  # one executemany
    assert three["UPDATE solitaire_stock"] == 1, three
    assert three == one, (one, three)


# ── a group's messages: their counters held back and written together ─────────────────────
CHATTERS = ["ann", "bo", "cy"]
SAYS = {
    "post": {"text": "今天的红烧肉很好吃"},
    "ask": {"text": "请问几点可以取餐?"},
    "link": {"text": "看 https://spam.example.com/deal"},  # a share, and a strike
    "word": {"text": "加微信订餐"},  # a listed word: a strike
}
CHAT_OPS = st.lists(
    st.tuples(
        st.sampled_from([*SAYS, "join", "leave", "fail"]),
        st.integers(0, len(CHATTERS) - 1),
    ),
    min_size=1,
    max_size=16,
)


def _chat_tenant(engine: Engine, now: datetime) -> int:
    """office-lunch, with group "g" registered (moderation on, one listed word) and its
    owner "cy", exempt from moderation."""
    from app.mechanics.community.service import group_member_t, group_t, word_t

    tenant_id = tenant_with_funnel(engine, "office-lunch", None, now)
    with engine.begin() as conn:
        conn.execute(
            group_t.insert().values(
                tenant_id=tenant_id,
                group_id="g",
                name="午餐福利群",
                kind="product",
                settings={},
                words_version=1,
                created_at=now,
                updated_at=now,
            )
        )
        conn.execute(word_t.insert().values(tenant_id=tenant_id, group_id="g", word="微信"))
    [owner] = apply_batch(engine, [_chat_op(tenant_id, ("join", 2), 0)], now)
    with engine.begin() as conn:
        conn.execute(
            group_member_t.update()
            .where(group_member_t.c.member_id == owner.body["member"]["id"])
            .values(role="owner")
        )
    return tenant_id


def _chat_op(tenant_id: int, op: tuple[str, int], n: int) -> Inbound:
    kind, who = op
    member = {"id": CHATTERS[who]}
    if kind in ("join", "leave"):
        kind = "member.joined" if kind == "join" else "member.left"
        return Inbound(tenant_id, "bot", kind, {"group_id": "g"}, member=member)
    said = SAYS["word" if kind == "fail" else kind]
    data = {"group_id": "g", "message_id": f"m{n}", **said, "fail": kind == "fail"}
    return Inbound(tenant_id, "bot", "message.posted", data, member=member)


def _chat_outcome(engine: Engine, tenant_id: int) -> dict[str, Any]:
    from app.mechanics.community.service import day_t, decision_t, group_member_t, member_t

    def named(table: Any, *columns: Any) -> list[tuple[Any, ...]]:
        rows = conn.execute(
            select(member_t.c.external_id, *columns)
            .join(member_t, member_t.c.id == table.c.member_id)
            .where(table.c.tenant_id == tenant_id)
            .order_by(member_t.c.external_id, *columns)
        )
        return [tuple(r) for r in rows]

    with engine.connect() as conn:
        g = group_member_t.c
        return {
            "members": named(group_member_t, g.role, g.messages, g.joined_at, g.last_seen_at),
            "warned": named(group_member_t, g.warned_at),
            "days": named(day_t, day_t.c.day, day_t.c.messages, day_t.c.shares, day_t.c.questions),
            "decisions": named(decision_t, decision_t.c.action, decision_t.c.rule),
        }


def _failing_watcher(*args: Any) -> None:
    """Fails a message that asks to, after community's watcher has counted (and perhaps
    moderated) it: the event's savepoint must take all of that back."""
    from app.errors import Refused

    if args[4].get("fail"):
        raise Refused("test_failure", "this message was set to fail")


@settings(suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(ops=CHAT_OPS)
def test_messages_counted_together_end_as_if_counted_one_by_one(engine, ops):
    """A batch's messages add to the members' group and day rows in memory, written once
    (a run); the batch leaves exactly what the same events leave one transaction each:
    moderation's warnings and removals (a removal writes what the batch held back, then
    deletes the row), joins and leaves between the messages, the owner exempt, and messages
    that fail after they were counted (even after a removal wrote the counters)."""
    from unittest import mock

    from app.events import dispatch

    now = OPENS + timedelta(minutes=1)
    together, alone = _chat_tenant(engine, now), _chat_tenant(engine, now)
    with mock.patch.object(dispatch, "WATCHERS", (*dispatch.WATCHERS, _failing_watcher)):
        batch = apply_batch(engine, [_chat_op(together, op, n) for n, op in enumerate(ops)], now)
        singles = [
            apply_batch(engine, [_chat_op(alone, op, n)], now)[0] for n, op in enumerate(ops)
        ]
    assert [(r.status, r.actions) for r in batch] == [(r.status, r.actions) for r in singles]
    assert all(r.status in (200, 409) for r in batch), [r.error for r in batch]
    assert _chat_outcome(engine, together) == _chat_outcome(engine, alone)


def test_a_batch_of_messages_writes_the_group_counters_once(engine):
    """Ten messages in one batch: one write of the members' group rows and one of their day
    rows (on PostgreSQL both in one statement), however many messages the batch holds."""
    now = OPENS + timedelta(minutes=1)

    def messages(n: int) -> Counter[str]:
        tenant_id = _chat_tenant(engine, now)
        ops = [("post", i % len(CHATTERS)) for i in range(n)]
        with counted(engine) as seen:
            replies = apply_batch(
                engine, [_chat_op(tenant_id, op, i) for i, op in enumerate(ops)], now
            )
        assert all(r.ok for r in replies)
        return seen

    one, ten = messages(1), messages(10)
    assert ten["INSERT group_member"] == 1, ten
    assert ten["INSERT group_day"] == 1, ten
    assert one["INSERT group_member"] == 1, one


def test_deferred_work_under_the_batch_savepoint_keeps_what_succeeded(engine):
    """The batch's deferred work runs under the batch's own savepoint: a work that fails
    after writing (here a duplicate key, which on PostgreSQL aborts the transaction until
    rolled back to the savepoint) leaves nothing, the works before and after it and the
    batch's own writes are committed, and the last work's savepoint is left for the commit
    (no RELEASE sent after it)."""
    from app.events.dispatch import BatchCache, _Savepoint, _savepoints_on

    def respond(conn: Any, event_id: int) -> None:
        conn.execute(EventResponse.__table__.insert().values(event_id=event_id, response="{}"))

    def failing(conn: Any) -> int:
        respond(conn, 2)
        respond(conn, 1)  # taken by the first work
        return 1

    cache = BatchCache()
    cache.begin_event()
    cache.defer("a", lambda conn: respond(conn, 1) or 1)
    cache.defer("b", failing)
    cache.defer("c", lambda conn: respond(conn, 3) or 1)
    cache.end_event()
    _savepoints_on(engine)
    sent: list[str] = []
    with engine.connect() as conn, conn.begin():
        respond(conn, 7)  # a write of the batch before its deferred work
        savepoint = _Savepoint(conn)
        run = savepoint._run
        savepoint._run = lambda *statements: (sent.extend(statements), run(*statements))[1]  # type: ignore[method-assign]
        try:
            assert cache.run_deferred(conn, savepoint) == 2
        finally:
            savepoint.close()
    with engine.connect() as conn:
        stored = conn.execute(select(EventResponse.event_id)).scalars().all()  # type: ignore[call-overload]
    assert sorted(stored) == [1, 3, 7]
    name = _Savepoint.NAME
    assert sent == [
        f"SAVEPOINT {name}",  # the first work's
        f"RELEASE SAVEPOINT {name}",
        f"SAVEPOINT {name}",  # the failing work's
        f"ROLLBACK TO SAVEPOINT {name}",
        f"RELEASE SAVEPOINT {name}",
        f"SAVEPOINT {name}",  # the last's, released by the commit
    ]
