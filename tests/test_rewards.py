"""Check-in and the points ledger, through webhooks and the member API — SQLite and
PostgreSQL."""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta

from tests.conftest import FUNNELS, event
from tests.test_groupbuy import LUNCH, Shop

SKINCARE = json.loads((FUNNELS / "skincare-club.json").read_text())


def skincare(streak_days: int = 3, points: int = 30) -> dict[str, object]:
    doc = json.loads(json.dumps(SKINCARE))
    doc["mechanics"]["rewards"]["streak-21"].update(
        streak_days=streak_days, reward={"points": points}
    )
    return doc


def checks_in(shop: Shop, openid: str) -> None:
    assert shop.bot.send(event("member.checked_in", openid)).status_code == 200


def test_check_in_once_per_local_day_across_midnight_in_shanghai_with_streak_rewards(engine, clock):
    shop = Shop(engine, clock)
    r = shop.client.put("/v1/funnels/skincare-club", json=skincare(), headers=shop.admin)
    assert r.status_code == 201, r.text
    shop.login("amy", in_group=False)
    # 23:50 and 23:59 in Shanghai (15:50 and 15:59 UTC) are one day; 00:05 is the next
    clock.set(datetime(2026, 12, 1, 15, 50, tzinfo=UTC))
    checks_in(shop, "amy")
    clock.set(datetime(2026, 12, 1, 15, 59, tzinfo=UTC))
    checks_in(shop, "amy")  # the same local day: no second check-in
    clock.set(datetime(2026, 12, 1, 16, 5, tzinfo=UTC))
    checks_in(shop, "amy")  # 00:05 the next day: streak 2
    clock.set(datetime(2026, 12, 2, 16, 5, tzinfo=UTC))
    checks_in(shop, "amy")  # streak 3: the reward
    amy = shop.login("amy", in_group=False)
    mine = shop.client.get("/v1/member/points", headers=amy).json()
    assert mine["balance"] == 30 and [e["kind"] for e in mine["entries"]] == ["credit"]
    clock.set(datetime(2026, 12, 4, 16, 5, tzinfo=UTC))  # a day missed: the streak restarts
    for day in range(3):
        clock.set(datetime(2026, 12, 4, 16, 5, tzinfo=UTC) + timedelta(days=day))
        checks_in(shop, "amy")
    amy = shop.login("amy", in_group=False)
    assert shop.client.get("/v1/member/points", headers=amy).json()["balance"] == 60
    grants = [p["params"] for p in shop.outbox("grant_points")]
    assert [g["points"] for g in grants] == [30, 30]


def test_funnel_points_post_to_the_ledger_and_a_deduction_never_goes_negative(engine, clock):
    doc = json.loads(json.dumps(LUNCH))
    doc["transitions"].append(
        {
            "from": "in_group",
            "to": "in_group",
            "event": "review.posted",
            "actions": [{"type": "grant_points", "points": -500, "reason": "penalty"}],
        }
    )
    shop = Shop(engine, clock, doc)
    bo = shop.login("bo")
    r = shop.bot.send(event("review.posted", "bo", review_id="r1", rating=5))
    assert r.status_code == 200, r.text
    [action] = [a for f in r.json()["funnels"] for a in f["actions"]]
    assert action["params"]["points"] == 0 and action["params"]["balance"] == 0
    assert shop.client.get("/v1/member/points", headers=bo).json()["balance"] == 0


def test_voucher_codes_are_twelve_typeable_symbols_each_equally_likely():
    from collections import Counter

    from app.mechanics.vouchers.service import ALPHABET, CODE_LENGTH, new_code, normalize

    codes = [new_code() for _ in range(2000)]
    assert all(len(c) == CODE_LENGTH and set(c) <= set(ALPHABET) for c in codes)
    assert len(set(codes)) == len(codes)
    # A cashier may type it in lower case with dashes, or scan the QR text.
    c = codes[0]
    assert normalize(f"{c[:4]}-{c[4:8]}-{c[8:]}".lower()) == c
    assert normalize(f"flywheel:voucher:{c}") == c
    # 24,000 symbols: 750 of each expected, sd ~27; a biased draw shows far outside this.
    counts = Counter("".join(codes))
    assert set(counts) == set(ALPHABET)
    assert all(600 < n < 900 for n in counts.values()), counts
