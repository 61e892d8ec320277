"""`step(funnel, member_state, event, now) -> Outcome`: the whole funnel semantics, pure.

Order of evaluation for one event:
1. A member outside the funnel (new, completed or exited) enters when the event is one of
   `entry.events`, the re-entry rule allows it and the entry guard holds: the member is put
   in the initial state (its `on_enter` actions run, its timers are armed) and the same
   event is then offered to the initial state's transitions.
2. An active member leaves the funnel when an `exit` rule matches.
3. Otherwise the first transition, in document order, from the current state on this event
   (or this timer) whose guard holds is taken. A transition to the state it leaves is
   internal: its actions run, but the state is not re-entered and its timers keep running.
4. Message actions pass the send policy (quiet hours, daily cap).
An event nothing matches leaves the state unchanged, and the outcome says why.
"""

from __future__ import annotations

from datetime import datetime
from typing import Any

from app.engine.compiler import CompiledFunnel, CompiledTransition
from app.engine.guards import Guard, render_template
from app.engine.policy import apply_send_policy
from app.engine.schedule import next_cron, next_local_time, parse_duration
from app.engine.state import (
    ArmedTimer,
    Event,
    MemberState,
    Move,
    Outcome,
    PlannedAction,
    StageChange,
)

__all__ = ["Event", "MemberState", "Outcome", "due_time", "relocate", "step"]


def step(funnel: CompiledFunnel, member: MemberState, event: Event, now: datetime) -> Outcome:
    if now.tzinfo is None:
        raise ValueError("now must be timezone-aware")
    return _Step(funnel, member, event, now).run()


def due_time(t: CompiledTransition, after: datetime, funnel: CompiledFunnel) -> datetime:
    """When a timer transition armed at `after` comes due."""
    if t.after is not None:
        return after + t.after
    if t.cron is not None:
        return next_cron(after, t.cron, funnel.zone)
    assert t.at_time is not None
    return next_local_time(after, t.at_time, t.at_days, funnel.zone)


class _Step:
    def __init__(self, funnel: CompiledFunnel, member: MemberState, event: Event, now: datetime):
        self.f, self.m, self.event, self.now = funnel, member, event, now
        self.original = member
        self.moves: list[Move] = []
        self.stages: list[StageChange] = []
        self.actions: list[PlannedAction] = []
        self.armed: list[ArmedTimer] = []
        self.cancelled: list[str] = []
        self.guard_errors: list[str] = []
        self.reason = ""

    # ── flow ──────────────────────────────────────────────────────────────────────────────
    def run(self) -> Outcome:
        entered = False
        if self.m.status != "active":
            refusal = self._entry_refusal()
            if refusal:
                return self._unchanged(refusal)
            self._enter_funnel()
            entered = True
        else:
            for x in self.f.exits:
                if x.event == self.event.type and self._holds(x.guard, f"exit[{x.index}]"):
                    self._plan(x.actions, f"exit[{x.index}].actions")
                    self._exit_funnel(f"exit[{x.index}]")
                    return self._done(f"exit[{x.index}] matched")

        if self.event.timer is not None:
            return self._fire_timer(self.event.timer)
        assert self.m.state is not None
        for t in self.f.on_event.get((self.m.state, self.event.type), ()):
            if self._holds(t.guard, t.path):
                self._take(t)
                return self._done(f"{t.path} taken")
        if entered:
            return self._done(f'entered at "{self.m.state}"')
        guarded = (
            " (guards did not hold)" if (self.m.state, self.event.type) in self.f.on_event else ""
        )
        return self._unchanged(f'no transition from "{self.m.state}" on {self.event.type}{guarded}')

    def _entry_refusal(self) -> str | None:
        entry = self.f.definition.entry
        if self.event.timer is not None:
            return "timer for a member who is not in the funnel"
        if self.event.type not in entry.events:
            return f"{self.event.type} does not enter this funnel (entry.events)"
        rule, m = entry.reentry, self.m
        if m.entries:
            if rule.max_entries is not None and m.entries >= rule.max_entries:
                return f"already entered {m.entries} times (reentry.max_entries)"
            if rule.mode == "once":
                return "already entered once (reentry.mode once)"
            if rule.mode == "once_per_campaign" and m.campaign == self.f.campaign:
                return f'already entered campaign "{self.f.campaign}"'
            if rule.mode == "after_cooldown":
                assert rule.cooldown is not None
                ready = (m.left_at or m.entered_at or self.now) + parse_duration(rule.cooldown)
                if self.now < ready:
                    return f"re-entry cooldown runs until {ready.isoformat()}"
        if not self._holds(self.f.entry_guard, "entry"):
            return "entry guard did not hold"
        return None

    # ── moves ─────────────────────────────────────────────────────────────────────────────
    def _enter_funnel(self) -> None:
        self.m = self.m.evolve(
            status="active",
            entries=self.m.entries + 1,
            entered_at=self.now,
            left_at=None,
            campaign=self.f.campaign,
            state=None,
            stage=None,
        )
        initial = self.f.definition.initial
        self.moves.append(Move(None, initial, "entry"))
        self._enter_state(initial)

    def _exit_funnel(self, rule: str) -> None:
        self._cancel_timers()
        self.moves.append(Move(self.m.state, None, rule))
        self.stages.append(StageChange(self.m.stage, None, self.m.state, None, self.now))
        self.m = self.m.evolve(status="exited", left_at=self.now)

    def _take(self, t: CompiledTransition) -> None:
        self._plan(t.actions, f"{t.path}.actions")
        if t.to == self.m.state:  # internal: no re-entry; a one-shot timer is used up
            self.moves.append(Move(self.m.state, t.to, t.path))
            if t.trigger != "event":
                self._drop_timer(t.timer_key)
                if t.trigger in ("cron", "at"):
                    self._arm(t)
            return
        self.moves.append(Move(self.m.state, t.to, t.path))
        self._enter_state(t.to)

    def _enter_state(self, name: str, *, run_actions: bool = True) -> None:
        self._cancel_timers()
        old_state, old_stage = self.m.state, self.m.stage
        stage = self.f.stage_of(name)
        self.m = self.m.evolve(
            state=name, stage=stage, state_entered_at=self.now, seq=self.m.seq + 1
        )
        if stage != old_stage:
            self.stages.append(StageChange(old_stage, stage, old_state, name, self.now))
        if run_actions:
            self._plan(self.f.definition.states[name].on_enter, f"states.{name}.on_enter")
        if self.f.is_final(name):
            self.m = self.m.evolve(status="completed", left_at=self.now)
            return
        for t in self.f.timers.get(name, ()):
            self._arm(t)

    # ── timers ────────────────────────────────────────────────────────────────────────────
    def _arm(self, t: CompiledTransition) -> None:
        assert self.m.state is not None
        timer = ArmedTimer(t.timer_key, self.m.state, self.m.seq, due_time(t, self.now, self.f))
        self.m = self.m.evolve(timers=(*self.m.timers, timer))
        self.armed.append(timer)

    def _drop_timer(self, key: str) -> None:
        self.m = self.m.evolve(timers=tuple(t for t in self.m.timers if t.key != key))
        self.cancelled.append(key)

    def _cancel_timers(self) -> None:
        for timer in self.m.timers:
            self.cancelled.append(timer.key)
        self.m = self.m.evolve(timers=())

    def _fire_timer(self, key: str) -> Outcome:
        armed = next(
            (
                t
                for t in self.m.timers
                if t.key == key and t.state == self.m.state and t.seq == self.m.seq
            ),
            None,
        )
        if armed is None:
            return self._unchanged(f'timer {key} is not armed in state "{self.m.state}" (stale)')
        if armed.due_at > self.now:
            return self._unchanged(f"timer {key} is not due until {armed.due_at.isoformat()}")
        t = self.f.by_timer_key[key]
        if self._holds(t.guard, t.path):
            self._take(t)
            return self._done(f"{t.path} taken")
        self._drop_timer(key)
        if t.trigger in ("cron", "at"):
            self._arm(t)  # a recurring timer whose guard failed waits for its next occurrence
        return self._done(f"{t.path}: guard did not hold")

    # ── guards and actions ────────────────────────────────────────────────────────────────
    def _context(self) -> dict[str, Any]:
        m = self.m
        in_state = (self.now - m.state_entered_at).total_seconds() if m.state_entered_at else 0
        return {
            "event": {**self.event.data, "type": self.event.type, "id": self.event.id},
            "member": dict(m.profile),
            "funnel": {
                "key": self.f.key,
                "version": self.f.version or 0,
                "campaign": self.f.campaign,
            },
            "state": {
                "name": m.state or "",
                "stage": m.stage or "",
                "entries": m.entries,
                "seconds_in_state": int(in_state),
            },
            "now": self.now,
        }

    def _holds(self, guard: Guard | None, where: str) -> bool:
        if guard is None:
            return True
        ok, error = guard.evaluate(self._context())
        if error:
            self.guard_errors.append(f"{where}.guard: {error}")
        return ok

    def _plan(self, actions: tuple[Any, ...] | list[Any], source: str) -> None:
        context = None
        for i, action in enumerate(actions):
            params = action.model_dump(mode="json", exclude={"type"}, exclude_none=True)
            if action.type == "send_message":
                context = context or self._context()
                params["text"] = render_template(action.template, context)
            self.actions.append(
                PlannedAction(action.type, params, f"{source}[{i}]", "send", self.now)
            )

    # ── results ───────────────────────────────────────────────────────────────────────────
    def _done(self, reason: str) -> Outcome:
        actions, counts = apply_send_policy(self.f, self.actions, self.m.message_counts, self.now)
        self.m = self.m.evolve(message_counts=counts)
        return Outcome(
            state=self.m,
            matched=True,
            reason=reason,
            moves=tuple(self.moves),
            stage_changes=tuple(self.stages),
            actions=tuple(actions),
            timers_armed=tuple(self.armed),
            timers_cancelled=tuple(self.cancelled),
            guard_errors=tuple(self.guard_errors),
        )

    def _unchanged(self, reason: str) -> Outcome:
        return Outcome(
            state=self.original, matched=False, reason=reason, guard_errors=tuple(self.guard_errors)
        )


def relocate(funnel: CompiledFunnel, member: MemberState, state: str, now: datetime) -> Outcome:
    """Put an active member in `state` of (usually a newer version of) a funnel, as a
    migration map asks: timers are re-armed for the new state, `on_enter` actions do not run
    (the member did not do anything), and a stage change is recorded when the stage differs."""
    if now.tzinfo is None:
        raise ValueError("now must be timezone-aware")
    s = _Step(funnel, member, Event("funnel.migrated"), now)
    s.moves.append(Move(member.state, state, "migration"))
    s._enter_state(state, run_actions=False)
    return s._done(f'migrated from "{member.state}" to "{state}"')
