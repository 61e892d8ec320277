"""Group-buy commands, run inside the write path (see `app.mechanics.commands`).

Every limit is a database invariant, never a read-then-decide:
- a team's seats: the team row is locked (`FOR UPDATE`) and `seats_taken` only grows through
  `UPDATE … WHERE seats_taken < capacity`;
- one open team per member and campaign: the unique `(tenant, member, live_key)` on seats;
- stock and the cap on open teams: a conditional UPDATE of the campaign's counter row;
- per-member limits (teams led, joined): counted under the member's row lock, which every
  command of that member takes.

Pay to join: a seat is *held* for the payment window and counts against the team's size; an
`order.paid` carrying the team confirms it. A hold that expires is released by the sweep.
A payment that finds no seat (released, team full, failed or cancelled) is refunded, or
opens a new team for the payer when the campaign says `on_late_payment: new_team`. Funnels
of pay-to-join members move on `groupbuy.joined`/`groupbuy.succeeded`, not on the
`order.paid` itself, and fulfilment is an action queued only when the team succeeds.
"""

from __future__ import annotations

import secrets
from collections.abc import Sequence
from dataclasses import dataclass, replace
from datetime import datetime
from typing import Any, NamedTuple

from sqlalchemy import Connection, Table, bindparam, or_, select, update

from app.db import insert_or_skip, insert_rows, one_of
from app.engine.definition import GroupBuy
from app.engine.schedule import parse_duration
from app.errors import FieldProblem, NotFound, Refused
from app.events.models import EventLog
from app.funnels import store
from app.mechanics.commands import (
    Context,
    DirectAction,
    Effects,
    Emit,
    Peers,
    WriteThrough,
    campaign_config,
)
from app.mechanics.groupbuy import rules
from app.mechanics.groupbuy.models import CampaignCounter, Seat, Team
from app.mechanics.vouchers import service as vouchers
from app.members.models import Member
from app.prepared import Many, Prepared

team_t: Table = Team.__table__  # type: ignore[attr-defined]
seat_t: Table = Seat.__table__  # type: ignore[attr-defined]
counter_t: Table = CampaignCounter.__table__  # type: ignore[attr-defined]
member_t: Table = Member.__table__  # type: ignore[attr-defined]
event_t: Table = EventLog.__table__  # type: ignore[attr-defined]

OPEN, SUCCEEDED, FAILED, CANCELLED = "open", "succeeded", "failed", "cancelled"
HELD, ACTIVE, LEFT, RELEASED = "held", "active", "left", "released"
LEADER, MEMBER = "leader", "member"
SHARE_PATH = "/pages/groupbuy/team?id="


class InvalidReference(NotFound):
    status, code, title = 422, "invalid_reference", "Unknown reference"


# ── lookups ───────────────────────────────────────────────────────────────────────────────
def team_config(conn: Connection, team: Any) -> tuple[store.VersionRef, GroupBuy]:
    """The campaign as the version the team was opened under defines it."""
    ref = store.version_ref(conn, team.version_id)
    return ref, store.compiled_version(conn, ref).definition.mechanics.groupbuy[team.campaign]


def _one_of(column: Any, values: tuple[str, ...]) -> Any:
    """`column IN (values)` with the values compiled in (a Prepared statement takes no
    expanding IN list)."""
    return or_(*(column == v for v in values))


# The statements of joining (the hot path) are built once, with parameters, and run as
# Prepared statements (app/prepared.py): building a statement per call cost more than
# running it, and Connection.execute's own work about as much again.
_TEAM_BY_SHARE = Prepared(
    select(team_t)
    .where(team_t.c.public_id == bindparam("b_public"), team_t.c.tenant_id == bindparam("b_tenant"))
    .with_for_update()
)
_TEAM_BY_ID = Prepared(select(team_t).where(team_t.c.id == bindparam("b_id")))
_CAMPAIGN_SEATS = Prepared(
    select(seat_t, team_t.c.public_id, team_t.c.status.label("team_status"))
    .join(team_t, team_t.c.id == seat_t.c.team_id)
    .where(
        seat_t.c.tenant_id == bindparam("b_tenant"),
        seat_t.c.member_id == bindparam("b_member"),
        seat_t.c.campaign_key == bindparam("b_campaign"),
    )
)
_TAKE_SEAT = Prepared(
    update(team_t)
    .where(team_t.c.id == bindparam("b_id"), team_t.c.seats_taken < team_t.c.capacity)
    .values(seats_taken=team_t.c.seats_taken + 1)
    .returning(*team_t.c)
)
_NEW_SEAT = Prepared(seat_t.insert().returning(seat_t.c.id))
_SUCCEED = Prepared(
    update(team_t)
    .where(team_t.c.id == bindparam("b_id"))
    .values(
        status=SUCCEEDED,
        closed_at=bindparam("b_at"),
        close_reason=bindparam("b_reason"),
        price_fen=bindparam("b_price"),
        virtual_seats=bindparam("b_virtual"),
    )
    .returning(*team_t.c)
)


def _seats_query(statuses: tuple[str, ...]) -> Prepared:
    return Prepared(
        select(seat_t)
        .where(seat_t.c.team_id == bindparam("b_team"), _one_of(seat_t.c.status, statuses))
        .order_by(seat_t.c.joined_at, seat_t.c.id)
    )


_SEATS: dict[tuple[str, ...], Prepared] = {
    s: _seats_query(s) for s in ((ACTIVE,), (HELD,), (HELD, ACTIVE))
}


class _Shown(NamedTuple):
    """One of `_TEAM_MEMBERS`' rows, made in memory (a batch's run of joins)."""

    role: str
    status: str
    joined_at: datetime
    hold_until: datetime | None
    nickname: str | None
    attributes: dict[str, Any] | None
    member_id: int
    order_id: str | None
    paid_fen: int | None
    team_id: int


def _team_members(teams: Any) -> Any:
    """The members a team's answer lists (and a success rewards), in joining order."""
    return (
        select(
            seat_t.c.role,
            seat_t.c.status,
            seat_t.c.joined_at,
            seat_t.c.hold_until,
            member_t.c.nickname,
            member_t.c.attributes,
            seat_t.c.member_id,
            seat_t.c.order_id,
            seat_t.c.paid_fen,
            seat_t.c.team_id,
        )
        .join(member_t, member_t.c.id == seat_t.c.member_id)
        .where(teams, _one_of(seat_t.c.status, (HELD, ACTIVE)))
        .order_by(seat_t.c.joined_at, seat_t.c.id)
    )


_TEAM_MEMBERS = Prepared(_team_members(seat_t.c.team_id == bindparam("b_team")))
# A batch's run of joins locks every team its joins name, in one order (id) and one
# statement, and reads their members with another.
_TEAMS_BY_SHARE = Prepared(
    {
        dialect: select(team_t)
        .where(team_t.c.tenant_id == bindparam("b_tenant"), shares)
        .order_by(team_t.c.id)
        .with_for_update()
        for dialect, shares in one_of(team_t.c.public_id, "b_publics").items()
    }
)
_TEAMS_MEMBERS = Prepared(
    {
        dialect: _team_members(teams)
        for dialect, teams in one_of(seat_t.c.team_id, "b_teams").items()
    }
)


def _lock_team(ctx: Context, public_id: Any, path: str = "data.team") -> Any:
    team = _TEAM_BY_SHARE.record(ctx.conn, {"b_public": str(public_id), "b_tenant": ctx.tenant_id})
    if team is None:
        message = f'no group-buy team "{public_id}"'
        if ctx.source in ("member", "admin"):  # the API's team is in its URL: a 404, as for
            raise NotFound(message)  # any address that names nothing (or another tenant's)
        raise InvalidReference(message, errors=[FieldProblem(path, "unknown team")])
    return team


def _reload(conn: Connection, team_id: int) -> Any:
    team = _TEAM_BY_ID.record(conn, {"b_id": team_id})
    assert team is not None, team_id
    return team


def _campaign_seats(ctx: Context, member_id: int, campaign_key: str) -> list[Any]:
    """Every seat the member ever held in the campaign, with its team's share id and status:
    one read answers "already in this team?", "in another open team?" and the limits."""
    params = {"b_tenant": ctx.tenant_id, "b_member": member_id, "b_campaign": campaign_key}
    return _CAMPAIGN_SEATS.records(ctx.conn, params)


def _live(seats: Sequence[Any]) -> Any | None:
    """The seat, of `_campaign_seats`, in a team of the campaign that is still open."""
    return next((s for s in seats if s.live_key is not None), None)


def _seat_of(conn: Connection, team_id: int, member_id: int) -> Any:
    return conn.execute(
        select(seat_t).where(seat_t.c.team_id == team_id, seat_t.c.member_id == member_id)
    ).first()


def _member(ctx: Context) -> Any:
    """The command's member, locked, with the profile the mini-program supplied (nickname,
    avatar), which teammates see."""
    m = ctx.member()
    profile = ctx.data.get("profile") or {}
    changes: dict[str, Any] = {}
    if profile.get("nickname") and profile["nickname"] != m.nickname:
        changes["nickname"] = profile["nickname"]
    if profile.get("avatar") and profile["avatar"] != (m.attributes or {}).get("avatar"):
        changes["attributes"] = {**(m.attributes or {}), "avatar": profile["avatar"]}
    if not changes:
        return m
    changed = ctx.conn.execute(
        update(member_t).where(member_t.c.id == m.id).values(**changes).returning(*member_t.c)
    ).one()
    ctx.member_changed(changed)
    return changed


def _campaign_key(funnel_id: int, name: str) -> str:
    return f"{funnel_id}:{name}"


# ── limits ────────────────────────────────────────────────────────────────────────────────
def _uses_counter(cfg: GroupBuy) -> bool:
    return bool(cfg.stock_teams or cfg.stock_seats or cfg.max_open_teams)


_COUNTER_INSERT = insert_or_skip(counter_t, ["tenant_id", "funnel_id", "campaign"])


def _take(
    ctx: Context,
    team: Any | None,
    funnel_id: int,
    name: str,
    cfg: GroupBuy,
    *,
    teams: int = 0,
    seats: int = 0,
) -> None:
    """Take (or, negative, give back) campaign stock with one conditional UPDATE."""
    if not _uses_counter(cfg) or (teams == 0 and seats == 0):
        return
    key = {"tenant_id": ctx.tenant_id, "funnel_id": funnel_id, "campaign": name}
    ctx.conn.execute(_COUNTER_INSERT[ctx.conn.dialect.name], key)
    c = counter_t.c
    where = [c.tenant_id == ctx.tenant_id, c.funnel_id == funnel_id, c.campaign == name]
    if teams > 0 and cfg.stock_teams:
        where.append(c.teams_used + teams <= cfg.stock_teams)
    if teams > 0 and cfg.max_open_teams:
        where.append(c.teams_open + teams <= cfg.max_open_teams)
    if seats > 0 and cfg.stock_seats:
        where.append(c.seats_used + seats <= cfg.stock_seats)
    done = ctx.conn.execute(
        update(counter_t)
        .where(*where)
        .values(
            teams_used=c.teams_used + teams,
            teams_open=c.teams_open + teams,
            seats_used=c.seats_used + seats,
        )
    ).rowcount
    if done:
        return
    row = ctx.conn.execute(select(counter_t).where(*where[:3])).one()
    if teams > 0 and cfg.max_open_teams and row.teams_open + teams > cfg.max_open_teams:
        raise Refused(
            rules.TOO_MANY_OPEN,
            f"{cfg.max_open_teams} teams are open at once already; join one of them instead",
        )
    raise Refused(rules.SOLD_OUT, f"the group-buy for {cfg.product} is sold out")


def _closing_counters(ctx: Context, team: Any, cfg: GroupBuy, *, succeeded: bool) -> None:
    """A closing team leaves the open count; a failed or cancelled one gives its stock back."""
    if not _uses_counter(cfg):
        return
    c = counter_t.c
    values: dict[str, Any] = {"teams_open": c.teams_open - 1}
    if not succeeded:
        values["teams_used"] = c.teams_used - 1
        values["seats_used"] = c.seats_used - team.seats_taken
    ctx.conn.execute(
        update(counter_t)
        .where(
            c.tenant_id == ctx.tenant_id,
            c.funnel_id == team.funnel_id,
            c.campaign == team.campaign,
        )
        .values(**values)
    )


def _check_member_limits(
    ctx: Context, member_id: int, seats: Sequence[Any], cfg: GroupBuy, role: str
) -> None:
    """`seats`: the member's seats in the campaign (`_campaign_seats`)."""
    live = _live(seats)
    if live is not None:
        raise Refused(
            rules.IN_ANOTHER_TEAM,
            f"you are already in open team {live.public_id} of this campaign; one at a time",
        )
    limit = cfg.max_teams_led_per_member if role == LEADER else cfg.max_teams_joined_per_member
    if limit is not None:
        n = sum(
            1
            for s in seats
            if s.role == role and s.status in (HELD, ACTIVE) and s.team_status in (OPEN, SUCCEEDED)
        )
        if n >= limit:
            what = "led" if role == LEADER else "joined"
            raise Refused(
                rules.LEAD_LIMIT if role == LEADER else rules.JOIN_LIMIT,
                f"you have {what} {n} team(s) of this campaign, the most it allows",
            )
    if role == MEMBER and cfg.new_customers_only:
        paid_before = ctx.conn.execute(
            select(event_t.c.id)
            .where(event_t.c.member_id == member_id, event_t.c.type == "order.paid")
            .limit(1)
        ).first()
        if paid_before is not None:
            raise Refused(
                rules.NEW_CUSTOMERS_ONLY, "this team is for new customers (老带新团) only"
            )


# ── commands ──────────────────────────────────────────────────────────────────────────────
def open_team(ctx: Context) -> Effects:
    """A member opens a team as its leader (`groupbuy.open`)."""
    funnel_key, name = str(ctx.data["funnel"]), str(ctx.data["campaign"])
    m = _member(ctx)
    ref, cfg = campaign_config(ctx, funnel_key, "groupbuy", name)
    return _open(ctx, m, ref, name, cfg, paid=None)


def _open(
    ctx: Context,
    m: Any,
    ref: store.VersionRef,
    name: str,
    cfg: GroupBuy,
    paid: dict[str, Any] | None,
) -> Effects:
    refusal = rules.window_refusal(cfg, ctx.now)
    if refusal is not None:
        raise Refused(refusal, _window_detail(refusal, cfg))
    seats = _campaign_seats(ctx, m.id, _campaign_key(ref.funnel_id, name))
    _check_member_limits(ctx, m.id, seats, cfg, LEADER)
    _take(ctx, None, ref.funnel_id, name, cfg, teams=1, seats=1)
    deadline = rules.team_deadline(cfg, ctx.now)
    pay = cfg.join_mode == "pay"
    team = ctx.conn.execute(
        team_t.insert()
        .values(
            public_id="tm_" + secrets.token_urlsafe(12),
            tenant_id=ctx.tenant_id,
            funnel_id=ref.funnel_id,
            version_id=ref.version_id,
            campaign=name,
            status=OPEN,
            leader_member_id=m.id,
            capacity=rules.capacity(cfg),
            min_size=cfg.team_size,
            seats_taken=1,
            seats_paid=1 if paid else 0,
            opened_at=ctx.now,
            deadline=deadline,
        )
        .returning(*team_t.c)
    ).one()
    seat_status = HELD if pay and paid is None else ACTIVE
    ctx.conn.execute(
        seat_t.insert().values(
            tenant_id=ctx.tenant_id,
            team_id=team.id,
            member_id=m.id,
            campaign_key=_campaign_key(ref.funnel_id, name),
            live_key=_campaign_key(ref.funnel_id, name),
            role=LEADER,
            status=seat_status,
            price_fen=rules.seat_price(cfg, LEADER),
            joined_at=ctx.now,
            hold_until=rules.hold_until(cfg, ctx.now, deadline) if seat_status == HELD else None,
            order_id=paid["order_id"] if paid else None,
            paid_fen=paid.get("amount_fen") if paid else None,
        )
    )
    data = _event_data(team, cfg, LEADER)
    effects = Effects(m.id, {"outcome": "opened", "team": team_json(ctx.conn, team, ctx.now)})
    effects.emits.append(Emit(m.id, "groupbuy.team_opened", data))
    if seat_status == ACTIVE:
        effects.emits.append(Emit(m.id, "groupbuy.joined", data))
    return effects


def join(ctx: Context) -> Effects:
    """A member joins a team through its share (`groupbuy.join`). In a batch, through the
    batch's run of joins (`_Joins`)."""
    if ctx.run is not None and (ctx.tenant_id, str(ctx.data["team"])) not in _THROUGH:
        run = ctx.run(("groupbuy.join", ctx.tenant_id), lambda peers: _Joins(ctx, peers))
        assert isinstance(run, _Joins)
        return run.join(ctx)
    team = _lock_team(ctx, ctx.data["team"])
    m = _member(ctx)
    _, cfg = team_config(ctx.conn, team)
    seats = _campaign_seats(ctx, m.id, _campaign_key(team.funnel_id, team.campaign))
    seat = _may_join(ctx, team, cfg, m.id, seats)
    pay = cfg.join_mode == "pay"
    team = _take_seat(ctx, team, cfg)
    values = {
        "status": HELD if pay else ACTIVE,
        "live_key": _campaign_key(team.funnel_id, team.campaign),
        "role": MEMBER,
        "price_fen": rules.seat_price(cfg, MEMBER),
        "joined_at": ctx.now,
        "hold_until": rules.hold_until(cfg, ctx.now, team.deadline) if pay else None,
        "ended_at": None,
    }
    _put_seat(ctx, team, m.id, seat, values)
    effects = Effects(m.id, {"outcome": "held" if pay else "joined"})
    if not pay:
        effects.emits.append(Emit(m.id, "groupbuy.joined", _event_data(team, cfg, MEMBER)))
        team = _settle_if_full(ctx, team, cfg, effects)
    effects.result["team"] = team_json(ctx.conn, team, ctx.now)
    return effects


_SEAT_COLUMNS = (
    "tenant_id",
    "team_id",
    "member_id",
    "campaign_key",
    "live_key",
    "role",
    "status",
    "price_fen",
    "joined_at",
    "hold_until",
    "order_id",
    "paid_fen",
    "ended_at",
)
_NEW_SEATS = Many(insert_rows(seat_t, _SEAT_COLUMNS), seat_t.insert())
_TEAM_CLOSE_COLUMNS = (
    "seats_taken",
    "status",
    "closed_at",
    "close_reason",
    "price_fen",
    "virtual_seats",
)
_SET_TEAM = Prepared(
    update(team_t)
    .where(team_t.c.id == bindparam("b_id"))
    .values({c: bindparam(f"b_{c}") for c in _TEAM_CLOSE_COLUMNS})
)
_MEMBERS_SEATS = Prepared(
    {
        dialect: select(seat_t, team_t.c.public_id, team_t.c.status.label("team_status"))
        .join(team_t, team_t.c.id == seat_t.c.team_id)
        .where(
            seat_t.c.tenant_id == bindparam("b_tenant"),
            members,
            seat_t.c.campaign_key == bindparam("b_campaign"),
        )
        for dialect, members in one_of(seat_t.c.member_id, "b_members").items()
    }
)


# The seats of teams that closed no longer live (those already not live left as they are).
_NOT_LIVE = Prepared(
    {
        dialect: update(seat_t).where(teams, seat_t.c.live_key.is_not(None)).values(live_key=None)
        for dialect, teams in one_of(seat_t.c.team_id, "b_teams").items()
    }
)


# Teams whose joins the run leaves to `join` (a campaign's join mode and limits are fixed by
# the version the team was opened under): known after their first join, by this process.
_THROUGH: set[tuple[int, str]] = set()
_THROUGH_MAX = 10_000


class _HeldSeat(NamedTuple):
    """A seat the run holds back, as `_campaign_seats` answers seats."""

    team_id: int
    public_id: str
    live_key: str | None
    role: str
    status: str
    team_status: str


@dataclass(frozen=True)
class _TeamState:
    row: Any  # the team row, locked, as the run's joins left it
    members: tuple[Any, ...]  # `_TEAM_MEMBERS`' rows, the run's joiners after the table's
    stored: Any  # the row as the table holds it


class _Joins:
    """A batch's joins (`app.mechanics.commands.Run`): the hot-team case, every connection
    joining the same few teams.

    The batch's first join locks every team the batch's joins name, in id order, and reads
    them (their rows, their members as the answer lists them), two statements; the campaign
    seats of every member of the batch who joins, one statement per campaign. A join is
    then decided from memory by `join`'s rules, the join that fills a team succeeds it from
    memory too (`_succeeded`: the vouchers are issued at once, one statement), and the seats
    and the teams written at `flush`: one statement for the seats, one per team, one for
    the seats of the teams that succeeded. What the run does not hold is left to `join`
    itself, by `WriteThrough` before anything changes: a pay-to-join campaign, a campaign
    with stock or a cap on open teams (their counters; such a team's next joins skip the
    run), and a member taking back a seat they left. PostgreSQL: a join that waited
    for its team's lock and sent five statements under it (nine for the success) sends
    none of its own now (the success, its vouchers')."""

    kinds = frozenset({"groupbuy.join"})

    def __init__(self, ctx: Context, peers: Peers) -> None:
        self.tenant_id = ctx.tenant_id
        self.peers = sorted({m for m, _ in peers if m is not None})
        self.shares = sorted({str(d["team"]) for _, d in peers if d.get("team") is not None})
        self.teams: dict[str, _TeamState] = {}  # by share id
        self.seats: dict[tuple[str, int], tuple[Any, ...]] = {}  # (campaign, member) -> seats
        self.new: list[dict[str, Any]] = []  # the seats held back, in order
        self._mark: tuple[Any, ...] = ({}, {}, 0)

    def mark(self) -> None:
        self._mark = (dict(self.teams), dict(self.seats), len(self.new))

    def undo(self) -> None:
        """Back to the mark; a team the failed event locked is forgotten (its lock went with
        the savepoint on PostgreSQL)."""
        teams, seats, held = self._mark
        self.teams, self.seats = dict(teams), dict(seats)
        del self.new[held:]

    def flush(self, conn: Connection) -> None:
        changed = [t for t in self.teams.values() if t.row != t.stored]
        if not changed:
            return
        # A seat of a team the run closed is written no longer live, and only the seats
        # written before (the leader's, earlier batches' joiners') are updated: a seat's
        # live_key is in one of its indexes, so each update writes the row again.
        closed = sorted(t.row.id for t in changed if t.row.status != t.stored.status)
        _NEW_SEATS.run(
            conn, [{**s, "live_key": None} if s["team_id"] in closed else s for s in self.new]
        )
        _SET_TEAM.run_many(
            conn,
            [
                {"b_id": t.row.id, **{f"b_{c}": getattr(t.row, c) for c in _TEAM_CLOSE_COLUMNS}}
                for t in changed
            ],
        )
        if closed:
            _NOT_LIVE.run(conn, {"b_teams": closed})
        self.new = []
        self.teams = {k: replace(t, stored=t.row) for k, t in self.teams.items()}

    def _team(self, ctx: Context, public_id: str) -> _TeamState:
        if not self.teams:
            self._lock(ctx, self.shares)
        if public_id not in self.teams:
            self._lock(ctx, [public_id])
        found = self.teams.get(public_id)
        if found is None:  # no such team: answered as `join` answers it
            _lock_team(ctx, public_id)
            raise AssertionError(f"team {public_id} was not locked")
        return found

    def _lock(self, ctx: Context, shares: list[str]) -> None:
        """Teams locked in id order (two writers' batches over the same teams then wait for
        each other instead of deadlocking) and read, with their members, in two
        statements."""
        params = {"b_tenant": self.tenant_id, "b_publics": shares}
        rows = _TEAMS_BY_SHARE.records(ctx.conn, params)
        if not rows:
            return
        members: dict[int, list[Any]] = {r.id: [] for r in rows}
        for m in _TEAMS_MEMBERS.records(ctx.conn, {"b_teams": sorted(members)}):
            members[m.team_id].append(m)
        for r in rows:
            self.teams[r.public_id] = _TeamState(r, tuple(members[r.id]), r)

    def _seats(self, ctx: Context, campaign: str, member_id: int) -> tuple[Any, ...]:
        """`_campaign_seats` from memory: read for all of the batch's joiners at once (a
        seat in a team the run closed, as the run has it)."""
        if (campaign, member_id) not in self.seats:
            wanted = self.peers if member_id in self.peers else [member_id]
            for m in wanted:
                self.seats.setdefault((campaign, m), ())
            params = {"b_tenant": self.tenant_id, "b_members": wanted, "b_campaign": campaign}
            closed = {t.row.id: t.row.status for t in self.teams.values() if t.row.status != OPEN}
            for r in _MEMBERS_SEATS.records(ctx.conn, params):
                if r.team_id in closed:
                    r = r._replace(live_key=None, team_status=closed[r.team_id])
                self.seats[(campaign, r.member_id)] += (r,)
        return self.seats[(campaign, member_id)]

    def join(self, ctx: Context) -> Effects:
        public_id = str(ctx.data["team"])
        state = self._team(ctx, public_id)
        team = state.row
        _, cfg = team_config(ctx.conn, team)
        if cfg.join_mode == "pay" or _uses_counter(cfg):
            if len(_THROUGH) >= _THROUGH_MAX:
                _THROUGH.clear()
            _THROUGH.add((ctx.tenant_id, public_id))  # its next joins go to `join` at once
            raise WriteThrough
        m = _member(ctx)
        campaign = _campaign_key(team.funnel_id, team.campaign)
        seats = self._seats(ctx, campaign, m.id)
        if _may_join(ctx, team, cfg, m.id, seats) is not None:
            raise WriteThrough  # a seat they left or lost, taken again
        if team.seats_taken >= team.capacity:
            raise Refused(rules.TEAM_FULL, f"team {team.public_id} is full")
        team = team._replace(seats_taken=team.seats_taken + 1)
        self.new.append(
            {
                "tenant_id": ctx.tenant_id,
                "team_id": team.id,
                "member_id": m.id,
                "campaign_key": campaign,
                "live_key": campaign,
                "role": MEMBER,
                "status": ACTIVE,
                "price_fen": rules.seat_price(cfg, MEMBER),
                "joined_at": ctx.now,
                "hold_until": None,
                "order_id": None,
                "paid_fen": None,
                "ended_at": None,
            }
        )
        held = _HeldSeat(team.id, team.public_id, campaign, MEMBER, ACTIVE, team.status)
        self.seats[(campaign, m.id)] = (*seats, held)
        shown = _Shown(
            MEMBER, ACTIVE, ctx.now, None, m.nickname, m.attributes, m.id, None, None, team.id
        )
        members = (*state.members, shown)
        effects = Effects(m.id, {"outcome": "joined"})
        effects.emits.append(Emit(m.id, "groupbuy.joined", _event_data(team, cfg, MEMBER)))
        settlement = rules.settle_when_full(cfg, _confirmed(team, cfg))
        if settlement is not None:
            team = self._succeed(ctx, team, cfg, settlement, members, effects)
        self.teams[public_id] = replace(state, row=team, members=members)
        effects.result["team"] = team_json(ctx.conn, team, ctx.now, members=members)
        return effects

    def _succeed(
        self,
        ctx: Context,
        team: Any,
        cfg: GroupBuy,
        settlement: rules.Settlement,
        members: tuple[_Shown, ...],
        effects: Effects,
    ) -> Any:
        """`_succeed` from memory: the team closed, its seats no longer live."""
        team = team._replace(
            status=SUCCEEDED,
            closed_at=ctx.now,
            close_reason=settlement.reason,
            price_fen=settlement.price_fen,
            virtual_seats=settlement.virtual_seats,
        )
        for key, seats in self.seats.items():
            if any(s.team_id == team.id for s in seats):
                self.seats[key] = tuple(
                    s._replace(live_key=None, team_status=SUCCEEDED) if s.team_id == team.id else s
                    for s in seats
                )
        active = [s for s in members if s.status == ACTIVE]
        _succeeded(ctx, team, cfg, settlement, active, effects)
        return team


def _may_join(
    ctx: Context, team: Any, cfg: GroupBuy, member_id: int, seats: Sequence[Any]
) -> Any | None:
    """A join's refusals, in their order, given the member's campaign seats; the seat they
    had in the team (left or released), if any."""
    seat = next((s for s in seats if s.team_id == team.id), None)
    _refuse_closed(team, ctx.now)
    if seat is not None and seat.status in (HELD, ACTIVE):
        raise Refused(
            rules.ALREADY_JOINED,
            f"you are already in team {team.public_id}"
            + (" (your seat waits for its payment)" if seat.status == HELD else ""),
        )
    _check_member_limits(ctx, member_id, seats, cfg, MEMBER)
    return seat


def _refuse_closed(team: Any, now: datetime) -> None:
    if team.status != OPEN:
        raise Refused(rules.TEAM_CLOSED, f"team {team.public_id} is {team.status}")
    if now >= team.deadline:
        raise Refused(
            rules.TEAM_EXPIRED, f"team {team.public_id} expired at {team.deadline.isoformat()}"
        )


def _take_seat(ctx: Context, team: Any, cfg: GroupBuy) -> Any:
    """Take a seat if one is left; the team as it is now."""
    taken = _TAKE_SEAT.record(ctx.conn, {"b_id": team.id})
    if taken is None:
        raise Refused(rules.TEAM_FULL, f"team {team.public_id} is full")
    _take(ctx, team, team.funnel_id, team.campaign, cfg, seats=1)
    return taken


def _put_seat(ctx: Context, team: Any, member_id: int, seat: Any, values: dict[str, Any]) -> int:
    """Insert the member's seat, or reuse the row of a seat they left or lost."""
    if seat is not None:
        ctx.conn.execute(update(seat_t).where(seat_t.c.id == seat.id).values(**values))
        return int(seat.id)
    row = {
        "tenant_id": ctx.tenant_id,
        "team_id": team.id,
        "member_id": member_id,
        "campaign_key": _campaign_key(team.funnel_id, team.campaign),
        "order_id": None,
        "paid_fen": None,
        **values,
    }
    return int(_NEW_SEAT.scalar(ctx.conn, row))


def _confirmed(team: Any, cfg: GroupBuy) -> int:
    return int(team.seats_paid if cfg.join_mode == "pay" else team.seats_taken)


def _settle_if_full(ctx: Context, team: Any, cfg: GroupBuy, effects: Effects) -> Any:
    """Close `team` (its current row) as succeeded once enough seats are confirmed; the
    team as it is afterwards."""
    settlement = rules.settle_when_full(cfg, _confirmed(team, cfg))
    if settlement is None:
        return team
    return _succeed(ctx, team, cfg, settlement, effects)


def leave(ctx: Context) -> Effects:
    """A member leaves an open team (`groupbuy.leave`). A paid seat is refunded; a leader's
    place passes to the earliest remaining member; a leader alone cancels the team."""
    team = _lock_team(ctx, ctx.data["team"])
    m = _member(ctx)
    _, cfg = team_config(ctx.conn, team)
    seat = _seat_of(ctx.conn, team.id, m.id)
    if seat is None or seat.status not in (HELD, ACTIVE):
        raise Refused(rules.NOT_IN_TEAM, f"you are not in team {team.public_id}")
    if team.status != OPEN:
        raise Refused(rules.TEAM_CLOSED, f"team {team.public_id} is {team.status}")
    effects = Effects(m.id, {"outcome": "left"})
    _vacate(ctx, team, cfg, seat, LEFT, "left", effects)
    effects.emits.append(Emit(m.id, "groupbuy.left", _event_data(team, cfg, seat.role)))
    effects.result["team"] = team_json(ctx.conn, _reload(ctx.conn, team.id), ctx.now)
    return effects


def _vacate(
    ctx: Context, team: Any, cfg: GroupBuy, seat: Any, status: str, why: str, effects: Effects
) -> None:
    """Free a seat of an open team (left, or a payment hold released)."""
    paid = seat.status == ACTIVE and seat.order_id is not None
    ctx.conn.execute(
        update(seat_t)
        .where(seat_t.c.id == seat.id)
        .values(status=status, live_key=None, ended_at=ctx.now, hold_until=None)
    )
    ctx.conn.execute(
        update(team_t)
        .where(team_t.c.id == team.id)
        .values(
            seats_taken=team_t.c.seats_taken - 1,
            seats_paid=team_t.c.seats_paid - (1 if paid else 0),
        )
    )
    _take(ctx, team, team.funnel_id, team.campaign, cfg, seats=-1)
    if paid:
        effects.actions.append(_refund(team, seat.member_id, seat.order_id, seat.paid_fen, why))
    if seat.role != LEADER:
        return
    heir = ctx.conn.execute(
        select(seat_t.c.id, seat_t.c.member_id)
        .where(seat_t.c.team_id == team.id, seat_t.c.status.in_([HELD, ACTIVE]))
        .order_by(seat_t.c.joined_at, seat_t.c.id)
        .limit(1)
    ).first()
    if heir is None:
        reason = "leader_left_alone" if why == "left" else "leader_unpaid"
        _close(ctx, _reload(ctx.conn, team.id), cfg, CANCELLED, reason, effects)
        return
    ctx.conn.execute(update(seat_t).where(seat_t.c.id == heir.id).values(role=LEADER))
    ctx.conn.execute(
        update(team_t).where(team_t.c.id == team.id).values(leader_member_id=heir.member_id)
    )


def cancel(ctx: Context) -> Effects:
    """The merchant cancels an open team (`groupbuy.cancel`): paid members are refunded."""
    team = _lock_team(ctx, ctx.data["team"])
    _, cfg = team_config(ctx.conn, team)
    if team.status != OPEN:
        raise Refused(rules.TEAM_CLOSED, f"team {team.public_id} is {team.status}")
    effects = Effects(None, {"outcome": "cancelled"})
    reason = str(ctx.data.get("reason") or "cancelled_by_merchant")[:64]
    _close(ctx, team, cfg, CANCELLED, reason, effects)
    effects.result["team"] = team_json(ctx.conn, _reload(ctx.conn, team.id), ctx.now)
    return effects


def deadline(ctx: Context) -> Effects:
    """The team's deadline passed (the sweep): settle it, without anyone calling the API."""
    team = ctx.conn.execute(
        select(team_t).where(team_t.c.id == int(ctx.data["team_id"])).with_for_update()
    ).first()
    if team is None or team.status != OPEN or team.deadline > ctx.now:
        return Effects(None, {"outcome": "nothing_due"})
    _, cfg = team_config(ctx.conn, team)
    effects = Effects(None, {"outcome": "settled"})
    if cfg.join_mode == "pay":  # unpaid holds end with the team
        for held in _seats(ctx.conn, team.id, (HELD,)):
            seat = ctx.conn.execute(select(seat_t).where(seat_t.c.id == held.id)).one()
            _vacate(ctx, team, cfg, seat, RELEASED, "deadline", effects)
        team = _reload(ctx.conn, team.id)
        if team.status != OPEN:
            return effects
    settlement = rules.settle_at_deadline(cfg, _confirmed(team, cfg))
    if settlement.succeeded:
        _succeed(ctx, team, cfg, settlement, effects)
    else:
        _close(ctx, team, cfg, FAILED, settlement.reason, effects)
    effects.result["team"] = team_json(ctx.conn, _reload(ctx.conn, team.id), ctx.now)
    return effects


def hold_expired(ctx: Context) -> Effects:
    """A pay-to-join seat's payment window passed unpaid (the sweep): release the seat."""
    seat = ctx.conn.execute(select(seat_t).where(seat_t.c.id == int(ctx.data["seat_id"]))).first()
    if seat is None:
        return Effects(None, {"outcome": "nothing_due"})
    team = ctx.conn.execute(
        select(team_t).where(team_t.c.id == seat.team_id).with_for_update()
    ).one()
    seat = ctx.conn.execute(select(seat_t).where(seat_t.c.id == seat.id)).one()  # under lock
    if seat.status != HELD or seat.hold_until is None or seat.hold_until > ctx.now:
        return Effects(None, {"outcome": "nothing_due"})
    _, cfg = team_config(ctx.conn, team)
    effects = Effects(seat.member_id, {"outcome": "released"})
    if team.status == OPEN:
        _vacate(ctx, team, cfg, seat, RELEASED, "payment_window_passed", effects)
    else:
        ctx.conn.execute(
            update(seat_t)
            .where(seat_t.c.id == seat.id)
            .values(status=RELEASED, live_key=None, hold_until=None, ended_at=ctx.now)
        )
    effects.emits.append(
        Emit(seat.member_id, "groupbuy.seat_released", _event_data(team, cfg, seat.role))
    )
    return effects


def pay(ctx: Context) -> Effects:
    """An `order.paid` carrying a team: confirm the payer's held seat, or take a free one;
    a payment that finds no seat is refunded (or opens a new team, as configured)."""
    team = _lock_team(ctx, ctx.data["team_id"], path="data.team_id")
    m = ctx.member()
    _, cfg = team_config(ctx.conn, team)
    order_id, amount = str(ctx.data["order_id"]), ctx.data.get("amount_fen")
    paid = {"order_id": order_id, "amount_fen": amount}
    seat = _seat_of(ctx.conn, team.id, m.id)
    effects = Effects(m.id, {"outcome": "confirmed"})
    if (
        seat is not None
        and seat.status == HELD
        and team.status == OPEN
        and (seat.hold_until is None or seat.hold_until <= ctx.now)
    ):  # the window passed and the sweep has not come yet: the hold is gone all the same
        _vacate(ctx, team, cfg, seat, RELEASED, "payment_window_passed", effects)
        team, seat = _reload(ctx.conn, team.id), _seat_of(ctx.conn, team.id, m.id)
    if seat is not None and seat.status == ACTIVE and seat.order_id == order_id:
        effects.result = {"outcome": "already_confirmed"}
    elif seat is not None and seat.status == HELD and team.status == OPEN:
        _confirm(ctx, team, cfg, seat.id, seat.role, paid, effects)
    elif seat is not None and seat.status == ACTIVE:  # a second payment for one seat
        _refund_payment(ctx, team, m.id, paid, "already_paid", effects)
    elif not _retake_seat(ctx, team, cfg, m.id, seat, paid, effects):
        why = "team_full" if team.status == OPEN else f"team_{team.status}"
        opened = _late_payment_team(ctx, m, team, cfg, paid)
        if opened is not None:
            opened.result["outcome"] = "new_team"
            opened.result["reason"] = why
            return opened
        _refund_payment(ctx, team, m.id, paid, why, effects)
    effects.result["team"] = team_json(ctx.conn, _reload(ctx.conn, team.id), ctx.now)
    return effects


def _refund_payment(
    ctx: Context, team: Any, member_id: int, paid: dict[str, Any], why: str, effects: Effects
) -> None:
    effects.result = {"outcome": "refunded", "reason": why}
    effects.actions.append(_refund(team, member_id, paid["order_id"], paid["amount_fen"], why))


def _retake_seat(
    ctx: Context,
    team: Any,
    cfg: GroupBuy,
    member_id: int,
    seat: Any,
    paid: dict[str, Any],
    effects: Effects,
) -> bool:
    """A payer whose hold was released takes a free seat of the team, if one is left (and
    the campaign's stock allows: if not, this savepoint undoes the attempt)."""
    if team.status != OPEN or ctx.now >= team.deadline:
        return False
    attempt = ctx.conn.begin_nested()
    try:
        if not _free_seat(ctx, team, member_id, cfg):
            attempt.rollback()
            return False
    except Refused:
        attempt.rollback()
        return False
    seat_id = _put_seat(
        ctx,
        team,
        member_id,
        seat,
        {
            "status": HELD,
            "live_key": _campaign_key(team.funnel_id, team.campaign),
            "role": MEMBER,
            "price_fen": rules.seat_price(cfg, MEMBER),
            "joined_at": ctx.now,
            "hold_until": None,
            "ended_at": None,
        },
    )
    attempt.commit()
    _confirm(ctx, team, cfg, seat_id, MEMBER, paid, effects)
    return True


def _free_seat(ctx: Context, team: Any, member_id: int, cfg: GroupBuy) -> bool:
    """Can a payer without a held seat take one now (after their hold was released)?"""
    if team.seats_taken >= team.capacity:
        return False
    seats = _campaign_seats(ctx, member_id, _campaign_key(team.funnel_id, team.campaign))
    if _live(seats) is not None:
        return False
    _take_seat(ctx, team, cfg)
    return True


def _late_payment_team(
    ctx: Context, m: Any, team: Any, cfg: GroupBuy, paid: dict[str, Any]
) -> Effects | None:
    """With `on_late_payment: new_team`, open a team with the payer as its paid leader; if
    that is refused too (campaign over, a limit, sold out), None: the payment is refunded."""
    if cfg.on_late_payment != "new_team":
        return None
    versions = {v.funnel_id: v for v in ctx.versions()}
    ref = versions.get(team.funnel_id) or store.version_ref(ctx.conn, team.version_id)
    current = store.compiled_version(ctx.conn, ref).definition.mechanics.groupbuy.get(
        team.campaign, cfg
    )
    attempt = ctx.conn.begin_nested()
    try:
        opened = _open(ctx, m, ref, team.campaign, current, paid=paid)
    except Refused:
        attempt.rollback()
        return None
    attempt.commit()
    return opened


def _confirm(
    ctx: Context,
    team: Any,
    cfg: GroupBuy,
    seat_id: int,
    role: str,
    paid: dict[str, Any],
    effects: Effects,
) -> None:
    ctx.conn.execute(
        update(seat_t)
        .where(seat_t.c.id == seat_id)
        .values(
            status=ACTIVE,
            hold_until=None,
            order_id=paid["order_id"],
            paid_fen=paid["amount_fen"],
        )
    )
    team = ctx.conn.execute(
        update(team_t)
        .where(team_t.c.id == team.id)
        .values(seats_paid=team_t.c.seats_paid + 1)
        .returning(*team_t.c)
    ).one()
    member_id = effects.member_id
    assert member_id is not None
    effects.emits.append(Emit(member_id, "groupbuy.joined", _event_data(team, cfg, role)))
    _settle_if_full(ctx, team, cfg, effects)


def _seats(conn: Connection, team_id: int, statuses: tuple[str, ...]) -> list[Any]:
    return _SEATS[statuses].records(conn, {"b_team": team_id})


def _succeed(
    ctx: Context, team: Any, cfg: GroupBuy, settlement: rules.Settlement, effects: Effects
) -> Any:
    """Close the team as succeeded; the closed team."""
    team = _SUCCEED.record(
        ctx.conn,
        {
            "b_id": team.id,
            "b_at": ctx.now,
            "b_reason": settlement.reason,
            "b_price": settlement.price_fen,
            "b_virtual": settlement.virtual_seats,
        },
    )
    assert team is not None
    _NOT_LIVE.run(ctx.conn, {"b_teams": [team.id]})
    _closing_counters(ctx, team, cfg, succeeded=True)
    _succeeded(ctx, team, cfg, settlement, _seats(ctx.conn, team.id, (ACTIVE,)), effects)
    return team


def _succeeded(
    ctx: Context,
    team: Any,
    cfg: GroupBuy,
    settlement: rules.Settlement,
    seats: Sequence[Any],
    effects: Effects,
) -> None:
    """What a success gives the members of its active `seats` (member_id, role, order_id,
    paid_fen; in joining order): a voucher each, `groupbuy.succeeded` and `voucher.issued`,
    and the paid orders' fulfilment (and a tier's refund)."""
    source = f"groupbuy.{team.campaign}"
    issued: list[Any] = []
    if cfg.voucher is not None:  # one each, in one statement
        v = cfg.voucher
        valid_for = parse_duration(v.valid_for)
        issued = vouchers.issue_many(
            ctx.conn,
            [
                vouchers.new_voucher(
                    tenant_id=ctx.tenant_id,
                    member_id=seat.member_id,
                    name=v.voucher,
                    value_fen=v.value_fen,
                    discount_percent=v.discount_percent,
                    valid_for=valid_for,
                    origin=f"groupbuy:{team.id}:{seat.member_id}",
                    mechanic=source,
                    funnel_id=team.funnel_id,
                    team_id=team.id,
                    now=ctx.now,
                )
                for seat in seats
            ],
        )
    for n, seat in enumerate(seats):
        data = _event_data(team, cfg, seat.role)
        if issued:
            data["voucher"] = issued[n].code
        effects.emits.append(Emit(seat.member_id, "groupbuy.succeeded", data))
        if issued:
            effects.emits.append(
                Emit(seat.member_id, "voucher.issued", vouchers.event_data(issued[n], source))
            )
        if seat.order_id is not None:
            effects.actions.append(
                DirectAction(
                    seat.member_id,
                    "fulfil_order",
                    {
                        "order_id": seat.order_id,
                        "team": team.public_id,
                        "product": cfg.product,
                        "idempotency_key": f"fulfil:{seat.order_id}",
                    },
                    source,
                )
            )
            due = (seat.paid_fen or 0) - (settlement.price_fen or seat.paid_fen or 0)
            if settlement.price_fen is not None and due > 0:  # a tier the team reached
                effects.actions.append(
                    _refund(team, seat.member_id, seat.order_id, due, "tier_price", partial=True)
                )


def _close(
    ctx: Context, team: Any, cfg: GroupBuy, status: str, reason: str, effects: Effects
) -> None:
    """Fail or cancel an open team: everyone is told, every paid seat refunded."""
    ctx.conn.execute(
        update(team_t)
        .where(team_t.c.id == team.id)
        .values(status=status, closed_at=ctx.now, close_reason=reason)
    )
    _NOT_LIVE.run(ctx.conn, {"b_teams": [team.id]})
    _closing_counters(ctx, team, cfg, succeeded=False)
    event = "groupbuy.failed" if status == FAILED else "groupbuy.cancelled"
    for seat in _seats(ctx.conn, team.id, (HELD, ACTIVE)):
        data = {**_event_data(team, cfg, seat.role), "reason": reason}
        effects.emits.append(Emit(seat.member_id, event, data))
        if seat.status == ACTIVE and seat.order_id is not None:
            effects.actions.append(
                _refund(team, seat.member_id, seat.order_id, seat.paid_fen, reason)
            )


def _refund(
    team: Any,
    member_id: int,
    order_id: str,
    amount: int | None,
    reason: str,
    *,
    partial: bool = False,
) -> DirectAction:
    """A refund the merchant's payment integration carries out; the outbox retries it until
    acknowledged, and one that never is stays listed as dead for manual handling."""
    return DirectAction(
        member_id,
        "refund",
        {
            "order_id": order_id,
            "amount_fen": amount,
            "reason": reason,
            "team": team.public_id,
            "partial": partial,
            # the payment system's dedupe key: one refund per order (and one tier refund)
            "idempotency_key": f"{order_id}:tier" if partial else order_id,
        },
        f"groupbuy.{team.campaign}",
    )


# ── what callers see ──────────────────────────────────────────────────────────────────────
def _event_data(team: Any, cfg: GroupBuy, role: str) -> dict[str, Any]:
    return {
        "team": team.public_id,
        "campaign": team.campaign,
        "product": cfg.product,
        "role": role,
        "team_size": team.capacity,
        "price_fen": team.price_fen if team.price_fen is not None else cfg.price_fen,
        "discount_percent": cfg.discount_percent,
    }


def _window_detail(reason: str, cfg: GroupBuy) -> str:
    if reason == rules.CAMPAIGN_NOT_STARTED and cfg.starts_at:
        return f"the campaign starts at {cfg.starts_at.isoformat()}"
    if cfg.ends_at:
        return f"the campaign ended at {cfg.ends_at.isoformat()}"
    return reason


def team_json(
    conn: Connection, team: Any, now: datetime, members: Sequence[Any] | None = None
) -> dict[str, Any]:
    """A team's live state, as anyone holding its share sees it: no member ids. `members`:
    the team's as `_TEAM_MEMBERS` reads them, if known (a batch's run of joins)."""
    ref = store.version_ref(conn, team.version_id)
    cfg = store.compiled_version(conn, ref).definition.mechanics.groupbuy[team.campaign]
    if members is None:
        members = _TEAM_MEMBERS.records(conn, {"b_team": team.id})
    return {
        "id": team.public_id,
        "share_path": SHARE_PATH + team.public_id,
        "funnel": ref.key,
        "campaign": team.campaign,
        "product": cfg.product,
        "status": team.status,
        "join_mode": cfg.join_mode,
        "team_size": team.capacity,
        "min_size": team.min_size,
        "seats_taken": team.seats_taken,
        "seats_left": max(0, team.capacity - team.seats_taken) if team.status == OPEN else 0,
        "price_fen": team.price_fen if team.price_fen is not None else cfg.price_fen,
        "leader_price_fen": cfg.leader_price_fen,
        "discount_percent": cfg.discount_percent,
        "opened_at": team.opened_at.isoformat(),
        "deadline": team.deadline.isoformat(),
        "expired": team.status == OPEN and now >= team.deadline,
        "closed_at": team.closed_at.isoformat() if team.closed_at else None,
        "close_reason": team.close_reason,
        "virtual_seats": team.virtual_seats,
        "members": [
            {
                "nickname": r.nickname or "",
                "avatar": (r.attributes or {}).get("avatar"),
                "role": r.role,
                "paid": r.status == ACTIVE if cfg.join_mode == "pay" else None,
                "joined_at": r.joined_at.isoformat(),
                "hold_until": r.hold_until.isoformat() if r.hold_until else None,
            }
            for r in members
        ],
    }
