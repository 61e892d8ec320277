"""Limited resources under real concurrency on PostgreSQL: many threads, each with its own
connection, released together by a barrier, each applying its command through the write
path (`apply_batch`: its own transaction, deadlock retry and all).

- 200 members join one team of 3 at the same instant: exactly 2 get in, 198 get a 409;
- 20 batches of 8 joins race for 5 teams of 3 (each batch's run locks its teams in its own
  order): exactly 10 get in, every team succeeds once;
- 200 members open teams of a stock-limited campaign at once: never more than the stock;
- 20 tills redeem one voucher at once: exactly one succeeds;
- 300 members append to one solitaire list at once: lines 1..K, no item oversold;
- 100 members accept one invite code, then 50 invitees pay twice each, all at once: one
  link each, each reward once, the inviter's cap of 10 holds;
- 200 members claim a card drop of 50 at once: exactly 50 cards;
- 100 members draw a prize with a stock of 10 at once: exactly 10 won, the stock at 0.
"""

from __future__ import annotations

import copy
import json
import threading
from collections import Counter
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import pytest
from sqlalchemy import Engine, func, select

from app.db import make_engine
from app.events.dispatch import Inbound, Reply, apply_batch
from app.mechanics.groupbuy.models import CampaignCounter, Seat, Team
from app.mechanics.referral.models import ReferralLink, ReferralReward
from app.mechanics.rewards.models import CardBalance, CardEntry, DailySupply, PrizeStock
from app.mechanics.solitaire.models import SolitaireLine, SolitaireStock
from app.mechanics.vouchers.models import Voucher
from tests.conftest import FUNNELS, _truncate, command, tenant_with_funnel
from tests.test_groupbuy import OPENS

pytestmark = pytest.mark.postgres
LUNCH = json.loads((FUNNELS / "office-lunch.json").read_text())
CROWD = 200
MEMBERS = 300  # the solitaire race takes 300


@pytest.fixture
def pg(postgres_url: str) -> Iterator[Engine]:
    # 60 connections for 200 threads: each waits for one, then races on the row locks.
    engine = make_engine(postgres_url, pool_size=60, max_overflow=0)
    try:
        yield engine
    finally:
        _truncate(engine)
        engine.dispose()


def setup(engine: Engine, **campaign: Any) -> int:
    doc = copy.deepcopy(LUNCH)
    doc["mechanics"]["groupbuy"]["lunch-team"].update(campaign)
    tenant_id = tenant_with_funnel(engine, "office-lunch", doc, OPENS)
    members = [
        Inbound(tenant_id, "bot", "member.joined", {"group_id": "g"}, member={"id": f"m{i}"})
        for i in range(MEMBERS + 1)
    ]
    assert all(r.ok for r in apply_batch(engine, members, OPENS))
    return tenant_id


def race(engine: Engine, items: list[Inbound]) -> list[Reply]:
    """Apply every item in its own thread and transaction, all released at once."""
    barrier = threading.Barrier(len(items))

    def go(item: Inbound) -> Reply:
        barrier.wait()
        [reply] = apply_batch(engine, [item], OPENS)
        return reply

    with ThreadPoolExecutor(len(items)) as pool:
        return list(pool.map(go, items))


def outcomes(replies: list[Reply]) -> Counter[str]:
    return Counter("ok" if r.ok else f"{r.status}:{r.error.code}" for r in replies)  # type: ignore[union-attr]


def scalar(engine: Engine, query: Any) -> Any:
    with engine.connect() as conn:
        return conn.execute(query).scalar_one()


def open_team(engine: Engine, tenant_id: int, member: str = "m0") -> str:
    [r] = apply_batch(
        engine,
        [command(tenant_id, "groupbuy.open", member, funnel="office-lunch", campaign="lunch-team")],
        OPENS,
    )
    assert r.ok, r.error
    return str(r.body["result"]["team"]["id"])


def test_200_members_join_one_team_of_3_at_once(pg):
    tenant_id = setup(pg)
    team = open_team(pg, tenant_id)
    joins = [command(tenant_id, "groupbuy.join", f"m{i}", team=team) for i in range(1, CROWD + 1)]
    counts = outcomes(race(pg, joins))
    assert counts["ok"] == 2, counts
    assert counts["ok"] + counts["409:team_full"] + counts["409:team_closed"] == CROWD, counts
    assert scalar(pg, select(Team.seats_taken)) == 3  # type: ignore[call-overload]
    assert scalar(pg, select(Team.status)) == "succeeded"  # type: ignore[call-overload]
    assert scalar(pg, select(func.count()).select_from(Seat)) == 3
    assert scalar(pg, select(func.count()).select_from(Voucher)) == 3


@pytest.mark.parametrize(
    ("limit", "reason"),
    [({"stock_teams": 5}, "sold_out"), ({"max_open_teams": 4}, "too_many_open_teams")],
)
def test_200_members_open_teams_of_a_limited_campaign_at_once(pg, limit, reason):
    tenant_id = setup(pg, **limit)
    opens = [
        command(tenant_id, "groupbuy.open", f"m{i}", funnel="office-lunch", campaign="lunch-team")
        for i in range(1, CROWD + 1)
    ]
    counts = outcomes(race(pg, opens))
    allowed = next(iter(limit.values()))
    assert counts == Counter({"ok": allowed, f"409:{reason}": CROWD - allowed}), counts
    assert scalar(pg, select(func.count()).select_from(Team)) == allowed
    used = scalar(pg, select(CampaignCounter.teams_used))  # type: ignore[call-overload]
    assert used == allowed and scalar(pg, select(CampaignCounter.teams_open)) == allowed  # type: ignore[call-overload]


def test_seat_stock_holds_when_many_join_many_teams_at_once(pg):
    tenant_id = setup(pg, stock_seats=10)
    teams = [open_team(pg, tenant_id, f"m{i}") for i in range(4)]  # 4 seats taken
    joins = [command(tenant_id, "groupbuy.join", f"m{i}", team=teams[i % 4]) for i in range(4, 104)]
    counts = outcomes(race(pg, joins))
    assert counts["ok"] == 6, counts  # 10 seats in all; never negative, never more
    assert scalar(pg, select(CampaignCounter.seats_used)) <= 10  # type: ignore[call-overload]
    assert scalar(pg, select(func.sum(Team.seats_taken))) == 10  # type: ignore[call-overload]


def test_batches_of_joins_race_for_the_same_teams(pg):
    """Writers' batches, each decided in memory by its run of joins (a team locked once per
    batch, its success from memory), race for five teams of three: the runs lock the
    teams in different orders, so some batches deadlock and are retried whole. Exactly ten
    seats are taken, every team succeeds once with three vouchers, nobody holds two."""
    tenant_id = setup(pg, team_size=3)
    teams = [open_team(pg, tenant_id, f"m{i}") for i in range(5)]
    batches = [
        [
            command(tenant_id, "groupbuy.join", f"m{5 + 8 * b + k}", team=teams[(b + k) % 5])
            for k in range(8)
        ]
        for b in range(20)
    ]
    barrier = threading.Barrier(len(batches))

    def go(items: list[Inbound]) -> list[Reply]:
        barrier.wait()
        return apply_batch(pg, items, OPENS)

    with ThreadPoolExecutor(len(batches)) as pool:
        replies = [r for batch in pool.map(go, batches) for r in batch]
    counts = outcomes(replies)
    assert counts["ok"] == 10, counts
    assert counts["ok"] + counts["409:team_full"] + counts["409:team_closed"] == 160, counts
    with pg.connect() as conn:
        rows = conn.execute(select(Team.status, Team.seats_taken)).all()  # type: ignore[call-overload]
        seats = conn.execute(
            select(Seat.member_id, func.count()).group_by(Seat.member_id)  # type: ignore[call-overload]
        ).all()
    assert sorted(rows) == [("succeeded", 3)] * 5
    assert len(seats) == 15 and all(n == 1 for _, n in seats)
    assert scalar(pg, select(func.count()).select_from(Voucher)) == 15


def test_20_tills_redeem_one_voucher_at_once(pg):
    tenant_id = setup(pg)
    team = open_team(pg, tenant_id)
    for m in ("m1", "m2"):
        [r] = apply_batch(pg, [command(tenant_id, "groupbuy.join", m, team=team)], OPENS)
        assert r.ok, r.error
    code = scalar(pg, select(Voucher.code).limit(1))  # type: ignore[call-overload]
    tills = [command(tenant_id, "voucher.redeem", None, code=code, till=f"t{i}") for i in range(20)]
    counts = outcomes(race(pg, tills))
    assert counts == Counter({"ok": 1, "409:voucher_already_redeemed": 19}), counts


def test_300_simultaneous_appends_against_stock_of_50(pg):
    tenant_id = setup(pg)
    definition = {
        "title": "午餐",
        "items": [
            {"sku": "pork", "name": "红烧肉饭", "price_fen": 3200, "stock": 50},
            {"sku": "egg", "name": "番茄炒蛋饭", "price_fen": 2600, "stock": 50},
        ],
    }
    [opened] = apply_batch(
        pg, [command(tenant_id, "solitaire.open", None, group="g", definition=definition)], OPENS
    )
    assert opened.ok, opened.error
    sl = opened.body["result"]["list"]["id"]
    appends = [
        command(
            tenant_id,
            "solitaire.append",
            f"m{i}",
            list=sl,
            items=[{"sku": "pork" if i % 2 else "egg", "qty": 1 + i % 3}],
        )
        for i in range(1, 301)
    ]
    replies = race(pg, appends)
    assert not [r for r in replies if r.status == 500]
    refused = [r for r in replies if not r.ok]
    assert {r.error.code for r in refused} <= {"sold_out", "list_not_open"}  # type: ignore[union-attr]
    for r in refused:
        if r.error.code == "sold_out":  # type: ignore[union-attr]
            assert "left" in r.error.detail and r.error.errors  # type: ignore[union-attr]
    numbers = sorted(r.body["result"]["line"] for r in replies if r.ok)
    assert numbers == list(range(1, len(numbers) + 1))  # 1..K, no gaps, no duplicates
    with pg.connect() as conn:
        reserved = dict(conn.execute(select(SolitaireStock.sku, SolitaireStock.reserved)).all())  # type: ignore[call-overload]
        ordered: Counter[str] = Counter()
        for (items,) in conn.execute(select(SolitaireLine.items)):  # type: ignore[call-overload]
            for i in items:
                ordered[i["sku"]] += i["qty"]
    assert all(0 <= n <= 50 for n in reserved.values()), reserved  # never oversold
    assert reserved == dict(ordered)
    assert len(numbers) > 40  # the stock went to many members, not a handful


def test_100_acceptances_of_one_code_and_50_qualifying_orders_at_once(pg):
    referral = {
        "qualify_event": "order.paid",
        "inviter_reward": {"points": 50},
        "invitee_reward": {"points": 20},
        "max_rewards_per_inviter": 10,
        "max_rewards_per_inviter_per_day": None,
        "tiers": [],
    }
    doc = copy.deepcopy(LUNCH)
    doc["mechanics"]["referral"]["colleagues"].update(referral)
    tenant_id = tenant_with_funnel(pg, "office-lunch", doc, OPENS)
    [mine] = apply_batch(
        pg,
        [command(tenant_id, "referral.mine", "m0", funnel="office-lunch", campaign="colleagues")],
        OPENS,
    )
    assert mine.ok, mine.error
    code = mine.body["result"]["code"]
    accepts = [command(tenant_id, "invite.accepted", f"m{i}", code=code) for i in range(1, 101)]
    accepts += [command(tenant_id, "invite.accepted", "m1", code=code)] * 5  # one invitee, again
    replies = race(pg, accepts)
    assert all(r.ok for r in replies), [r.error for r in replies if not r.ok]
    outcomes_ = Counter(r.body["result"]["outcome"] for r in replies)
    assert outcomes_ == Counter({"attributed": 100, "already_attributed": 5}), outcomes_
    assert scalar(pg, select(func.count()).select_from(ReferralLink)) == 100

    orders = [
        command(tenant_id, "order.paid", f"m{i}", order_id=f"o-{i}-{n}", amount_fen=4000)
        for i in range(1, 51)
        for n in (1, 2)  # each invitee pays twice at once: qualifies once
    ]
    replies = race(pg, orders)
    assert all(r.ok for r in replies), [r.error for r in replies if not r.ok]
    with pg.connect() as conn:
        kinds = Counter(conn.execute(select(ReferralReward.kind)).scalars())  # type: ignore[call-overload]
        keys = conn.execute(select(ReferralReward.reward_key)).scalars().all()  # type: ignore[call-overload]
    assert kinds == Counter({"invitee": 50, "inviter": 10}), kinds  # the cap of 10 held
    assert len(keys) == len(set(keys))


def test_200_claimants_of_a_card_drop_of_50(pg):
    """The 抢霸王餐卡 rush: 200 members claim at the drop's first instant; exactly 50 get a
    card, 150 hear sold_out, and the ledger, the balances and the supply agree."""
    doc = copy.deepcopy(LUNCH)
    doc["mechanics"]["rewards"]["free-meal-card"].update(daily_limit=50, drop_at="10:00")
    tenant_id = tenant_with_funnel(pg, "office-lunch", doc, OPENS)
    claims = [
        command(tenant_id, "card.claim", f"m{i}", funnel="office-lunch", campaign="free-meal-card")
        for i in range(CROWD)
    ]
    replies = race(pg, claims)
    assert outcomes(replies) == Counter({"ok": 50, "409:sold_out": 150})
    assert scalar(pg, select(func.count()).select_from(CardEntry)) == 50
    assert scalar(pg, select(func.sum(CardBalance.count))) == 50  # type: ignore[arg-type]
    assert scalar(pg, select(DailySupply.used)) == 50  # type: ignore[arg-type]


def test_100_draws_race_for_a_prize_stock_of_10(pg):
    doc = copy.deepcopy(LUNCH)
    doc["mechanics"]["rewards"]["wheel"] = {
        "kind": "lottery",
        "title": "必中转盘",
        "prizes": [{"name": "drink", "odds_ppm": 1_000_000, "stock": 10, "reward": {"points": 5}}],
    }
    tenant_id = tenant_with_funnel(pg, "office-lunch", doc, OPENS)
    draws = [
        command(tenant_id, "lottery.draw", f"m{i}", funnel="office-lunch", campaign="wheel")
        for i in range(100)
    ]
    replies = race(pg, draws)
    assert all(r.ok for r in replies), [r.error for r in replies if not r.ok]
    won = Counter(r.body["result"]["prize"] for r in replies)
    assert won == Counter({"drink": 10, None: 90})
    assert scalar(pg, select(PrizeStock.remaining)) == 0  # type: ignore[arg-type]
