"""Dry runs: feed a funnel a timeline of events for several members, firing timers as they come
due, exactly as the service would — and write nothing. Used by `flywheel simulate` (and by
what-if replays: `flywheel replay`)."""

from __future__ import annotations

import heapq
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from app.engine.compiler import CompiledFunnel
from app.engine.state import Event, MemberState, Outcome
from app.engine.step import step


@dataclass(frozen=True)
class Record:
    at: datetime
    member: str
    event: Event
    before: MemberState
    outcome: Outcome


@dataclass(frozen=True)
class TimelineEntry:
    at: datetime
    member: str = "member"
    type: str | None = None  # None: only advance the clock (timers due by `at` fire)
    data: Mapping[str, Any] | None = None
    profile: Mapping[str, Any] | None = None


class Simulator:
    def __init__(self, funnel: CompiledFunnel) -> None:
        self.funnel = funnel
        self.members: dict[str, MemberState] = {}
        self.now: datetime | None = None
        # Armed timers, earliest first. An entry whose timer was cancelled or re-armed since
        # is skipped when it comes up: firing is O(log n), not a scan of every member.
        self._due: list[tuple[datetime, str, str]] = []

    def feed(self, entries: Iterable[TimelineEntry]) -> Iterator[Record]:
        for entry in entries:
            if self.now is not None and entry.at < self.now:
                raise ValueError(f"timeline goes back in time at {entry.at.isoformat()}")
            yield from self.fire_timers(until=entry.at)
            self.now = entry.at
            if entry.type is None:
                continue
            state = self.members.get(entry.member, MemberState())
            profile = {"nickname": entry.member, **state.profile, **(entry.profile or {})}
            state = state.evolve(profile=profile)
            yield self._apply(
                entry.member, state, Event(entry.type, dict(entry.data or {})), entry.at
            )

    def fire_timers(self, until: datetime) -> Iterator[Record]:
        """Fire every timer due by `until`, earliest first, as the timer worker would."""
        while self._due and self._due[0][0] <= until:
            at, name, key = heapq.heappop(self._due)
            state = self.members.get(name)
            if state is None or not any(t.key == key and t.due_at == at for t in state.timers):
                continue  # cancelled, or re-armed for another time
            self.now = at
            yield self._apply(name, state, Event.timer_fired(key), at)

    def _apply(self, name: str, state: MemberState, event: Event, at: datetime) -> Record:
        outcome = step(self.funnel, state, event, at)
        self.members[name] = outcome.state if outcome.matched else state
        for timer in outcome.timers_armed:
            heapq.heappush(self._due, (timer.due_at, name, timer.key))
        return Record(at, name, event, state, outcome)


def parse_timeline_line(line: Mapping[str, Any], previous: datetime | None) -> TimelineEntry:
    raw_at = line.get("at")
    if raw_at is None and previous is None:
        raise ValueError('the first line needs "at", an ISO 8601 time with its offset')
    at = datetime.fromisoformat(raw_at) if raw_at else previous
    assert at is not None
    if at.tzinfo is None:
        raise ValueError(f'"at" needs a UTC offset: {raw_at}')
    unknown = set(line) - {"at", "member", "type", "data", "profile"}
    if unknown:
        raise ValueError(f"unknown keys {sorted(unknown)}")
    return TimelineEntry(
        at=at,
        member=str(line.get("member", "member")),
        type=line.get("type"),
        data=line.get("data"),
        profile=line.get("profile"),
    )
