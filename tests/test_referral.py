"""Referral (裂变) end to end over HTTP — SQLite and PostgreSQL."""

from __future__ import annotations

import copy
from datetime import timedelta
from typing import Any

import pytest

from app.engine import compile_document
from app.errors import InvalidDefinition
from tests.conftest import event
from tests.test_groupbuy import LUNCH, Shop

CAMPAIGN = "/v1/member/referral/office-lunch/colleagues"


def lunch_referral(**changes: Any) -> dict[str, Any]:
    doc = copy.deepcopy(LUNCH)
    doc["mechanics"]["referral"]["colleagues"].update(changes)
    return doc


def code_of(shop: Shop, auth: dict[str, str]) -> dict[str, Any]:
    r = shop.client.post(CAMPAIGN, headers=auth)
    assert r.status_code == 200, r.text
    return r.json()["result"]  # type: ignore[no-any-return]


def accepts(shop: Shop, openid: str, code: str) -> dict[str, Any]:
    r = shop.bot.send(event("invite.accepted", openid, code=code))
    assert r.status_code == 200, r.text
    return r.json()  # type: ignore[no-any-return]


def paid_order(shop: Shop, openid: str, order: str, amount: int = 4000) -> None:
    assert (
        shop.shop.send(event("order.paid", openid, order_id=order, amount_fen=amount)).status_code
        == 200
    )


def refund(shop: Shop, openid: str, order: str) -> None:
    assert (
        shop.shop.send(event("order.refunded", openid, order_id=order, amount_fen=4000)).status_code
        == 200
    )


PAID_QUALIFIES = {
    "qualify_event": "order.paid",
    "min_order_fen": 3000,
    "invitee_reward": {"points": 20},
    "inviter_reward": {"points": 50},
    "hold": "P7D",
    "tiers": [],
}


@pytest.mark.parametrize("depth", [1, 2])
def test_a_invites_b_and_c_b_invites_d_rewards_follow_orders_holds_and_refunds(
    engine, clock, depth
):
    shop = Shop(engine, clock, lunch_referral(**PAID_QUALIFIES, depth=depth))
    a = shop.login("a")
    code_a = code_of(shop, a)["code"]
    assert code_of(shop, a)["code"] == code_a  # stable
    for openid in ("b", "c"):
        shop.login(openid, in_group=False)
        assert accepts(shop, openid, code_a)["result"]["outcome"] == "attributed"
    b = shop.login("b", in_group=False)
    code_b = code_of(shop, b)["code"]
    shop.login("d", in_group=False)
    assert accepts(shop, "d", code_b)["result"]["outcome"] == "attributed"
    assert accepts(shop, "d", code_a)["result"]["outcome"] == "already_attributed"
    assert accepts(shop, "a", code_b)["result"]["outcome"] == "would_form_a_cycle"

    assert accepts(shop, "b", code_b)["result"]["outcome"] == "own_code"

    paid_order(shop, "b", "o-b")  # b's first order qualifies a's reward and b's own
    paid_order(shop, "d", "o-d", amount=2000)  # under the minimum: nothing
    paid_order(shop, "d", "o-d2")  # d's order rewards b (and a at level 2 when allowed)
    mine = code_of(shop, a)
    kinds = sorted((r["kind"], r["level"], r["status"]) for r in mine["rewards"])
    expected_a = [("inviter", 1, "pending")] + ([("inviter", 2, "pending")] if depth == 2 else [])
    assert kinds == expected_a
    assert [i["qualified"] for i in mine["invitees"]] == [True, False]
    b_rewards = sorted((r["kind"], r["level"]) for r in code_of(shop, b)["rewards"])
    assert b_rewards == [("invitee", 0), ("inviter", 1)]
    assert shop.states()["a"] == "advocate"  # the refer stage, through the write path

    refund(shop, "d", "o-d2")  # inside the hold: voids exactly what d's order caused
    b_after = {(r["kind"], r["level"]): r["status"] for r in code_of(shop, b)["rewards"]}
    assert b_after == {("invitee", 0): "pending", ("inviter", 1): "voided"}

    shop.clock.advance(timedelta(days=7))  # the hold ends: the sweep approves and pays
    paid = [r for r in shop.sweep() if r.body["type"] == "referral.pay_due"]
    assert len(paid) == 2  # a's level 1 and b's own; the voided ones are not paid
    a, b = shop.login("a", in_group=False), shop.login("b", in_group=False)  # fresh tokens
    a_after = {(r["kind"], r["level"]): r["status"] for r in code_of(shop, a)["rewards"]}
    assert a_after[("inviter", 1)] == "paid"
    if depth == 2:
        assert a_after[("inviter", 2)] == "voided"  # caused by d's refunded order
    points = [p["params"] for p in shop.outbox("grant_points")]
    assert sorted(p["points"] for p in points) == [20, 50]

    refund(shop, "b", "o-b")  # after payment: reversed in the ledger, points taken back
    a_final = {(r["kind"], r["level"]): r["status"] for r in code_of(shop, a)["rewards"]}
    assert a_final[("inviter", 1)] == "voided"
    points = [p["params"]["points"] for p in shop.outbox("grant_points")]
    assert sorted(points) == [-50, -20, 20, 50]
    with shop.engine.connect() as conn:
        from sqlalchemy import func, select

        from app.mechanics.referral.models import RewardLedger

        net = conn.execute(select(func.sum(RewardLedger.points))).scalar_one()  # type: ignore[arg-type]
    assert net == 0


def test_a_campaign_asking_for_depth_3_is_refused_with_the_reason():
    with pytest.raises(InvalidDefinition) as refused:
        compile_document(lunch_referral(depth=3))
    [problem] = refused.value.problems
    assert problem.path == "mechanics.referral.colleagues.depth"
    assert "2" in problem.message


def test_an_unknown_code_is_422_at_its_path(engine, clock):
    shop = Shop(engine, clock)
    shop.login("a", in_group=False)
    r = shop.bot.send(event("invite.accepted", "a", code="NOPE2345"))
    assert r.status_code == 422 and r.json()["errors"][0]["path"] == "data.code"


def test_a_shared_device_flags_the_reward_for_review_and_an_admin_decides(engine, clock):
    shop = Shop(engine, clock, lunch_referral(**PAID_QUALIFIES))
    a = shop.login("a")
    assert (
        shop.bot.send(
            {
                "type": "member.scanned",
                "member": {"id": "a", "attributes": {"device_id": "dev-1"}},
                "data": {"channel": "poster"},
            }
        ).status_code
        == 200
    )
    code = code_of(shop, a)["code"]
    for openid, device in (("b", "dev-1"), ("c", "dev-2")):
        shop.bot.send(
            {
                "type": "member.scanned",
                "member": {"id": openid, "attributes": {"device_id": device}},
                "data": {"channel": "poster"},
            }
        )
        accepts(shop, openid, code)
    paid_order(shop, "b", "o-b")
    paid_order(shop, "c", "o-c")
    r = shop.client.get(
        "/v1/referral/office-lunch/colleagues/rewards",
        params={"status": "flagged"},
        headers=shop.admin,
    )
    flagged = r.json()["rewards"]
    assert {(x["member"], x["kind"]) for x in flagged} == {("a", "inviter"), ("b", "invitee")}
    assert all(x["flags"] == ["same_device"] for x in flagged)
    shop.clock.advance(timedelta(days=8))
    shop.sweep()  # the flagged ones wait for review; c's are paid
    statuses = {
        (x["member"], x["kind"]): x["status"]
        for x in shop.client.get(
            "/v1/referral/office-lunch/colleagues/rewards", headers=shop.admin
        ).json()["rewards"]
    }
    assert statuses[("c", "invitee")] == "paid" and statuses[("a", "inviter")] == "flagged"
    ids = {(x["member"], x["kind"]): x["id"] for x in flagged}
    r = shop.client.post(f"/v1/referral/rewards/{ids[('a', 'inviter')]}/void", headers=shop.admin)
    assert r.status_code == 200 and r.json()["result"]["reward"]["status"] == "voided"
    r = shop.client.post(
        f"/v1/referral/rewards/{ids[('b', 'invitee')]}/release", headers=shop.admin
    )
    assert r.status_code == 200 and r.json()["result"]["reward"]["status"] == "paid"
    r = shop.client.post(f"/v1/referral/rewards/{ids[('b', 'invitee')]}/void", headers=shop.admin)
    assert r.status_code == 409 and r.json()["code"] == "reward_settled"


def test_unreviewed_flags_are_approved_after_the_review_window_when_configured(engine, clock):
    shop = Shop(
        engine,
        clock,
        lunch_referral(**PAID_QUALIFIES, burst_per_hour=2, review_auto_approve_after="P3D"),
    )
    a = shop.login("a")
    code = code_of(shop, a)["code"]
    for openid in ("b", "c", "d"):  # the third acceptance within the hour is a burst
        shop.login(openid, in_group=False)
        accepts(shop, openid, code)
    paid_order(shop, "d", "o-d")
    [mine] = [r for r in code_of(shop, a)["rewards"]]
    assert mine["flags"] == ["burst_of_acceptances"] and mine["status"] == "pending"
    shop.clock.advance(timedelta(days=8))
    shop.sweep()
    assert code_of(shop, shop.login("a", in_group=False))["rewards"][0]["status"] == "pending"
    shop.clock.advance(timedelta(days=2))  # hold 7 days + review 3 days
    shop.sweep()
    assert code_of(shop, shop.login("a", in_group=False))["rewards"][0]["status"] == "paid"


def test_channel_codes_stats_and_the_tree(engine, clock):
    shop = Shop(engine, clock, lunch_referral(**PAID_QUALIFIES, depth=2))
    r = shop.client.post(
        "/v1/referral/office-lunch/colleagues/channels",
        json={"channel": "lobby-poster-A"},
        headers=shop.admin,
    )
    assert r.status_code == 200, r.text
    poster = r.json()["result"]["code"]
    again = shop.client.post(
        "/v1/referral/office-lunch/colleagues/channels",
        json={"channel": "lobby-poster-A"},
        headers=shop.admin,
    )
    assert again.json()["result"]["code"] == poster
    shop.login("a", in_group=False)
    assert accepts(shop, "a", poster)["result"]["outcome"] == "attributed"  # the poster brought a
    a = shop.login("a", in_group=False)
    code_a = code_of(shop, a)["code"]
    for openid in ("b", "c"):
        shop.login(openid, in_group=False)
        accepts(shop, openid, code_a)
    b = shop.login("b", in_group=False)
    shop.login("d", in_group=False)
    accepts(shop, "d", code_of(shop, b)["code"])
    paid_order(shop, "b", "o-b")
    paid_order(shop, "c", "o-c")
    stats = shop.client.get("/v1/referral/office-lunch/colleagues/stats", headers=shop.admin).json()
    assert stats["leaderboard"][0] == {"rank": 1, "nickname": "a", "qualified_invitees": 2}
    assert stats["acceptances"] == 4 and stats["member_acceptances"] == 3
    assert stats["code_holders"] == 2 and stats["k_factor"] == 1.5
    assert stats["depths"] == {"1": 1, "2": 2, "3": 1}
    assert stats["never_active_invitees"] == 1  # d accepted and was never seen again
    assert stats["never_active_by_inviter"] == [{"inviter": "b", "invitees": 1}]
    tree = shop.client.get(
        "/v1/referral/office-lunch/colleagues/members/a/tree", headers=shop.admin
    ).json()
    assert [
        (t["member"], t["qualified"], [x["member"] for x in t["invitees"]])
        for t in tree["invitees"]
    ] == [("b", True, ["d"]), ("c", True, [])]
