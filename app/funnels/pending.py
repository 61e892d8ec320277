"""A batch's funnel-step writes, held until the batch's end and written one statement per
table (`Pending`).

A team's success steps five members' funnels and logs eleven emitted events: each step wrote
its instance, closed and opened stage-history rows, its report pairs, dropped and armed its
timers and queued its actions, one statement each: ~23 statements a join, most of the
writer's time. None of those rows is read again by a later event of the batch, except
through what the batch keeps in memory (a member's instances, `BatchCache`), and the report
pairs' first entries (read here, with the pending ones laid over). So the dispatcher's batch
hands them to a `Pending` and writes them all before its responses and its commit, in
foreign-key order: on PostgreSQL one statement per kind of row (the rows as one JSON
parameter, `app.prepared.Many`), on SQLite an executemany each. (The write path's own reads
of the event log look for inbound events only, `order.paid` and `order.refunded`, which no
mechanic emits: an emitted event's row is never looked for before the batch's end.)

What needs ids before the rows exist (an emitted event's id is its step's cause, an
action's id is in the answer) takes them from the tables' own counters first: on SQLite,
whose batch holds the write lock, the next after the largest given (every event row and
outbox row the batch writes takes its id so, so none collides); on PostgreSQL drawn from
the sequence in blocks, the first four per event of the batch (at least 16), then twice as
many each time (ids drawn and not used are gaps, as a rolled-back insert's are; the
outbox's `act_<id>` are ordered by number, not as text).

An event that fails gives back what it added (`mark`, `event_failed`): its savepoint took
its other writes. Timers and sweeps, which apply one item per savepoint of
SQLAlchemy's, write through (no `Pending`).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

from sqlalchemy import Connection, Table, bindparam, delete, insert, select, text, update

from app.db import insert_rows, next_id_sql, one_of, unnested
from app.events.models import EventLog
from app.funnels.models import FunnelInstance, StageHistory, StagePair
from app.outbox.models import Outbox
from app.prepared import Many, Prepared
from app.timers.models import Timer

event_t: Table = EventLog.__table__  # type: ignore[attr-defined]
instance_t: Table = FunnelInstance.__table__  # type: ignore[attr-defined]
history_t: Table = StageHistory.__table__  # type: ignore[attr-defined]
pair_t: Table = StagePair.__table__  # type: ignore[attr-defined]
timer_t: Table = Timer.__table__  # type: ignore[attr-defined]
outbox_t: Table = Outbox.__table__  # type: ignore[attr-defined]

FIRST_BLOCK = 16  # the fewest ids drawn from a PostgreSQL sequence at once

EMITTED_COLUMNS = (  # an emitted event's row: no key, no digest (and its id)
    "tenant_id",
    "source",
    "type",
    "member_id",
    "occurred_at",
    "received_at",
    "data",
    "status_code",
)
OUTBOX_COLUMNS = (
    "id",
    "tenant_id",
    "member_id",
    "event_id",
    "funnel_id",
    "source",
    "type",
    "payload",
    "status",
    "order_at",
    "next_attempt_at",
    "attempts",
    "created_at",
)
HISTORY_COLUMNS = (
    "tenant_id",
    "funnel_id",
    "member_id",
    "instance_id",
    "version",
    "campaign",
    "stage",
    "state",
    "entered_at",
    "entered_by",
    "entered_event_id",
    "left_at",
    "left_by",
)
PAIR_COLUMNS = (
    "tenant_id",
    "funnel_id",
    "member_id",
    "version",
    "a",
    "b",
    "at_us",
    "delay_us",
    "campaign",
    "rolled",
)
TIMER_COLUMNS = (
    "tenant_id",
    "member_id",
    "funnel_id",
    "instance_id",
    "key",
    "due_at",
    "attempts",
    "created_at",
)
_INSTANCE_VALUES = ("version", "status", "state", "stage", "data", "updated_at")


def _inserts(table: Table, names: Sequence[str]) -> Many:
    return Many(insert_rows(table, names), insert(table))


def _instances_set(by: Any) -> Any:
    return (
        update(instance_t)
        .where(instance_t.c.id == by["b_id"])
        .values({c: by[f"b_{c}"] for c in _INSTANCE_VALUES})
    )


_INSTANCE_KEYS = {"b_id": instance_t.c.id, **{f"b_{c}": instance_t.c[c] for c in _INSTANCE_VALUES}}
_SET_INSTANCES = Many(
    _instances_set(unnested(_INSTANCE_KEYS).c),
    _instances_set({k: bindparam(k) for k in _INSTANCE_KEYS}),
)
_CLOSE_KEYS = {
    "b_instance": history_t.c.instance_id,
    "b_at": history_t.c.left_at,
    "b_by": history_t.c.left_by,
}


def _close(by: Any) -> Any:
    return (
        update(history_t)
        .where(history_t.c.instance_id == by["b_instance"], history_t.c.left_at.is_(None))
        .values(left_at=by["b_at"], left_by=by["b_by"])
    )


_CLOSE_STAGES = Many(
    _close(unnested(_CLOSE_KEYS).c), _close({k: bindparam(k) for k in _CLOSE_KEYS})
)
_DROP_KEYS = {"b_instance": timer_t.c.instance_id, "b_key": timer_t.c.key}


def _drop(by: Any) -> Any:
    return delete(timer_t).where(
        timer_t.c.instance_id == by["b_instance"], timer_t.c.key == by["b_key"]
    )


_DROP_TIMERS = Many(_drop(unnested(_DROP_KEYS).c), _drop({k: bindparam(k) for k in _DROP_KEYS}))
_LOG_EVENTS = _inserts(event_t, ("id", *EMITTED_COLUMNS))
_OPEN_STAGES = _inserts(history_t, HISTORY_COLUMNS)
_ADD_PAIRS = _inserts(pair_t, PAIR_COLUMNS)
_ARM_TIMERS = _inserts(timer_t, TIMER_COLUMNS)
_ENQUEUE = _inserts(outbox_t, OUTBOX_COLUMNS)


def _last_id(table: str) -> Prepared:
    """SQLite: the largest id the table ever gave (AUTOINCREMENT's record, or its rows')."""
    return Prepared(
        text(
            f"SELECT max(coalesce((SELECT seq FROM sqlite_sequence WHERE name = '{table}'), 0),"  # noqa: S608 - a table's own name
            f" coalesce((SELECT max(id) FROM {table}), 0))"
        )
    )


def _drawn(table: str) -> Prepared:
    """PostgreSQL: the next `n` ids of the table's sequence."""
    return Prepared(
        text(
            f"SELECT {next_id_sql(table)}"  # noqa: S608 - a table's own name
            " FROM generate_series(1, :n)"
        ).bindparams(bindparam("n"))
    )


# Each table's two statements, compiled once for the process (made for each batch, they
# were compiled again by each batch's first use: ~4% of a small batch's time).
_ID_STATEMENTS = {table: (_last_id(table), _drawn(table)) for table in ("event", "outbox")}


class _Ids:
    """Ids handed out ahead of their rows (see the module docstring)."""

    def __init__(self, table: str, block: int) -> None:
        self._last, self._draw = _ID_STATEMENTS[table]
        self._next: int | None = None  # SQLite: the next id to give
        self._drawn: list[int] = []  # PostgreSQL: drawn and not given yet, last first
        self._block = block

    def take(self, conn: Connection) -> int:
        if conn.dialect.name == "postgresql":
            if not self._drawn:
                drawn = self._draw.rows(conn, {"n": self._block})
                self._drawn, self._block = [int(i) for (i,) in drawn][::-1], self._block * 2
            return self._drawn.pop()
        if self._next is None:
            self._next = int(self._last.rows(conn, {})[0][0]) + 1
        given, self._next = self._next, self._next + 1
        return given


_FIRSTS_OF = Prepared(
    {
        dialect: select(
            pair_t.c.member_id, pair_t.c.version, pair_t.c.a, pair_t.c.at_us, pair_t.c.campaign
        ).where(pair_t.c.funnel_id == bindparam("b_funnel"), members, pair_t.c.a == pair_t.c.b)
        for dialect, members in one_of(pair_t.c.member_id, "b_members").items()
    }
)


class Pending:
    """Rows a batch writes at its end, in the order its events made them; `mark` and
    `event_failed` frame each event. `members`: the batch's own (locked before its first
    event), whose report pairs are read together when the first of them needs theirs."""

    def __init__(self, members: Sequence[int] = (), items: int = 0) -> None:
        self.events: list[dict[str, Any]] = []
        self.instances: dict[int, dict[str, Any]] = {}  # instance id -> its latest values
        self.stages: list[tuple[str, Any]] = []  # ("close", params) | ("open", row)
        self.pairs: list[dict[str, Any]] = []
        self.timers: dict[tuple[int, str], dict[str, Any] | None] = {}  # None: dropped
        self.actions: list[dict[str, Any]] = []
        block = max(FIRST_BLOCK, 4 * items)
        self._event_ids, self._action_ids = _Ids("event", block), _Ids("outbox", block)
        self.members = set(members)
        # The table's first entries (member, version, a, at_us, campaign) by (funnel,
        # member): the member's lock keeps them as read until the batch writes its own.
        self._stored: dict[tuple[int, int], list[tuple[Any, ...]]] = {}
        self._undo: list[Callable[[], None]] = []  # what an event failing gives back
        self._new: set[int] = set()  # members the batch made: no first entries stored

    def __bool__(self) -> bool:
        return bool(
            self.events
            or self.instances
            or self.stages
            or self.pairs
            or self.timers
            or self.actions
        )

    # ── events ──
    def mark(self) -> None:
        """An event begins: what it adds is given back if it fails."""
        self._undo = []

    def event_failed(self) -> None:
        for undo in reversed(self._undo):
            undo()
        self._undo = []

    def _appended(self, rows: list[Any], row: Any) -> None:
        rows.append(row)
        self._undo.append(rows.pop)

    def _set(self, rows: dict[Any, Any], key: Any, value: Any) -> None:
        missing = object()
        before = rows.get(key, missing)
        rows[key] = value

        def undo() -> None:
            if before is missing:
                del rows[key]
            else:
                rows[key] = before

        self._undo.append(undo)

    # ── rows ──
    def event_id(self, conn: Connection) -> int:
        """An id for an event row written now (SQLite: none may collide with those given)."""
        return self._event_ids.take(conn)

    def log_event(self, conn: Connection, row: dict[str, Any]) -> int:
        """An emitted event's row; its id."""
        row = {**row, "id": self._event_ids.take(conn)}
        self._appended(self.events, row)
        return int(row["id"])

    def update_instance(self, instance_id: int, values: dict[str, Any]) -> None:
        self._set(self.instances, instance_id, values)

    def close_stage(self, params: dict[str, Any]) -> None:
        self._appended(self.stages, ("close", params))

    def open_stage(self, row: dict[str, Any]) -> None:
        self._appended(self.stages, ("open", row))

    def add_pairs(self, rows: list[dict[str, Any]]) -> None:
        for row in rows:
            self._appended(self.pairs, row)

    def firsts(
        self, conn: Connection, funnel_id: int, member_id: int, version: int
    ) -> list[tuple[Any, ...]]:
        """A member's first entries into the funnel's stages, (version, a, at_us,
        campaign) of `version` and of all versions (0): the table's, read once a batch
        (for all of the batch's members at once), and those pending."""
        key = (funnel_id, member_id)
        if key not in self._stored and member_id in self._new:
            self._stored[key] = []
        if key not in self._stored:
            batch = member_id in self.members
            wanted = sorted(self.members) if batch else [member_id]
            for m in wanted:
                self._stored.setdefault((funnel_id, m), [])
            for row in _FIRSTS_OF.rows(conn, {"b_funnel": funnel_id, "b_members": wanted}):
                self._stored[(funnel_id, row[0])].append(row[1:])
        stored = [r for r in self._stored[key] if r[0] in (version, 0)]
        return stored + [
            (p["version"], p["a"], p["at_us"], p["campaign"])
            for p in self.pairs
            if p["funnel_id"] == funnel_id
            and p["member_id"] == member_id
            and p["a"] == p["b"]
            and p["version"] in (version, 0)
        ]

    def new_member(self, member_id: int) -> None:
        """A member the batch made (their row is new: the table holds no pairs of theirs)."""
        self._new.add(member_id)

    def drop_timer(self, instance_id: int, key: str) -> None:
        self._set(self.timers, (instance_id, key), None)

    def arm_timer(self, row: dict[str, Any]) -> None:
        self._set(self.timers, (row["instance_id"], row["key"]), row)

    def enqueue(self, conn: Connection, row: dict[str, Any]) -> int:
        """An outbox row; its id."""
        row = {**row, "id": self._action_ids.take(conn)}
        self._appended(self.actions, row)
        return int(row["id"])

    # ── the batch's end ──
    def write(self, conn: Connection) -> None:
        """Write everything pending, parents first, and forget it."""
        if not self:
            return
        _LOG_EVENTS.run(conn, self.events)
        _SET_INSTANCES.run(
            conn,
            [
                {"b_id": i, **{f"b_{c}": v[c] for c in _INSTANCE_VALUES}}
                for i, v in sorted(self.instances.items())
            ],
        )
        closes, opens = _stage_rows(self.stages)
        _CLOSE_STAGES.run(conn, closes)
        _OPEN_STAGES.run(conn, opens)
        _ADD_PAIRS.run(conn, self.pairs)
        timers = sorted(self.timers.items(), key=lambda kv: kv[0])
        _DROP_TIMERS.run(conn, [{"b_instance": i, "b_key": k} for (i, k), _ in timers])
        _ARM_TIMERS.run(conn, [row for _, row in timers if row is not None])
        _ENQUEUE.run(conn, self.actions)
        self.events, self.instances, self.stages, self.pairs = [], {}, [], []
        self.timers, self.actions, self._undo, self._stored = {}, [], [], {}
        self._new = set()  # their pairs are in the table now


def _stage_rows(
    stages: list[tuple[str, Any]],
) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """Stage-history closes and opens as the table would have had them one by one: a close
    ends every open row of the instance, the table's (an UPDATE, run before the inserts;
    the first close of each instance is the one that finds them) and those opened since
    (their `left_at`)."""
    closes: dict[int, dict[str, Any]] = {}
    still_open: dict[int, list[dict[str, Any]]] = {}  # instance -> its pending open rows
    rows: list[dict[str, Any]] = []
    for kind, value in stages:
        if kind == "open":
            row = dict(value)
            still_open.setdefault(row["instance_id"], []).append(row)
            rows.append(row)
            continue
        instance = value["b_instance"]
        closes.setdefault(instance, value)
        for row in still_open.pop(instance, []):
            row["left_at"], row["left_by"] = value["b_at"], value["b_by"]
    return [closes[i] for i in sorted(closes)], rows
