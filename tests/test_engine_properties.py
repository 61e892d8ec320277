"""Properties of `step` over random valid funnels and random event sequences.

- it never crashes and never leaves the declared states;
- a transition whose guard fails is never taken (guards here have known truth values);
- the stage always matches the state, timers belong to the current state;
- the same inputs give the same outcome.
"""

from __future__ import annotations

import itertools
from dataclasses import replace
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from hypothesis import assume, given, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, rule

from app.engine import CompiledFunnel, Event, MemberState, compile_document, step
from app.engine.definition import STAGES
from app.errors import InvalidDefinition
from tests.factories import office_lunch

EVENTS = ["member.joined", "message.posted", "order.paid", "review.posted", "member.left"]
# Guards whose truth is known from the event alone, so the test can check the engine obeyed.
GUARDS: dict[str | None, Any] = {
    None: lambda data: True,
    "true": lambda data: True,
    "false": lambda data: False,
    "has(event.amount) && event.amount > 10": lambda data: data.get("amount", 0) > 10,
    "event.amount > 10": lambda data: "amount" in data and data["amount"] > 10,  # errors → false
}
T0 = datetime(2026, 12, 1, 1, 0, tzinfo=UTC)


@st.composite
def funnels(draw: st.DrawFn) -> dict[str, Any]:
    n = draw(st.integers(2, 7))
    names = [f"s{i}" for i in range(n)]
    final_last = draw(st.booleans())
    states = {name: {"stage": draw(st.sampled_from(STAGES))} for name in names}
    if final_last:
        states[names[-1]]["final"] = True
    transitions: list[dict[str, Any]] = []
    # a chain keeps every state reachable
    for a, b in itertools.pairwise(names):
        transitions.append(
            {
                "from": a,
                "to": b,
                "event": draw(st.sampled_from(EVENTS[:4])),
                "guard": draw(st.sampled_from([g for g in GUARDS if g])),
            }
        )
    sources = names[:-1] if final_last else names
    for _ in range(draw(st.integers(0, 8))):
        t: dict[str, Any] = {
            "from": draw(st.sampled_from(sources)),
            "to": draw(st.sampled_from(names)),
        }
        kind = draw(st.sampled_from(["event", "event", "after", "at"]))
        if kind == "event":
            t["event"] = draw(st.sampled_from(EVENTS[:4]))
        elif kind == "after":
            t["after"] = draw(st.sampled_from(["PT1H", "PT6H", "P1D"]))
        else:
            t["at"] = {
                "time": draw(st.sampled_from(["08:00", "10:30"])),
                "days": draw(st.sampled_from(["every_day", "weekdays", [6, 7]])),
            }
        guard = draw(st.sampled_from(list(GUARDS)))
        if guard:
            t["guard"] = guard
        transitions.append(t)
    doc: dict[str, Any] = {
        "key": "prop",
        "name": "property funnel",
        "initial": "s0",
        "states": states,
        "transitions": transitions,
        "entry": {
            "events": draw(
                st.lists(st.sampled_from(EVENTS[:4]), min_size=1, max_size=3, unique=True)
            ),
            "reentry": draw(
                st.sampled_from([{"mode": "once"}, {"mode": "after_cooldown", "cooldown": "PT1H"}])
            ),
        },
        "exit": [{"event": "member.left"}],
    }
    if draw(st.booleans()):
        doc["policy"] = {
            "quiet_hours": {"start": "22:00", "end": "08:00"},
            "max_messages_per_day": 2,
        }
        states["s0"]["on_enter"] = [
            {"type": "send_message", "template": "hi {{ member.nickname }}"}
        ]
    return doc


def compiled_or_skip(doc: dict[str, Any]) -> CompiledFunnel:
    try:
        return compile_document(doc)
    except InvalidDefinition:
        assume(False)  # e.g. a random timer shadowed by another: invalid by design
        raise


happenings = st.one_of(
    st.tuples(
        st.just("event"),
        st.sampled_from(EVENTS),
        st.fixed_dictionaries({}, optional={"amount": st.integers(-5, 50)}),
    ),
    st.tuples(st.just("timer"), st.integers(0, 30), st.just({})),
)


def check(f: CompiledFunnel, before: MemberState, event: Event, now: datetime) -> MemberState:
    outcome = step(f, before, event, now)
    assert outcome == step(f, before, event, now), "step is deterministic"
    after = outcome.state
    if not outcome.matched:
        assert after == before and not outcome.actions and not outcome.moves
        return after
    states = f.definition.states
    assert after.state is None or after.state in states
    if after.state is not None:
        assert after.stage == states[after.state].stage
    if after.status == "active":
        assert not states[after.state].final  # type: ignore[index]
    else:
        assert after.timers == ()
    for timer in after.timers:
        t = f.by_timer_key[timer.key]
        assert timer.state == after.state and after.state in t.sources and timer.seq == after.seq
    for move in outcome.moves:
        if move.rule.startswith("transitions["):
            t = f.definition.transitions[int(move.rule[12:-1])]
            if t.event is not None:
                assert _holds(f, int(move.rule[12:-1]), event), (
                    f"{move.rule} taken though its guard fails"
                )
            else:
                assert t.guard in (None, "true"), f"timer {move.rule} taken though its guard fails"
    return after


def _holds(f: CompiledFunnel, index: int, event: Event) -> bool:
    source = f.definition.transitions[index].guard
    if source in GUARDS:
        return bool(GUARDS[source](dict(event.data)))
    guard = f.transitions[index].guard  # guards of the reference funnel read only the event
    assert guard is not None
    return guard.evaluate({"event": dict(event.data)})[0]


@given(
    doc=funnels(),
    script=st.lists(happenings, max_size=25),
    gaps=st.lists(st.integers(0, 720), min_size=25, max_size=25),
)
def test_step_keeps_its_invariants(doc, script, gaps):
    f = compiled_or_skip(doc)
    m, now = MemberState(profile={"nickname": "p"}), T0
    for (kind, value, data), gap in zip(script, gaps, strict=False):
        now += timedelta(minutes=gap)
        if kind == "event":
            event = Event(value, data)
        elif m.timers:
            timer = m.timers[value % len(m.timers)]
            now = max(now, timer.due_at)
            event = Event.timer_fired(timer.key)
        else:
            event = Event.timer_fired(f"t{value}")  # a stale or unknown timer
        m = check(f, m, event, now)


class OfficeLunchMachine(RuleBasedStateMachine):
    """Several members living through the reference funnel, timers firing as time passes."""

    @initialize()
    def setup(self) -> None:
        self.f = compile_document(office_lunch(), version=1)
        self.now = T0
        self.members: dict[int, MemberState] = {}
        self.sent: dict[tuple[int, str], int] = {}

    @rule(
        member=st.integers(0, 2),
        event=st.sampled_from(
            [
                "member.scanned",
                "member.joined",
                "groupbuy.joined",
                "groupbuy.succeeded",
                "groupbuy.failed",
                "card.collected",
                "review.posted",
                "order.placed",
                "order.paid",
                "invite.accepted",
                "member.left",
            ]
        ),
        amount=st.integers(0, 5000),
        sequence=st.integers(1, 40),
    )
    def send(self, member: int, event: str, amount: int, sequence: int) -> None:
        data = {"amount_fen": amount, "sequence": sequence, "photos": amount % 3}
        self._apply(member, Event(event, data))

    @rule(minutes=st.integers(1, 3 * 24 * 60))
    def wait(self, minutes: int) -> None:
        self.now += timedelta(minutes=minutes)
        for member, state in list(self.members.items()):
            for timer in sorted(state.timers, key=lambda t: t.due_at):
                if timer.due_at <= self.now:
                    self._apply(member, Event.timer_fired(timer.key))

    def _apply(self, member: int, event: Event) -> None:
        before = self.members.get(member, MemberState(profile={"nickname": f"m{member}"}))
        outcome = step(self.f, before, event, self.now)
        self.members[member] = check(self.f, before, event, self.now)
        for action in outcome.actions:
            if action.type == "send_message" and action.disposition != "suppressed":
                day = action.deliver_at.astimezone(self.f.zone).date().isoformat()
                self.sent[(member, day)] = self.sent.get((member, day), 0) + 1

    @invariant()
    def message_cap_holds(self) -> None:
        cap = self.f.max_messages_per_day
        assert cap is not None
        assert all(n <= cap for n in self.sent.values())


TestOfficeLunchMachine = OfficeLunchMachine.TestCase
TestOfficeLunchMachine.settings = settings(settings.default, stateful_step_count=30)


# A template is the marketer's text with {{ dotted.names }}: the renderer must fill each name
# from the context, leave the text around it alone, and render a missing or null value (or a
# path through a non-object) as empty text, whatever it rendered before for the same template.
_NAMES = st.sampled_from(["member", "nickname", "event", "amount", "x"])
_VALUES = st.recursive(
    st.none() | st.integers(-5, 5) | st.text("ab 元", max_size=3),
    lambda inner: st.dictionaries(_NAMES, inner, max_size=3),
    max_leaves=6,
)


def _reference_render(template: str, context: Any) -> str:
    import re

    def value(match: re.Match[str]) -> str:
        node = context
        for name in match.group(1).split("."):
            if not isinstance(node, dict) or name not in node:
                return ""
            node = node[name]
        return "" if node is None else str(node)

    return re.sub(r"\{\{\s*([^{}]*?)\s*\}\}", value, template)


@given(
    pieces=st.lists(
        st.text("hi {}.", max_size=4)
        | st.builds(
            lambda path, pad: "{{" + pad + ".".join(path) + pad + "}}",
            st.lists(_NAMES, min_size=1, max_size=3),
            st.sampled_from(["", " "]),
        ),
        max_size=5,
    ),
    contexts=st.lists(st.dictionaries(_NAMES, _VALUES, max_size=4), min_size=1, max_size=3),
)
def test_a_template_renders_each_context_like_a_fresh_substitution(
    pieces: list[str], contexts: list[dict[str, Any]]
) -> None:
    from app.engine.guards import render_template

    template = "".join(pieces)
    for context in contexts:
        assert render_template(template, context) == _reference_render(template, context)


_TIMES = st.none() | st.datetimes(timezones=st.just(UTC))
_CHANGES = st.fixed_dictionaries(
    {},
    optional={
        "status": st.sampled_from(["new", "active", "completed", "exited"]),
        "state": st.none() | st.text(max_size=5),
        "stage": st.none() | st.sampled_from(STAGES),
        "state_entered_at": _TIMES,
        "seq": st.integers(0, 9),
        "entries": st.integers(0, 9),
        "left_at": _TIMES,
        "campaign": st.none() | st.text(max_size=5),
        "message_counts": st.lists(st.tuples(st.text(max_size=3), st.integers(0, 5))).map(tuple),
        "profile": st.dictionaries(st.text(max_size=3), st.integers()),
    },
)


@given(first=_CHANGES, then=_CHANGES)
def test_evolve_is_dataclasses_replace(first, then):
    """`MemberState.evolve` skips `dataclasses.replace`'s machinery; it must make the same
    state, and refuse a field the state does not have."""
    base = MemberState(profile={"nickname": "p"})
    assert base.evolve(**first).evolve(**then) == replace(replace(base, **first), **then)
    evolved = base.evolve(**first)
    assert vars(evolved) == vars(replace(base, **first))  # profile too (not compared by ==)
    with pytest.raises(TypeError, match="no field 'nickname'"):
        base.evolve(nickname="x")
