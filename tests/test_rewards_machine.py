"""Hypothesis state machines over the rewards, each on its own SQLite file:

- the points ledger: credits, debits and reversals, replays of an origin; the balance is the
  sum of the ledger, never negative, a refused debit leaves nothing behind, a credit is
  reversed at most once;
- check-in streaks in zones from UTC-11 to UTC+14 (and one with daylight saving), time
  moving by minutes to days: one check-in per local day, each streak one more than the
  previous local day's or 1, a reward at each multiple of the streak length;
- a card drop's supply: claims, reviews and redemptions while time runs; never more cards
  dropped on a day than its supply, at most one per member per day, balances equal to the
  ledger and never negative, and the answers the model predicts.
"""

from __future__ import annotations

import copy
import json
from collections import Counter, defaultdict
from datetime import date, timedelta
from pathlib import Path
from typing import Any, ClassVar
from zoneinfo import ZoneInfo

from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    initialize,
    invariant,
    rule,
    run_state_machine_as_test,
)
from sqlalchemy import func, select

from app.clock import FrozenClock
from app.errors import Conflict
from app.mechanics.rewards import points
from app.mechanics.rewards.models import (
    CardBalance,
    CardEntry,
    CheckIn,
    DailySupply,
    PointsBalance,
    PointsEntry,
)
from tests.conftest import FUNNELS, apply_command, sqlite_copy, tenant_with_funnel
from tests.test_groupbuy import LUNCH, OPENS

MEMBERS = ["m0", "m1", "m2"]


def _settings(steps: int = 30) -> settings:
    return settings(
        max_examples=max(10, settings.default.max_examples // 2),
        stateful_step_count=steps,
        derandomize=True,  # the same examples every run, so the coverage checks are stable
    )


# ── the points ledger ─────────────────────────────────────────────────────────────────────
class PointsMachine(RuleBasedStateMachine):
    template: Path
    workdir: Path
    seen: ClassVar[Counter[str]] = Counter()

    def __init__(self) -> None:
        super().__init__()
        self.engine = sqlite_copy(self.template, self.workdir, "points.db")
        self.tenant_id = tenant_with_funnel(self.engine, "office-lunch", None, OPENS)
        for m in MEMBERS:  # members, made by the write path
            assert apply_command(self.engine, self.tenant_id, OPENS, "member.checked_in", m).ok
        with self.engine.connect() as conn:
            self.ids = dict(conn.exec_driver_sql("SELECT external_id, id FROM member").all())
        self.model: dict[str, int] = defaultdict(int)
        self.credits: dict[str, tuple[str, int]] = {}  # origin → (member, points)
        self.reversed: set[str] = set()
        self.n = 0

    def teardown(self) -> None:
        self.engine.dispose()

    def post(self, member: str, amount: int, origin: str) -> Any:
        try:
            with self.engine.begin() as conn:
                return points.post(conn, self.tenant_id, self.ids[member], amount, origin, OPENS)
        except Conflict as exc:
            return exc

    @rule(member=st.sampled_from(MEMBERS), amount=st.integers(1, 100), again=st.booleans())
    def credit(self, member: str, amount: int, again: bool) -> None:
        if again and self.credits:
            origin = sorted(self.credits)[amount % len(self.credits)]
            assert self.post(member, amount, origin) is None  # one cause credits once
            self.seen["replayed"] += 1
            return
        self.n += 1
        origin = f"credit-{self.n}"
        assert isinstance(self.post(member, amount, origin), int)
        self.model[member] += amount
        self.credits[origin] = (member, amount)
        self.seen["credit"] += 1

    @rule(member=st.sampled_from(MEMBERS), amount=st.integers(1, 150))
    def debit(self, member: str, amount: int) -> None:
        self.n += 1
        result = self.post(member, -amount, f"debit-{self.n}")
        if amount > self.model[member]:
            assert isinstance(result, Conflict) and result.code == "not_enough_points"
            self.seen["refused"] += 1
        else:
            assert isinstance(result, int)
            self.model[member] -= amount
            self.seen["debit"] += 1

    @rule(pick=st.integers(0, 1000))
    def reverse(self, pick: int) -> None:
        if not self.credits:
            return
        origin = sorted(self.credits)[pick % len(self.credits)]
        member, amount = self.credits[origin]
        with self.engine.begin() as conn:
            entry = points.reverse(conn, self.tenant_id, origin, OPENS, "refund")
        if origin in self.reversed or self.model[member] == 0:
            assert entry is None
        else:
            assert entry is not None
            self.model[member] -= min(amount, self.model[member])
            self.reversed.add(origin)
            self.seen["reversal"] += 1

    @invariant()
    def balance_is_the_sum_of_the_ledger_and_never_negative(self) -> None:
        with self.engine.connect() as conn:
            sums = dict(
                conn.execute(
                    select(PointsEntry.member_id, func.sum(PointsEntry.points)).group_by(  # type: ignore[call-overload]
                        PointsEntry.member_id
                    )
                ).all()
            )
            balances = dict(
                conn.execute(select(PointsBalance.member_id, PointsBalance.balance)).all()
            )  # type: ignore[call-overload]
            reversals = (
                conn.execute(
                    select(PointsEntry.reverses).where(PointsEntry.kind == "reversal")  # type: ignore[call-overload]
                )
                .scalars()
                .all()
            )
        for m in MEMBERS:
            mid = self.ids[m]
            assert balances.get(mid, 0) == sums.get(mid, 0) == self.model[m] >= 0
        assert len(reversals) == len(set(reversals))  # reversed at most once


def test_points_ledger_invariants(sqlite_template, tmp_path):
    PointsMachine.template, PointsMachine.workdir = sqlite_template, tmp_path
    PointsMachine.seen.clear()
    run_state_machine_as_test(PointsMachine, settings=_settings())
    assert {"credit", "debit", "refused", "reversal", "replayed"} <= set(PointsMachine.seen)


# ── check-in streaks across time zones ────────────────────────────────────────────────────
ZONES = ["Asia/Shanghai", "Pacific/Kiritimati", "Pacific/Pago_Pago", "America/Los_Angeles"]
STREAK, POINTS = 3, 10


class CheckInMachine(RuleBasedStateMachine):
    template: Path
    workdir: Path
    seen: ClassVar[Counter[str]] = Counter()

    def __init__(self) -> None:
        super().__init__()
        self.engine = sqlite_copy(self.template, self.workdir, "checkin.db")
        self.clock = FrozenClock(OPENS)
        self.last: dict[str, tuple[date, int]] = {}
        self.rewards: Counter[str] = Counter()

    def teardown(self) -> None:
        self.engine.dispose()

    @initialize(zone=st.sampled_from(ZONES))
    def funnel_in(self, zone: str) -> None:
        doc = json.loads((FUNNELS / "skincare-club.json").read_text())
        doc["timezone"] = zone
        doc["mechanics"]["rewards"]["streak-21"].update(
            streak_days=STREAK, reward={"points": POINTS}
        )
        self.zone = ZoneInfo(zone)
        self.tenant_id = tenant_with_funnel(self.engine, "skincare-club", doc, OPENS)
        self.seen[zone] += 1

    @rule(minutes=st.sampled_from([1, 30, 60 * 5, 60 * 12, 60 * 23, 60 * 24, 60 * 25, 60 * 49]))
    def time_passes(self, minutes: int) -> None:
        self.clock.advance(timedelta(minutes=minutes))

    @rule(member=st.sampled_from(MEMBERS[:2]))
    def checks_in(self, member: str) -> None:
        now = self.clock.now()
        reply = apply_command(self.engine, self.tenant_id, now, "member.checked_in", member)
        assert reply.ok, reply.error
        day = now.astimezone(self.zone).date()
        last = self.last.get(member)
        if last and last[0] == day:
            self.seen["same_day"] += 1
            return
        streak = last[1] + 1 if last and last[0] == day - timedelta(days=1) else 1
        self.seen["continued" if streak > 1 else "started"] += 1
        self.last[member] = (day, streak)
        if streak % STREAK == 0:
            self.rewards[member] += POINTS
            self.seen["rewarded"] += 1

    @invariant()
    def one_a_day_each_streak_follows_yesterday_and_rewards_match(self) -> None:
        with self.engine.connect() as conn:
            rows = conn.execute(
                select(CheckIn.member_id, CheckIn.local_date, CheckIn.streak)  # type: ignore[call-overload]
            ).all()
            balances = dict(
                conn.execute(select(PointsBalance.member_id, PointsBalance.balance)).all()
            )  # type: ignore[call-overload]
            ids = dict(conn.exec_driver_sql("SELECT external_id, id FROM member").all())
        days = {(m, d): s for m, d, s in rows}
        assert len(days) == len(rows)  # one a day
        for (m, d), s in days.items():
            assert s == days.get((m, d - timedelta(days=1)), 0) + 1
        for m, (day, streak) in self.last.items():
            assert days[(ids[m], day)] == streak
            assert balances.get(ids[m], 0) == self.rewards[m]


def test_check_in_streak_invariants_across_time_zones(sqlite_template, tmp_path):
    CheckInMachine.template, CheckInMachine.workdir = sqlite_template, tmp_path
    CheckInMachine.seen.clear()
    run_state_machine_as_test(CheckInMachine, settings=_settings(40))
    assert {"same_day", "continued", "started", "rewarded"} <= set(CheckInMachine.seen)
    assert len(set(ZONES) & set(CheckInMachine.seen)) >= 2


# ── a card drop's supply ──────────────────────────────────────────────────────────────────
SUPPLY, NEEDED = 2, 2


class CardSupplyMachine(RuleBasedStateMachine):
    template: Path
    workdir: Path
    seen: ClassVar[Counter[str]] = Counter()

    def __init__(self) -> None:
        super().__init__()
        self.engine = sqlite_copy(self.template, self.workdir, "cards.db")
        self.clock = FrozenClock(OPENS)  # 10:00 in Shanghai: inside the 09:00 drop
        doc = copy.deepcopy(LUNCH)
        doc["mechanics"]["rewards"]["free-meal-card"].update(
            daily_limit=SUPPLY, cards_for_reward=NEEDED, drop_for="PT3H", ends_at=None
        )
        self.tenant_id = tenant_with_funnel(self.engine, "office-lunch", doc, OPENS)
        self.zone = ZoneInfo("Asia/Shanghai")
        self.claimed: dict[date, set[str]] = defaultdict(set)
        self.held: Counter[str] = Counter()
        self.reviewed: set[str] = set()
        self.review_days: dict[str, set[date]] = defaultdict(set)
        self.orders = 0

    def teardown(self) -> None:
        self.engine.dispose()

    def apply(self, kind: str, member: str, **data: Any) -> Any:
        return apply_command(self.engine, self.tenant_id, self.clock.now(), kind, member, **data)

    @rule(hours=st.sampled_from([1, 2, 5, 20, 24]))
    def time_passes(self, hours: int) -> None:
        self.clock.advance(timedelta(hours=hours))

    @rule(member=st.sampled_from(MEMBERS))
    def claims(self, member: str) -> None:
        reply = self.apply("card.claim", member, funnel="office-lunch", campaign="free-meal-card")
        local = self.clock.now().astimezone(self.zone)
        day = local.date()
        if not 9 <= local.hour < 12:
            expected = "drop_not_open"
        elif member in self.claimed[day]:
            expected = "daily_limit_reached"
        elif len(self.claimed[day]) >= SUPPLY:
            expected = "sold_out"
        else:
            expected = "ok"
            self.claimed[day].add(member)
            self.held[member] += 1
        got = "ok" if reply.ok else reply.error.code
        assert got == expected, (got, expected, local)
        self.seen[got] += 1

    @rule(member=st.sampled_from(MEMBERS), repeat=st.booleans())
    def reviews(self, member: str, repeat: bool) -> None:
        if not (repeat and self.reviewed):
            self.orders += 1
        order = f"o{self.orders}"
        reply = self.apply(
            "review.posted", member, review_id=f"r{order}{member}", order_id=order, rating=5
        )
        assert reply.ok, reply.error
        # review-card: one card per order, one review card per member and day
        if order not in self.reviewed and not self._reviewed_today(member):
            self.held[member] += 1
            self.reviewed.add(order)
            self.review_days[member].add(self.clock.now().astimezone(self.zone).date())
            self.seen["review_card"] += 1

    def _reviewed_today(self, member: str) -> bool:
        return self.clock.now().astimezone(self.zone).date() in self.review_days[member]

    @rule(member=st.sampled_from(MEMBERS))
    def redeems(self, member: str) -> None:
        reply = self.apply("card.redeem", member, funnel="office-lunch", campaign="free-meal-card")
        if self.held[member] >= NEEDED:
            assert reply.ok, reply.error
            self.held[member] -= NEEDED
            self.seen["redeemed"] += 1
        else:
            assert reply.error is not None and reply.error.code == "not_enough_cards"
            self.seen["not_enough_cards"] += 1

    @invariant()
    def supply_and_balances_hold(self) -> None:
        with self.engine.connect() as conn:
            drops = conn.execute(
                select(CardEntry.member_id, CardEntry.origin).where(CardEntry.via == "drop")  # type: ignore[call-overload]
            ).all()
            used = dict(conn.execute(select(DailySupply.local_date, DailySupply.used)).all())  # type: ignore[call-overload]
            sums = dict(
                conn.execute(
                    select(CardEntry.member_id, func.sum(CardEntry.delta)).group_by(
                        CardEntry.member_id
                    )  # type: ignore[call-overload]
                ).all()
            )
            balances = dict(conn.execute(select(CardBalance.member_id, CardBalance.count)).all())  # type: ignore[call-overload]
            ids = dict(conn.exec_driver_sql("SELECT external_id, id FROM member").all())
        per_day = Counter(origin.split(":")[3] for _, origin in drops)
        per_member_day = Counter((m, origin.split(":")[3]) for m, origin in drops)
        assert all(n <= SUPPLY for n in per_day.values())
        assert all(n == 1 for n in per_member_day.values())
        assert {str(d): n for d, n in used.items() if n} == dict(per_day)
        for m in MEMBERS:
            mid = ids.get(m)
            assert balances.get(mid, 0) == sums.get(mid, 0) == self.held[m] >= 0


def test_card_supply_invariants(sqlite_template, tmp_path):
    CardSupplyMachine.template, CardSupplyMachine.workdir = sqlite_template, tmp_path
    CardSupplyMachine.seen.clear()
    run_state_machine_as_test(CardSupplyMachine, settings=_settings(40))
    reached = {"ok", "sold_out", "daily_limit_reached", "drop_not_open", "redeemed"}
    assert reached <= set(CardSupplyMachine.seen), CardSupplyMachine.seen
