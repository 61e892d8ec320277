"""The write path in a process of its own (app/events/writer.py), on both databases: what
it answers is what the in-process writer answers, batches that arrive while it is busy share
its next commit and are still answered one by one, an event refused in one of them fails
alone, and a writer that dies is answered 503 and replaced."""

from __future__ import annotations

import asyncio
import os
import pickle
import signal
from datetime import timedelta

import pytest
from sqlalchemy import Engine, func, select
from sqlalchemy.exc import OperationalError

from app.clock import FrozenClock
from app.errors import FieldProblem, InvalidDefinition, NotFound, Refused
from app.events.dispatch import Dispatcher, Inbound, InProcess, Reply
from app.events.models import EventLog
from app.events.writer import _HEADER, WriterProcess, _dumps
from app.observability import Metrics
from tests.conftest import T0, settings_for, tenant_with_funnel
from tests.factories import welcome


def _joined(tenant_id: int, tag: str, n: int) -> list[Inbound]:
    return [
        Inbound(
            tenant_id,
            "bot",
            "member.joined",
            data={"group_id": "g1"},
            key=f"{tag}-{i}",
            digest=f"{tag}-{i}",
            member={"id": f"{tag}-{i}"},
        )
        for i in range(n)
    ]


def _stored(engine: Engine, tenant_id: int) -> int:
    with engine.connect() as conn:
        return conn.execute(
            select(func.count()).where(EventLog.tenant_id == tenant_id, EventLog.source == "bot")  # type: ignore[arg-type]
        ).scalar_one()


def _writer(engine: Engine) -> WriterProcess:
    return WriterProcess(settings_for(engine.url.render_as_string(hide_password=False)))


def test_batches_sent_while_the_writer_is_busy_share_a_commit_and_fail_alone(engine):
    tenant_id = tenant_with_funnel(engine, "welcome", welcome(), T0)
    first = _joined(tenant_id, "a", 40)
    bad = Inbound(tenant_id, "bot", "no.such.event", key="bad", digest="bad", member={"id": "x"})
    second = [*_joined(tenant_id, "b", 5), bad, *_joined(tenant_id, "c", 5)]
    writer = _writer(engine)

    async def run() -> list[tuple[list, int]]:
        # sent back to back, before the first can have committed: the process takes the
        # second while (or after) it writes the first
        try:
            return await asyncio.gather(writer.apply(first, T0), writer.apply(second, T0))
        finally:
            writer.close()

    (r1, n1), (r2, n2) = asyncio.run(run())
    assert [r.status for r in r1] == [200] * 40
    assert [r.status for r in r2] == [200] * 5 + [422] + [200] * 5
    assert r2[5].error is not None and r2[5].error.code == "invalid_event"
    assert r2[5].error.errors[0].path == "type"
    # answered per batch, committed together or not; a commit's size told once
    assert (n1, n2) in ((40, 11), (51, 0))
    assert r1[0].body["member"]["external_id"] == "a-0" and r2[6].body["idempotency_key"] == "c-0"
    assert _stored(engine, tenant_id) == 50

    # the same events through the in-process writer are replays of what was stored
    async def again() -> tuple[list, int]:
        return await InProcess(engine).apply(first[:3], T0 + timedelta(seconds=1))

    replies, _ = asyncio.run(again())
    assert [r.replayed for r in replies] == [True] * 3
    assert [r.raw for r in replies] == [r.raw for r in r1[:3]]


def test_events_handed_over_together_are_sent_together_and_answered_each_its_own(engine):
    """Ten requests' events in one turn of the event loop go as three messages (at most
    `COALESCE` each): every caller gets its own reply, a bad event fails alone, and each
    commit's size is told once."""
    tenant_id = tenant_with_funnel(engine, "welcome", welcome(), T0)
    events = _joined(tenant_id, "t", 10)
    events[3] = Inbound(tenant_id, "bot", "no.such.event", key="b", digest="b", member={"id": "x"})
    writer = _writer(engine)
    sent: list[int] = []

    async def run() -> list[tuple[list[Reply], int]]:
        await writer._connect()
        assert writer._writer is not None
        write = writer._writer.write
        writer._writer.write = lambda data: sent.append(len(data)) or write(data)  # type: ignore[method-assign]
        try:
            return await asyncio.gather(*(writer.apply([e], T0) for e in events))
        finally:
            writer.close()

    answers = asyncio.run(run())
    assert len(sent) == 3  # 4 + 4 + 2 events
    assert [len(replies) for replies, _ in answers] == [1] * 10
    statuses = [replies[0].status for replies, _ in answers]
    assert statuses == [200] * 3 + [422] + [200] * 6
    externals = [r[0].body["member"]["external_id"] for r, _ in answers if r[0].ok]
    assert externals == [f"t-{i}" for i in range(10) if i != 3]
    assert sum(n for _, n in answers) == 10  # commits, counted once each
    assert _stored(engine, tenant_id) == 9


def test_a_writer_killed_answers_its_batch_503_and_the_next_batch_starts_a_new_one(engine):
    tenant_id = tenant_with_funnel(engine, "welcome", welcome(), T0)
    writer = _writer(engine)

    async def run() -> None:
        replies, _ = await writer.apply(_joined(tenant_id, "a", 1), T0)
        assert replies[0].status == 200
        dead = writer.pid
        assert dead is not None
        os.kill(dead, signal.SIGKILL)
        writer._process.join()  # gone before the next batch is sent to it
        with pytest.raises(OperationalError) as lost:
            await writer.apply(_joined(tenant_id, "b", 3), T0)
        assert lost.value.connection_invalidated  # said as a lost database: a 503
        assert "exited with code -9" in str(lost.value)
        replies, _ = await writer.apply(_joined(tenant_id, "c", 3), T0)
        assert [r.status for r in replies] == [200] * 3
        assert writer.pid not in (None, dead)

    async def closing() -> None:
        try:
            await run()
        finally:
            writer.close()

    asyncio.run(closing())
    assert _stored(engine, tenant_id) == 4  # the batch sent to the dead writer never ran


def test_the_writer_exits_when_the_service_closes_its_end(engine):
    writer = _writer(engine)
    writer.open()
    process = writer._process
    assert process.is_alive()
    writer._socket.close()  # as when the service's process dies: its end of the socket closes
    process.join(30)
    assert process.exitcode == 0
    writer.close()


def test_a_batch_the_service_left_before_its_answer_is_committed_and_the_writer_exits(engine):
    """(The service was killed with a batch in flight: nobody was told it succeeded, and a
    retry with the same key is answered from the log.)"""
    tenant_id = tenant_with_funnel(engine, "welcome", welcome(), T0)
    writer = _writer(engine)
    writer.open()
    process, sock = writer._process, writer._socket
    message = pickle.dumps((_joined(tenant_id, "a", 20), T0))
    sock.sendall(_HEADER.pack(len(message)) + message)
    sock.close()  # gone before the answer
    process.join(30)
    assert process.exitcode == 0  # no traceback about the answer it could not send
    assert _stored(engine, tenant_id) == 20
    writer.close()


def test_domain_errors_cross_the_process_boundary_whole():
    refused = Refused("team_full", "the team is full", [FieldProblem("team", "full")])
    refused.headers["Retry-After"] = "1"
    back = pickle.loads(pickle.dumps(refused))
    assert type(back) is Refused and (back.status, back.code) == (409, "team_full")
    assert (back.detail, back.errors, back.headers) == (
        "the team is full",
        [FieldProblem("team", "full")],
        {"Retry-After": "1"},
    )
    invalid = pickle.loads(pickle.dumps(InvalidDefinition([FieldProblem("states", "empty")])))
    assert invalid.problems == [FieldProblem("states", "empty")] and invalid.status == 422
    assert str(pickle.loads(pickle.dumps(NotFound("no member 7")))) == "no member 7"


class _Unpicklable(Exception):
    def __reduce__(self):  # type: ignore[no-untyped-def]
        raise TypeError("cannot pickle a driver's connection")


def test_an_error_that_does_not_pickle_is_answered_by_its_name_and_text():
    lost = OperationalError("SELECT 1", None, _Unpicklable("server closed the connection"))
    ok, back = pickle.loads(_dumps((False, lost)))
    assert not ok and isinstance(back, OperationalError)
    assert "_Unpicklable: server closed the connection" in str(back)
    ok, other = pickle.loads(_dumps((False, _Unpicklable("boom"))))
    assert isinstance(other, RuntimeError) and str(other) == "_Unpicklable: boom"


class _Recording:
    """A lane that records what it was handed and answers 200."""

    pipelined = False

    def __init__(self) -> None:
        self.items: list[Inbound] = []

    def open(self) -> None:
        pass

    async def apply(self, items, now):  # type: ignore[no-untyped-def]
        self.items.extend(items)
        return [Reply(200, {}) for _ in items], len(items)

    def close(self) -> None:
        pass


def test_commands_on_one_team_or_list_go_to_one_writer_whoever_sends_them():
    """Every join of a team (and every line of a list) queues on that row: one writer takes
    them all, whichever members send them."""
    lanes = [_Recording() for _ in range(4)]
    dispatcher = Dispatcher(None, FrozenClock(T0), Metrics(), lanes=lanes)  # type: ignore[arg-type]

    def command(kind: str, data: dict[str, str], member_id: int) -> Inbound:
        return Inbound(1, "member", kind, data=data, member_id=member_id)

    items = [
        *(command("groupbuy.join", {"team": "tm_hot"}, m) for m in range(40)),
        *(command("solitaire.append", {"list": "sl_hot"}, m) for m in range(40)),
        *(command("groupbuy.open", {"funnel": "f", "campaign": "c"}, m) for m in range(40)),
    ]

    async def send() -> None:
        await asyncio.gather(*(dispatcher.submit(item) for item in items))

    asyncio.run(send())
    where = {id(item): i for i, lane in enumerate(lanes) for item in lane.items}
    assert len(where) == len(items)
    assert len({where[id(i)] for i in items if i.type == "groupbuy.join"}) == 1
    assert len({where[id(i)] for i in items if i.type == "solitaire.append"}) == 1
    assert len({where[id(i)] for i in items if i.type == "groupbuy.open"}) == 1  # below


def test_member_events_fill_the_first_writer_and_a_member_keeps_to_its_writer():
    """Events not routed by a contended row fill the first lane (up to a batch in flight)
    before the next: bigger batches, each paying its round trips once. A member with events
    in flight sends the next to the same lane, so their events are applied in the order
    they came, however full that lane is."""
    lanes = [_Recording() for _ in range(4)]
    dispatcher = Dispatcher(None, FrozenClock(T0), Metrics(), lanes=lanes, max_batch=8)  # type: ignore[arg-type]

    def message(member: str, n: int = 0) -> Inbound:
        return Inbound(1, "bot", "message.posted", data={"n": n}, member={"id": member})

    first = [message(f"m-{i}") for i in range(20)]
    again = [message("m-0", n) for n in (1, 2, 3)]  # m-0's, while its first is in flight

    async def send(items: list[Inbound]) -> None:
        await asyncio.gather(*(dispatcher.submit(item) for item in items))

    asyncio.run(send(first + again))
    members = [[(i.member or {})["id"] for i in lane.items] for lane in lanes]
    assert members[0] == [f"m-{i}" for i in range(8)] + ["m-0"] * 3
    assert members[1] == [f"m-{i}" for i in range(8, 16)]
    assert members[2] == [f"m-{i}" for i in range(16, 20)]
    assert members[3] == []
    assert [i.data["n"] for i in lanes[0].items if (i.member or {})["id"] == "m-0"] == [0, 1, 2, 3]

    asyncio.run(send([message("m-19", 4)]))  # nothing in flight: the first lane again
    assert lanes[0].items[-1].data["n"] == 4
    assert dispatcher._in_flight == [0, 0, 0, 0] and not dispatcher._members


class _Pipelined(_Recording):
    """A lane that merges what it is sent (as the writer process does), recording each
    hand-over and, for each, how many submits had started by then."""

    pipelined = True

    def __init__(self, started: list[int]) -> None:
        super().__init__()
        self.started, self.handed = started, []  # type: ignore[var-annotated]

    async def apply(self, items, now):  # type: ignore[no-untyped-def]
        self.handed.append((len(items), len(self.started)))
        return await super().apply(items, now)


def test_a_writer_process_is_handed_each_event_before_the_next_request_runs():
    """A burst of requests the event loop has ready at once: the first event reaches the
    writer before the second request's handler runs, so the writer applies it while the
    service parses the rest (queued for one hand-over at the end, the two processes took
    turns, each idle while the other worked)."""
    started: list[int] = []
    lane = _Pipelined(started)
    dispatcher = Dispatcher(None, FrozenClock(T0), Metrics(), lanes=[lane])  # type: ignore[arg-type]
    items = [Inbound(1, "member", "solitaire.append", member_id=m) for m in range(8)]

    async def request(item: Inbound) -> Reply:
        started.append(item.member_id or 0)
        return await dispatcher.submit(item)

    async def burst() -> list[Reply]:
        return await asyncio.gather(*(request(item) for item in items))

    replies = asyncio.run(burst())
    assert [r.status for r in replies] == [200] * 8
    assert lane.handed == [(1, n) for n in range(1, 9)]  # one each, as its request ran
    assert lane.items == items
