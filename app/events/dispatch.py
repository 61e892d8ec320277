"""The one write path: every event (webhook, member API, timer) is applied here.

`apply_one` applies one event inside the caller's transaction: it claims the idempotency key
in the event log, finds or creates the member (and locks the member's row, so two events of
one member never interleave), steps every funnel the member is in or enters, and writes the
instances, stage history, timers and outbox rows, then stores the response on the event row.

`Dispatcher` is group commit. Callers hand it events and wait; a writer thread takes
everything queued so far, applies each event under its own SAVEPOINT (an event that fails
is rolled back alone and its caller gets the error), commits once, and only then answers
every caller of the batch. When idle a lone event is written at once; under load the queue
that builds up while one batch commits becomes the next batch, so one fsync (SQLite) or one
round of WAL flush (PostgreSQL) serves many events. With several writers (PostgreSQL), a
member's events always go to the same writer, so batches never wait on each other's member
locks; a batch that still hits a deadlock is retried whole, since nothing of it committed.
"""

from __future__ import annotations

import asyncio
import logging
import time
import zlib
from collections import deque
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

import orjson
from sqlalchemy import Connection, Engine, Table, bindparam, delete, insert, select, update
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.exc import DBAPIError, OperationalError

from app.clock import Clock
from app.engine import MemberState, step
from app.engine.catalogue import BUILTIN_EVENTS
from app.engine.state import Event
from app.errors import Conflict, DomainError, NotFound
from app.events.ingest import unknown_type
from app.events.models import EventLog
from app.funnels import store
from app.members.models import Member
from app.observability import Metrics
from app.outbox.service import delivery_id, enqueue
from app.timers.models import Timer

log = logging.getLogger("flywheel.dispatch")

event_t: Table = EventLog.__table__  # type: ignore[attr-defined]
member_t: Table = Member.__table__  # type: ignore[attr-defined]
timer_t: Table = Timer.__table__  # type: ignore[attr-defined]
TIMER_SOURCE = "timer"
DEADLOCK_RETRIES = 3


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


class BatchCache:
    """What one transaction may reuse between its events: the tenant's open versions."""

    def __init__(self) -> None:
        self.versions: dict[int, list[store.VersionRef]] = {}

    def open_versions(self, conn: Connection, tenant_id: int) -> list[store.VersionRef]:
        hit = self.versions.get(tenant_id)
        if hit is None:
            hit = self.versions[tenant_id] = store.open_versions(conn, tenant_id)
        return hit


# Statements built once (see app.funnels.store); ON CONFLICT needs the dialect's insert.
def _on_conflict_insert(table: Table, keys: list[str], returning: bool) -> dict[str, Any]:
    out = {}
    for name, dialect in (("postgresql", postgresql), ("sqlite", sqlite)):
        stmt = dialect.insert(table).on_conflict_do_nothing(index_elements=keys)
        out[name] = stmt.returning(table.c.id) if returning else stmt
    return out


_CLAIM_KEY = _on_conflict_insert(event_t, ["tenant_id", "source", "dedupe_key"], returning=True)
_INSERT_EVENT = insert(event_t).returning(event_t.c.id)
_RESPOND = (
    update(event_t)
    .where(event_t.c.id == bindparam("b_id"))
    .values(
        member_id=bindparam("b_member"),
        status_code=bindparam("b_status"),
        response=bindparam("b_response"),
    )
)
_PRIOR = select(event_t.c.digest, event_t.c.status_code, event_t.c.response).where(
    event_t.c.tenant_id == bindparam("b_tenant"),
    event_t.c.source == bindparam("b_source"),
    event_t.c.dedupe_key == bindparam("b_key"),
)
_MEMBER_BY_EXTERNAL = (
    select(member_t)
    .where(
        member_t.c.tenant_id == bindparam("b_tenant"), member_t.c.external_id == bindparam("b_ext")
    )
    .with_for_update()
)
_MEMBER_BY_ID = (
    select(member_t)
    .where(member_t.c.id == bindparam("b_id"), member_t.c.tenant_id == bindparam("b_tenant"))
    .with_for_update()
)
_NEW_MEMBER = _on_conflict_insert(member_t, ["tenant_id", "external_id"], returning=False)
_DROP_TIMER = delete(timer_t).where(timer_t.c.id == bindparam("b_id"))


# ── one event ─────────────────────────────────────────────────────────────────────────────
def apply_one(conn: Connection, item: Inbound, now: datetime, cache: BatchCache) -> Reply:
    row = {
        "tenant_id": item.tenant_id,
        "source": item.source,
        "dedupe_key": item.key,
        "digest": item.digest,
        "type": item.type,
        "occurred_at": item.occurred_at or now,
        "received_at": now,
        "data": item.data,
    }
    if item.key is not None:
        event_id = conn.execute(_CLAIM_KEY[conn.dialect.name], row).scalar()
        if event_id is None:
            return _replay(conn, item)
    else:
        event_id = conn.execute(_INSERT_EVENT, row).scalar_one()

    if item.timer_id is not None:
        body, n_actions = _fire_timer(conn, item, event_id, now)
    else:
        body, n_actions = _step_funnels(conn, item, event_id, now, cache)
    raw = orjson.dumps(body)
    conn.execute(
        _RESPOND,
        {
            "b_id": event_id,
            "b_member": body["member"]["id"],
            "b_status": 200,
            "b_response": raw.decode(),
        },
    )
    return Reply(200, body, actions=n_actions, raw=raw)


def _replay(conn: Connection, item: Inbound) -> Reply:
    prior = conn.execute(
        _PRIOR, {"b_tenant": item.tenant_id, "b_source": item.source, "b_key": item.key}
    ).one()
    if prior.digest != item.digest:
        raise Conflict(
            f'idempotency key "{item.key}" was already used with a different body; '
            "send a new key for a new event, or the same body to repeat the first"
        )
    raw = (prior.response or "{}").encode()
    return Reply(prior.status_code or 200, orjson.loads(raw), replayed=True, raw=raw)


def _member(conn: Connection, tenant_id: int, ref: dict[str, Any], now: datetime) -> Any:
    """Find the member by the integration's id (creating it on first sight), lock the row,
    and merge what the event says about the profile."""
    key = {"b_tenant": tenant_id, "b_ext": ref["id"]}
    m = conn.execute(_MEMBER_BY_EXTERNAL, key).first()
    if m is None:
        conn.execute(
            _NEW_MEMBER[conn.dialect.name],
            {
                "tenant_id": tenant_id,
                "external_id": ref["id"],
                "nickname": ref.get("nickname"),
                "unionid": ref.get("unionid"),
                "attributes": ref.get("attributes") or {},
                "created_at": now,
            },
        )
        return conn.execute(_MEMBER_BY_EXTERNAL, key).one()
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


def _step_funnels(
    conn: Connection, item: Inbound, event_id: int, now: datetime, cache: BatchCache
) -> tuple[dict[str, Any], int]:
    if item.member is not None:
        m = _member(conn, item.tenant_id, item.member, now)
    else:
        m = conn.execute(
            _MEMBER_BY_ID, {"b_id": item.member_id, "b_tenant": item.tenant_id}
        ).first()
        if m is None:
            raise NotFound(f"no member {item.member_id}")
    profile = _profile(m)
    versions = cache.open_versions(conn, item.tenant_id)
    instances = store.member_instances(conn, m.id)
    if item.type not in BUILTIN_EVENTS:
        custom = {
            name
            for ref in versions
            for name in store.compiled_version(conn, ref).known_events - BUILTIN_EVENTS.keys()
        }
        if item.type not in custom:
            raise unknown_type(item.type, custom)

    candidates: dict[int, store.VersionRef] = {v.funnel_id: v for v in versions}
    for current in instances.values():
        if current.status == "active":
            candidates[current.funnel_id] = current.ref  # members finish the version they began
    event = Event(type=item.type, data=item.data, id=str(event_id))
    outcomes, n_actions = [], 0
    for funnel_id, ref in candidates.items():
        inst = instances.get(funnel_id)
        active = inst is not None and inst.status == "active"
        funnel = store.compiled_version(conn, ref)
        if not active and item.type not in funnel.definition.entry.events:
            continue
        state = MemberState.from_json(inst.data, profile) if inst else MemberState(profile=profile)
        outcome = step(funnel, state, event, now)
        result, n = _persist(conn, item, m, ref, inst, outcome, state, event_id, now)
        n_actions += n
        if outcome.matched or active:
            outcomes.append(result)
    return _body(event_id, item, m, outcomes), n_actions


def _persist(
    conn: Connection,
    item: Inbound,
    m: Any,
    ref: store.VersionRef,
    inst: store.InstanceRow | None,
    outcome: Any,
    before: MemberState,
    event_id: int,
    now: datetime,
) -> tuple[dict[str, Any], int]:
    ids: list[int] = []
    if outcome.matched:
        store.save_outcome(
            conn,
            tenant_id=item.tenant_id,
            funnel_id=ref.funnel_id,
            member_id=m.id,
            instance=inst,
            version=ref.version,
            outcome=outcome,
            event_type=item.type,
            event_ref=str(event_id),
            now=now,
        )
        ids = enqueue(
            conn,
            tenant_id=item.tenant_id,
            member_id=m.id,
            member_external_id=m.external_id,
            funnel_id=ref.funnel_id,
            funnel_key=ref.key,
            version=ref.version,
            event_id=event_id,
            event_type=item.type,
            actions=outcome.actions,
            now=now,
        )
    new = outcome.state
    return {
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
            for i, a in zip(ids, outcome.actions, strict=True)
        ],
        "timers": [{"key": t.key, "due_at": t.due_at.isoformat()} for t in outcome.timers_armed],
        "guard_errors": list(outcome.guard_errors),
    }, len(ids)


def _body(event_id: int, item: Inbound, m: Any, funnels: list[dict[str, Any]]) -> dict[str, Any]:
    return {
        "event_id": event_id,
        "idempotency_key": item.key,
        "type": item.type,
        "member": {"id": m.id, "external_id": m.external_id},
        "funnels": funnels,
    }


def _fire_timer(
    conn: Connection, item: Inbound, event_id: int, now: datetime
) -> tuple[dict[str, Any], int]:
    """A due timer: step its one instance with `timer.fired`, and delete the timer row in
    this same transaction (so it fires at most once)."""
    conn.execute(_DROP_TIMER, {"b_id": item.timer_id})
    m = conn.execute(_MEMBER_BY_ID, {"b_id": item.member_id, "b_tenant": item.tenant_id}).one()
    assert item.instance_id is not None and item.timer_key is not None
    inst = store.instance_by_id(conn, item.instance_id)
    outcomes, n_actions = [], 0
    if inst is not None:
        funnel = store.compiled_version(conn, inst.ref)
        state = MemberState.from_json(inst.data, _profile(m))
        outcome = step(funnel, state, Event.timer_fired(item.timer_key, str(event_id)), now)
        result, n_actions = _persist(conn, item, m, inst.ref, inst, outcome, state, event_id, now)
        outcomes.append(result)
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


def _apply_batch_once(engine: Engine, items: Sequence[Inbound], now: datetime) -> list[Reply]:
    replies: list[Reply] = []
    cache = BatchCache()
    with engine.connect() as conn, conn.begin():
        for item in items:
            savepoint = conn.begin_nested()
            try:
                reply = apply_one(conn, item, now, cache)
            except DomainError as exc:
                savepoint.rollback()
                replies.append(Reply(exc.status, {}, error=exc))
                continue
            except OperationalError as exc:
                if _is_retryable(exc):
                    raise  # the transaction is aborted: retry the batch
                savepoint.rollback()
                log.exception("event failed in the write path", extra={"fields": _ids(item)})
                replies.append(Reply(500, {}, error=WritePathError(str(exc.orig))))
                continue
            except Exception as exc:  # a bug for one event must not fail the others
                savepoint.rollback()
                log.exception("event failed in the write path", extra={"fields": _ids(item)})
                replies.append(Reply(500, {}, error=WritePathError(type(exc).__name__)))
                continue
            savepoint.commit()
            replies.append(reply)
    return replies


def _ids(item: Inbound) -> dict[str, Any]:
    return {"tenant_id": item.tenant_id, "source": item.source, "type": item.type}


class WritePathError(DomainError):
    status, code, title = 500, "write_path_error", "The event could not be applied"

    def __init__(self, cause: str) -> None:
        super().__init__(f"the event was not applied and nothing of it was stored ({cause})")


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
    ) -> None:
        self.engine, self.clock, self.metrics = engine, clock, metrics
        self.max_batch = max_batch
        self.on_commit = on_commit
        self._queues: list[deque[tuple[Inbound, asyncio.Future[Reply], float]]] = [
            deque() for _ in range(writers)
        ]
        self._busy = [False] * writers
        self._executor = ThreadPoolExecutor(writers, thread_name_prefix="flywheel-writer")
        self._tasks: set[asyncio.Task[None]] = set()

    def close(self) -> None:
        self._executor.shutdown(wait=True)

    async def submit(self, item: Inbound) -> Reply:
        loop = asyncio.get_running_loop()
        future: asyncio.Future[Reply] = loop.create_future()
        lane = self._lane(item)
        self._queues[lane].append((item, future, time.perf_counter()))
        if not self._busy[lane]:
            self._busy[lane] = True
            task = loop.create_task(self._drain(lane))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)
        return await future

    def _lane(self, item: Inbound) -> int:
        if len(self._queues) == 1:
            return 0
        who = item.member["id"] if item.member else str(item.member_id)
        return zlib.crc32(f"{item.tenant_id}:{who}".encode()) % len(self._queues)

    async def _drain(self, lane: int) -> None:
        loop = asyncio.get_running_loop()
        queue = self._queues[lane]
        try:
            while queue:
                batch = [queue.popleft() for _ in range(min(len(queue), self.max_batch))]
                items = [b[0] for b in batch]
                try:
                    replies = await loop.run_in_executor(
                        self._executor, apply_batch, self.engine, items, self.clock.now()
                    )
                except Exception as exc:
                    log.exception("a batch of %d events failed to commit", len(batch))
                    for _, future, _ in batch:
                        if not future.done():
                            future.set_exception(exc)
                    continue
                done = time.perf_counter()
                self.metrics.batch_size.observe(len(batch))
                for (_, future, started), reply in zip(batch, replies, strict=True):
                    self.metrics.dispatch_seconds.observe(done - started)
                    if not future.done():
                        future.set_result(reply)
                if self.on_commit is not None:
                    self.on_commit(replies)
        finally:
            self._busy[lane] = False

    def run(self, items: Sequence[Inbound]) -> list[Reply]:
        """Apply events synchronously (CLI, workers, tests): the same path, one batch."""
        replies = apply_batch(self.engine, items, self.clock.now())
        if self.on_commit is not None:
            self.on_commit(replies)
        return replies
