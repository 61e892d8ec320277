"""The one write path: every event (webhook, member API, timer) is applied here.

`apply_one` applies one event inside the caller's transaction: it claims the idempotency key
in the event log (or takes the claim its batch made for it: `BatchCache.claim`), finds or
creates the member (and locks the member's row, so two events of
one member never interleave), steps every funnel the member is in or enters, and writes the
instances, stage history, timers and outbox rows; the response reaches the event row with the
batch's others, in one statement before the commit (`BatchCache.run_deferred`).

`Dispatcher` is group commit. Callers hand it events and wait; a writer (a `Lane`: a writer
process of its own, app/events/writer.py, handed each event at once, or a thread of this
process, handed the queue) takes everything that arrived so far, applies each event under
its own SAVEPOINT (an event that fails is rolled
back alone and its caller gets the error), commits once, and only then answers every caller
of the batch. When idle a lone event is written at once; under load what queues while one
batch commits becomes the next batch, so one fsync (SQLite) or one round of WAL flush
(PostgreSQL) serves many events. With several writers (PostgreSQL), the commands on one
contended row (a team's joins, a solitaire list's lines) all go to that row's writer, by
the row, which applies them one after another without waiting, and a batch's solitaire
appends to one list are applied together (a run: `app.mechanics.commands.Run`). Other
events fill the first writer before the next: the first lane with fewer than a batch
(`max_batch`) of events in flight takes them, and a member with events in flight sends the
next to the same lane, so a member's events are applied in the order they came and batches
seldom wait on each other's member locks. Spread over two lanes by member, as they were,
messages made batches half as big, each paying its round trips (a batch of one message cost
the writer and PostgreSQL ~1.3 ms of CPU each, a batch of 30 ~150 and ~100 µs a message):
live, 2,095–2,211 webhooks a second against 2,736–3,062 filling the first lane, the joins
the same. A batch that still hits a deadlock is retried whole, since nothing of it
committed.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
import weakref
import zlib
from collections import Counter, deque
from collections.abc import Callable, Hashable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from datetime import datetime
from functools import partial
from typing import Any, NamedTuple, Protocol

import orjson
from sqlalchemy import (
    Connection,
    Engine,
    Table,
    bindparam,
    delete,
    insert,
    literal_column,
    select,
    update,
)
from sqlalchemy import event as sa_event
from sqlalchemy.exc import DBAPIError, OperationalError

from app.clock import Clock
from app.db import GIVES_WAY, insert_numbered, insert_or_skip, insert_rows, one_of, unnested
from app.engine import MemberState, step
from app.engine.catalogue import BUILTIN_EVENTS
from app.engine.schedule import parse_duration
from app.engine.state import Event, PlannedAction
from app.errors import Conflict, DomainError, NotFound
from app.events.ingest import unknown_type
from app.events.models import EventLog, EventResponse
from app.funnels import store
from app.funnels.pending import EMITTED_COLUMNS, Pending
from app.mechanics.commands import (
    Context,
    DirectAction,
    Emit,
    Handler,
    Run,
    RunLoader,
    WriteThrough,
    lending_runs,
)
from app.mechanics.community import service as community
from app.mechanics.referral import service as referral
from app.mechanics.registry import RUN_COMMANDS, command_for, contended
from app.mechanics.rewards import cards, checkin, points
from app.mechanics.vouchers import service as vouchers
from app.members.models import Member
from app.observability import Metrics
from app.outbox.service import delivery_id, enqueue
from app.prepared import Many, Prepared, as_one
from app.timers.models import Timer

log = logging.getLogger("flywheel.dispatch")

event_t: Table = EventLog.__table__  # type: ignore[attr-defined]
response_t: Table = EventResponse.__table__  # type: ignore[attr-defined]
member_t: Table = Member.__table__  # type: ignore[attr-defined]
timer_t: Table = Timer.__table__  # type: ignore[attr-defined]
TIMER_SOURCE = "timer"
EMITTED_SOURCE = "flywheel"  # events Flywheel emits itself (groupbuy.succeeded, voucher.issued)
DEADLOCK_RETRIES = 3
MAX_CASCADE = 4
# Mechanics that watch plain and emitted events: group membership, activity and moderation,
# referral qualification and refunds, check-in, cards for reviews.
WATCHERS = (
    community.observe,
    referral.observe,
    checkin.observe,
    cards.observe,
)  # an emitted event's funnels may emit more (a voucher issued), this deep
# What watchers read of rows only other transactions change (a chat group's settings), for
# the batch's items, before its first event: read by an event, it took the batch's first
# savepoint, which a batch whose events write nothing of their own (messages) now skips.
PRELOADS = (community.preload,)


@dataclass(frozen=True)
class Inbound:
    """One event on its way into the write path."""

    tenant_id: int
    source: str  # webhook source name, "member", or "timer"
    type: str
    data: dict[str, Any] = field(default_factory=dict)
    key: str | None = None  # idempotency key (webhook-id, Idempotency-Key)
    digest: str | None = None  # SHA-256 of the body the key came with
    occurred_at: datetime | None = None
    member: dict[str, Any] | None = None  # MemberRef fields, by the integration's ids
    member_id: int | None = None  # Flywheel's id (timers, member API)
    timer_id: int | None = None
    instance_id: int | None = None
    timer_key: str | None = None


@dataclass(frozen=True)
class Reply:
    status: int
    body: dict[str, Any]
    replayed: bool = False
    error: DomainError | None = None
    actions: int = 0
    raw: bytes = b""  # the body's exact bytes, as stored

    def content(self) -> bytes:
        return self.raw or orjson.dumps(self.body)

    @property
    def ok(self) -> bool:
        return self.error is None


Deferred = Callable[[Connection], int]  # work after the events; returns actions queued


class _Response(NamedTuple):
    """What an applied event leaves for its rows (see `BatchCache.respond`)."""

    response: dict[str, Any] | None  # an EventResponse row
    member: dict[str, Any] | None  # the member found only now, for the event's row
    item: Inbound


class BatchCache:
    """What one transaction may reuse between its events.

    The tenant's open versions, and rows prefetched for the whole batch with one statement
    each instead of one per event: the batch's members (locked, in id order) and their
    funnel instances. A prefetched row is handed out once, to the first event that asks for
    it, and then forgotten: that event may change it, so later events read it again. Every
    path that writes a member's row or instances first takes the member through this cache
    (`member_by_ref`, `member_by_id`, `instances`), so no event sees a row another event
    already changed. The exception is a member's instances as a funnel step just wrote them
    (`keep_instances`): the member's next step reads those, within the event (a team's
    success steps each member two or three times) and, once the event has ended well, in
    later events of the batch; an event rolled back to its savepoint leaves none behind.
    Timers and sweeps use the cache without prefetching."""

    def __init__(self, *, runs: bool = False) -> None:
        """`runs`: commands may use runs (app.mechanics.commands.Run), for a caller that
        flushes them as `_apply_batch_once` does (before other events and the deferred
        work, and on `WriteThrough`); timers and sweeps apply without."""
        self.runs = runs
        # The batch's funnel-step writes, held for its end (app/funnels/pending.py); timers
        # and sweeps write through.
        self.pending = Pending() if runs else None  # `prefetch` sizes it for the batch
        self._behind: dict[int, dict[int, store.InstanceRow]] = {}  # written, not stored yet
        self.versions: dict[int, list[store.VersionRef]] = {}
        self._members: dict[int, Any] = {}  # member id -> locked row, not yet handed out
        self._by_ref: dict[tuple[int, str], int] = {}  # (tenant, external id) -> member id
        self._instances: dict[int, dict[int, store.InstanceRow]] = {}
        self._written: dict[int, dict[int, store.InstanceRow]] = {}  # by this event's steps
        # Work for after the batch's events (Context.defer): kept per event until it ends
        # well, so an event rolled back to its savepoint leaves nothing behind.
        self._deferred: dict[Hashable, Deferred] = {}
        self._staged: dict[Hashable, Deferred] = {}
        # What applied events leave for their rows, written by one statement each for the
        # batch (`run_deferred`): keyed events' responses (also by key, for a repeat later
        # in the same batch), and the member of events that made theirs.
        self._responses: list[dict[str, Any]] = []
        self._members_found: list[dict[str, Any]] = []
        self._answered: dict[tuple[int, str, str], tuple[str | None, str]] = {}
        self._response: _Response | None = None
        # Runs (app.mechanics.commands.Run): commands on one contended row applied in
        # memory, their writes held back until `flush_runs`. `_touched`: the runs the event
        # in progress used (marked), `_loaded`: those it loaded.
        self._items: Sequence[Inbound] = ()
        self._item: Inbound | None = None
        self._runs: dict[Hashable, Run] = {}
        self._touched: dict[Hashable, Run] = {}
        self._loaded: set[Hashable] = set()
        self.write_through = False  # the event in progress may not use a run
        # The batch's event rows, claimed together before its first event (`claim`): by
        # the item's position, its event id, or None where the key was taken before (a
        # repeat: answered from the stored response). `position` is the item in progress.
        self.position: int | None = None
        self._claims: dict[int, int | None] = {}
        self._claimed_member: dict[int, int | None] = {}  # the member id each claim stored
        self._unclaim: list[int] = []  # claims of events that failed, deleted at the end

    def open_versions(self, conn: Connection, tenant_id: int) -> list[store.VersionRef]:
        hit = self.versions.get(tenant_id)
        if hit is None:
            hit = self.versions[tenant_id] = store.open_versions(conn, tenant_id)
        return hit

    def prefetch(self, conn: Connection, items: Sequence[Inbound]) -> None:
        self._items = items
        refs: dict[int, set[str]] = {}
        ids: dict[int, set[int]] = {}
        for item in items:
            if item.member is not None:
                refs.setdefault(item.tenant_id, set()).add(str(item.member["id"]))
            elif item.member_id is not None:
                ids.setdefault(item.tenant_id, set()).add(item.member_id)
        rows = [
            *(
                r
                for tenant, ext in refs.items()
                for r in _MEMBERS_BY_EXTERNAL.records(
                    conn, {"b_tenant": tenant, "b_ext": sorted(ext)}
                )
            ),
            *(
                r
                for tenant, wanted in ids.items()
                for r in _MEMBERS_BY_ID.records(conn, {"b_tenant": tenant, "b_ids": sorted(wanted)})
            ),
        ]
        for r in rows:
            self._members[r.id] = r
            self._by_ref[(r.tenant_id, r.external_id)] = r.id
        # Funnel instances of the members whose events may step a funnel: not those who only
        # send a run's commands (an append steps none; should one emit, as the append that
        # closes a list does, its members' instances are read then).
        stepping = {
            member_id
            for item in items
            if item.type not in RUN_COMMANDS and (member_id := self.known_member(item)) is not None
        }
        if stepping:
            self._instances = store.instances_of_members(conn, stepping)
        if self.pending is not None:
            self.pending = Pending(sorted(stepping), len(items))
        # Every event that steps funnels reads its tenant's open versions: once, here,
        # before the batch's first savepoint (see PRELOADS).
        for tenant_id in sorted({i.tenant_id for i in items if i.type not in RUN_COMMANDS}):
            self.open_versions(conn, tenant_id)

    def claim(self, conn: Connection, items: Sequence[Inbound], now: datetime) -> None:
        """Claim the batch's event rows with one statement (`INSERT … ON CONFLICT DO
        NOTHING`: on PostgreSQL drawing the ids and answering which rows it made; on
        SQLite an executemany with ids drawn first, then a read of the rows made), instead
        of an INSERT … RETURNING per event: on PostgreSQL a round trip per event, under the
        contended row's lock for a team's joins or a list's appends.
        A key that comes twice in the batch is claimed by its events one by one, as
        `_apply_one` does without a batch (the second waits for the first's outcome)."""
        keys = Counter((i.tenant_id, i.source, i.key) for i in items if i.key is not None)
        todo = [
            (n, item)
            for n, item in enumerate(items)
            if item.key is None or keys[(item.tenant_id, item.source, item.key)] == 1
        ]
        if not todo:
            return
        rows = [_event_row(item, now, self) for _, item in todo]
        if conn.dialect.name == "postgresql":
            numbered = _CLAIM_NUMBERED.rows(conn, as_one(rows))  # (id, made) of each row
            ids = [int(i) for i, _ in numbered]
            made = {int(i) for i, was_made in numbered if was_made}
        else:
            assert self.pending is not None, "claims are the dispatcher's batch's"
            ids = [self.pending.event_id(conn) for _ in todo]  # after the largest given
            for event_id, row in zip(ids, rows, strict=True):
                row["id"] = event_id
            _CLAIM_ROWS.run_many(conn, rows)
            if any(item.key is not None for _, item in todo):
                made = {i for (i,) in _CLAIMED.rows(conn, {"b_ids": ids})}
            else:
                made = set(ids)  # rows without a key never conflict
        for event_id, (n, _), row in zip(ids, todo, rows, strict=True):
            self._claims[n] = event_id if event_id in made else None
            self._claimed_member[n] = row["member_id"]

    def claimed(self) -> tuple[bool, int | None]:
        """(claimed for the batch, its event id or None for a repeat) of the item in
        progress."""
        if self.position is None or self.position not in self._claims:
            return False, None
        return True, self._claims[self.position]

    def claimed_member(self) -> int | None:
        """The member id the batch's claim stored on the row of the item in progress."""
        return self._claimed_member.get(self.position) if self.position is not None else None

    def known_member(self, item: Inbound) -> int | None:
        """The id of the item's member if the batch prefetched (and locked) it: stored on
        the event row from its first write, so that the row is not written again."""
        if item.member is not None:
            return self._by_ref.get((item.tenant_id, str(item.member["id"])))
        if item.member_id is not None and item.member_id in self._members:
            return item.member_id
        return None

    def member_by_ref(self, tenant_id: int, external_id: str) -> Any | None:
        member_id = self._by_ref.get((tenant_id, external_id))
        return self._members.pop(member_id, None) if member_id is not None else None

    def member_by_id(self, conn: Connection, tenant_id: int, member_id: int) -> Any | None:
        hit = self._members.pop(member_id, None)
        if hit is not None and hit.tenant_id == tenant_id:
            return hit
        return _MEMBER_BY_ID.record(conn, {"b_id": member_id, "b_tenant": tenant_id})

    def members_by_ids(
        self, conn: Connection, tenant_id: int, member_ids: Sequence[int]
    ) -> dict[int, Any]:
        """`member_by_id` for several members: those not prefetched (or handed out already)
        read and locked with one statement, in id order (a team's success locks its five)."""
        found: dict[int, Any] = {}
        for member_id in member_ids:
            hit = self._members.pop(member_id, None)
            if hit is not None and hit.tenant_id == tenant_id:
                found[member_id] = hit
        rest = sorted(set(member_ids) - found.keys())
        if rest:
            rows = _MEMBERS_BY_ID.records(conn, {"b_tenant": tenant_id, "b_ids": rest})
            found.update((r.id, r) for r in rows)
        return found

    def new_member(self, member_id: int) -> None:
        """A member this batch made: no funnel instances, no report pairs to read."""
        self._instances[member_id] = {}
        if self.pending is not None:
            self.pending.new_member(member_id)

    def instances(self, conn: Connection, member_id: int) -> dict[int, store.InstanceRow]:
        hit = self._written.pop(member_id, None) or self._instances.pop(member_id, None)
        if hit is not None:
            return hit
        stored = store.member_instances(conn, member_id)
        behind = self._behind.get(member_id)  # what the table does not hold yet
        return {**stored, **behind} if behind else stored

    def keep_instances(self, member_id: int, rows: dict[int, store.InstanceRow]) -> None:
        """The member's instances as this event's step left them (locked, written)."""
        self._written[member_id] = rows

    def drop_instances(self, member_id: int) -> None:
        self._written.pop(member_id, None)
        self._instances.pop(member_id, None)

    def begin_event(self, item: Inbound | None = None) -> None:
        if self.pending is not None:
            self.pending.mark()
        self._staged = {}
        self._written = {}
        self._response = None
        self._item = item

    # ── runs ──
    def run(self, key: Hashable, load: RunLoader) -> Run:
        """The batch's run under `key`, loaded the first time with the batch's other items
        of the same type as peers; marked the first time each event uses it."""
        found = self._runs.get(key)
        if found is None:
            kind = self._item.type if self._item is not None else None
            peers = [(i.member_id, i.data) for i in self._items if i.type == kind]
            found = self._runs[key] = load(peers)
            self._loaded.add(key)
        return self._use(key, found)

    def lend(self, key: Hashable, load: RunLoader | None) -> Run | None:
        """`run` for code with only the connection (`app.mechanics.commands.batch_run`):
        None while the event in progress writes through, or, with no `load`, if no run is
        open under `key`."""
        if self.write_through:
            return None
        if load is not None:
            return self.run(key, load)
        found = self._runs.get(key)
        return self._use(key, found) if found is not None else None

    def _use(self, key: Hashable, found: Run) -> Run:
        if key not in self._touched:
            found.mark()
            self._touched[key] = found
        return found

    def held_back(self, item: Inbound) -> bool:
        """Whether runs hold writes back that `item` may need to read (it is not of every
        open run's kinds, or a timer's): flush them first."""
        if not self._runs:
            return False
        return item.timer_id is not None or any(
            item.type not in run.kinds for run in self._runs.values()
        )

    def flush_runs(self, conn: Connection) -> None:
        """Write what the runs held back, and forget them: other events may change their
        rows now."""
        runs, self._runs = list(self._runs.values()), {}
        for run in runs:
            run.flush(conn)

    def event_failed(self, *, again: bool = False) -> None:
        """The event in progress was rolled back to its savepoint: the runs it used go back
        to their marks, the ones it loaded (their locks released with it) are dropped, and
        its claim is deleted at the end of the batch (kept when it is applied `again`), and
        the rows it left pending are dropped."""
        if self.pending is not None:
            self.pending.event_failed()
        pre, event_id = self.claimed()
        if pre and event_id is not None and not again:
            self._unclaim.append(event_id)
            self._claims[self.position] = None  # type: ignore[index]
        for key, run in self._touched.items():
            if key in self._loaded:
                del self._runs[key]
            else:
                run.undo()
        self._touched, self._loaded = {}, set()

    def respond(
        self, event_id: int, member_id: int | None, stored: int | None, raw: str, item: Inbound
    ) -> None:
        """The event's response, for its rows once the event has ended well: stored
        (`EventResponse`) for an event with an idempotency key, the only kind that can be
        sent again; and its member on its row, if the event found them only now (`stored`:
        the member id its row was claimed with)."""
        self._response = _Response(
            {"event_id": event_id, "response": raw} if item.key is not None else None,
            {"b_id": event_id, "b_member": member_id} if member_id != stored else None,
            item,
        )

    def answered(self, item: Inbound) -> tuple[str | None, str] | None:
        """(digest, response) of an event with the item's key applied earlier in this
        batch, whose row does not hold its response yet."""
        if item.key is None:
            return None
        return self._answered.get((item.tenant_id, item.source, item.key))

    def defer(self, key: Hashable, work: Deferred) -> None:
        self._staged[key] = work

    def end_event(self) -> None:
        """The event applied: what it deferred stays (the latest under each key), and the
        instances it wrote are what later events of the batch read."""
        self._touched, self._loaded = {}, set()
        for key, work in self._staged.items():
            self._deferred.pop(key, None)
            self._deferred[key] = work
        self._staged = {}
        self._instances.update(self._written)
        if self.pending is not None:
            self._behind.update(self._written)
        self._written = {}
        if self._response is not None:
            response, member, item = self._response
            if member is not None:
                self._members_found.append(member)
            if response is not None and item.key is not None:
                self._responses.append(response)
                self._answered[(item.tenant_id, item.source, item.key)] = (
                    item.digest,
                    response["response"],
                )
            self._response = None

    def run_deferred(self, conn: Connection, savepoint: _Savepoint | None = None) -> int:
        """Store the events' responses, then run the deferred work, each under a savepoint of
        its own, before the commit; the number of actions it queued. A failure is logged and
        skipped: deferred work is a message about state that is stored already, and must not
        undo the events. `savepoint`: the batch's (`_apply_batch_once`), which serves the
        deferred work as it served the events, and is left for the commit to release after
        the last work; timers and sweeps, without one, take SQLAlchemy's."""

        def batch_writes() -> None:
            if self.pending is not None:
                self.pending.write(conn)
                self._behind = {}
            self.flush_runs(conn)
            _UNCLAIM.run_many(conn, [{"b_id": i} for i in self._unclaim])
            self._unclaim = []
            responses, self._responses, self._answered = self._responses, [], {}
            members, self._members_found = self._members_found, []
            # One statement each for the batch (an update each took 58 µs of the writer's
            # CPU and 109 µs of its time on PostgreSQL; as an executemany 26 and 36 per event).
            _STORE_RESPONSES.run(conn, responses)
            _SET_MEMBER.run(conn, members)

        if savepoint is None:
            batch_writes()
        else:
            savepoint.outside(batch_writes)
        n, work, self._deferred = 0, list(self._deferred.values()), {}
        for i, run in enumerate(work):
            n += _deferred_once(conn, run, savepoint, last=i == len(work) - 1)
        return n

    def forget(self) -> None:
        """After an event's savepoint rolled back: what it read may be gone with it (not what
        earlier events wrote and the batch holds pending: `_behind`)."""
        self._members.clear()
        self._instances.clear()
        self._written.clear()


# Statements built once (see app.funnels.store); ON CONFLICT needs the dialect's insert.
# The writes every event makes run as Prepared statements (app/prepared.py).
_EVENT_KEY = ["tenant_id", "source", "dedupe_key"]
_CLAIM_KEY = Prepared(insert_or_skip(event_t, _EVENT_KEY, event_t.c.id))
_INSERT_EVENT = Prepared(insert(event_t).returning(event_t.c.id))
# An event row's columns but its id, which the claim draws.
_CLAIMED_ROW = ("dedupe_key", "digest", *EMITTED_COLUMNS)
# The batch's claims: on PostgreSQL one statement that draws the ids and answers which rows
# it made; on SQLite an executemany with the ids drawn first, then a read of the rows made.
_CLAIM_NUMBERED = Prepared(insert_numbered(event_t, _CLAIMED_ROW, _EVENT_KEY))
_CLAIM_ROWS = Prepared(insert_or_skip(event_t, _EVENT_KEY)["sqlite"])
_CLAIMED = Prepared(
    {d: select(event_t.c.id).where(c) for d, c in one_of(event_t.c.id, "b_ids").items()}
)
_UNCLAIM = Prepared(delete(event_t).where(event_t.c.id == bindparam("b_id")))
_FOUND = {"b_id": event_t.c.id, "b_member": event_t.c.member_id}


def _set_member(by: Any) -> Any:
    """Store the member of events that made theirs; `by`: the parameters (binds, or rows)."""
    return update(event_t).where(event_t.c.id == by["b_id"]).values(member_id=by["b_member"])


_SET_MEMBER = Many(
    _set_member(unnested(_FOUND).c),
    _set_member({name: bindparam(name) for name in _FOUND}),
)
_STORE_RESPONSES = Many(insert_rows(response_t, ("event_id", "response")), insert(response_t))
_PRIOR = (
    select(event_t.c.digest, event_t.c.status_code, response_t.c.response)
    .select_from(event_t.outerjoin(response_t, response_t.c.event_id == event_t.c.id))
    .where(
        event_t.c.tenant_id == bindparam("b_tenant"),
        event_t.c.source == bindparam("b_source"),
        event_t.c.dedupe_key == bindparam("b_key"),
    )
)
_MEMBER_BY_EXTERNAL = Prepared(
    select(member_t)
    .where(
        member_t.c.tenant_id == bindparam("b_tenant"), member_t.c.external_id == bindparam("b_ext")
    )
    .with_for_update()
)
_MEMBER_BY_ID = Prepared(
    select(member_t)
    .where(member_t.c.id == bindparam("b_id"), member_t.c.tenant_id == bindparam("b_tenant"))
    .with_for_update()
)


# The batch's members, locked in one order (id), so two writers never wait on each other
# in a cycle over the same members.
def _locked_members(which: Any, tenant: Any = member_t.c.tenant_id) -> Any:
    return (
        select(member_t)
        .where(tenant == bindparam("b_tenant"), which)
        .order_by(member_t.c.id)
        .with_for_update()
    )


_MEMBERS_BY_EXTERNAL = Prepared(
    {d: _locked_members(c) for d, c in one_of(member_t.c.external_id, "b_ext").items()}
)
_BY_IDS = one_of(member_t.c.id, "b_ids")
_MEMBERS_BY_ID = Prepared(
    {
        "postgresql": _locked_members(_BY_IDS["postgresql"]),
        # `tenant_id + 0`: checked on each row found by id, not looked up in the (tenant,
        # external id) index; SQLite's planner, without statistics, read the tenant's
        # whole index for it rather than the few ids of the list.
        "sqlite": _locked_members(_BY_IDS["sqlite"], member_t.c.tenant_id + literal_column("0")),
    }
)
_NEW_MEMBER = Prepared(insert_or_skip(member_t, ["tenant_id", "external_id"], member_t))
_DROP_TIMER = delete(timer_t).where(timer_t.c.id == bindparam("b_id"))


# ── one event ─────────────────────────────────────────────────────────────────────────────
def apply_one(conn: Connection, item: Inbound, now: datetime, cache: BatchCache) -> Reply:
    """Apply one event; the caller owns the transaction (and the event's savepoint) and,
    before committing, calls `cache.run_deferred`."""
    cache.begin_event(item)
    reply = _apply_one(conn, item, now, cache)
    cache.end_event()
    return reply


def _event_row(item: Inbound, now: datetime, cache: BatchCache) -> dict[str, Any]:
    return {
        "tenant_id": item.tenant_id,
        "source": item.source,
        "dedupe_key": item.key,
        "digest": item.digest,
        "type": item.type,
        "member_id": cache.known_member(item),
        "occurred_at": item.occurred_at or now,
        "received_at": now,
        "data": item.data,
        # stored as answered: the row of an event that fails is deleted (`event_failed`)
        "status_code": 200,
    }


def _apply_one(conn: Connection, item: Inbound, now: datetime, cache: BatchCache) -> Reply:
    pre, claimed = cache.claimed()
    if pre:  # the batch claimed it
        if claimed is None:
            return _replay(conn, item, cache)
        event_id, stored = claimed, cache.claimed_member()
    else:
        row = _event_row(item, now, cache)
        if cache.pending is not None:  # (SQLite: not an id the batch gave a pending row)
            row["id"] = cache.pending.event_id(conn)
        event_id = (_CLAIM_KEY if item.key is not None else _INSERT_EVENT).scalar(conn, row)
        if event_id is None:
            return _replay(conn, item, cache)
        stored = row["member_id"]

    handler = command_for(item.type, item.data) if item.timer_id is None else None
    if item.timer_id is not None:
        body, n_actions = _fire_timer(conn, item, event_id, now, cache)
    elif handler is not None:
        body, n_actions = _run_command(conn, item, handler, event_id, now, cache)
    else:
        body, n_actions = _step_funnels(conn, item, event_id, now, cache)
    raw = orjson.dumps(body)
    member_id = body["member"]["id"] if body["member"] else None
    cache.respond(event_id, member_id, stored, raw.decode(), item)
    return Reply(200, body, actions=n_actions, raw=raw)


def _replay(conn: Connection, item: Inbound, cache: BatchCache) -> Reply:
    earlier = cache.answered(item)
    if earlier is not None:
        digest, response, status = *earlier, 200
    else:
        prior = conn.execute(
            _PRIOR, {"b_tenant": item.tenant_id, "b_source": item.source, "b_key": item.key}
        ).one()
        digest, response, status = prior.digest, prior.response, prior.status_code
    if digest != item.digest:
        raise Conflict(
            f'idempotency key "{item.key}" was already used with a different body; '
            "send a new key for a new event, or the same body to repeat the first"
        )
    raw = (response or "{}").encode()
    return Reply(status or 200, orjson.loads(raw), replayed=True, raw=raw)


def _member(
    conn: Connection, tenant_id: int, ref: dict[str, Any], now: datetime, cache: BatchCache
) -> Any:
    """Find the member by the integration's id (creating it on first sight), lock the row,
    and merge what the event says about the profile."""
    key = {"b_tenant": tenant_id, "b_ext": ref["id"]}
    m = cache.member_by_ref(tenant_id, ref["id"]) or _MEMBER_BY_EXTERNAL.record(conn, key)
    if m is None:
        made = _NEW_MEMBER.record(
            conn,
            {
                "tenant_id": tenant_id,
                "external_id": ref["id"],
                "nickname": ref.get("nickname"),
                "unionid": ref.get("unionid"),
                "attributes": ref.get("attributes") or {},
                "created_at": now,
            },
        )
        if made is not None:
            cache.new_member(made.id)
            return made
        # Made by another writer since the read (PostgreSQL): theirs, locked.
        created = _MEMBER_BY_EXTERNAL.record(conn, key)
        assert created is not None
        return created
    changes: dict[str, Any] = {}
    for name in ("nickname", "unionid"):
        if ref.get(name) is not None and ref[name] != getattr(m, name):
            changes[name] = ref[name]
    if ref.get("attributes"):
        merged = {**(m.attributes or {}), **ref["attributes"]}
        if merged != m.attributes:
            changes["attributes"] = merged
    if changes:
        conn.execute(update(member_t).where(member_t.c.id == m.id).values(**changes))
        return conn.execute(select(member_t).where(member_t.c.id == m.id)).one()
    return m


def _profile(m: Any) -> dict[str, Any]:
    return {
        **(m.attributes or {}),
        "id": m.id,
        "external_id": m.external_id,
        "nickname": m.nickname or "",
    }


def _resolve_member(conn: Connection, item: Inbound, now: datetime, cache: BatchCache) -> Any:
    """The event's member, locked: by the integration's reference (created on first sight)
    or by Flywheel's id."""
    if item.member is not None:
        return _member(conn, item.tenant_id, item.member, now, cache)
    assert item.member_id is not None
    m = cache.member_by_id(conn, item.tenant_id, item.member_id)
    if m is None:
        raise NotFound(f"no member {item.member_id}")
    return m


def _step_funnels(
    conn: Connection, item: Inbound, event_id: int, now: datetime, cache: BatchCache
) -> tuple[dict[str, Any], int]:
    m = _resolve_member(conn, item, now, cache)
    versions = cache.open_versions(conn, item.tenant_id)
    if item.type not in BUILTIN_EVENTS:
        custom = {
            name
            for ref in versions
            for name in store.compiled_version(conn, ref).known_events - BUILTIN_EVENTS.keys()
        }
        if item.type not in custom:
            raise unknown_type(item.type, custom)
    outcomes, n_actions, emits = _step_member(
        conn, item.tenant_id, m, item.type, item.data, event_id, now, cache
    )
    more, n_more = _emit_all(conn, item.tenant_id, emits, m.id, now, cache, m)
    return _body(event_id, item, m, outcomes + more), n_actions + n_more


def _step_member(
    conn: Connection,
    tenant_id: int,
    m: Any,
    event_type: str,
    data: dict[str, Any],
    event_id: int,
    now: datetime,
    cache: BatchCache,
) -> tuple[list[dict[str, Any]], int, list[Emit]]:
    """Step every funnel the member (locked) is in, or enters, with one event. Mechanics that
    watch plain events (referral qualification, refunds) see it first."""
    _attribute(conn, m, event_type, data)
    profile = _profile(m)
    versions = cache.open_versions(conn, tenant_id)
    watched = [
        fx
        for watch in WATCHERS
        if (fx := watch(conn, tenant_id, m, event_type, data, event_id, now, versions))
    ]
    instances = cache.instances(conn, m.id)
    candidates: dict[int, store.VersionRef] = {v.funnel_id: v for v in versions}
    for current in instances.values():
        if current.status == "active":
            candidates[current.funnel_id] = current.ref  # members finish the version they began
    event = Event(type=event_type, data=data, id=str(event_id))
    outcomes, n_actions, emits = [], 0, []
    after = dict(instances)  # the member's instances once this step is written
    for fx in watched:
        emits.extend(fx.emits)
        n_actions += _enqueue_direct(
            conn, tenant_id, fx.actions, event_id, event_type, now, cache.pending
        )
    for funnel_id, ref in candidates.items():
        inst = instances.get(funnel_id)
        active = inst is not None and inst.status == "active"
        funnel = store.compiled_version(conn, ref)
        if not active and event_type not in funnel.definition.entry.events:
            continue
        state = inst.member_state(profile) if inst else MemberState(profile=profile)
        outcome = step(funnel, state, event, now)
        result, n, new, written = _persist(
            conn, tenant_id, event_type, m, ref, inst, outcome, state, event_id, now, cache.pending
        )
        if written is not None:
            after[funnel_id] = store.InstanceRow(
                written,
                funnel_id,
                m.id,
                ref.version,
                outcome.state.status,
                None,
                ref,
                outcome.state,
            )
        n_actions += n
        emits.extend(new)
        if outcome.matched or active:
            outcomes.append(result)
    cache.keep_instances(m.id, after)
    return outcomes, n_actions, emits


# First-touch attribution: which event fields say where a member came from. A column is
# written once, by the first event that carries it (a member row already has it: no write).
_ATTRIBUTION = {
    "member.scanned": (("channel", "acquired_channel"),),
    "member.joined": (
        ("channel", "acquired_channel"),
        ("group_id", "acquired_group"),
        ("inviter_id", "invited_by"),
    ),
    "invite.accepted": (("channel", "acquired_channel"), ("inviter_id", "invited_by")),
}


def _attribute(conn: Connection, m: Any, event_type: str, data: dict[str, Any]) -> None:
    fields = _ATTRIBUTION.get(event_type)
    if not fields:
        return
    changes = {
        column: str(data[key])
        for key, column in fields
        if data.get(key) and getattr(m, column) is None
    }
    if changes:
        params = {"b_id": m.id, **{f"b_{c}": v for c, v in changes.items()}}
        _first_touch(frozenset(changes)).run(conn, params)


_FIRST_TOUCH: dict[frozenset[str], Prepared] = {}


def _first_touch(columns: frozenset[str]) -> Prepared:
    """The member row's first-touch columns set where still empty, one statement per set of
    columns (a Core UPDATE built for each member.joined cost ~230 µs; Prepared, ~20)."""
    found = _FIRST_TOUCH.get(columns)
    if found is None:
        found = _FIRST_TOUCH[columns] = Prepared(
            update(member_t)
            .where(member_t.c.id == bindparam("b_id"), *(member_t.c[c].is_(None) for c in columns))
            .values({c: bindparam(f"b_{c}") for c in columns})
        )
    return found


_LOG_EMITTED = Prepared(insert(event_t).returning(event_t.c.id))


def _emit_all(
    conn: Connection,
    tenant_id: int,
    emits: Sequence[Emit],
    actor_id: int | None,
    now: datetime,
    cache: BatchCache,
    actor: Any | None = None,
) -> tuple[list[dict[str, Any]], int]:
    """Log each emitted event and step its member's funnels with it; what those steps emit
    in turn (a voucher issued) follows, at most MAX_CASCADE deep. Returns the actor's
    funnel outcomes and the number of actions queued. `actor`, the actor's row as this
    event last wrote it (locked already), is not read again."""
    queue = deque((e, 1) for e in emits)
    locked: dict[int, Any] = {actor.id: actor} if actor is not None else {}
    wanted = sorted({e.member_id for e in emits} - locked.keys())  # locked in one order
    locked.update(cache.members_by_ids(conn, tenant_id, wanted))
    missing = sorted(set(wanted) - locked.keys())
    if missing:
        raise NotFound(f"no member {missing[0]}")
    outcomes: list[dict[str, Any]] = []
    n_actions = 0
    while queue:
        emit, depth = queue.popleft()
        if depth > MAX_CASCADE:
            raise WritePathError(
                f"events emitted more than {MAX_CASCADE} levels deep ({emit.type}); "
                "a funnel's actions and the events they cause form a loop"
            )
        m = locked.get(emit.member_id)
        if m is None:
            m = locked[emit.member_id] = _lock_member(conn, tenant_id, emit.member_id, cache)
        row = {
            "tenant_id": tenant_id,
            "source": EMITTED_SOURCE,
            "type": emit.type,
            "member_id": emit.member_id,
            "occurred_at": now,
            "received_at": now,
            "data": emit.data,
            "status_code": 200,
        }
        if cache.pending is not None:
            event_id = cache.pending.log_event(conn, row)
        else:
            event_id = _LOG_EMITTED.scalar(conn, row)
        results, n, more = _step_member(
            conn, tenant_id, m, emit.type, emit.data, event_id, now, cache
        )
        n_actions += n
        queue.extend((e, depth + 1) for e in more)
        if emit.member_id == actor_id:
            outcomes.extend(results)
    return outcomes, n_actions


def _lock_member(conn: Connection, tenant_id: int, member_id: int, cache: BatchCache) -> Any:
    m = cache.member_by_id(conn, tenant_id, member_id)
    if m is None:
        raise NotFound(f"no member {member_id}")
    return m


def _run_command(
    conn: Connection,
    item: Inbound,
    handler: Handler,
    event_id: int,
    now: datetime,
    cache: BatchCache,
) -> tuple[dict[str, Any], int]:
    """A mechanic's operation (join a team, redeem a voucher…): the handler decides and
    writes; the events it emits move each member's funnels; its actions join the outbox."""
    actor: list[Any] = []

    def member() -> Any:
        if not actor:
            actor.append(_resolve_member(conn, item, now, cache))
        return actor[0]

    def member_changed(row: Any) -> None:
        actor[:] = [row]

    ctx = Context(
        conn=conn,
        tenant_id=item.tenant_id,
        event_id=event_id,
        now=now,
        source=item.source,
        data=item.data,
        member=member,
        member_changed=member_changed,
        versions=lambda: cache.open_versions(conn, item.tenant_id),
        defer=lambda key, actions: cache.defer(
            key,
            lambda c: _enqueue_direct(c, item.tenant_id, actions(), event_id, item.type, now),
        ),
        run=cache.run if cache.runs and not cache.write_through else None,
    )
    effects = handler(ctx)
    m = actor[0] if actor and actor[0].id == effects.member_id else None
    outcomes, n_actions = _emit_all(
        conn, item.tenant_id, effects.emits, effects.member_id, now, cache, m
    )
    n_actions += _enqueue_direct(
        conn, item.tenant_id, effects.actions, event_id, item.type, now, cache.pending
    )
    if m is None and effects.member_id is not None:
        m = conn.execute(select(member_t).where(member_t.c.id == effects.member_id)).one()
    body = _body(event_id, item, m, outcomes)
    body["result"] = effects.result
    body["emitted"] = [{"type": e.type, "member_id": e.member_id} for e in effects.emits]
    return body, n_actions


_EXTERNAL_ID = Prepared(select(member_t.c.external_id).where(member_t.c.id == bindparam("b_id")))


def _enqueue_direct(
    conn: Connection,
    tenant_id: int,
    actions: Sequence[DirectAction],
    event_id: int,
    event_type: str,
    now: datetime,
    pending: Pending | None = None,
) -> int:
    """Actions a mechanic asked for (a refund, a fulfilment, points), into the outbox."""
    n = 0
    for a in actions:
        external_id = (
            _EXTERNAL_ID.scalar(conn, {"b_id": a.member_id}) if a.member_id is not None else None
        )
        planned = PlannedAction(a.type, a.params, a.source, "send", now)
        n += len(
            enqueue(
                conn,
                tenant_id=tenant_id,
                member_id=a.member_id,
                member_external_id=external_id,
                funnel_id=None,
                funnel_key=None,
                version=None,
                event_id=event_id,
                event_type=event_type,
                actions=[planned],
                now=now,
                pending=pending,
            )
        )
    return n


def _persist(
    conn: Connection,
    tenant_id: int,
    event_type: str,
    m: Any,
    ref: store.VersionRef,
    inst: store.InstanceRow | None,
    outcome: Any,
    before: MemberState,
    event_id: int,
    now: datetime,
    pending: Pending | None = None,
) -> tuple[dict[str, Any], int, list[Emit], int | None]:
    """Write a step's outcome: its answer, the actions queued, the events it emits and the
    id of the instance written (None: the step matched nothing and wrote nothing)."""
    ids: list[int] = []
    actions: list[PlannedAction] = list(outcome.actions)
    emits: list[Emit] = []
    written = None
    if outcome.matched:
        written = store.save_outcome(
            conn,
            tenant_id=tenant_id,
            funnel_id=ref.funnel_id,
            member_id=m.id,
            instance=inst,
            version=ref.version,
            outcome=outcome,
            event_type=event_type,
            event_ref=str(event_id),
            now=now,
            pending=pending,
        )
        actions, emits = _issue_vouchers(conn, tenant_id, m.id, ref, actions, event_id, now)
        actions = _grant_points(conn, tenant_id, m.id, ref, actions, event_id, now)
        ids = enqueue(
            conn,
            tenant_id=tenant_id,
            member_id=m.id,
            member_external_id=m.external_id,
            funnel_id=ref.funnel_id,
            funnel_key=ref.key,
            version=ref.version,
            event_id=event_id,
            event_type=event_type,
            actions=actions,
            now=now,
            pending=pending,
        )
    new = outcome.state
    return (
        {
            "funnel": ref.key,
            "version": ref.version,
            "matched": outcome.matched,
            "reason": outcome.reason,
            "from_state": before.state,
            "state": new.state,
            "stage": new.stage,
            "status": new.status,
            "actions": [
                {
                    "id": delivery_id(i),
                    "type": a.type,
                    "params": dict(a.params),
                    "disposition": a.disposition,
                    "deliver_at": a.deliver_at.isoformat(),
                    "source": a.source,
                }
                for i, a in zip(ids, actions, strict=True)
            ],
            "timers": [
                {"key": t.key, "due_at": t.due_at.isoformat()} for t in outcome.timers_armed
            ],
            "guard_errors": list(outcome.guard_errors),
        },
        len(ids),
        emits,
        written,
    )


def _issue_vouchers(
    conn: Connection,
    tenant_id: int,
    member_id: int,
    ref: store.VersionRef,
    actions: list[PlannedAction],
    event_id: int,
    now: datetime,
) -> tuple[list[PlannedAction], list[Emit]]:
    """A funnel's `issue_voucher` action makes a real voucher (its code goes into the
    action, so the message the merchant sends carries it) and emits `voucher.issued`."""
    out, emits = [], []
    for i, a in enumerate(actions):
        if a.type != "issue_voucher":
            out.append(a)
            continue
        p = a.params
        row, _ = vouchers.issue(
            conn,
            vouchers.new_voucher(
                tenant_id=tenant_id,
                member_id=member_id,
                name=str(p["voucher"]),
                value_fen=p.get("value_fen"),
                discount_percent=p.get("discount_percent"),
                valid_for=parse_duration(str(p.get("valid_for", "P7D"))),
                origin=f"event:{event_id}:{ref.funnel_id}:{i}",
                mechanic=p.get("mechanic") or f"funnel.{ref.key}",
                funnel_id=ref.funnel_id,
                now=now,
            ),
        )
        params = {**p, "code": row.code, "qr": vouchers.QR_PREFIX + row.code}
        params["expires_at"] = row.expires_at.isoformat()
        out.append(replace(a, params=params))
        emits.append(Emit(member_id, "voucher.issued", vouchers.event_data(row)))
    return out, emits


def _grant_points(
    conn: Connection,
    tenant_id: int,
    member_id: int,
    ref: store.VersionRef,
    actions: list[PlannedAction],
    event_id: int,
    now: datetime,
) -> list[PlannedAction]:
    """A funnel's `grant_points` action posts to the member's points ledger (a deduction
    takes at most what the member has: a balance never goes negative); the action, with the
    new balance, still goes to the merchant."""
    out = []
    for i, a in enumerate(actions):
        if a.type != "grant_points":
            out.append(a)
            continue
        wanted = int(a.params.get("points") or 0)
        if wanted < 0:
            wanted = -min(-wanted, points.balance(conn, tenant_id, member_id))
        points.post(
            conn,
            tenant_id,
            member_id,
            wanted,
            f"event:{event_id}:{ref.funnel_id}:{i}",
            now,
            str(a.params.get("reason") or f"funnel {ref.key}"),
        )
        params = {
            **a.params,
            "points": wanted,
            "balance": points.balance(conn, tenant_id, member_id),
        }
        out.append(replace(a, params=params))
    return out


def _body(
    event_id: int, item: Inbound, m: Any | None, funnels: list[dict[str, Any]]
) -> dict[str, Any]:
    return {
        "event_id": event_id,
        "idempotency_key": item.key,
        "type": item.type,
        "member": {"id": m.id, "external_id": m.external_id} if m is not None else None,
        "funnels": funnels,
    }


def _fire_timer(
    conn: Connection, item: Inbound, event_id: int, now: datetime, cache: BatchCache
) -> tuple[dict[str, Any], int]:
    """A due timer: step its one instance with `timer.fired`, and delete the timer row in
    this same transaction (so it fires at most once)."""
    conn.execute(_DROP_TIMER, {"b_id": item.timer_id})
    assert item.member_id is not None
    assert item.instance_id is not None and item.timer_key is not None
    m = _lock_member(conn, item.tenant_id, item.member_id, cache)
    cache.drop_instances(m.id)  # prefetched or not, this member's instances change here
    inst = store.instance_by_id(conn, item.instance_id)
    outcomes, n_actions = [], 0
    if inst is not None:
        funnel = store.compiled_version(conn, inst.ref)
        state = inst.member_state(_profile(m))
        outcome = step(funnel, state, Event.timer_fired(item.timer_key, str(event_id)), now)
        result, n_actions, emits, _ = _persist(
            conn, item.tenant_id, item.type, m, inst.ref, inst, outcome, state, event_id, now
        )
        outcomes.append(result)
        more, n_more = _emit_all(conn, item.tenant_id, emits, m.id, now, cache, m)
        outcomes.extend(more)
        n_actions += n_more
    return _body(event_id, item, m, outcomes), n_actions


# ── batches ───────────────────────────────────────────────────────────────────────────────
def apply_batch(engine: Engine, items: Sequence[Inbound], now: datetime) -> list[Reply]:
    """Apply `items` in one transaction, a savepoint each; commit once. A deadlock (two
    transactions locking the same members in opposite orders) retries the whole batch."""
    for attempt in range(DEADLOCK_RETRIES + 1):
        try:
            return _apply_batch_once(engine, items, now)
        except OperationalError as exc:
            if attempt == DEADLOCK_RETRIES or not _is_retryable(exc):
                raise
            log.warning("batch of %d events retried after %s", len(items), type(exc.orig).__name__)
    raise AssertionError("unreachable")


def _is_retryable(exc: DBAPIError) -> bool:
    code = getattr(exc.orig, "sqlstate", None) or getattr(exc.orig, "pgcode", None)
    return code in ("40P01", "40001")  # deadlock detected, serialization failure


class _Savepoint:
    """A SAVEPOINT per event, sent on the driver's cursor. SQLAlchemy's `begin_nested` does
    the same with bookkeeping that cost more than the event's own statements (about 150 µs
    per event on SQLite); the root transaction stays SQLAlchemy's, and one name serves
    because every savepoint is released or rolled back before the next is taken.

    Ending one event's savepoint and taking the next event's is one round trip on
    PostgreSQL (its simple protocol takes several statements: 64 -> 34 µs of the writer's
    CPU, 86 -> 45 µs of its time); sqlite3 takes one statement at a time, and costs little
    for each. A savepoint rolled back to stays open, fresh, for the next event, and so does
    one the event sent no statement under (an append applied in memory by its batch's run,
    its row claimed with the batch's: on PostgreSQL such an event costs no round trip).

    The batch's first savepoint is taken only when an event first sends a statement (just
    before it): a batch of messages or appends, whose events send none, takes none."""

    NAME = "flywheel_event"

    def __init__(self, conn: Connection) -> None:
        self._cursor = conn.connection.driver_connection.cursor()  # type: ignore[union-attr]
        self._driver_error: type[Exception] = conn.dialect.loaded_dbapi.Error
        self._joined = conn.dialect.name == "postgresql"
        self._open = False  # the savepoint is taken (and neither released nor replaced)
        self._used = False  # a statement ran since it was taken (or rolled back to)
        self._armed = False  # an event is applying: its statements need the savepoint
        # Told of each statement (Prepared's too) by `_before_statement`, one listener on
        # the engine for every batch (`_savepoints_on`): listening on each batch's
        # connection cost ~110 µs. The thread's batch is the one in progress.
        assert conn.engine in _SAVEPOINT_ENGINES, "the engine's listener comes first"
        self._conn = conn
        self._outer = getattr(_IN_PROGRESS, "savepoint", None)  # (a batch within a batch)
        _IN_PROGRESS.savepoint = self

    def close(self) -> None:
        """The batch is done with it."""
        _IN_PROGRESS.savepoint = self._outer

    def _ran(self, *_: Any) -> None:
        if self._armed and not self._open:
            self._run(f"SAVEPOINT {self.NAME}")
            self._open = True
        if self._open:
            self._used = True

    def _run(self, *statements: str) -> None:
        batches = ["; ".join(statements)] if self._joined else statements
        for statement in batches:
            try:
                self._cursor.execute(statement)
            except self._driver_error as exc:
                # Past SQLAlchemy, so said here as it would: the connection (and with it the
                # transaction) is gone, which fails the whole batch as "database unavailable".
                raise OperationalError(statement, None, exc, connection_invalidated=True) from exc

    def begin(self) -> None:
        """The first event's savepoint, taken with its first statement."""
        self._armed = True

    def release(self, *, again: bool) -> None:
        """The event's changes kept; `again`: the next event's savepoint taken."""
        self._armed = again
        if not self._used:
            # Nothing since the savepoint (or none taken): it serves the next event as it
            # is, or, after the last, stays open until the commit (nothing rolls back to it).
            return
        if again:
            self._run(f"RELEASE SAVEPOINT {self.NAME}", f"SAVEPOINT {self.NAME}")
        else:
            self._run(f"RELEASE SAVEPOINT {self.NAME}")
            self._open = False
        self._used = False

    def rollback(self, *, again: bool) -> None:
        """The event's changes undone; `again`: the savepoint kept for the next event."""
        self._armed = again
        if not self._used:
            return
        if again:
            self._run(f"ROLLBACK TO SAVEPOINT {self.NAME}")
        else:
            self._run(f"ROLLBACK TO SAVEPOINT {self.NAME}", f"RELEASE SAVEPOINT {self.NAME}")
            self._open = False
        self._used = False

    def keep(self) -> None:
        """The last changes of the batch kept, only the commit after them: the savepoint is
        left for the commit to release (one round trip less than a RELEASE)."""
        self._armed = self._used = False

    def outside(self, write: Callable[[], None]) -> None:
        """Run `write` (what runs held back for the events before the next) so that the next
        event's failure cannot take it: with no savepoint taken for it, and an open one
        moved past it."""
        armed, self._armed = self._armed, False
        try:
            write()
        finally:
            self._armed = armed
        if self._used:
            self._run(f"RELEASE SAVEPOINT {self.NAME}", f"SAVEPOINT {self.NAME}")
            self._used = False


def _deferred_once(
    conn: Connection, run: Deferred, savepoint: _Savepoint | None, *, last: bool
) -> int:
    """One deferred work under a savepoint of its own (see `BatchCache.run_deferred`): the
    batch's, left for the commit after the `last` work, or else SQLAlchemy's."""
    undo: Callable[[], None]
    kept: Callable[[], None]
    if savepoint is None:
        nested = conn.begin_nested()
        undo, kept = nested.rollback, nested.commit
    else:
        savepoint.begin()
        undo = partial(savepoint.rollback, again=False)
        kept = savepoint.keep if last else partial(savepoint.release, again=False)
    try:
        n = run(conn)
    except OperationalError:
        raise
    except Exception:
        undo()
        log.exception("deferred work after the batch's events failed")
        return 0
    kept()
    return n


_SAVEPOINT_ENGINES: weakref.WeakSet[Engine] = weakref.WeakSet()
_IN_PROGRESS = threading.local()  # .savepoint: the batch's that this thread applies


def _before_statement(conn: Connection, *_: Any) -> None:
    savepoint = getattr(_IN_PROGRESS, "savepoint", None)
    if savepoint is not None and savepoint._conn is conn:
        savepoint._ran()


def _savepoints_on(engine: Engine) -> None:
    """Listen for `_Savepoint`s on the engine's connections (once per engine)."""
    if engine not in _SAVEPOINT_ENGINES:
        sa_event.listen(engine, "before_cursor_execute", _before_statement)
        _SAVEPOINT_ENGINES.add(engine)


def _apply_batch_once(engine: Engine, items: Sequence[Inbound], now: datetime) -> list[Reply]:
    replies: list[Reply] = []
    cache = BatchCache(runs=True)
    _savepoints_on(engine)
    # On SQLite the batch waits for other writers (workers' rounds) to have their turn.
    with (
        engine.connect().execution_options(**{GIVES_WAY: True}) as conn,
        conn.begin(),
        lending_runs(conn, cache.lend),
    ):
        cache.prefetch(conn, items)
        for preload in PRELOADS:
            preload(conn, items)
        cache.claim(conn, items, now)
        savepoint = _Savepoint(conn)
        try:
            if items:
                savepoint.begin()
            for n, item in enumerate(items):
                if cache.held_back(item):
                    _flush_runs(conn, cache, savepoint)
                cache.position = n
                more = n + 1 < len(items)
                replies.append(_apply_item(conn, item, now, cache, savepoint, more=more))
            cache.position = None
            queued = cache.run_deferred(conn, savepoint)
        finally:
            savepoint.close()
    if queued and replies:  # said on a reply, so the commit wakes the outbox's delivery
        replies[-1] = replace(replies[-1], actions=replies[-1].actions + queued)
    return replies


def _flush_runs(conn: Connection, cache: BatchCache, savepoint: _Savepoint) -> None:
    """Write what the runs held back before the next event, outside its savepoint: an event
    that fails must not take earlier events' lines with it."""
    savepoint.outside(lambda: cache.flush_runs(conn))


def _apply_item(
    conn: Connection,
    item: Inbound,
    now: datetime,
    cache: BatchCache,
    savepoint: _Savepoint,
    *,
    more: bool,
) -> Reply:
    """One event under the savepoint open for it; `more`: events follow (take theirs)."""
    try:
        reply = apply_one(conn, item, now, cache)
    except WriteThrough:
        # Nothing written but the event's claim: roll it back, flush, apply it plainly.
        savepoint.rollback(again=True)
        cache.event_failed(again=True)
        _flush_runs(conn, cache, savepoint)
        cache.write_through = True
        try:
            return _apply_item(conn, item, now, cache, savepoint, more=more)
        finally:
            cache.write_through = False
    except DomainError as exc:
        savepoint.rollback(again=more)
        cache.event_failed()
        return Reply(exc.status, {}, error=exc)
    except OperationalError as exc:
        if _is_retryable(exc) or exc.connection_invalidated:
            # The transaction is aborted (retry the batch) or its connection is lost
            # (the whole batch is answered 503; nothing of it was committed).
            raise
        savepoint.rollback(again=more)
        cache.event_failed()
        cache.forget()
        log.exception("event failed in the write path", extra={"fields": _ids(item)})
        return Reply(500, {}, error=WritePathError(str(exc.orig)))
    except Exception as exc:  # a bug for one event must not fail the others
        savepoint.rollback(again=more)
        cache.event_failed()
        cache.forget()
        log.exception("event failed in the write path", extra={"fields": _ids(item)})
        return Reply(500, {}, error=WritePathError(type(exc).__name__))
    savepoint.release(again=more)
    return reply


def _ids(item: Inbound) -> dict[str, Any]:
    return {"tenant_id": item.tenant_id, "source": item.source, "type": item.type}


class WritePathError(DomainError):
    status, code, title = 500, "write_path_error", "The event could not be applied"

    def __init__(self, cause: str) -> None:
        super().__init__(f"the event was not applied and nothing of it was stored ({cause})")


class Lane(Protocol):
    """Applies one lane's batches in order: `apply_batch`, here or elsewhere. `apply`
    answers the batch's replies and the number of events committed in their transaction:
    more than the batch when the lane merged batches, told with the first of them (0 with
    the others), so each commit is counted once."""

    pipelined: bool  # takes the next batch before the last one committed (and merges them)

    def open(self) -> None: ...

    async def apply(self, items: Sequence[Inbound], now: datetime) -> tuple[list[Reply], int]: ...

    def close(self) -> None: ...


class InProcess:
    """A lane applied in this process, by a thread of its own."""

    pipelined = False

    def __init__(self, engine: Engine) -> None:
        self.engine = engine
        self._executor = ThreadPoolExecutor(1, thread_name_prefix="flywheel-writer")

    def open(self) -> None:
        pass

    async def apply(self, items: Sequence[Inbound], now: datetime) -> tuple[list[Reply], int]:
        loop = asyncio.get_running_loop()
        replies = await loop.run_in_executor(self._executor, apply_batch, self.engine, items, now)
        return replies, len(items)

    def close(self) -> None:
        self._executor.shutdown(wait=True)


_Queued = tuple[Inbound, "asyncio.Future[Reply]", float]  # the item, its caller, when queued


class Dispatcher:
    """Group commit in front of `apply_batch` (see the module docstring)."""

    def __init__(
        self,
        engine: Engine,
        clock: Clock,
        metrics: Metrics,
        *,
        writers: int = 1,
        max_batch: int = 256,
        on_commit: Callable[[Sequence[Reply]], None] | None = None,
        lanes: Sequence[Lane] | None = None,
    ) -> None:
        self.engine, self.clock, self.metrics = engine, clock, metrics
        self.max_batch = max_batch
        self.on_commit = on_commit
        # Where each lane's batches are applied: in this process (a thread each), or by a
        # writer process each (app.events.writer).
        self.lanes: list[Lane] = (
            list(lanes) if lanes else [InProcess(engine) for _ in range(writers)]
        )
        self._queues: list[deque[_Queued]] = [deque() for _ in self.lanes]
        self._busy = [False] * len(self.lanes)
        self._in_flight = [0] * len(self.lanes)  # events handed to each lane, not answered
        self._members: dict[str, list[int]] = {}  # member key -> [its lane, events in flight]
        self._tasks: set[asyncio.Task[None]] = set()

    def open(self) -> None:
        for lane in self.lanes:
            lane.open()

    def close(self) -> None:
        for lane in self.lanes:
            lane.close()

    async def submit(self, item: Inbound) -> Reply:
        loop = asyncio.get_running_loop()
        future: asyncio.Future[Reply] = loop.create_future()
        lane, member = self._lane(item)
        self._in_flight[lane] += 1
        if member is not None:
            self._members.setdefault(member, [lane, 0])[1] += 1
        try:
            return await self._submit(item, lane, future)
        finally:
            self._in_flight[lane] -= 1
            if member is not None:
                held = self._members[member]
                held[1] -= 1
                if not held[1]:
                    del self._members[member]

    async def _submit(self, item: Inbound, lane: int, future: asyncio.Future[Reply]) -> Reply:
        loop = asyncio.get_running_loop()
        if self.lanes[lane].pipelined:
            # Sent to the writer process now, from this request's own task. Queued for a
            # drain task instead, it waited behind every request the event loop had ready:
            # a burst of 64 went out as one batch once all 64 were parsed, and the two
            # processes took turns (the writer idle while the service parsed, the service
            # idle while the writer applied; appends: 1,160/s with each at 67% and 33% of a
            # core). Sent one by one, the writer applies the first while the service parses
            # the next, and merges into each transaction what arrived during the last.
            await self._settle(self.lanes[lane], [(item, future, time.perf_counter())])
            return await future
        self._queues[lane].append((item, future, time.perf_counter()))
        if not self._busy[lane]:
            self._busy[lane] = True
            task = loop.create_task(self._drain(lane))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)
        return await future

    def _lane(self, item: Inbound) -> tuple[int, str | None]:
        """The item's lane, and the member key it holds there while in flight (None: a
        command routed by its row, or one lane)."""
        if len(self._queues) == 1:
            return 0, None
        row = contended(item.type, item.data)  # a team, a solitaire list
        if row is not None:
            return zlib.crc32(f"{item.tenant_id}:{row}".encode()) % len(self._queues), None
        who = item.member["id"] if item.member else item.member_id
        member = f"{item.tenant_id}:{who}"
        held = self._members.get(member)
        if held is not None:
            return held[0], member
        flights = self._in_flight
        lane = next((i for i, n in enumerate(flights) if n < self.max_batch), None)
        return (lane if lane is not None else flights.index(min(flights))), member

    async def _drain(self, lane: int) -> None:
        """Hand the lane's queue over, a batch at a time: the queue that builds while one
        batch commits is the next batch. (A pipelined lane is handed each event by `submit`
        and never queues here.)"""
        queue, applier = self._queues[lane], self.lanes[lane]
        try:
            while queue:
                batch = [queue.popleft() for _ in range(min(len(queue), self.max_batch))]
                await self._settle(applier, batch)
        finally:
            self._busy[lane] = False

    async def _settle(self, applier: Lane, batch: list[_Queued]) -> None:
        """Apply one batch and answer each of its callers."""
        try:
            replies, committed = await applier.apply([b[0] for b in batch], self.clock.now())
        except Exception as exc:
            if isinstance(exc, OperationalError):  # an outage: one line, not a trace
                log.warning(  # per batch (each of its callers gets a 503)
                    "database unavailable: a batch of %d events was not applied (%s)",
                    len(batch),
                    type(exc.orig).__name__,
                )
            else:
                log.exception("a batch of %d events failed to commit", len(batch))
            for _, future, _ in batch:
                if not future.done():
                    future.set_exception(exc)
            return
        done = time.perf_counter()
        if committed:
            self.metrics.batch_size.observe(committed)
        for (_, future, started), reply in zip(batch, replies, strict=True):
            self.metrics.dispatch_seconds.observe(done - started)
            if not future.done():
                future.set_result(reply)
        if self.on_commit is not None:
            self.on_commit(replies)

    def run(self, items: Sequence[Inbound]) -> list[Reply]:
        """Apply events synchronously (CLI, workers, tests): the same path, one batch."""
        replies = apply_batch(self.engine, items, self.clock.now())
        if self.on_commit is not None:
            self.on_commit(replies)
        return replies
