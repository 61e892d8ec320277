"""The mechanics' reports through the API, from real traffic: group-buy, solitaire, cohorts
(referral and community have their own scenarios in their tests' shops)."""

from __future__ import annotations

from datetime import timedelta

import pytest

from tests.test_groupbuy import Shop
from tests.test_solitaire import MENU, append, open_list


@pytest.fixture
def shop(engine, clock) -> Shop:  # type: ignore[no-untyped-def]
    return Shop(engine, clock)


def test_groupbuy_solitaire_and_cohorts_from_real_traffic(shop: Shop) -> None:
    ann, bea, cai, dan = (shop.login(o) for o in ("ann", "bea", "cai", "dan"))
    team = shop.open(ann).json()["result"]["team"]
    shop.clock.advance(timedelta(minutes=10))
    shop.join(bea, team["id"])
    shop.clock.advance(timedelta(minutes=20))
    assert shop.join(cai, team["id"]).json()["result"]["team"]["status"] == "succeeded"
    shop.open(dan)  # still open
    code = shop.vouchers(bea)[0]["code"]
    r = shop.client.post(f"/v1/vouchers/{code}/redeem", json={"till": "t1"}, headers=shop.admin)
    assert r.status_code == 200, r.text

    sl = open_list(shop)  # the office-lunch menu
    pork, egg = {"sku": "braised-pork", "qty": 2}, {"sku": "tomato-egg"}
    assert append(shop, ann, sl["id"], items=[pork]).status_code == 200
    assert append(shop, bea, sl["id"], items=[egg, {**pork, "qty": 1}]).status_code == 200

    r = shop.client.get("/v1/reports/funnels/office-lunch/mechanics", headers=shop.admin)
    assert r.status_code == 200, r.text
    body = r.json()
    [gb] = body["groupbuy"]
    assert gb["campaign"] == "lunch-team" and gb["teams_opened"] == 2
    assert (gb["succeeded"], gb["open"], gb["success_rate"]) == (1, 1, 1.0)
    assert gb["median_fill_seconds"] == 1800.0
    assert (gb["vouchers_issued"], gb["vouchers_redeemed"]) == (3, 1)
    [lst] = [x for x in body["solitaire"] if x["list"] == sl["id"]]
    assert (lst["orders"], lst["members"], lst["units"]) == (2, 2, 4)
    assert lst["revenue_fen"] == 3 * MENU["braised-pork"][1] + MENU["tomato-egg"][1]
    [cohort] = body["cohorts"]
    assert cohort["members"] == 4 and cohort["retained"][0] == 4
    assert body["community"]["check_in_streaks"][0] == {"days": "1", "members": 0}
