"""Commands: operations on mechanics that run inside the write path.

An inbound item whose type is a command ("groupbuy.join", "voucher.redeem", …) is handed
to its handler instead of the funnels. The handler locks what it changes (a team row first,
then members: one order everywhere, so concurrent commands wait rather than deadlock),
decides with the mechanic's pure rules, writes, and returns `Effects`: the result for the
caller, the events it emits for each member concerned (the dispatcher logs each one and
steps that member's funnels with it, in the same transaction) and actions for the outbox
that no funnel asked for (a refund, a fulfilment).
"""

from __future__ import annotations

from collections.abc import Callable, Hashable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, Protocol

from sqlalchemy import Connection

from app.engine.paths import suggest
from app.errors import NotFound
from app.funnels import store


@dataclass(frozen=True)
class Emit:
    member_id: int
    type: str
    data: dict[str, Any]


@dataclass(frozen=True)
class DirectAction:
    member_id: int | None  # None: an action about a group or a list, not one member
    type: str
    params: dict[str, Any]
    source: str  # the mechanic that asked: "groupbuy.lunch-team"


@dataclass
class Effects:
    member_id: int | None  # the member the command was about, if any
    result: dict[str, Any]
    emits: list[Emit] = field(default_factory=list)
    actions: list[DirectAction] = field(default_factory=list)


class Run(Protocol):
    """A batch's writes to contended rows, applied in memory and written once.

    Appends to one solitaire list arrive together (one writer takes them all, in batches of
    dozens): each read the list, its stock, the member's group membership and lines, and
    wrote the stock, the list's line number and the line, nine round trips on PostgreSQL
    under the list's lock. A run reads those once for the batch (the list locked, the
    membership and lines of every member of the batch who appends to it), decides each
    command from memory with the same rules, and holds its writes back until `flush`: one
    statement per table for the batch. A group's messages do the same with the counters
    each one adds to (app.mechanics.community.service `_Activity`).

    The write path keeps the savepoint semantics: `mark` when an event first uses the run,
    `undo` to that mark when the event fails (a run the failed event loaded is dropped, its
    lock gone with the savepoint on PostgreSQL). It flushes every run before any event whose
    type is not one of the run's `kinds`, before the batch's deferred work, and when a
    command raises `WriteThrough`: what is held back is never missing from what another
    event reads. (Within its own kind of event, whatever reads the run's rows flushes it
    first; `undo` must then bring back what the rollback took from the database.)"""

    kinds: frozenset[str]  # the event types it may stay open across

    def mark(self) -> None: ...

    def undo(self) -> None: ...

    def flush(self, conn: Connection) -> None: ...


class WriteThrough(Exception):
    """Raised by a command that uses a run before it changes anything: it needs the database
    as it is (the last portion sells out and closes the list). The write path rolls the
    event back to its savepoint, flushes the runs, and applies it again without one."""


# Who else in the batch sends the same command: (member id, data), to prefetch for them.
Peers = Sequence[tuple[int | None, dict[str, Any]]]
RunLoader = Callable[[Peers], Run]


# Where the dispatcher's batch lends its runs to code that has only the connection (the
# watchers of plain events, such as community's message counters): `batch_run`.
_RUNS = "flywheel.batch_runs"
RunSource = Callable[[Hashable, RunLoader | None], Run | None]


def batch_run(conn: Connection, key: Hashable, load: RunLoader | None = None) -> Run | None:
    """The run under `key` of the batch `conn` is applying, as `Context.run` gives a command
    (loaded by `load` the first time); with no `load`, only a run already open. None outside
    the dispatcher's batches (timers, sweeps, tests' single events): write through."""
    runs: RunSource | None = conn.info.get(_RUNS)
    return runs(key, load) if runs is not None else None


@contextmanager
def lending_runs(conn: Connection, runs: RunSource) -> Iterator[None]:
    """`batch_run` answers from `runs` while the block runs (the connection's `info` outlives
    the checkout, so the loan ends with the block). The dict is taken once: a connection the
    database dropped refuses `conn.info`, which would hide the error that dropped it."""
    info = conn.info
    info[_RUNS] = runs
    try:
        yield
    finally:
        info.pop(_RUNS, None)


@dataclass
class Context:
    conn: Connection
    tenant_id: int
    event_id: int
    now: datetime
    source: str
    data: dict[str, Any]
    # Find (or, for an integration's member reference, create) the command's member and
    # lock its row; called after the handler has locked its team.
    member: Callable[[], Any]
    # A handler that changed the member's row hands the new row back here, so the events it
    # emits see it without reading the row again.
    member_changed: Callable[[Any], None]
    versions: Callable[[], list[store.VersionRef]]
    # `defer(key, actions)`: once every event of the transaction has run, queue the actions
    # `actions()` returns then, once per key (the last event's wins). For messages that only
    # need the final state, such as a solitaire list's text after a burst of appends.
    defer: Callable[[Hashable, Callable[[], list[DirectAction]]], None]
    # `run(key, load)`: the batch's run under `key`, loaded by `load(peers)` the first time;
    # None when the command must write through (outside the dispatcher's batches: timers and
    # sweeps; or applied again after `WriteThrough`).
    run: Callable[[Hashable, RunLoader], Run] | None = None


Handler = Callable[[Context], Effects]


KINDS = {
    "groupbuy": "group-buy",
    "solitaire": "solitaire",
    "referral": "referral",
    "rewards": "rewards",
}


def campaign_config(
    ctx: Context, funnel_key: str, kind: str, name: str
) -> tuple[store.VersionRef, Any]:
    """A campaign of `kind` ("groupbuy", "solitaire", "referral", "rewards") as the funnel's
    newest open version defines it; 404 with a did-you-mean for an unknown funnel or
    campaign."""
    versions = {v.key: v for v in ctx.versions()}
    ref = versions.get(funnel_key)
    if ref is None:
        raise NotFound(f'no open funnel "{funnel_key}"{suggest(funnel_key, set(versions))}')
    found = getattr(store.compiled_version(ctx.conn, ref).definition.mechanics, kind)
    if name not in found:
        raise NotFound(
            f'funnel "{funnel_key}" has no {KINDS[kind]} campaign "{name}"'
            f"{suggest(name, set(found))}"
        )
    return ref, found[name]
