"""Send policy: quiet hours and a daily message cap, applied to the actions a step planned.

Every action gets a disposition — send now, deferred to the end of quiet hours, or suppressed
by the cap — so the outbox can record what happened to it and why.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import replace
from datetime import datetime

from app.engine.compiler import CompiledFunnel
from app.engine.schedule import in_quiet_hours, local_date, quiet_hours_end
from app.engine.state import PlannedAction

MESSAGE_ACTIONS = frozenset({"send_message"})


def apply_send_policy(
    funnel: CompiledFunnel,
    actions: Iterable[PlannedAction],
    counts: tuple[tuple[str, int], ...],
    now: datetime,
) -> tuple[list[PlannedAction], tuple[tuple[str, int], ...]]:
    today = local_date(now, funnel.zone)
    per_day = {day: n for day, n in counts if day >= today}
    result = []
    for action in actions:
        if action.type not in MESSAGE_ACTIONS:
            result.append(action)
            continue
        deliver_at, disposition = now, "send"
        if funnel.quiet_hours and in_quiet_hours(now, *funnel.quiet_hours, funnel.zone):
            deliver_at, disposition = (
                quiet_hours_end(now, funnel.quiet_hours[1], funnel.zone),
                "deferred",
            )
        day = local_date(deliver_at, funnel.zone)
        cap = funnel.max_messages_per_day
        if cap is not None and per_day.get(day, 0) >= cap:
            disposition = "suppressed"
        else:
            per_day[day] = per_day.get(day, 0) + 1
        result.append(replace(action, deliver_at=deliver_at, disposition=disposition))  # type: ignore[arg-type]
    return result, tuple(sorted(per_day.items()))
