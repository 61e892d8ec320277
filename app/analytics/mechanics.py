"""Reports on the mechanics a funnel runs, over a date range: group-buy, solitaire,
referral, community groups, and weekly cohort retention. Each is a few grouped statements."""

from __future__ import annotations

from datetime import date, datetime, timedelta
from typing import Any

from sqlalchemy import Connection, and_, case, distinct, func, select
from sqlalchemy.ext.compiler import compiles
from sqlalchemy.sql.functions import FunctionElement
from sqlalchemy.types import Integer

from app.analytics.funnel import Period, Scope
from app.analytics.sql import local_day, micros, nearest_ranks
from app.events.models import EventLog
from app.funnels.store import history_t
from app.mechanics.community.models import ChatGroup, ModerationDecision
from app.mechanics.community.service import health
from app.mechanics.groupbuy.models import Team
from app.mechanics.referral.models import ReferralCode, ReferralLink
from app.mechanics.rewards.models import CheckIn
from app.mechanics.solitaire.models import SolitaireLine, SolitaireList
from app.mechanics.vouchers.models import Voucher
from app.members.models import Member

team_t = Team.__table__  # type: ignore[attr-defined]
voucher_t = Voucher.__table__  # type: ignore[attr-defined]
list_t = SolitaireList.__table__  # type: ignore[attr-defined]
line_t = SolitaireLine.__table__  # type: ignore[attr-defined]
code_t = ReferralCode.__table__  # type: ignore[attr-defined]
link_t = ReferralLink.__table__  # type: ignore[attr-defined]
group_t = ChatGroup.__table__  # type: ignore[attr-defined]
decision_t = ModerationDecision.__table__  # type: ignore[attr-defined]
checkin_t = CheckIn.__table__  # type: ignore[attr-defined]
event_t = EventLog.__table__  # type: ignore[attr-defined]
member_t = Member.__table__  # type: ignore[attr-defined]

STREAK_BUCKETS = ((1, 1), (2, 6), (7, 13), (14, 29), (30, None))
COHORT_WEEKS = 8


def _n(value: Any) -> int:
    return int(value or 0)


def _rate(part: int, whole: int) -> float | None:
    return round(part / whole, 4) if whole else None


# ── group-buy ───────────────────────────────────────────────────────────────────────────────
def groupbuy(conn: Connection, scope: Scope, period: Period) -> list[dict[str, Any]]:
    """Per campaign, teams opened in the range: how many succeeded, failed, were cancelled
    or are still open; the success rate of those that closed; how long a successful team
    took to fill; the vouchers they issued and how many were redeemed."""
    t = team_t.c
    where = (
        t.tenant_id == scope.tenant_id,
        t.funnel_id == scope.funnel_id,
        t.opened_at >= period.start,
        t.opened_at < period.end,
    )

    def count(status: str) -> Any:
        return func.sum(case((t.status == status, 1), else_=0))

    rows = conn.execute(
        select(
            t.campaign,
            func.count(),
            count("succeeded"),
            count("failed"),
            count("cancelled"),
            count("open"),
        )
        .where(*where)
        .group_by(t.campaign)
        .order_by(t.campaign)
    ).all()
    fill = select(t.campaign.label("k"), (micros(t.closed_at) - micros(t.opened_at)).label("d"))
    fills = nearest_ranks(conn, fill.where(*where, t.status == "succeeded").subquery())
    v = voucher_t.c
    issued = dict(
        (campaign, (_n(n), _n(redeemed)))
        for campaign, n, redeemed in conn.execute(
            select(
                t.campaign,
                func.count(v.id),
                func.sum(case((v.status == "redeemed", 1), else_=0)),
            )
            .select_from(team_t.join(voucher_t, v.team_id == t.id))
            .where(*where, v.tenant_id == scope.tenant_id)
            .group_by(t.campaign)
        ).all()
    )
    out = []
    for campaign, opened, ok, failed, cancelled, still_open in rows:
        ok, failed, cancelled = _n(ok), _n(failed), _n(cancelled)
        median, p90 = fills.get(campaign, (None, None))
        vouchers, redeemed = issued.get(campaign, (0, 0))
        out.append(
            {
                "campaign": campaign,
                "teams_opened": int(opened),
                "succeeded": ok,
                "failed": failed,
                "cancelled": cancelled,
                "open": _n(still_open),
                "success_rate": _rate(ok, ok + failed + cancelled),
                "median_fill_seconds": median,
                "p90_fill_seconds": p90,
                "vouchers_issued": vouchers,
                "vouchers_redeemed": redeemed,
                "redemption_rate": _rate(redeemed, vouchers),
            }
        )
    return out


# ── solitaire ───────────────────────────────────────────────────────────────────────────────
class item_units(FunctionElement[int]):
    """The sum of `qty` over a line's items (a JSON array), in the database."""

    type = Integer()
    inherit_cache = True


@compiles(item_units, "sqlite")
def _units_sqlite(element: item_units, compiler: Any, **kw: Any) -> str:
    col = compiler.process(next(iter(element.clauses)), **kw)
    sql = "(SELECT COALESCE(SUM(json_extract(value, '$.qty')), 0) FROM json_each({}))"
    return sql.format(col)  # col: the compiled column expression, never input


@compiles(item_units, "postgresql")
def _units_pg(element: item_units, compiler: Any, **kw: Any) -> str:
    col = compiler.process(next(iter(element.clauses)), **kw)
    sql = "(SELECT COALESCE(SUM((e ->> 'qty')::int), 0) FROM jsonb_array_elements({}) AS e)"
    return sql.format(col)


def solitaire(conn: Connection, scope: Scope, period: Period) -> list[dict[str, Any]]:
    """Per list opened in the range (the funnel's, and lists tied to no funnel): live
    orders, distinct members, units ordered, revenue; newest first."""
    lst, ln = list_t.c, line_t.c
    live = and_(ln.list_id == lst.id, ln.status == "live")
    rows = conn.execute(
        select(
            lst.public_id,
            lst.title,
            lst.group_id,
            lst.status,
            lst.opens_at,
            func.count(ln.id),
            func.count(distinct(ln.member_id)),
            func.sum(item_units(ln["items"])),  # `.items` is the collection method
            func.sum(ln.total_fen),
        )
        .select_from(list_t.outerjoin(line_t, live))
        .where(
            lst.tenant_id == scope.tenant_id,
            (lst.funnel_id == scope.funnel_id) | lst.funnel_id.is_(None),
            lst.opens_at >= period.start,
            lst.opens_at < period.end,
        )
        .group_by(lst.id, lst.public_id, lst.title, lst.group_id, lst.status, lst.opens_at)
        .order_by(lst.opens_at.desc(), lst.id.desc())
        .limit(200)
    ).all()
    return [
        {
            "list": r.public_id,
            "title": r.title,
            "group_id": r.group_id,
            "status": r.status,
            "opens_at": r.opens_at.isoformat(),
            "orders": _n(r[5]),
            "members": _n(r[6]),
            "units": _n(r[7]),
            "revenue_fen": _n(r[8]),
        }
        for r in rows
    ]


# ── referral ────────────────────────────────────────────────────────────────────────────────
def referral(conn: Connection, scope: Scope, period: Period, top: int = 5) -> list[dict[str, Any]]:
    """Per campaign: members holding a code, invitations accepted and qualified in the range,
    the k-factor (acceptances per code holder) and the top inviters by qualified invitees."""
    lk, c = link_t.c, code_t.c
    where = (
        lk.tenant_id == scope.tenant_id,
        lk.funnel_id == scope.funnel_id,
        lk.accepted_at >= period.start,
        lk.accepted_at < period.end,
    )
    holders: dict[str, int] = dict(
        conn.execute(
            select(c.campaign, func.count())
            .where(
                c.tenant_id == scope.tenant_id,
                c.funnel_id == scope.funnel_id,
                c.owner_member_id.is_not(None),
            )
            .group_by(c.campaign)
        ).all()
    )
    rows = conn.execute(
        select(
            lk.campaign,
            func.count(),
            func.sum(case((lk.inviter_member_id.is_not(None), 1), else_=0)),
            func.sum(case((lk.qualified_at.is_not(None), 1), else_=0)),
        )
        .where(*where)
        .group_by(lk.campaign)
    ).all()
    out = []
    for campaign, accepted, by_members, qualified in rows:
        n_holders = int(holders.get(campaign, 0))
        leaders = conn.execute(
            select(member_t.c.external_id, member_t.c.nickname, func.count().label("n"))
            .select_from(link_t.join(member_t, member_t.c.id == lk.inviter_member_id))
            .where(*where, lk.campaign == campaign, lk.qualified_at.is_not(None))
            .group_by(member_t.c.id, member_t.c.external_id, member_t.c.nickname)
            .order_by(func.count().desc(), member_t.c.id)
            .limit(top)
        ).all()
        out.append(
            {
                "campaign": campaign,
                "code_holders": n_holders,
                "accepted": int(accepted),
                "accepted_from_members": _n(by_members),
                "qualified": _n(qualified),
                "k_factor": round(_n(by_members) / n_holders, 4) if n_holders else None,
                "top_inviters": [
                    {"member": r.external_id, "nickname": r.nickname or "", "qualified": r.n}
                    for r in leaders
                ],
            }
        )
    return sorted(out, key=lambda r: r["campaign"])


# ── community ───────────────────────────────────────────────────────────────────────────────
def community(conn: Connection, scope: Scope, period: Period, now: datetime) -> dict[str, Any]:
    """Each group's active share against its 20/80 floor (as of now), warnings and removals
    in the range, and the distribution of check-in streaks reached in the range."""
    groups = conn.execute(
        select(group_t).where(group_t.c.tenant_id == scope.tenant_id).order_by(group_t.c.group_id)
    ).all()
    d = decision_t.c
    actions: dict[tuple[str, str], int] = {
        (g, a): int(n)
        for g, a, n in conn.execute(
            select(d.group_id, d.action, func.count())
            .where(
                d.tenant_id == scope.tenant_id,
                d.status == "active",
                d.created_at >= period.start,
                d.created_at < period.end,
            )
            .group_by(d.group_id, d.action)
        ).all()
    }
    report = []
    for g in groups:
        h = health(conn, scope.tenant_id, g, now)
        h["warnings"] = actions.get((g.group_id, "warn"), 0)
        h["removals"] = actions.get((g.group_id, "remove"), 0)
        report.append(h)
    ck = checkin_t.c
    best = (
        select(func.max(ck.streak).label("streak"))
        .where(
            ck.tenant_id == scope.tenant_id,
            ck.funnel_id == scope.funnel_id,
            ck.created_at >= period.start,
            ck.created_at < period.end,
        )
        .group_by(ck.member_id, ck.campaign)
        .subquery()
    )
    label = case(
        *(
            (best.c.streak <= hi if hi else best.c.streak >= lo, _bucket(lo, hi))
            for lo, hi in STREAK_BUCKETS
        )
    )
    counts: dict[str, int] = dict(conn.execute(select(label, func.count()).group_by(label)).all())
    streaks = [
        {"days": _bucket(lo, hi), "members": int(counts.get(_bucket(lo, hi), 0))}
        for lo, hi in STREAK_BUCKETS
    ]
    return {"groups": report, "check_in_streaks": streaks}


def _bucket(lo: int, hi: int | None) -> str:
    return f"{lo}+" if hi is None else (str(lo) if lo == hi else f"{lo}-{hi}")


# ── cohorts ─────────────────────────────────────────────────────────────────────────────────
def cohorts(
    conn: Connection, scope: Scope, period: Period, weeks: int = COHORT_WEEKS
) -> list[dict[str, Any]]:
    """Members by the local week (Monday first) they entered the funnel, and how many of
    them had any event in each following week: week 0 is the week of acquisition."""
    h, e = history_t.c, event_t.c
    first = (
        select(h.member_id, func.min(h.entered_at).label("at"))
        .where(h.tenant_id == scope.tenant_id, h.funnel_id == scope.funnel_id)
        .group_by(h.member_id)
        .having(func.min(h.entered_at) >= period.start, func.min(h.entered_at) < period.end)
        .subquery("first")
    )
    horizon = period.end + timedelta(weeks=weeks + 1)

    def week(column: Any) -> Any:  # 1970-01-01 was a Thursday: +3 makes weeks start Monday
        return (local_day(column, period.zone, period.start, horizon) + 3) // 7

    cohort = select(first.c.member_id, first.c.at, week(first.c.at).label("w")).subquery()
    size: dict[int, int] = dict(
        conn.execute(select(cohort.c.w, func.count()).group_by(cohort.c.w)).all()
    )
    active = (
        select(cohort.c.w, (week(e.occurred_at) - cohort.c.w).label("k"), e.member_id)
        .select_from(cohort.join(event_t, e.member_id == cohort.c.member_id))
        .where(e.occurred_at >= cohort.c.at, e.occurred_at < horizon)
        .distinct()
        .subquery()
    )
    retained = {
        (int(w), int(k)): int(n)
        for w, k, n in conn.execute(
            select(active.c.w, active.c.k, func.count())
            .where(active.c.k <= weeks)
            .group_by(active.c.w, active.c.k)
        ).all()
    }
    out = []
    for w in sorted(size):
        n = int(size[w])
        monday = date(1970, 1, 1) + timedelta(days=int(w) * 7 - 3)
        out.append(
            {
                "week": monday.isoformat(),
                "members": n,
                "retained": [retained.get((int(w), k), 0) for k in range(weeks + 1)],
                "retention": [_rate(retained.get((int(w), k), 0), n) for k in range(weeks + 1)],
            }
        )
    return out


def every_report(conn: Connection, scope: Scope, period: Period, now: datetime) -> dict[str, Any]:
    """All the mechanics' reports of one funnel and range (the API's body, the console's)."""
    return {
        "groupbuy": groupbuy(conn, scope, period),
        "solitaire": solitaire(conn, scope, period),
        "referral": referral(conn, scope, period),
        "community": community(conn, scope, period, now),
        "cohorts": cohorts(conn, scope, period),
    }
