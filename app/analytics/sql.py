"""Portable pieces of SQL the reports share: exact time arithmetic on both databases."""

from __future__ import annotations

from datetime import datetime, timedelta
from typing import Any
from zoneinfo import ZoneInfo

from sqlalchemy import BigInteger, Connection, case, func, literal, select
from sqlalchemy.ext.compiler import compiles
from sqlalchemy.sql.elements import ColumnElement
from sqlalchemy.sql.functions import FunctionElement

DAY_US = 86_400_000_000


class micros(FunctionElement[int]):
    """A timestamp column as integer microseconds since the Unix epoch, exactly.

    Exact matters: a conversion window is inclusive, and floating-point day fractions
    (SQLite's julianday) are off by tens of microseconds. SQLAlchemy stores SQLite
    datetimes as `YYYY-MM-DD HH:MM:SS.ffffff`, so whole seconds come from strftime('%s') of
    the first 19 characters (given the fraction, strftime rounds) and the microseconds from
    the rest; PostgreSQL's epoch is an exact numeric."""

    type = BigInteger()
    inherit_cache = True


@compiles(micros, "sqlite")
def _micros_sqlite(element: micros, compiler: Any, **kw: Any) -> str:
    col = compiler.process(next(iter(element.clauses)), **kw)
    return (
        f"(CAST(strftime('%s', substr({col}, 1, 19)) AS INTEGER) * 1000000"
        f" + CAST(substr({col}, 21, 6) AS INTEGER))"
    )


@compiles(micros, "postgresql")
def _micros_pg(element: micros, compiler: Any, **kw: Any) -> str:
    col = compiler.process(next(iter(element.clauses)), **kw)
    return f"CAST(EXTRACT(EPOCH FROM {col}) * 1000000 AS BIGINT)"


def local_day(column: Any, zone: ZoneInfo, start: datetime, end: datetime) -> ColumnElement[int]:
    """The local calendar day of `column` (days since 1970-01-01) in `zone`, exact across
    the offset changes between `start` and `end` (daylight saving): the offset is a CASE
    over the instants it changes, found here, not a per-row time zone conversion that
    SQLite cannot do."""
    spans = offsets(zone, start, end)
    us = micros(column)
    if len(spans) == 1:
        offset: Any = literal(spans[0][1])
    else:
        # CASE WHEN column < change1 THEN offset0 WHEN column < change2 THEN offset1 … ELSE last
        whens = [(column < spans[i + 1][0], spans[i][1]) for i in range(len(spans) - 1)]
        offset = case(*whens, else_=spans[-1][1])
    return (us + offset) // DAY_US  # type: ignore[no-any-return]


def offsets(zone: ZoneInfo, start: datetime, end: datetime) -> list[tuple[datetime, int]]:
    """[(from instant, UTC offset in microseconds)] covering start..end, hour by hour (zone
    changes happen on the hour or half hour; a bisection finds the exact instant)."""

    def off(at: datetime) -> int:
        delta = at.astimezone(zone).utcoffset() or timedelta(0)
        return int(delta.total_seconds()) * 1_000_000

    spans = [(start, off(start))]
    at = start
    while at < end:
        nxt = min(at + timedelta(hours=1), end)
        if off(nxt) != spans[-1][1]:
            lo, hi = at, nxt  # off(lo) is the old offset, off(hi) the new one
            while hi - lo > timedelta(seconds=1):
                mid = lo + (hi - lo) / 2
                lo, hi = (mid, hi) if off(mid) == spans[-1][1] else (lo, mid)
            spans.append((hi.replace(microsecond=0), off(nxt)))
        at = nxt
    return spans


def nearest_ranks(conn: Connection, delays: Any) -> dict[Any, tuple[float, float]]:
    """Nearest-rank median and 90th percentile (seconds) of `delays` (a subquery of `k`, a
    group key, and `d`, microseconds) per group, ranked by window functions in the
    database: rank ⌈p·n/100⌉ of the sorted values."""
    ranked = select(
        delays.c.k,
        delays.c.d,
        func.row_number().over(partition_by=delays.c.k, order_by=delays.c.d).label("rn"),
        func.count().over(partition_by=delays.c.k).label("n"),
    ).subquery("ranked")
    r = ranked.c

    def at(pct: int) -> Any:
        return func.min(case((r.rn == (r.n * pct + 99) // 100, r.d)))

    rows = conn.execute(select(r.k, at(50), at(90)).group_by(r.k)).all()
    return {k: (med / 1e6, p90 / 1e6) for k, med, p90 in rows}
