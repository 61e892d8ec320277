"""The AARRR funnel report: who entered each stage in a date range, who converted to the
next stage within the conversion window, how long that took, broken down by where members
came from, and day by day.

Definitions (the tests count the same things naively in Python and compare):

- A member's *first entry* into a stage is their earliest stage_history row for it that
  starts in [start, end + window): later re-entries (a member back in retain) don't move it.
- The *cohort* of a stage: members whose first entry falls in [start, end).
- *Converted to the next stage*: a cohort member whose first entry into the next stage (the
  funnel's stages in AARRR order) is at or after their entry into this one and at most the
  conversion window later. A member who skips a stage counts as dropped at it.
- *Reached from the first stage*: the same, measured from the first stage's entry.
- Time to convert: nearest-rank median and 90th percentile of those delays.

All of it is two grouped statements over one funnel's stage history in the range (the
`ix_stage_history_report` index): one row per member and stage inside the database, a
handful of rows out of it.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import date, datetime, timedelta
from typing import Any, Literal
from zoneinfo import ZoneInfo

from sqlalchemy import (
    ColumnElement,
    Connection,
    Select,
    and_,
    case,
    distinct,
    func,
    literal,
    select,
    union_all,
)

from app.analytics.sql import local_day, micros, nearest_ranks
from app.engine.definition import STAGES
from app.engine.schedule import parse_duration
from app.errors import FieldProblem, InvalidQuery, NotFound
from app.funnels.store import funnel_t, history_t, version_t
from app.members.models import Member

member_t = Member.__table__  # type: ignore[attr-defined]

Dimension = Literal["channel", "group", "inviter", "campaign"]
# Where each breakdown's value lives: first-touch attribution on the member, the campaign
# on each stay (a member who re-enters under a new campaign runs the funnel again).
DIMENSIONS: dict[str, Any] = {
    "channel": member_t.c.acquired_channel,
    "group": member_t.c.acquired_group,
    "inviter": member_t.c.invited_by,
    "campaign": history_t.c.campaign,
}


@dataclass(frozen=True)
class Scope:
    tenant_id: int
    funnel_id: int
    version: int | None  # None: every version's stays
    stages: tuple[str, ...]  # the funnel's stages, in AARRR order


@dataclass(frozen=True)
class Period:
    start: datetime  # inclusive, aware
    end: datetime  # exclusive
    window: timedelta  # how long after entering a stage a conversion still counts
    zone: ZoneInfo  # the days of the daily series

    @property
    def window_us(self) -> int:
        return self.window // timedelta(microseconds=1)


MAX_DAYS = 400
DEFAULT_DAYS = 30


def scope_for(
    conn: Connection, tenant_id: int, key: str, version: int | None
) -> tuple[Scope, ZoneInfo]:
    """The funnel's id, its stages (one version's, or every version's) and its zone."""
    funnel_id = conn.execute(
        select(funnel_t.c.id).where(funnel_t.c.tenant_id == tenant_id, funnel_t.c.key == key)
    ).scalar()
    if funnel_id is None:
        raise NotFound(f'no funnel "{key}"')
    q = select(version_t.c.version, version_t.c.definition).where(
        version_t.c.funnel_id == funnel_id
    )
    if version is not None:
        q = q.where(version_t.c.version == version)
    rows = conn.execute(q.order_by(version_t.c.version.desc())).all()
    if not rows:
        raise NotFound(f'funnel "{key}" has no version {version}')
    used = {state["stage"] for _, doc in rows for state in doc["states"].values()}
    zone = ZoneInfo(rows[0].definition.get("timezone") or "Asia/Shanghai")
    return Scope(tenant_id, funnel_id, version, tuple(s for s in STAGES if s in used)), zone


def period_for(
    zone: ZoneInfo, today: date, start: date | None, end: date | None, window: str
) -> Period:
    """Local dates [start, end] (both inclusive; default: the 30 days up to today) in the
    funnel's zone, as UTC instants, and the conversion window."""
    end = end or today
    start = start or end - timedelta(days=DEFAULT_DAYS - 1)
    if start > end:
        raise InvalidQuery(
            f"the range starts ({start}) after it ends ({end})",
            errors=[FieldProblem("query:from", "must not be after `to`")],
        )
    if (end - start).days + 1 > MAX_DAYS:
        raise InvalidQuery(
            f"the range covers {(end - start).days + 1} days; at most {MAX_DAYS}",
            errors=[FieldProblem("query:to", f"at most {MAX_DAYS} days after `from`")],
        )
    try:
        within = parse_duration(window)
    except ValueError as exc:
        raise InvalidQuery(str(exc), errors=[FieldProblem("query:window", str(exc))]) from exc

    def midnight(d: date) -> datetime:
        return datetime(d.year, d.month, d.day, tzinfo=zone)

    return Period(midnight(start), midnight(end + timedelta(days=1)), within, zone)


def period_json(period: Period) -> dict[str, str]:
    """The range as the local dates asked for (`to` inclusive) and the zone."""
    last = period.end.astimezone(period.zone) - timedelta(days=1)
    return {
        "from": period.start.astimezone(period.zone).date().isoformat(),
        "to": last.date().isoformat(),
        "timezone": str(period.zone),
    }


def _where(scope: Scope, start: datetime, end: datetime) -> list[ColumnElement[bool]]:
    h = history_t.c
    conds = [
        h.tenant_id == scope.tenant_id,
        h.funnel_id == scope.funnel_id,
        h.entered_at >= start,
        h.entered_at < end,
        h.stage.in_(scope.stages),
    ]
    if scope.version is not None:
        conds.append(h.version == scope.version)
    return conds


def _firsts(scope: Scope, period: Period, dimension: str | None = None) -> Select[Any]:
    """One row per member (per member and value, for a breakdown): t0…tn, the first entry
    into each stage in [start, end + window)."""
    h = history_t.c
    cols: list[Any] = [h.member_id]
    group: list[Any] = [h.member_id]
    source: Any = history_t
    if dimension is not None:
        value = DIMENSIONS[dimension]
        cols.append(value.label("value"))
        group.append(value)
        if value.table is member_t:
            source = history_t.join(member_t, member_t.c.id == h.member_id)
    cols += [
        func.min(case((h.stage == stage, h.entered_at))).label(f"t{i}")
        for i, stage in enumerate(scope.stages)
    ]
    where = _where(scope, period.start, period.end + period.window)
    return select(*cols).select_from(source).where(*where).group_by(*group)


def _within(period: Period, a: Any, b: Any) -> ColumnElement[bool]:
    return and_(b >= a, micros(b) - micros(a) <= period.window_us)


def _count(cond: ColumnElement[bool]) -> Any:
    return func.coalesce(func.sum(case((cond, 1), else_=0)), 0)


def _ratio(part: int, whole: int) -> float | None:
    return round(part / whole, 4) if whole else None


def report(conn: Connection, scope: Scope, period: Period) -> dict[str, Any]:
    """Per stage: entered, converted to the next, dropped, conversion, reached from the
    first stage, and the median and p90 time to convert."""
    f = _firsts(scope, period).cte("firsts")
    n = len(scope.stages)
    t = [f.c[f"t{i}"] for i in range(n)]
    cohort = [t[i] < period.end for i in range(n)]
    step = [and_(cohort[i], _within(period, t[i], t[i + 1])) for i in range(n - 1)]
    reach = [and_(cohort[0], _within(period, t[0], t[i])) for i in range(n)]
    counts = conn.execute(
        select(
            *(_count(c) for c in cohort), *(_count(c) for c in step), *(_count(c) for c in reach)
        )
    ).one()
    entered = [int(v) for v in counts[:n]]
    converted = [int(v) for v in counts[n : 2 * n - 1]]
    reached = [int(v) for v in counts[2 * n - 1 :]]
    delays = _percentiles(conn, f, t, step) if n > 1 else {}
    stages = []
    for i, stage in enumerate(scope.stages):
        row: dict[str, Any] = {"stage": stage, "entered": entered[i]}
        if i + 1 < n:
            median, p90 = delays.get(i, (None, None))
            row.update(
                next_stage=scope.stages[i + 1],
                converted=converted[i],
                dropped=entered[i] - converted[i],
                conversion=_ratio(converted[i], entered[i]),
                median_seconds=median,
                p90_seconds=p90,
            )
        row.update(
            reached_from_first=reached[i], conversion_from_first=_ratio(reached[i], entered[0])
        )
        stages.append(row)
    return {"stages": stages}


def report_with_daily(conn: Connection, scope: Scope, period: Period) -> dict[str, Any]:
    """The report and its daily series: the API's body and the console's page."""
    return {**report(conn, scope, period), "daily": daily(conn, scope, period)}


def _percentiles(
    conn: Connection, f: Any, t: list[Any], step: list[ColumnElement[bool]]
) -> dict[Any, tuple[float, float]]:
    delays = union_all(
        *(
            select(literal(i).label("k"), (micros(t[i + 1]) - micros(t[i])).label("d"))
            .select_from(f)
            .where(cond)
            for i, cond in enumerate(step)
        )
    ).subquery("delays")
    return nearest_ranks(conn, delays)


def breakdown(
    conn: Connection, scope: Scope, period: Period, dimension: str, limit: int = 20
) -> list[dict[str, Any]]:
    """Per value of `dimension` (top `limit` by first-stage entries): each stage's entries
    and how many of the first stage's cohort reached it within the window."""
    f = _firsts(scope, period, dimension).subquery("firsts")
    n = len(scope.stages)
    t = [f.c[f"t{i}"] for i in range(n)]
    entered = [_count(t[i] < period.end).label(f"e{i}") for i in range(n)]
    reach = [
        _count(and_(t[0] < period.end, _within(period, t[0], t[i]))).label(f"r{i}")
        for i in range(n)
    ]
    rows = conn.execute(
        select(f.c.value, *entered, *reach)
        .group_by(f.c.value)
        .order_by(entered[0].desc(), func.coalesce(f.c.value, "").asc())
        .limit(limit)
    ).all()
    out = []
    for row in rows:
        first = int(row[1])
        out.append(
            {
                "value": row.value,
                "stages": [
                    {
                        "stage": stage,
                        "entered": int(row[1 + i]),
                        "reached_from_first": int(row[1 + n + i]),
                        "conversion_from_first": _ratio(int(row[1 + n + i]), first),
                    }
                    for i, stage in enumerate(scope.stages)
                ],
            }
        )
    return out


def daily(conn: Connection, scope: Scope, period: Period) -> list[dict[str, Any]]:
    """Members entering each stage, per local day of the range (zeros included)."""
    h = history_t.c
    day = local_day(h.entered_at, period.zone, period.start, period.end)
    rows = conn.execute(
        select(day.label("day"), h.stage, func.count(distinct(h.member_id)))
        .where(*_where(scope, period.start, period.end))
        .group_by(day, h.stage)
    ).all()
    counts = {(int(d), stage): int(c) for d, stage, c in rows}
    epoch = date(1970, 1, 1)
    first = period.start.astimezone(period.zone).date()
    last = (period.end - timedelta(microseconds=1)).astimezone(period.zone).date()
    series = []
    for offset in range((last - first).days + 1):
        day_ = first + timedelta(days=offset)
        n = (day_ - epoch).days
        series.append(
            {"date": day_.isoformat(), **{s: counts.get((n, s), 0) for s in scope.stages}}
        )
    return series
