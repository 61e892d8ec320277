"""A hypothesis state machine over referral: members accept each other's codes (cycles,
self-invites and repeats included), pay, get refunded, and time passes. After every step:

- the attribution graph is a forest: one inviter at most, nobody their own ancestor;
- no inviter holds more live inviter rewards than the cap, and none is above level 2;
- a reward is pending, paid or voided — and the ledger agrees: a paid reward has one payment
  entry, a voided one none or a payment and its reversal (net zero), never anything else;
- at the end, once every hold has passed, no reward is left pending.
"""

from __future__ import annotations

import copy
from collections import Counter
from datetime import timedelta
from pathlib import Path
from typing import Any, ClassVar

from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, rule, run_state_machine_as_test
from sqlalchemy import select

from app.clock import FrozenClock
from app.events.dispatch import Reply
from app.mechanics.referral.models import ReferralLink, ReferralReward, RewardLedger
from app.mechanics.sweeps import sweep_due
from tests.conftest import apply_command, sqlite_copy, tenant_with_funnel
from tests.test_groupbuy import LUNCH, OPENS

MEMBERS = [f"m{i}" for i in range(6)]
CAP = 3


def campaign_doc() -> dict[str, Any]:
    doc = copy.deepcopy(LUNCH)
    doc["mechanics"]["referral"]["colleagues"].update(
        qualify_event="order.paid",
        inviter_reward={"points": 50},
        invitee_reward={"points": 20},
        tiers=[{"invites": 2, "reward": {"points": 100}}],
        max_rewards_per_inviter=CAP,
        max_rewards_per_inviter_per_day=None,
        depth=2,
        hold="P1D",
        attribution_window="P365D",  # time moves fast here: members stay new
    )
    return doc


class ReferralMachine(RuleBasedStateMachine):
    template: Path
    workdir: Path
    seen: ClassVar[Counter[str]] = Counter()  # over the run: which outcomes were reached

    def __init__(self) -> None:
        super().__init__()
        self.engine = sqlite_copy(self.template, self.workdir, "referral.db")
        self.clock = FrozenClock(OPENS)
        self.tenant_id = tenant_with_funnel(self.engine, "office-lunch", campaign_doc(), OPENS)
        self.codes: dict[str, str] = {}
        for m in MEMBERS:
            reply = self.apply("referral.mine", m, funnel="office-lunch", campaign="colleagues")
            self.codes[m] = reply.body["result"]["code"]
        self.orders: list[str] = []

    def teardown(self) -> None:
        self.clock.advance(timedelta(days=2))  # every hold has passed
        sweep_due(self.engine, self.clock.now())
        with self.engine.connect() as conn:
            statuses = Counter(conn.execute(select(ReferralReward.status)).scalars())  # type: ignore[call-overload]
        assert statuses["pending"] == 0, statuses
        self.seen.update(statuses)
        with self.engine.connect() as conn:
            self.seen.update(conn.execute(select(RewardLedger.entry)).scalars())  # type: ignore[call-overload]
        self.ledger_agrees()
        self.engine.dispose()

    def apply(self, kind: str, member: str | None, **data: Any) -> Reply:
        reply = apply_command(self.engine, self.tenant_id, self.clock.now(), kind, member, **data)
        assert reply.ok, reply.error
        return reply

    @rule(invitee=st.sampled_from(MEMBERS), inviter=st.sampled_from(MEMBERS))
    def accept(self, invitee: str, inviter: str) -> None:
        reply = self.apply("invite.accepted", invitee, code=self.codes[inviter])
        self.seen[reply.body["result"]["outcome"]] += 1

    @rule(member=st.sampled_from(MEMBERS), amount=st.sampled_from([1000, 4000]))
    def pays(self, member: str, amount: int) -> None:
        order = f"o{len(self.orders)}"
        self.orders.append(order)
        self.apply("order.paid", member, order_id=order, amount_fen=amount)

    @rule(pick=st.integers(0, 30), member=st.sampled_from(MEMBERS))
    def refund(self, pick: int, member: str) -> None:
        if self.orders:
            order = self.orders[pick % len(self.orders)]
            self.apply("order.refunded", member, order_id=order, amount_fen=4000)

    @rule(data=st.data())
    def refund_after_payment(self, data: st.DataObject) -> None:
        """The refund that matters most: of an order whose rewards were already paid."""
        with self.engine.connect() as conn:
            paid = (
                conn.execute(
                    select(ReferralReward.cause_order_id).where(  # type: ignore[call-overload]
                        ReferralReward.status == "paid", ReferralReward.cause_order_id.is_not(None)
                    )  # type: ignore[union-attr]
                )
                .scalars()
                .all()
            )
        if paid:
            order = data.draw(st.sampled_from(sorted(set(paid))))
            self.apply("order.refunded", MEMBERS[0], order_id=order, amount_fen=4000)

    @rule(member=st.sampled_from(MEMBERS))
    def paid_out_then_refunded(self, member: str) -> None:
        """An order that qualifies, rewards paid after the hold, then the order refunded."""
        order = f"o{len(self.orders)}"
        self.orders.append(order)
        self.apply("order.paid", member, order_id=order, amount_fen=4000)
        self.clock.advance(timedelta(days=2))
        sweep_due(self.engine, self.clock.now())
        self.apply("order.refunded", member, order_id=order, amount_fen=4000)

    @rule(hours=st.integers(1, 30))
    def time_passes(self, hours: int) -> None:
        self.clock.advance(timedelta(hours=hours))
        sweep_due(self.engine, self.clock.now())

    @invariant()
    def attribution_is_a_forest(self) -> None:
        with self.engine.connect() as conn:
            links = conn.execute(
                select(ReferralLink.invitee_member_id, ReferralLink.inviter_member_id)  # type: ignore[call-overload]
            ).all()
        parent = dict(links)
        assert len(parent) == len(links)  # one inviter at most
        for start in parent:
            seen, node = {start}, parent[start]
            while node is not None:
                assert node not in seen, f"cycle through {node}"
                seen.add(node)
                node = parent.get(node)

    @invariant()
    def caps_and_depth_hold(self) -> None:
        with self.engine.connect() as conn:
            rows = conn.execute(
                select(ReferralReward.beneficiary_member_id, ReferralReward.level).where(  # type: ignore[call-overload]
                    ReferralReward.kind == "inviter", ReferralReward.status != "voided"
                )
            ).all()
            levels = conn.execute(select(ReferralReward.level)).scalars().all()  # type: ignore[call-overload]
        assert all(n <= CAP for n in Counter(b for b, _ in rows).values())
        assert all(level <= 2 for level in levels)

    @invariant()
    def ledger_agrees(self) -> None:
        with self.engine.connect() as conn:
            rewards = conn.execute(select(ReferralReward.id, ReferralReward.status)).all()  # type: ignore[call-overload]
            entries = conn.execute(
                select(RewardLedger.reward_id, RewardLedger.entry, RewardLedger.points)  # type: ignore[call-overload]
            ).all()
        by_reward: dict[int, list[tuple[str, int]]] = {}
        for reward_id, entry, points in entries:
            by_reward.setdefault(reward_id, []).append((entry, points))
        for reward_id, status in rewards:
            mine = sorted(by_reward.get(reward_id, []))
            assert status in ("pending", "paid", "voided")
            if status == "pending":
                assert mine == []
            elif status == "paid":
                assert [e for e, _ in mine] == ["payment"]
            else:
                assert mine == [] or (
                    [e for e, _ in mine] == ["payment", "reversal"] and sum(p for _, p in mine) == 0
                )


def test_referral_invariants(sqlite_template, tmp_path):
    ReferralMachine.template, ReferralMachine.workdir = sqlite_template, tmp_path
    ReferralMachine.seen.clear()
    run_state_machine_as_test(
        ReferralMachine,
        settings=settings(
            max_examples=max(10, settings.default.max_examples // 2),
            stateful_step_count=30,
            derandomize=True,  # the same examples every run, so the coverage check is stable
        ),
    )
    # (a reversal, paid then refunded, is likely but not certain in a run; tests/test_referral
    # covers it step by step)
    reached = {"attributed", "own_code", "payment", "voided"}  # cycles: tests/test_referral
    assert reached <= set(ReferralMachine.seen), ReferralMachine.seen
