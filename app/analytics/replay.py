"""What-if: the tenant's recorded events of a date range, replayed through a draft funnel
(timers fire as they would have), counted per stage next to what the live funnel recorded.
Nothing is written: the events are read in one pass, in the order they happened."""

from __future__ import annotations

from collections.abc import Callable
from datetime import date, timedelta
from typing import Any

from sqlalchemy import Connection, func, select

from app.analytics.funnel import Period, Scope, period_for, report, scope_for
from app.engine.compiler import CompiledFunnel
from app.engine.definition import STAGES
from app.engine.simulate import Simulator, TimelineEntry
from app.events.models import EventLog
from app.members.models import Member

event_t = EventLog.__table__  # type: ignore[attr-defined]
member_t = Member.__table__  # type: ignore[attr-defined]
TIMER_SOURCE = "timer"  # the draft's own timers fire in the replay instead
Progress = Callable[[int, int], None]
MAX_REPLAY_EVENTS = 200_000  # over HTTP; the CLI has no limit


def _events(tenant_id: int, period: Period) -> Any:
    e = event_t.c
    return (
        e.tenant_id == tenant_id,
        e.member_id.is_not(None),
        e.source != TIMER_SOURCE,
        e.occurred_at >= period.start,
        e.occurred_at < period.end,
    )


def replay_range(
    conn: Connection, tenant_id: int, key: str, start: date, end: date
) -> tuple[Scope, Period]:
    """The live funnel's scope and the local days [start, end] (the CLI's and the API's)."""
    scope, zone = scope_for(conn, tenant_id, key, None)
    # No conversion window plays a part in a replay; period_for only validates one.
    return scope, period_for(zone, end, start, end, "P1D")


def count_events(conn: Connection, scope: Scope, period: Period) -> int:
    n: int = conn.execute(
        select(func.count()).select_from(event_t).where(*_events(scope.tenant_id, period))
    ).scalar_one()
    return n


def replay(
    conn: Connection,
    scope: Scope,
    draft: CompiledFunnel,
    period: Period,
    progress: Progress | None = None,
    every: int = 1000,
) -> dict[str, Any]:
    """Members who would have entered each stage in the range under `draft`, next to the
    members who did (the report's `entered`), and how many events it took."""
    total = count_events(conn, scope, period)
    rows = conn.execution_options(stream_results=True, yield_per=2000).execute(
        select(
            event_t.c.member_id,
            event_t.c.type,
            event_t.c.data,
            event_t.c.occurred_at,
            member_t.c.nickname,
            member_t.c.external_id,
            member_t.c.attributes,
        )
        .join(member_t, member_t.c.id == event_t.c.member_id)
        .where(*_events(scope.tenant_id, period))
        .order_by(event_t.c.occurred_at, event_t.c.id)
    )
    sim = Simulator(draft)
    entered: dict[str, set[str]] = {stage: set() for stage in STAGES}
    done = 0

    def count(records: Any) -> None:
        for record in records:
            for change in record.outcome.stage_changes:
                if change.entered is not None and period.start <= change.at < period.end:
                    entered[change.entered].add(record.member)

    for r in rows:
        profile = {
            **(r.attributes or {}),
            "id": r.member_id,
            "external_id": r.external_id,
            "nickname": r.nickname or "",
        }
        entry = TimelineEntry(
            r.occurred_at, str(r.member_id), r.type, r.data or {}, profile=profile
        )
        count(sim.feed([entry]))
        done += 1
        if progress is not None and done % every == 0:
            progress(done, total)
    count(sim.fire_timers(until=period.end - timedelta(microseconds=1)))
    if progress is not None:
        progress(done, total)
    real = {
        s["stage"]: s["entered"]
        for s in report(conn, scope, Period(period.start, period.end, timedelta(0), period.zone))[
            "stages"
        ]
    }
    draft_stages = {state.stage for state in draft.definition.states.values()}
    stages = [s for s in STAGES if s in draft_stages or s in real]
    return {
        "events": done,
        "members": len(sim.members),
        "stages": [
            {
                "stage": s,
                "real": real.get(s),
                "would": len(entered[s]) if s in draft_stages else None,
            }
            for s in stages
        ],
    }
