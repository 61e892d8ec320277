"""The pure engine, example by example: entry, transitions, guards, timers, policy, exits."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest

from app.engine import Event, MemberState, compile_document, step
from app.engine.step import relocate
from tests.factories import minimal, office_lunch

T = datetime(2026, 12, 1, 1, 0, tzinfo=UTC)  # Tuesday 09:00 in Shanghai


def run(funnel, events, start=T, gap=timedelta(minutes=1), member=None):
    m = member or MemberState()
    now, outcomes = start, []
    for e in events:
        o = step(funnel, m, e, now)
        m = o.state
        outcomes.append(o)
        now += gap
    return m, outcomes


def test_entry_puts_member_in_initial_state_and_runs_its_actions():
    f = compile_document(office_lunch(), version=1)
    o = step(f, MemberState(profile={"nickname": "小王"}), Event("member.scanned"), T)
    assert o.matched and o.state.state == "scanned" and o.state.stage == "acquire"
    assert o.state.status == "active" and o.state.entries == 1
    assert [a.type for a in o.actions] == ["send_message", "custom", "tag"]
    assert "欢迎 小王!" in o.actions[0].params["text"]
    assert [(c.left, c.entered) for c in o.stage_changes] == [(None, "acquire")]


def test_entry_event_is_also_offered_to_the_initial_state():
    doc = minimal(entry={"events": ["message.posted"]})
    m, _ = run(compile_document(doc), [Event("message.posted")])
    assert m.state == "active"  # entered at "joined", then joined --message.posted--> active


def test_event_that_does_not_enter_leaves_a_new_member_outside():
    o = step(compile_document(minimal()), MemberState(), Event("order.paid"), T)
    assert not o.matched and o.state == MemberState() and "does not enter" in o.reason


def test_unmatched_event_changes_nothing_and_says_why():
    f = compile_document(minimal())
    m, _ = run(f, [Event("member.joined")])
    o = step(f, m, Event("review.posted"), T)
    assert not o.matched and o.state == m and not o.actions
    assert o.reason == 'no transition from "joined" on review.posted'


def test_guard_decides_the_transition():
    f = compile_document(minimal())
    m, _ = run(f, [Event("member.joined"), Event("message.posted")])
    low = step(f, m, Event("order.paid", {"amount_fen": 2999}), T)
    assert not low.matched and low.state.state == "active" and "guards did not hold" in low.reason
    high = step(f, m, Event("order.paid", {"amount_fen": 3000}), T)
    assert high.state.state == "buyer" and high.state.status == "completed"


def test_guard_error_means_false_and_is_reported():
    f = compile_document(minimal())
    m, _ = run(f, [Event("member.joined"), Event("message.posted")])
    o = step(f, m, Event("order.paid", {}), T)  # no amount_fen
    assert not o.matched and o.guard_errors and "transitions[1].guard" in o.guard_errors[0]


def test_first_matching_transition_in_document_order_wins():
    f = compile_document(office_lunch())
    m, _ = run(f, [Event("member.scanned"), Event("member.joined")])
    early = step(f, m, Event("order.placed", {"sequence": 3}), T)
    late = step(f, m, Event("order.placed", {"sequence": 30}), T)
    assert early.state.state == late.state.state == "customer"
    assert [a.type for a in early.actions] == ["issue_voucher"] and not late.actions


def test_after_timer_fires_once_due_and_stale_timers_are_ignored():
    f = compile_document(office_lunch())
    m, _ = run(f, [Event("member.scanned")])
    (timer,) = m.timers
    assert timer.due_at == T + timedelta(days=1)
    early = step(f, m, Event.timer_fired(timer.key), T + timedelta(hours=1))
    assert not early.matched and "not due" in early.reason
    fired = step(f, m, Event.timer_fired(timer.key), timer.due_at)
    assert fired.matched and fired.state.state == "scanned"  # internal: reminder only
    assert fired.state.timers == () and fired.actions[0].type == "send_message"
    again = step(f, fired.state, Event.timer_fired(timer.key), timer.due_at)
    assert not again.matched and "stale" in again.reason


def test_leaving_a_state_cancels_its_timers():
    f = compile_document(office_lunch())
    m, _ = run(f, [Event("member.scanned")])
    o = step(f, m, Event("member.joined"), T)
    assert o.timers_cancelled == ("t1",)
    assert [t.key for t in o.state.timers] == ["t3"]  # in_group's weekday 10:30 menu


def test_local_wait_fires_at_next_weekday_local_time():
    f = compile_document(office_lunch())
    friday_noon = datetime(2026, 12, 4, 4, 0, tzinfo=UTC)  # Fri 12:00 Shanghai
    m, _ = run(f, [Event("member.scanned"), Event("member.joined")], start=friday_noon)
    (timer,) = m.timers
    assert timer.due_at == datetime(2026, 12, 7, 2, 30, tzinfo=UTC)  # Mon 10:30 Shanghai
    fired = step(f, m, Event.timer_fired("t3"), timer.due_at)
    assert fired.state.timers[0].due_at == datetime(2026, 12, 8, 2, 30, tzinfo=UTC)  # re-armed Tue


def test_cron_timer_rearms_when_its_guard_fails():
    doc = minimal(
        transitions=[
            {"from": "joined", "to": "active", "cron": "0 9 * * *", "guard": "member.vip == true"},
        ]
    )
    del doc["states"]["buyer"]
    f = compile_document(doc)
    m, _ = run(f, [Event("member.joined")], member=MemberState(profile={"vip": False}))
    (timer,) = m.timers
    assert timer.due_at == datetime(2026, 12, 2, 1, 0, tzinfo=UTC)
    o = step(f, m, Event.timer_fired("t0"), timer.due_at)
    assert o.state.state == "joined" and o.state.timers[0].due_at == timer.due_at + timedelta(
        days=1
    )


def test_wait_for_event_with_timeout():
    doc = minimal(
        transitions=[
            {"from": "joined", "to": "active", "event": "message.posted"},
            {"from": "joined", "to": "buyer", "after": "PT2H"},
        ]
    )
    f = compile_document(doc)
    m, _ = run(f, [Event("member.joined")])
    timed_out = step(f, m, Event.timer_fired("t1"), T + timedelta(hours=2))
    assert timed_out.state.state == "buyer"
    answered = step(f, m, Event("message.posted"), T + timedelta(minutes=5))
    assert answered.state.state == "active" and answered.state.timers == ()


def test_quiet_hours_defer_messages_until_morning():
    f = compile_document(office_lunch())
    night = datetime(2026, 12, 1, 15, 0, tzinfo=UTC)  # 23:00 Shanghai
    o = step(f, MemberState(), Event("member.scanned"), night)
    msg = o.actions[0]
    assert msg.disposition == "deferred"
    assert msg.deliver_at == datetime(2026, 12, 2, 0, 0, tzinfo=UTC)  # 08:00 Shanghai
    assert o.actions[1].disposition == "send"  # only messages are held


def test_daily_message_cap_suppresses_the_rest():
    doc = minimal(
        policy={"max_messages_per_day": 2},
        transitions=[
            {
                "from": "joined",
                "to": "joined",
                "event": "message.posted",
                "actions": [{"type": "send_message", "template": "hi"}],
            },
        ],
    )
    doc["states"] = {"joined": {"stage": "acquire"}}
    f = compile_document(doc)
    m, outs = run(f, [Event("member.joined")] + [Event("message.posted")] * 3)
    assert [o.actions[0].disposition for o in outs[1:]] == ["send", "send", "suppressed"]
    next_day = step(f, m, Event("message.posted"), T + timedelta(days=1))
    assert next_day.actions[0].disposition == "send"


def test_exit_rule_leaves_the_funnel_and_closes_the_stage():
    f = compile_document(office_lunch())
    m, _ = run(f, [Event("member.scanned")])
    o = step(f, m, Event("member.left"), T)
    assert o.state.status == "exited" and o.state.timers == ()
    assert [(c.left, c.entered) for c in o.stage_changes] == [("acquire", None)]


@pytest.mark.parametrize(
    ("reentry", "second_entry"),
    [
        ({"mode": "once"}, False),
        ({"mode": "once_per_campaign"}, False),
        ({"mode": "after_cooldown", "cooldown": "P1D"}, False),
        ({"mode": "after_cooldown", "cooldown": "PT1M"}, True),
    ],
)
def test_reentry_rules(reentry, second_entry):
    doc = minimal(
        entry={"events": ["member.joined"], "reentry": reentry}, exit=[{"event": "member.left"}]
    )
    f = compile_document(doc)
    m, _ = run(f, [Event("member.joined"), Event("member.left")], gap=timedelta(minutes=1))
    o = step(f, m, Event("member.joined"), T + timedelta(minutes=10))
    assert o.matched is second_entry
    assert o.state.entries == (2 if second_entry else 1)


def test_once_per_campaign_admits_a_new_campaign():
    doc = minimal(
        campaign="week-1",
        entry={"events": ["member.joined"], "reentry": {"mode": "once_per_campaign"}},
        exit=[{"event": "member.left"}],
    )
    m, _ = run(compile_document(doc), [Event("member.joined"), Event("member.left")])
    doc["campaign"] = "week-2"
    o = step(compile_document(doc), m, Event("member.joined"), T + timedelta(days=7))
    assert o.matched and o.state.entries == 2 and o.state.campaign == "week-2"


def test_max_entries():
    doc = minimal(
        entry={
            "events": ["member.joined"],
            "reentry": {"mode": "after_cooldown", "cooldown": "PT1S", "max_entries": 2},
        },
        exit=[{"event": "member.left"}],
    )
    f = compile_document(doc)
    m, _ = run(f, [Event("member.joined"), Event("member.left")] * 2)
    assert m.entries == 2
    assert not step(f, m, Event("member.joined"), T + timedelta(days=1)).matched


def test_relocate_rearms_timers_without_running_actions():
    f = compile_document(office_lunch())
    m, _ = run(f, [Event("member.scanned")])
    o = relocate(f, m, "activated", T + timedelta(hours=1))
    assert o.state.state == "activated" and o.actions == ()
    assert [t.key for t in o.state.timers] == ["t10"]  # activated --P7D--> dormant
    assert [(c.left, c.entered) for c in o.stage_changes] == [("acquire", "activate")]


def test_member_state_round_trips_through_json():
    f = compile_document(office_lunch())
    m, _ = run(f, [Event("member.scanned"), Event("member.joined")])
    assert MemberState.from_json(m.to_json(), m.profile) == m


def test_naive_now_is_refused():
    with pytest.raises(ValueError, match="timezone-aware"):
        step(
            compile_document(minimal()), MemberState(), Event("member.joined"), datetime(2026, 1, 1)
        )
