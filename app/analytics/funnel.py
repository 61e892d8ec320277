"""The AARRR funnel report: who entered each stage in a date range, who converted to the
next stage within the conversion window, how long that took, broken down by where members
came from, and day by day.

Definitions (the tests count the same things naively in Python and compare):

- A member's *first entry* into a stage is the first time they entered it in this funnel
  (in the version asked for, or in any version): returning to a stage later does not move
  it, and a later range does not count them again.
- The *cohort* of a stage: members whose first entry falls in [start, end).
- *Converted to the next stage*: a cohort member whose first entry into the next stage (the
  funnel's stages in AARRR order) is at or after their entry into this one and at most the
  conversion window later. A member who skips a stage counts as dropped at it.
- *Reached from the first stage*: the same, measured from the first stage's entry.
- Time to convert: nearest-rank median and 90th percentile of those delays.
- Daily series: each day's first entries, per stage (the days add up to `entered`).
- Breakdowns: the channel, group and inviter are the member's first-touch attribution; the
  campaign is the funnel's campaign when the member first entered the stage (for
  `reached_from_first`, the first stage).

It reads the first entries' index (app/funnels/entries.py), not the stage history: a few
thousand roll-up rows per stage pair for the whole days and hours of the range, and the
pairs themselves for the rest, so a million members cost little more than a thousand.
"""

from __future__ import annotations

from bisect import bisect_right
from collections import Counter
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from datetime import date, datetime, timedelta
from typing import Any, Literal
from zoneinfo import ZoneInfo

from sqlalchemy import Connection, bindparam, func, or_, select

from app.analytics.sql import DAY_US, offsets
from app.engine.definition import STAGES
from app.engine.schedule import parse_duration
from app.errors import FieldProblem, InvalidQuery, NotFound
from app.funnels.entries import (
    ALL_VERSIONS,
    BOUNDS,
    HOUR_US,
    STAGE_INDEX,
    UNROLLED,
    bucket,
    epoch_us,
    pair_t,
    rollup_t,
    upper,
)
from app.funnels.store import funnel_t, version_t
from app.members.models import Member

member_t = Member.__table__  # type: ignore[attr-defined]

Dimension = Literal["channel", "group", "inviter", "campaign"]
# Where each breakdown's value lives: first-touch attribution on the member, the campaign
# on each first entry.
DIMENSIONS: dict[str, Any] = {
    "channel": member_t.c.acquired_channel,
    "group": member_t.c.acquired_group,
    "inviter": member_t.c.invited_by,
    "campaign": pair_t.c.campaign,
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


# ── reading the first entries' index ────────────────────────────────────────────────────────
_PAIR = (
    pair_t.c.funnel_id == bindparam("b_funnel"),
    pair_t.c.version == bindparam("b_version"),
    pair_t.c.a == bindparam("b_a"),
    pair_t.c.b == bindparam("b_b"),
)
_FROM_TO = (pair_t.c.at_us >= bindparam("b_t0"), pair_t.c.at_us < bindparam("b_t1"))
# The roll-up's counts over a range of whole hours (span 1) or days (span 24), by delay
# bucket and by slot.
_ROLLUP = (
    rollup_t.c.funnel_id == bindparam("b_funnel"),
    rollup_t.c.version == bindparam("b_version"),
    rollup_t.c.a == bindparam("b_a"),
    rollup_t.c.b == bindparam("b_b"),
    rollup_t.c.span == bindparam("b_span"),
    rollup_t.c.slot >= bindparam("b_s0"),
    rollup_t.c.slot < bindparam("b_s1"),
)
_HIST = (
    select(rollup_t.c.bucket, func.sum(rollup_t.c.n)).where(*_ROLLUP).group_by(rollup_t.c.bucket)
)
_BY_SLOT = select(rollup_t.c.slot, func.sum(rollup_t.c.n)).where(*_ROLLUP).group_by(rollup_t.c.slot)
# Pairs one by one: all of them in a span (the ragged ends), the ones not rolled up yet, and
# rolled-up ones in a range of delays.
_SPAN = select(pair_t.c.at_us, pair_t.c.delay_us).where(*_PAIR, *_FROM_TO, pair_t.c.delay_us >= 0)
_UNROLLED = _SPAN.where(UNROLLED)
_ROLLED_SPAN = _SPAN.where(pair_t.c.rolled)
_DELAYS = (
    *_PAIR,
    pair_t.c.delay_us >= bindparam("b_d0"),
    pair_t.c.delay_us <= bindparam("b_d1"),
    *_FROM_TO,
    pair_t.c.rolled,
)
_COUNT = select(func.count()).where(*_DELAYS)
# The k-th smallest (from 0): the database walks the index, nothing but one value comes out.
_NTH = (
    select(pair_t.c.delay_us)
    .where(*_DELAYS)
    .order_by(pair_t.c.delay_us)
    .limit(1)
    .offset(bindparam("b_nth"))
)


class _Pairs:
    """One funnel's pairs (of one version, or of all) whose first stage was entered in
    [start, end): the roll-up counts the rolled-up pairs of the whole hours inside (the
    core); every other pair in the range is *loose* and read one by one. The two never
    overlap, so every count is exact."""

    def __init__(self, conn: Connection, scope: Scope, start_us: int, end_us: int) -> None:
        self.conn = conn
        self.key = {
            "b_funnel": scope.funnel_id,
            "b_version": ALL_VERSIONS if scope.version is None else scope.version,
        }
        h0, h1 = -(-start_us // HOUR_US), end_us // HOUR_US  # the whole hours inside
        if h0 >= h1:
            h0 = h1 = 0
        self.hours = (h0, h1)
        self.core = (h0 * HOUR_US, h1 * HOUR_US)
        ends = (
            [(start_us, self.core[0]), (self.core[1], end_us)] if h0 < h1 else [(start_us, end_us)]
        )
        self.ends = [(t0, t1) for t0, t1 in ends if t0 < t1]

    def _args(self, a: int, b: int, **more: int) -> dict[str, int]:
        return {**self.key, "b_a": a, "b_b": b, **more}

    def slots(self) -> list[tuple[int, int, int]]:
        """The core as roll-up slots (span, first, end): whole UTC days, hours around them."""
        h0, h1 = self.hours
        d0, d1 = -(-h0 // 24), h1 // 24
        if d0 >= d1:
            return [(1, h0, h1)] if h0 < h1 else []
        out = [(1, h0, d0 * 24), (24, d0, d1), (1, d1 * 24, h1)]
        return [(span, s0, s1) for span, s0, s1 in out if s0 < s1]

    def hist(self, a: int, b: int) -> Counter[int]:
        out: Counter[int] = Counter()
        for span, s0, s1 in self.slots():
            rows = self.conn.execute(_HIST, self._args(a, b, b_span=span, b_s0=s0, b_s1=s1))
            out.update({int(k): int(n) for k, n in rows})
        return out

    def loose(self, a: int, b: int) -> list[tuple[int, int]]:
        """(at_us, delay_us ≥ 0) of the pairs the roll-up does not count here."""
        spans = [(_SPAN, t0, t1) for t0, t1 in self.ends]
        if self.core[0] < self.core[1]:
            spans.append((_UNROLLED, *self.core))
        out: list[tuple[int, int]] = []
        for stmt, t0, t1 in spans:
            rows = self.conn.execute(stmt, self._args(a, b, b_t0=t0, b_t1=t1))
            out += [(at, d) for at, d in rows]
        return out

    def _delays(self, a: int, b: int, lo: int, hi: int, **more: int) -> dict[str, int]:
        t0, t1 = self.core
        return self._args(a, b, b_d0=lo, b_d1=hi, b_t0=t0, b_t1=t1, **more)

    def rolled(self, a: int, b: int, lo: int, hi: int) -> int:
        """How many of the pairs the roll-up counts here have a delay in [lo, hi]."""
        return int(self.conn.execute(_COUNT, self._delays(a, b, lo, hi)).scalar_one())

    def nth(self, a: int, b: int, lo: int, hi: int, n: int, loose: list[int]) -> int:
        """The n-th smallest (1-based) of the rolled-up delays in [lo, hi] and the sorted
        `loose` ones: a k-th-of-two-sorted-lists search, asking the database for single
        values (log₂ of the loose ones, plus one, queries) instead of reading the bucket."""

        def rolled_nth(k: int) -> int:  # 1-based
            args = self._delays(a, b, lo, hi, b_nth=k - 1)
            return int(self.conn.execute(_NTH, args).scalar_one())

        n_rolled = self.rolled(a, b, lo, hi) if len(loose) < n else 0
        return nth_of_two(n, loose, n_rolled, rolled_nth)

    def rolled_at(self, a: int, t0: int, t1: int) -> list[int]:
        """When the rolled-up entries into stage a in [t0, t1) were."""
        rows = self.conn.execute(_ROLLED_SPAN, self._args(a, a, b_t0=t0, b_t1=t1))
        return [at for at, _ in rows]

    def by_hour(self, a: int) -> dict[int, int]:
        """The roll-up's entries into stage a per hour of the core."""
        h0, h1 = self.hours
        rows = self.conn.execute(_BY_SLOT, self._args(a, a, b_span=1, b_s0=h0, b_s1=h1))
        return {int(h): int(n) for h, n in rows}

    def within(
        self, a: int, b: int, window_us: int, percents: Iterable[int] = ()
    ) -> tuple[int, dict[int, float]]:
        """How many pairs (a, b) have a delay in [0, window], and the nearest-rank
        percentiles of those delays in seconds. The buckets wholly inside the window come
        from the roll-up; the one the window cuts through is counted in the pairs' index,
        and a percentile is found in its bucket by single-value reads."""
        hist = self.hist(a, b)
        cut = bucket(window_us)
        counts = Counter({k: n for k, n in hist.items() if k < cut})
        if hist.get(cut):
            whole = upper(cut) == window_us
            counts[cut] = hist[cut] if whole else self.rolled(a, b, BOUNDS[cut], window_us)
        loose: dict[int, list[int]] = {}
        for _, d in self.loose(a, b):
            if d <= window_us:
                k = bucket(d)
                loose.setdefault(k, []).append(d)
                counts[k] += 1
        total = sum(counts.values())
        found: dict[int, float] = {}
        for pct in percents:
            if not total:
                break
            rank = (total * pct + 99) // 100  # nearest rank: ⌈p·n/100⌉, 1-based
            before = 0
            for k in sorted(counts):
                if before + counts[k] >= rank:
                    break
                before += counts[k]
            top = upper(k)
            hi = window_us if top is None else min(top, window_us)
            mine = sorted(loose.get(k, []))
            found[pct] = self.nth(a, b, BOUNDS[k], hi, rank - before, mine) / 1e6
        return total, found


def nth_of_two(n: int, mine: list[int], n_other: int, other: Callable[[int], int]) -> int:
    """The n-th smallest (1-based) of two sorted lists together: `mine` in memory, the other
    reached one value at a time (`other(k)`, its k-th, 1-based; `n_other` long). A binary
    search on how many of the n come from `mine`: log₂(len(mine)) + 1 calls of `other`."""
    lo, hi = max(0, n - n_other), min(n, len(mine))
    while lo < hi:
        i = (lo + hi) // 2  # take i from mine, n - i from the other
        if mine[i] < other(n - i):
            lo = i + 1  # mine[i] comes before the n-th: take more from mine
        else:
            hi = i
    candidates = [mine[lo - 1]] if lo else []
    if n - lo:
        candidates.append(other(n - lo))
    return max(candidates)


def _span_us(period: Period) -> tuple[int, int]:
    return epoch_us(period.start), epoch_us(period.end)


def report(conn: Connection, scope: Scope, period: Period) -> dict[str, Any]:
    """Per stage: entered, converted to the next, dropped, conversion, reached from the
    first stage, and the median and p90 time to convert."""
    pairs = _Pairs(conn, scope, *_span_us(period))
    idx = [STAGE_INDEX[s] for s in scope.stages]
    n, window = len(idx), period.window_us
    entered = [pairs.within(i, i, 0)[0] for i in idx]
    steps = [pairs.within(idx[i], idx[i + 1], window, (50, 90)) for i in range(n - 1)]
    reached = [entered[0]] + [pairs.within(idx[0], idx[j], window)[0] for j in range(1, n)]
    stages = []
    for i, stage in enumerate(scope.stages):
        row: dict[str, Any] = {"stage": stage, "entered": entered[i]}
        if i + 1 < n:
            converted, pct = steps[i]
            row.update(
                next_stage=scope.stages[i + 1],
                converted=converted,
                dropped=entered[i] - converted,
                conversion=_ratio(converted, entered[i]),
                median_seconds=pct.get(50),
                p90_seconds=pct.get(90),
            )
        row.update(
            reached_from_first=reached[i], conversion_from_first=_ratio(reached[i], entered[0])
        )
        stages.append(row)
    return {"stages": stages}


def report_with_daily(conn: Connection, scope: Scope, period: Period) -> dict[str, Any]:
    """The report and its daily series: the API's body and the console's page."""
    return {**report(conn, scope, period), "daily": daily(conn, scope, period)}


def _ratio(part: int, whole: int) -> float | None:
    return round(part / whole, 4) if whole else None


def breakdown(
    conn: Connection, scope: Scope, period: Period, dimension: str, limit: int = 20
) -> list[dict[str, Any]]:
    """Per value of `dimension` (top `limit` by first-stage entries): each stage's entries
    and how many of the first stage's cohort reached it within the window. One grouped
    statement over the range's pairs (a stage's own, and the first stage's to it)."""
    idx = [STAGE_INDEX[s] for s in scope.stages]
    start, end = _span_us(period)
    value = DIMENSIONS[dimension]
    p = pair_t.c
    source: Any = pair_t
    if value.table is member_t:
        source = pair_t.join(member_t, member_t.c.id == p.member_id)
    rows = conn.execute(
        select(value.label("value"), p.a, p.b, func.count())
        .select_from(source)
        .where(
            p.funnel_id == scope.funnel_id,
            p.version == (ALL_VERSIONS if scope.version is None else scope.version),
            p.a.in_(idx),
            p.b.in_(idx),
            or_(p.a == p.b, p.a == idx[0]),
            p.at_us >= start,
            p.at_us < end,
            p.delay_us >= 0,
            p.delay_us <= period.window_us,
        )
        .group_by(value, p.a, p.b)
    ).all()
    entered: dict[Any, Counter[int]] = {}
    reached: dict[Any, Counter[int]] = {}
    for v, a, b, n in rows:
        if a == b:
            entered.setdefault(v, Counter())[a] += int(n)
        if a == idx[0]:
            reached.setdefault(v, Counter())[b] += int(n)
    values = sorted(
        entered.keys() | reached.keys(),
        key=lambda v: (-entered.get(v, Counter())[idx[0]], v or ""),
    )[:limit]
    out = []
    for v in values:
        e, r = entered.get(v, Counter()), reached.get(v, Counter())
        first = e[idx[0]]
        out.append(
            {
                "value": v,
                "stages": [
                    {
                        "stage": stage,
                        "entered": e[i],
                        "reached_from_first": r[i],
                        "conversion_from_first": _ratio(r[i], first),
                    }
                    for stage, i in zip(scope.stages, idx, strict=True)
                ],
            }
        )
    return out


def daily(conn: Connection, scope: Scope, period: Period) -> list[dict[str, Any]]:
    """First entries into each stage per local day of the range (zeros included). Whole
    hours come from the roll-up unless a local midnight falls inside one (zones at :30 and
    :45 from UTC); those hours, the range's ends and the pairs not rolled up yet are read
    entry by entry."""
    start, end = _span_us(period)
    pairs = _Pairs(conn, scope, start, end)
    spans = [(epoch_us(at), off) for at, off in offsets(period.zone, period.start, period.end)]
    changes = [at for at, _ in spans]

    def day(t: int) -> int:
        return (t + spans[max(bisect_right(changes, t) - 1, 0)][1]) // DAY_US

    counts: Counter[tuple[int, str]] = Counter()
    for stage in scope.stages:
        a = STAGE_INDEX[stage]
        for hour, n in pairs.by_hour(a).items():
            t0, t1 = hour * HOUR_US, (hour + 1) * HOUR_US
            if day(t0) == day(t1 - 1):
                counts[(day(t0), stage)] += n
            else:
                for at in pairs.rolled_at(a, t0, t1):
                    counts[(day(at), stage)] += 1
        for at, _ in pairs.loose(a, a):
            counts[(day(at), stage)] += 1
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
