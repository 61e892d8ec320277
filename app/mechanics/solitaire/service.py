"""Solitaire commands, run inside the write path (see `app.mechanics.commands`).

Every change to a list locks its row first (`FOR UPDATE`), then the member: appends to one
list are serialized, so line numbers come from `last_seq + 1` with no gaps or duplicates (a
refused append rolls back with its savepoint, number included), and stock is reserved with a
conditional `UPDATE … WHERE reserved + qty <= stock` per item.

Closing (at `closes_at` by the sweep, by the organiser, or when everything is sold out) drops
items short of their minimum, cancels a list under its minimum total, and otherwise emits,
for each member with live lines, `solitaire.closed` and one `order.placed` whose `sequence` is
the member's place among the list's orders (1 = first, withdrawn lines do not count) — what a
funnel guard such as `event.sequence <= 20` reads for the early-order incentive.
"""

from __future__ import annotations

import secrets
from collections.abc import Sequence
from datetime import datetime, timedelta
from typing import Any

from pydantic import ValidationError
from sqlalchemy import Connection, Table, bindparam, select, update

from app.db import insert_rows, one_of
from app.engine.definition import Solitaire
from app.engine.paths import pydantic_loc_to_path
from app.engine.schedule import parse_duration
from app.errors import FieldProblem, NotFound, Refused
from app.events.ingest import InvalidEvent
from app.mechanics.commands import (
    Context,
    DirectAction,
    Effects,
    Emit,
    Handler,
    Peers,
    WriteThrough,
    campaign_config,
)
from app.mechanics.community import service as community
from app.mechanics.rewards.grant import grant_reward
from app.mechanics.solitaire import parse, rules
from app.mechanics.solitaire.models import SolitaireLine, SolitaireList, SolitaireStock
from app.members.models import Member
from app.prepared import Many, Prepared

list_t: Table = SolitaireList.__table__  # type: ignore[attr-defined]
line_t: Table = SolitaireLine.__table__  # type: ignore[attr-defined]
stock_t: Table = SolitaireStock.__table__  # type: ignore[attr-defined]
member_t: Table = Member.__table__  # type: ignore[attr-defined]

SCHEDULED, OPEN, CLOSED, FULFILLED, CANCELLED = (
    "scheduled",
    "open",
    "closed",
    "fulfilled",
    "cancelled",
)
LIVE, WITHDRAWN = "live", "withdrawn"


# ── opening ───────────────────────────────────────────────────────────────────────────────
def definition_from(ctx: Context) -> tuple[Solitaire, int | None, str | None]:
    """The list's menu and rules: a funnel's campaign, or a definition sent with the command."""
    data = ctx.data
    if data.get("definition") is not None:
        try:
            return Solitaire.model_validate(data["definition"]), None, None
        except ValidationError as exc:
            problems = [
                FieldProblem(pydantic_loc_to_path(("definition", *e["loc"])), e["msg"])
                for e in exc.errors()
            ]
            raise InvalidEvent("the list definition is invalid", errors=problems) from None
    name = str(data.get("campaign") or "")
    ref, cfg = campaign_config(ctx, str(data.get("funnel") or ""), "solitaire", name)
    return cfg, ref.funnel_id, name


def open_list(ctx: Context) -> Effects:
    """`solitaire.open` (the organiser, or the schedule): a list for one chat group."""
    cfg, funnel_id, campaign = definition_from(ctx)
    opens_at = _when(ctx.data.get("opens_at")) or ctx.now
    closes_at = _when(ctx.data.get("closes_at")) or opens_at + parse_duration(cfg.open_for)
    join_until = opens_at + parse_duration(cfg.join_until) if cfg.join_until else closes_at
    if closes_at <= opens_at:
        raise InvalidEvent(
            "closes_at must be after opens_at", errors=[FieldProblem("data.closes_at", "too early")]
        )
    items = [i.model_dump(mode="json") for i in cfg.items]
    list_id = ctx.conn.execute(
        list_t.insert()
        .values(
            public_id="sl_" + secrets.token_urlsafe(12),
            tenant_id=ctx.tenant_id,
            funnel_id=funnel_id,
            campaign=campaign,
            group_id=str(ctx.data["group"]),
            title=str(ctx.data.get("title") or cfg.title),
            note=cfg.note,
            roster=cfg.roster,
            items=items,
            options={
                "max_lines_per_member": cfg.max_lines_per_member,
                "min_total_fen": cfg.min_total_fen,
                "pickup_points": cfg.pickup_points,
                "ask_address": cfg.ask_address,
                "early_orders": cfg.early_orders,
                "early_reward": cfg.early_reward.model_dump(mode="json")
                if cfg.early_reward
                else None,
            },
            status=OPEN if opens_at <= ctx.now else SCHEDULED,
            opens_at=opens_at,
            join_until=min(join_until, closes_at),
            closes_at=closes_at,
            created_at=ctx.now,
        )
        .returning(list_t.c.id)
    ).scalar_one()
    if items:
        ctx.conn.execute(
            stock_t.insert(),
            [
                {"list_id": list_id, "sku": i["sku"], "stock": i["stock"], "reserved": 0}
                for i in items
            ],
        )
    return Effects(
        None, {"outcome": "opened", "list": list_json(ctx.conn, _get(ctx.conn, list_id))}
    )


def _when(value: Any) -> datetime | None:
    if value is None:
        return None
    if isinstance(value, datetime):
        return value
    return datetime.fromisoformat(str(value))


def _swept(ctx: Context) -> Any:
    """The list a sweep's command names (`list_id`), locked; None if it is gone."""
    return ctx.conn.execute(
        select(list_t).where(list_t.c.id == int(ctx.data["list_id"])).with_for_update()
    ).first()


def open_due(ctx: Context) -> Effects:
    """The sweep: a scheduled list whose opening time came."""
    sl = _swept(ctx)
    if sl is None or sl.status != SCHEDULED or sl.opens_at > ctx.now:
        return Effects(None, {"outcome": "nothing_due"})
    ctx.conn.execute(update(list_t).where(list_t.c.id == sl.id).values(status=OPEN))
    return Effects(None, {"outcome": "opened", "list": list_json(ctx.conn, _get(ctx.conn, sl.id))})


# ── entries ───────────────────────────────────────────────────────────────────────────────
# The statements of appending (the hot path) are built once, with parameters: building a
# statement per call cost more than running it.
_LIST_BY_SHARE = Prepared(
    select(list_t)
    .where(list_t.c.public_id == bindparam("b_public"), list_t.c.tenant_id == bindparam("b_tenant"))
    .with_for_update()
)
_LIST_BY_ID = Prepared(select(list_t).where(list_t.c.id == bindparam("b_id")))
_LIST_BY_PUBLIC = Prepared(select(list_t).where(list_t.c.public_id == bindparam("b_public")))
_MEMBER_LINES = Prepared(
    select(line_t).where(
        line_t.c.list_id == bindparam("b_list"),
        line_t.c.member_id == bindparam("b_member"),
        line_t.c.status == LIVE,
    )
)
_RESERVE = Prepared(
    update(stock_t)
    .where(
        stock_t.c.list_id == bindparam("b_list"),
        stock_t.c.sku == bindparam("b_sku"),
        (stock_t.c.stock.is_(None)) | (stock_t.c.reserved + bindparam("b_qty") <= stock_t.c.stock),
    )
    .values(reserved=stock_t.c.reserved + bindparam("b_qty"))
)
_STOCK_LEFT = Prepared(
    select(stock_t.c.sku, stock_t.c.stock, stock_t.c.reserved).where(
        stock_t.c.list_id == bindparam("b_list")
    )
)
_NEXT_SEQ = Prepared(
    update(list_t)
    .where(list_t.c.id == bindparam("b_list"))
    .values(last_seq=list_t.c.last_seq + 1)
    .returning(list_t.c.last_seq)
)
_NEW_LINE = Prepared(line_t.insert())
_LINE = (
    "tenant_id",
    "list_id",
    "seq",
    "member_id",
    "on_behalf_of",
    "items",
    "note",
    "pickup",
    "address",
    "total_fen",
    "status",
    "created_at",
    "updated_at",
)
_NEW_LINES = Many(insert_rows(line_t, _LINE), line_t.insert())


# A batch's appends to one list (`_Appends`): its appenders' live lines, read together, and
# the writes held back, made together. By the (list, member) index with both columns once
# the lines have statistics; a table too young for any (a first list's burst, before
# autovacuum's first ANALYZE) gets a plan that reads the whole list (6.5 ms a batch at
# 12,000 lines against 0.14 ms; no ORDER BY, which made that plan likelier).
_LINES_OF_MEMBERS = Prepared(
    {
        d: select(line_t.c.member_id, line_t.c["items"]).where(
            line_t.c.list_id == bindparam("b_list"), line_t.c.status == LIVE, listed
        )
        for d, listed in one_of(line_t.c.member_id, "b_members").items()
    }
)
_ADD_RESERVED = Prepared(
    update(stock_t)
    .where(stock_t.c.list_id == bindparam("b_list"), stock_t.c.sku == bindparam("b_sku"))
    .values(reserved=stock_t.c.reserved + bindparam("b_qty"))
)
_SET_SEQ = Prepared(
    update(list_t).where(list_t.c.id == bindparam("b_list")).values(last_seq=bindparam("b_seq"))
)


def _lock(ctx: Context, public_id: Any) -> Any:
    sl = _LIST_BY_SHARE.record(ctx.conn, {"b_public": str(public_id), "b_tenant": ctx.tenant_id})
    if sl is None:
        raise NotFound(f'no solitaire list "{public_id}"')
    return sl


def _get(conn: Connection, list_id: int) -> Any:
    sl = _LIST_BY_ID.record(conn, {"b_id": list_id})
    assert sl is not None, list_id
    return sl


def _menu(sl: Any) -> dict[str, dict[str, Any]]:
    return {i["sku"]: i for i in sl.items}


def _member_lines(
    conn: Connection, list_id: int, member_id: int, but: int | None = None
) -> list[Any]:
    """The member's live lines on the list (but one of them)."""
    rows = _MEMBER_LINES.records(conn, {"b_list": list_id, "b_member": member_id})
    return [r for r in rows if r.id != but]


def _priced(sl: Any, data: dict[str, Any]) -> rules.Priced:
    priced, problems = rules.price(_menu(sl), data.get("items") or [], sl.roster)
    pickups = sl.options.get("pickup_points") or []
    if pickups and data.get("pickup") is not None and data["pickup"] not in pickups:
        problems.append(FieldProblem("data.pickup", "one of: " + ", ".join(pickups)))
    if sl.options.get("ask_address") and not str(data.get("address") or "").strip():
        problems.append(FieldProblem("data.address", "this list delivers: give an address"))
    if problems:
        raise InvalidEvent(
            "the line has problems: " + "; ".join(str(p) for p in problems[:3]), errors=problems
        )
    assert priced is not None
    return priced


def _reserve(ctx: Context, sl: Any, items: list[dict[str, Any]], sign: int) -> None:
    """Reserve (sign=1) or release (sign=-1) stock; a shortfall is a 409 with what remains."""
    for i in items:
        took = _RESERVE.run(
            ctx.conn, {"b_list": sl.id, "b_sku": i["sku"], "b_qty": sign * i["qty"]}
        )
        if not took:
            raise _sold_out(sl, i, _available(ctx.conn, sl))


def _sold_out(sl: Any, item: dict[str, Any], left: dict[str, int]) -> Refused:
    """The refusal of a line that wants more than is left: what is left, in menu order."""
    menu = _menu(sl)
    stocked = [(s, left[s]) for s in menu if s in left]
    return Refused(
        rules.SOLD_OUT,
        f"{item['name']}: only {left.get(item['sku'], 0)} left; still available: "
        + (", ".join(f"{menu[s]['name']}×{n}" for s, n in stocked if n) or "none"),
        errors=[FieldProblem(f"available.{s}", f"{n} left") for s, n in stocked],
    )


def _available(conn: Connection, sl: Any) -> dict[str, int]:
    """What is left of each stocked item (items without stock are unlimited, not listed)."""
    return _left(_STOCK_LEFT.rows(conn, {"b_list": sl.id}))


def _left(stock: Sequence[Any]) -> dict[str, int]:
    return {sku: n - reserved for sku, n, reserved in stock if n is not None}


def _check_open(sl: Any, now: datetime, *, joining: bool) -> None:
    if sl.status != OPEN:
        raise Refused(rules.NOT_OPEN, f"the list is {sl.status}")
    if joining and now >= sl.join_until:
        raise Refused(rules.JOINING_CLOSED, f"new lines stopped at {sl.join_until.isoformat()}")
    if now >= sl.closes_at:
        raise Refused(rules.EDITING_CLOSED, f"the list closed at {sl.closes_at.isoformat()}")


def append(ctx: Context) -> Effects:
    """`solitaire.append`: a member adds a line (for themselves, or on behalf of someone).
    In a batch, through the batch's run of appends to the list (`_Appends`)."""
    if ctx.run is not None:
        public_id = str(ctx.data["list"])
        run = ctx.run(
            ("solitaire.append", ctx.tenant_id, public_id),
            lambda peers: _Appends.load(ctx, public_id, peers),
        )
        assert isinstance(run, _Appends)
        return run.append(ctx, ctx.member(), ctx.data)
    sl = _lock(ctx, ctx.data["list"])
    m = ctx.member()
    return _append(ctx, sl, m, ctx.data)


class NotInGroup(Refused):
    status, title = 403, "Not a member of the group"


def _not_in_group() -> NotInGroup:
    return NotInGroup(rules.NOT_IN_GROUP, "only members of the list's group may append to it")


def _checked(
    ctx: Context, sl: Any, data: dict[str, Any], in_group: bool, others: list[Any]
) -> rules.Priced:
    """An append's line priced, if the list takes it from this member (`in_group`, with
    `others`, the items of their live lines on it); refused otherwise."""
    _check_open(sl, ctx.now, joining=True)
    if not in_group:
        raise _not_in_group()
    priced = _priced(sl, data)
    refusal = rules.member_refusal(sl.options, _menu(sl), others, priced.items, adding=True)
    if refusal is not None:
        raise Refused(*refusal)
    return priced


def _line(
    ctx: Context, sl: Any, seq: int, m: Any, data: dict[str, Any], priced: rules.Priced
) -> dict[str, Any]:
    return {  # the columns of _LINE
        "tenant_id": ctx.tenant_id,
        "list_id": sl.id,
        "seq": seq,
        "member_id": m.id,
        "on_behalf_of": data.get("on_behalf_of"),
        "items": priced.items,
        "note": data.get("note"),
        "pickup": data.get("pickup"),
        "address": data.get("address"),
        "total_fen": priced.total_fen,
        "status": LIVE,
        "created_at": ctx.now,
        "updated_at": ctx.now,
    }


def _sells_out(sl: Any, left: dict[str, int]) -> bool:
    """Nothing left of any item: the list closes."""
    return bool(left) and all(n <= 0 for n in left.values()) and len(left) == len(sl.items)


def _standing(ctx: Context, sl: Any, member_id: int) -> tuple[bool, list[Any]]:
    """(in the list's group, the items of their live lines on it): what `_checked` asks."""
    if not community.is_member(ctx.conn, ctx.tenant_id, sl.group_id, member_id):
        return False, []
    return True, [o.items for o in _member_lines(ctx.conn, sl.id, member_id)]


def _append(ctx: Context, sl: Any, m: Any, data: dict[str, Any]) -> Effects:
    in_group, others = _standing(ctx, sl, m.id)
    priced = _checked(ctx, sl, data, in_group, others)
    _reserve(ctx, sl, priced.items, 1)
    seq = _NEXT_SEQ.scalar(ctx.conn, {"b_list": sl.id})
    _NEW_LINE.run(ctx.conn, _line(ctx, sl, seq, m, data, priced))
    effects = Effects(m.id, {"outcome": "appended", "line": seq})
    stock = _STOCK_LEFT.rows(ctx.conn, {"b_list": sl.id})
    # The answer has the list without its lines (GET the list for them): an answer that
    # carried every line grew with the list, and so did the event log row that keeps it.
    if _sells_out(sl, _left(stock)):
        _close(ctx, _get(ctx.conn, sl.id), "sold_out", effects)
        effects.result["list"] = list_json(ctx.conn, _get(ctx.conn, sl.id), with_lines=False)
    else:  # the locked row as this append left it (not read again): its number taken
        effects.result["list"] = list_json(ctx.conn, sl, False, stock=stock, last_seq=seq)
    return effects


class _Appends:
    """A batch's appends to one list (`app.mechanics.commands.Run`).

    Loaded by the batch's first append to the list: the list locked and its stock read, and
    the group membership and live lines of every member of the batch who appends to it, one
    statement each. Each append is then decided from memory by the rules `_append` applies
    (`_checked`, the same stock test as `_RESERVE`), and numbered `last_seq + 1` in turn;
    the lines, the stock reserved and the last number are written at `flush`, one statement
    per table. An append that would sell the list out raises `WriteThrough` (closing reads
    and writes every line), and is applied by `_append` once the run is flushed.
    PostgreSQL: 9 round trips per append under the list's lock became none of its own (its
    event's row is claimed with the batch's, and its savepoint, unused, serves the next)."""

    kinds = frozenset({"solitaire.append"})

    def __init__(
        self,
        sl: Any,
        stock: dict[str, tuple[int | None, int]],
        in_group: set[int],
        lines: dict[int, list[Any]],
    ) -> None:
        self.sl, self.stock, self.in_group, self.lines = sl, stock, in_group, lines
        self.seq: int = sl.last_seq
        self.new: list[dict[str, Any]] = []  # the lines held back, in order
        self._stored = {sku: reserved for sku, (_, reserved) in stock.items()}
        self._mark: tuple[int, int, dict[str, tuple[int | None, int]]] = (self.seq, 0, stock)

    @classmethod
    def load(cls, ctx: Context, public_id: str, peers: Peers) -> _Appends:
        sl = _lock(ctx, public_id)
        ids = sorted({m for m, d in peers if m is not None and str(d.get("list")) == public_id})
        stock = {sku: (n, r) for sku, n, r in _STOCK_LEFT.rows(ctx.conn, {"b_list": sl.id})}
        in_group = community.members_in(ctx.conn, ctx.tenant_id, sl.group_id, ids)
        lines: dict[int, list[Any]] = {m: [] for m in ids}
        for r in _LINES_OF_MEMBERS.records(ctx.conn, {"b_list": sl.id, "b_members": ids}):
            lines[r.member_id].append(r.items)
        return cls(sl, stock, in_group, lines)

    def mark(self) -> None:
        self._mark = (self.seq, len(self.new), self.stock)

    def undo(self) -> None:
        self.seq, held, self.stock = self._mark
        for line in self.new[held:]:
            self.lines[line["member_id"]].pop()
        del self.new[held:]

    def flush(self, conn: Connection) -> None:
        if not self.new:
            return
        taken = [
            {"b_list": self.sl.id, "b_sku": sku, "b_qty": reserved - self._stored[sku]}
            for sku, (_, reserved) in self.stock.items()
            if reserved != self._stored[sku]
        ]
        _ADD_RESERVED.run_many(conn, taken)
        _SET_SEQ.run(conn, {"b_list": self.sl.id, "b_seq": self.seq})
        _NEW_LINES.run(conn, self.new)
        self.new = []
        self._stored = {sku: reserved for sku, (_, reserved) in self.stock.items()}

    def _member(self, ctx: Context, member_id: int) -> tuple[bool, list[Any]]:
        """`_standing` from memory, read for a member the load did not ask about too (one
        who appends under a reference the batch did not know)."""
        if member_id not in self.lines:
            in_group, self.lines[member_id] = _standing(ctx, self.sl, member_id)
            if in_group:
                self.in_group.add(member_id)
        return member_id in self.in_group, self.lines[member_id]

    @staticmethod
    def _rows(stock: dict[str, tuple[int | None, int]]) -> list[tuple[str, int | None, int]]:
        """The stock as `_STOCK_LEFT` gives it: (sku, stock, reserved)."""
        return [(sku, n, reserved) for sku, (n, reserved) in stock.items()]

    def append(self, ctx: Context, m: Any, data: dict[str, Any]) -> Effects:
        sl = self.sl
        in_group, others = self._member(ctx, m.id)
        priced = _checked(ctx, sl, data, in_group, others)
        stock = dict(self.stock)
        for i in priced.items:
            row = stock.get(i["sku"])
            if row is None or (row[0] is not None and row[1] + i["qty"] > row[0]):
                raise _sold_out(sl, i, _left(self._rows(stock)))
            stock[i["sku"]] = (row[0], row[1] + i["qty"])
        rows = self._rows(stock)
        if _sells_out(sl, _left(rows)):
            raise WriteThrough
        self.seq += 1
        self.stock = stock
        self.new.append(_line(ctx, sl, self.seq, m, data, priced))
        others.append(priced.items)
        effects = Effects(m.id, {"outcome": "appended", "line": self.seq})
        effects.result["list"] = list_json(ctx.conn, sl, False, stock=rows, last_seq=self.seq)
        return effects


def reply(ctx: Context) -> Effects:
    """A group message that looks like a solitaire reply (`+1 红烧肉饭`, or the copied list
    with a new line): appended for its poster to the group's open list. What cannot be read
    or appended is answered with a message to the poster saying why — never dropped. The
    message still reaches the funnels as `message.posted`."""
    group = str(ctx.data.get("group_id") or "")
    sl = ctx.conn.execute(
        select(list_t)
        .where(
            list_t.c.tenant_id == ctx.tenant_id,
            list_t.c.group_id == group,
            list_t.c.status == OPEN,
        )
        .order_by(list_t.c.opens_at.desc(), list_t.c.id.desc())
        .limit(1)
        .with_for_update()
    ).first()
    m = ctx.member()
    if group:  # the bot saw them post in the group: they are in it
        community.joined(ctx.conn, ctx.tenant_id, group, m.id, ctx.now)
    effects = Effects(m.id, {"outcome": "no_open_list"}, [Emit(m.id, "message.posted", ctx.data)])
    if sl is None:
        return effects
    parsed = parse.parse(str(ctx.data.get("text") or ""), sl.items, sl.roster, sl.last_seq)
    if isinstance(parsed, parse.NotUnderstood):
        effects.result = {"outcome": "not_understood", "reason": parsed.reason}
        _tell(effects, m.id, sl, f"没看懂这条接龙 ({parsed.reason})。{parse.FORMAT_HELP}")
        return effects
    attempt = ctx.conn.begin_nested()
    try:
        appended = _append(ctx, sl, m, {"items": parsed.items, "note": parsed.note})
    except (Refused, InvalidEvent) as exc:
        attempt.rollback()
        effects.result = {"outcome": "refused", "reason": exc.code, "detail": exc.detail}
        _tell(effects, m.id, sl, f"接龙没有成功: {exc.detail}")
        return effects
    attempt.commit()
    effects.emits.extend(appended.emits)
    effects.actions.extend(appended.actions)
    effects.result = appended.result
    return effects


def announced(handler: Handler) -> Handler:
    """The handler, followed by the bot's list message when it changed a list.

    The message holds every line, so rendering it costs as much as the list is long (6,000
    lines: 50 ms). It is rendered once per transaction, after its last event
    (`Context.defer`), and, while the list is open, at most once per `ANNOUNCE_EVERY`: a
    change within that time of the last message marks the list `announce_due` instead, and
    the next change after it, or else the sweep (`solitaire.announce`), sends the list as it
    is then. Rendered for each batch, a busy list's message took most of the writer's time
    (appends to a 6,000-line list: 825 µs each, 420 with 1,500 lines); paced, it is one
    render a second however many batches there are. The bot edits one message per list and
    skips stale revisions, so the latest state says all, and a group is not flooded with
    edits. Opening, closing and finishing are announced at once."""

    def run(ctx: Context) -> Effects:
        effects = handler(ctx)
        changed = effects.result.get("list")
        if changed is not None and effects.result.get("outcome") not in QUIET:
            public_id = changed["id"]
            ctx.defer(("solitaire", public_id), lambda: _announce_or_pace(ctx, public_id))
        return effects

    run.__doc__ = handler.__doc__
    return run


QUIET = frozenset({"nothing_due", "no_open_list", "not_understood", "refused"})
ANNOUNCE_EVERY = timedelta(seconds=1)
_PACE = Prepared(
    update(list_t)
    .where(list_t.c.id == bindparam("b_id"), list_t.c.announce_due.is_(None))
    .values(announce_due=bindparam("b_due"))
)
_ANNOUNCED = Prepared(
    update(list_t)
    .where(list_t.c.id == bindparam("b_id"))
    .values(announced_at=bindparam("b_now"), announce_due=None)
)


def _announce_or_pace(ctx: Context, public_id: str) -> list[DirectAction]:
    sl = _LIST_BY_PUBLIC.record(ctx.conn, {"b_public": public_id})
    assert sl is not None, public_id  # the handler just changed it, under its lock
    last = sl.announced_at
    if sl.status == OPEN and last is not None and timedelta(0) <= ctx.now - last < ANNOUNCE_EVERY:
        if sl.announce_due is None:
            _PACE.run(ctx.conn, {"b_id": sl.id, "b_due": last + ANNOUNCE_EVERY})
        return []
    return [announcement(ctx, sl)]


def announce_due(ctx: Context) -> Effects:
    """The sweep: a list whose paced message is due (see `announced`)."""
    sl = _swept(ctx)
    if sl is None or sl.announce_due is None or sl.announce_due > ctx.now:
        return Effects(None, {"outcome": "nothing_due"})
    result = {"outcome": "announced", "list_id": sl.public_id}
    return Effects(None, result, actions=[announcement(ctx, sl)])


def announcement(ctx: Context, sl: Any) -> DirectAction:
    """Ask the bot to post (or edit) the group's list message: the text, `count` live orders
    of `capacity` (the stock, when every item has one) and the state. One `message_key` per
    list, and a rising `revision`, so the bot edits one message and skips stale updates."""
    lines = lines_of(ctx.conn, sl.id)
    stocks = [i.get("stock") for i in sl.items]
    capacity = sum(stocks) if stocks and all(n is not None for n in stocks) else None
    count = sum(1 for x in lines if x["status"] == LIVE)
    params = {
        "group_id": sl.group_id,
        "list": sl.public_id,
        "message_key": f"solitaire:{sl.public_id}",
        "revision": ctx.event_id,
        "status": sl.status,
        "count": count,
        "capacity": capacity,
        "text": rules.render_text(sl._mapping, lines, "zh"),
    }
    _ANNOUNCED.run(ctx.conn, {"b_id": sl.id, "b_now": ctx.now})
    return DirectAction(None, "update_list_message", params, "solitaire")


def _tell(effects: Effects, member_id: int, sl: Any, text: str) -> None:
    params = {"to": "member", "text": text, "group_id": sl.group_id, "list": sl.public_id}
    effects.actions.append(DirectAction(member_id, "send_message", params, "solitaire.reply"))


def _own_line(ctx: Context, sl: Any, member_id: int) -> Any:
    seq = ctx.data.get("line")
    line = ctx.conn.execute(
        select(line_t).where(line_t.c.list_id == sl.id, line_t.c.seq == seq)
    ).first()
    if line is None:
        raise NotFound(f"no line {seq} on this list")
    if line.member_id != member_id:
        raise Refused(rules.NOT_YOUR_LINE, f"line {seq} is not yours")
    if line.status != LIVE:
        raise Refused(rules.WITHDRAWN, f"line {seq} was withdrawn")
    return line


def change(ctx: Context) -> Effects:
    """`solitaire.change`: a member changes their own line until the edit deadline."""
    sl = _lock(ctx, ctx.data["list"])
    m = ctx.member()
    _check_open(sl, ctx.now, joining=False)
    line = _own_line(ctx, sl, m.id)
    kept = [{"sku": i["sku"], "qty": i["qty"]} for i in line.items]  # unless items change
    priced = _priced(sl, {"pickup": line.pickup, "items": kept, **ctx.data})
    others = _member_lines(ctx.conn, sl.id, m.id, but=line.id)
    refusal = rules.member_refusal(
        sl.options, _menu(sl), [o.items for o in others], priced.items, adding=False
    )
    if refusal is not None:
        raise Refused(*refusal)
    _reserve(ctx, sl, list(line.items), -1)
    _reserve(ctx, sl, priced.items, 1)
    values: dict[str, Any] = {"items": priced.items, "total_fen": priced.total_fen}
    for key in ("note", "pickup", "address"):
        if key in ctx.data:
            values[key] = ctx.data[key]
    ctx.conn.execute(
        update(line_t).where(line_t.c.id == line.id).values(updated_at=ctx.now, **values)
    )
    return Effects(
        m.id,
        {
            "outcome": "changed",
            "line": line.seq,
            "list": list_json(ctx.conn, _get(ctx.conn, sl.id), with_lines=False),
        },
    )


def withdraw(ctx: Context) -> Effects:
    """`solitaire.withdraw`: the line keeps its number, shown as withdrawn; stock returns."""
    sl = _lock(ctx, ctx.data["list"])
    m = ctx.member()
    _check_open(sl, ctx.now, joining=False)
    line = _own_line(ctx, sl, m.id)
    _reserve(ctx, sl, list(line.items), -1)
    ctx.conn.execute(
        update(line_t).where(line_t.c.id == line.id).values(status=WITHDRAWN, updated_at=ctx.now)
    )
    return Effects(
        m.id,
        {
            "outcome": "withdrawn",
            "line": line.seq,
            "list": list_json(ctx.conn, _get(ctx.conn, sl.id), with_lines=False),
        },
    )


# ── closing ───────────────────────────────────────────────────────────────────────────────
def close(ctx: Context) -> Effects:
    """`solitaire.close` by the organiser (an open or scheduled list)."""
    sl = _lock(ctx, ctx.data["list"])
    if sl.status not in (OPEN, SCHEDULED):
        raise Refused(rules.NOT_OPEN, f"the list is {sl.status}")
    effects = Effects(None, {"outcome": "closed"})
    _close(ctx, sl, str(ctx.data.get("reason") or "organiser")[:64], effects)
    effects.result["list"] = list_json(ctx.conn, _get(ctx.conn, sl.id))
    return effects


def close_due(ctx: Context) -> Effects:
    """The sweep: an open list whose closing time came."""
    sl = _swept(ctx)
    if sl is None or sl.status != OPEN or sl.closes_at > ctx.now:
        return Effects(None, {"outcome": "nothing_due"})
    effects = Effects(None, {"outcome": "closed"})
    _close(ctx, sl, "deadline", effects)
    effects.result["list"] = list_json(ctx.conn, _get(ctx.conn, sl.id))
    return effects


def _close(ctx: Context, sl: Any, reason: str, effects: Effects) -> None:
    live = list(
        ctx.conn.execute(
            select(line_t)
            .where(line_t.c.list_id == sl.id, line_t.c.status == LIVE)
            .order_by(line_t.c.seq)
        ).all()
    )
    plan = rules.plan_close(_menu(sl), sl.options, [(x.seq, x.items) for x in live], sl.roster)
    status = CANCELLED if plan.cancel_reason and plan.cancel_reason != "no_orders" else CLOSED
    ctx.conn.execute(
        update(list_t)
        .where(list_t.c.id == sl.id)
        .values(
            status=status,
            closed_at=ctx.now,
            close_reason=plan.cancel_reason if status == CANCELLED else reason,
            options={**sl.options, "unmade": plan.unmade},
        )
    )
    for x in live:
        made = plan.lines[x.seq]
        if made.items != list(x.items):
            ctx.conn.execute(
                update(line_t)
                .where(line_t.c.id == x.id)
                .values(items=made.items, total_fen=made.total_fen)
            )
    base = {"list": sl.public_id, "title": sl.title, "group_id": sl.group_id}
    members: dict[int, list[Any]] = {}
    for x in live:
        members.setdefault(x.member_id, []).append(x)
    if status == CANCELLED:
        for member_id in members:
            effects.emits.append(
                Emit(member_id, "solitaire.cancelled", {**base, "reason": plan.cancel_reason})
            )
        return
    for place, (member_id, mine) in enumerate(members.items(), start=1):
        items: dict[str, int] = {}
        for x in mine:
            for i in plan.lines[x.seq].items:
                items[i["sku"]] = items.get(i["sku"], 0) + i["qty"]
        total = sum(plan.lines[x.seq].total_fen for x in mine)
        effects.emits.append(Emit(member_id, "solitaire.closed", {**base, "sequence": place}))
        if sl.options.get("early_orders") and place <= sl.options["early_orders"]:
            _early_reward(ctx, sl, member_id, effects)
        if total > 0:  # a roster sign-up is not an order
            effects.emits.append(
                Emit(
                    member_id,
                    "order.placed",
                    {
                        **base,
                        "order_id": f"{sl.public_id}:{mine[0].seq}",
                        "amount_fen": total,
                        "items": [{"sku": s, "quantity": n} for s, n in items.items()],
                        "sequence": place,
                        "lines": [x.seq for x in mine],
                        "channel": "solitaire",
                    },
                )
            )


def _early_reward(ctx: Context, sl: Any, member_id: int, effects: Effects) -> None:
    """The campaign's own early-order reward (`early_orders` + `early_reward`), for funnels
    that do not express it as a guard on `order.placed`."""
    grant_reward(
        ctx.conn,
        ctx.tenant_id,
        member_id,
        sl.options.get("early_reward") or {},
        f"solitaire:{sl.id}:{member_id}:early",
        f"solitaire.{sl.campaign or sl.public_id}",
        sl.funnel_id,
        ctx.now,
        effects,
        reason="early solitaire order",
    )


def finish(ctx: Context) -> Effects:
    """`solitaire.fulfil` (a closed list was served) or `solitaire.cancel` (by the organiser;
    members with live lines are told)."""
    sl = _lock(ctx, ctx.data["list"])
    cancel = ctx.data.get("to") == CANCELLED
    allowed = (SCHEDULED, OPEN, CLOSED) if cancel else (CLOSED,)
    if sl.status not in allowed:
        raise Refused(rules.NOT_OPEN, f"the list is {sl.status}")
    effects = Effects(None, {"outcome": "cancelled" if cancel else "fulfilled"})
    ctx.conn.execute(
        update(list_t)
        .where(list_t.c.id == sl.id)
        .values(
            status=CANCELLED if cancel else FULFILLED,
            closed_at=sl.closed_at or ctx.now,
            close_reason=str(ctx.data.get("reason") or "organiser")[:64]
            if cancel
            else sl.close_reason,
        )
    )
    if cancel:
        members = ctx.conn.execute(
            select(line_t.c.member_id)
            .where(line_t.c.list_id == sl.id, line_t.c.status == LIVE)
            .distinct()
        ).scalars()
        for member_id in members:
            effects.emits.append(
                Emit(
                    member_id, "solitaire.cancelled", {"list": sl.public_id, "reason": "organiser"}
                )
            )
    effects.result["list"] = list_json(ctx.conn, _get(ctx.conn, sl.id))
    return effects


# ── what callers see ──────────────────────────────────────────────────────────────────────
_LINES = Prepared(
    select(
        line_t.c.seq,
        line_t.c.status,
        line_t.c["items"],
        line_t.c.note,
        line_t.c.pickup,
        line_t.c.on_behalf_of,
        line_t.c.total_fen,
        line_t.c.member_id,
        member_t.c.nickname,
    )
    .join(member_t, member_t.c.id == line_t.c.member_id)
    .where(line_t.c.list_id == bindparam("b_list"))
    .order_by(line_t.c.seq)
)


def lines_of(conn: Connection, list_id: int) -> list[dict[str, Any]]:
    """Every line of the list, in order (the list's message renders them all)."""
    return [r._asdict() for r in _LINES.records(conn, {"b_list": list_id})]


def list_json(
    conn: Connection,
    sl: Any,
    with_lines: bool = True,
    *,
    stock: Sequence[Any] | None = None,
    last_seq: int | None = None,
) -> dict[str, Any]:
    """The list as the API shows it; `stock` (its stock rows) and `last_seq`, when the
    caller has them already (an append), are not read again."""
    if stock is None:
        stock = _STOCK_LEFT.rows(conn, {"b_list": sl.id})
    left = {sku: (None if n is None else n - reserved) for sku, n, reserved in stock}
    out: dict[str, Any] = {
        "id": sl.public_id,
        "group_id": sl.group_id,
        "title": sl.title,
        "note": sl.note,
        "roster": sl.roster,
        "status": sl.status,
        "opens_at": sl.opens_at.isoformat(),
        "join_until": sl.join_until.isoformat(),
        "closes_at": sl.closes_at.isoformat(),
        "closed_at": sl.closed_at.isoformat() if sl.closed_at else None,
        "close_reason": sl.close_reason,
        "items": [{**i, "left": left.get(i["sku"])} for i in sl.items],
        "pickup_points": sl.options.get("pickup_points") or [],
        "lines_numbered": sl.last_seq if last_seq is None else last_seq,
    }
    if with_lines:
        lines = lines_of(conn, sl.id)
        out["lines"] = [{k: v for k, v in line.items() if k != "member_id"} for line in lines]
        out["live_lines"] = sum(1 for line in lines if line["status"] == LIVE)
    return out
