"""Group-buy and vouchers end to end over HTTP — SQLite and PostgreSQL.

Members log in through the development provider, talk to the member API with their tokens,
the group bot and the shop send signed webhooks, the cashier uses the tenant key, and team
deadlines, payment holds and voucher expiries run from the worker's sweep with nobody
calling the API.
"""

from __future__ import annotations

import copy
import json
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from sqlalchemy import select

from app.clock import FrozenClock
from app.funnels.models import FunnelInstance
from app.main import create_app
from app.mechanics.groupbuy.models import Seat, Team
from app.mechanics.vouchers.models import Voucher
from app.members.models import Member
from app.outbox.delivery import BACKOFF, MAX_ATTEMPTS
from app.outbox.models import Outbox
from tests.conftest import FUNNELS, Client, Source, count, deliver, event, new_tenant, settings_for
from tests.servers import Receiver

LUNCH = json.loads((FUNNELS / "office-lunch.json").read_text())
OPENS = datetime(2026, 12, 1, 2, 0, tzinfo=UTC)  # 10:00 in Shanghai, the campaign's first day
TEAMS = "/v1/member/groupbuy/office-lunch/lunch-team/teams"
GROUP = "office-lunch-perks"  # the office lunch perks group (its opengid)


def lunch(**changes: Any) -> dict[str, Any]:
    """The office-lunch funnel with its lunch-team campaign changed."""
    doc = copy.deepcopy(LUNCH)
    doc["mechanics"]["groupbuy"]["lunch-team"].update(changes)
    return doc


class Shop:
    """A tenant with the office-lunch funnel, a group bot, a shop webhook, and a till."""

    def __init__(self, engine, clock: FrozenClock, funnel: dict[str, Any] | None = None) -> None:
        clock.set(OPENS)
        url = engine.url.render_as_string(hide_password=False)
        settings = settings_for(url).model_copy(update={"dev_login": True, "workers": False})
        self.app = create_app(settings, engine=engine, clock=clock)
        self.client = Client(self.app)
        self.engine, self.clock = engine, clock
        self.tenant_id, self.admin = new_tenant(engine, "lunch")
        r = self.client.put("/v1/funnels/office-lunch", json=funnel or LUNCH, headers=self.admin)
        assert r.status_code == 201, r.text
        self.bot = Source(self.client, self.admin, clock, "group-bot")
        self.shop = Source(self.client, self.admin, clock, "shop")

    def login(self, openid: str, *, in_group: bool = True) -> dict[str, str]:
        body = {"provider": "dev", "tenant": "lunch", "openid": openid, "nickname": openid}
        r = self.client.post("/v1/member/session", json=body)
        assert r.status_code == 200, r.text
        auth = {"Authorization": f"Bearer {r.json()['token']}"}
        if in_group:  # scanned the lobby poster, then joined the group
            r = self.client.post(
                "/v1/member/events",
                json={"type": "member.scanned", "data": {"channel": "poster"}},
                headers=auth,
            )
            assert r.status_code == 200, r.text
            assert self.bot.send(event("member.joined", openid, group_id=GROUP)).status_code == 200
        return auth

    def open(self, auth: dict[str, str], **kw: Any) -> Any:
        return self.client.post(TEAMS, headers=auth, **kw)

    def join(self, auth: dict[str, str], team: str, **kw: Any) -> Any:
        return self.client.post(f"/v1/member/teams/{team}/join", headers=auth, **kw)

    def team(self, auth: dict[str, str], team: str) -> dict[str, Any]:
        r = self.client.get(f"/v1/member/teams/{team}", headers=auth)
        assert r.status_code == 200, r.text
        return r.json()  # type: ignore[no-any-return]

    def vouchers(self, auth: dict[str, str]) -> list[dict[str, Any]]:
        r = self.client.get("/v1/member/vouchers", headers=auth)
        assert r.status_code == 200, r.text
        return r.json()["vouchers"]  # type: ignore[no-any-return]

    def states(self) -> dict[str, str]:
        """Each member's state in the office-lunch funnel."""
        with self.engine.connect() as conn:
            rows = conn.execute(
                select(Member.external_id, FunnelInstance.data).join(  # type: ignore[call-overload]
                    Member, Member.id == FunnelInstance.member_id
                )
            ).all()
        return {r[0]: r[1]["state"] for r in rows}

    def sweep(self) -> list[Any]:
        return self.app.state.workers.fire_timers()  # type: ignore[no-any-return]

    def count(self, model: Any, *where: Any) -> int:
        return count(self.engine, model, *where)

    def outbox(self, kind: str) -> list[dict[str, Any]]:
        with self.engine.connect() as conn:
            rows = conn.execute(
                select(Outbox.payload).where(Outbox.type == kind).order_by(Outbox.id)  # type: ignore[arg-type]
            ).all()
        return [r[0] for r in rows]


@pytest.fixture
def shop(engine, clock) -> Shop:
    return Shop(engine, clock)


def funnel_state(response: Any) -> tuple[str | None, str | None]:
    lunch_outcomes = [f for f in response.json()["funnels"] if f["funnel"] == "office-lunch"]
    last = lunch_outcomes[-1]
    return last["state"], last["stage"]


# ── the seed case, end to end ─────────────────────────────────────────────────────────────
def test_three_colleagues_team_up_get_vouchers_and_the_till_redeems_once(shop):
    ann, bea, cai = (shop.login(o) for o in ("ann", "bea", "cai"))

    r = shop.open(ann, json={"profile": {"nickname": "Ann", "avatar": "https://img/ann.png"}})
    assert r.status_code == 200, r.text
    body = r.json()
    team = body["result"]["team"]
    assert body["result"]["outcome"] == "opened"
    assert team["status"] == "open" and team["seats_left"] == 2 and team["team_size"] == 3
    assert team["share_path"].endswith(team["id"])
    assert team["members"] == [
        {
            "nickname": "Ann",
            "avatar": "https://img/ann.png",
            "role": "leader",
            "paid": None,
            "joined_at": OPENS.isoformat(),
            "hold_until": None,
        }
    ]
    assert funnel_state(r) == ("teaming", "activate")
    deadline = datetime.fromisoformat(team["deadline"])
    assert deadline == OPENS + timedelta(hours=24)

    r = shop.join(bea, team["id"])
    assert r.status_code == 200, r.text
    assert r.json()["result"]["team"]["seats_left"] == 1
    assert shop.team(cai, team["id"])["members"][1]["nickname"] == "bea"  # a friend sees it

    r = shop.join(cai, team["id"])
    assert r.status_code == 200, r.text
    result = r.json()["result"]
    assert result["team"]["status"] == "succeeded" and result["team"]["seats_left"] == 0
    assert funnel_state(r) == ("activated", "activate")
    # cai's success message carries the voucher code
    sent = [a for f in r.json()["funnels"] for a in f["actions"] if a["type"] == "send_message"]
    cai_voucher = shop.vouchers(cai)
    assert len(cai_voucher) == 1 and cai_voucher[0]["code"] in sent[-1]["params"]["text"]

    held = {name: shop.vouchers(auth) for name, auth in (("ann", ann), ("bea", bea), ("cai", cai))}
    assert all(len(v) == 1 and v[0]["status"] == "issued" for v in held.values())
    assert all(
        v[0]["discount_percent"] == 75 and v[0]["name"] == "工作午餐7.5折券" for v in held.values()
    )
    assert len({v[0]["code"] for v in held.values()}) == 3
    # ann's and bea's funnels moved too, through the write path: all three are activated
    assert shop.states() == {"ann": "activated", "bea": "activated", "cai": "activated"}

    code = held["bea"][0]["code"]
    r = shop.client.get(f"/v1/vouchers/{code}", headers=shop.admin)
    assert r.status_code == 200 and r.json()["status"] == "issued"
    r = shop.client.post(f"/v1/vouchers/{code}/redeem", json={"till": "till-1"}, headers=shop.admin)
    assert r.status_code == 200, r.text
    assert r.json()["result"]["voucher"]["status"] == "redeemed"
    r = shop.client.post(f"/v1/vouchers/{code}/redeem", json={"till": "till-2"}, headers=shop.admin)
    assert r.status_code == 409
    assert r.headers["content-type"] == "application/problem+json"
    assert r.json()["code"] == "voucher_already_redeemed"
    assert shop.vouchers(bea)[0]["status"] == "redeemed"


def refused(r: Any, code: str) -> None:
    assert r.status_code == 409, r.text
    assert r.headers["content-type"] == "application/problem+json"
    assert r.json()["code"] == code, r.json()


# ── refusals ──────────────────────────────────────────────────────────────────────────────
def test_joins_that_cannot_happen_are_409_with_a_reason(shop):
    ann, bea, cai, dan = (shop.login(o) for o in ("ann", "bea", "cai", "dan"))
    team = shop.open(ann).json()["result"]["team"]["id"]
    refused(shop.join(ann, team), "already_joined")  # one's own team
    assert shop.join(bea, team).status_code == 200
    refused(shop.join(bea, team), "already_joined")  # twice
    refused(shop.open(bea), "in_another_team")  # one open team per campaign
    assert shop.join(cai, team).status_code == 200  # full: succeeded
    refused(shop.join(dan, team), "team_closed")
    refused(shop.open(ann), "lead_limit_reached")  # max_teams_led_per_member: 1

    r = shop.join(dan, "tm_nosuchteam")  # the team is the URL's: a 404, like any other
    assert r.status_code == 404 and r.json()["code"] == "not_found"

    other = shop.open(dan).json()["result"]["team"]
    shop.clock.set(datetime.fromisoformat(other["deadline"]))  # the sweep has not run yet
    eve = shop.login("eve")
    refused(shop.join(eve, other["id"]), "team_expired")
    shop.clock.set(datetime(2026, 12, 3, 16, 0, 1, tzinfo=UTC))  # past 2026-12-04 00:00 +08
    refused(shop.open(shop.login("fay", in_group=False)), "campaign_ended")
    assert shop.count(Seat) == 4 and shop.count(Team) == 2  # nothing half-written by refusals


def test_a_campaign_not_yet_started_and_an_unknown_campaign(engine, clock):
    shop = Shop(engine, clock, lunch(starts_at="2026-12-02T00:00:00+08:00"))
    ann = shop.login("ann")
    refused(shop.open(ann), "campaign_not_started")
    r = shop.client.post("/v1/member/groupbuy/office-lunch/lunch-teem/teams", headers=ann)
    assert r.status_code == 404 and "lunch-team" in r.json()["detail"]


def test_a_full_team_refuses_the_next_member_even_as_the_leader_leaves(shop):
    ann, bea, cai = (shop.login(o) for o in ("ann", "bea", "cai"))
    team = shop.open(ann).json()["result"]["team"]["id"]
    shop.join(bea, team)
    shop.clock.advance(timedelta(minutes=1))
    shop.join(cai, team)  # full
    refused(shop.client.post(f"/v1/member/teams/{team}/leave", headers=ann), "team_closed")


def test_the_leader_leaving_hands_over_to_the_earliest_member(shop):
    ann, bea, cai = (shop.login(o) for o in ("ann", "bea", "cai"))
    team = shop.open(ann).json()["result"]["team"]["id"]
    shop.clock.advance(timedelta(minutes=1))
    shop.join(bea, team)
    r = shop.client.post(f"/v1/member/teams/{team}/leave", headers=ann)
    assert r.status_code == 200, r.text
    state = r.json()["result"]["team"]
    assert state["status"] == "open" and state["seats_left"] == 2
    assert [(m["nickname"], m["role"]) for m in state["members"]] == [("bea", "leader")]
    refused(shop.client.post(f"/v1/member/teams/{team}/leave", headers=ann), "not_in_team")
    # bea, alone now, leaves: the team is cancelled and everyone in it told
    r = shop.client.post(f"/v1/member/teams/{team}/leave", headers=bea)
    assert r.json()["result"]["team"]["status"] == "cancelled"
    assert r.json()["result"]["team"]["close_reason"] == "leader_left_alone"
    refused(shop.join(cai, team), "team_closed")
    # ann may open a team of her own again (the one she led was not counted as led: she left)
    assert shop.open(ann).status_code == 200


def test_the_merchant_cancels_an_open_team(shop):
    ann = shop.login("ann")
    team = shop.open(ann).json()["result"]["team"]["id"]
    r = shop.client.post(
        f"/v1/groupbuy/teams/{team}/cancel", json={"reason": "kitchen_closed"}, headers=shop.admin
    )
    assert r.status_code == 200, r.text
    assert r.json()["result"]["team"]["close_reason"] == "kitchen_closed"
    assert [e["type"] for e in r.json()["emitted"]] == ["groupbuy.cancelled"]
    refused(
        shop.client.post(f"/v1/groupbuy/teams/{team}/cancel", headers=shop.admin), "team_closed"
    )
    _, other = new_tenant(shop.engine, "other")  # another tenant cannot see or touch it
    assert shop.client.get(f"/v1/groupbuy/teams/{team}", headers=other).status_code == 404
    assert shop.client.post(f"/v1/groupbuy/teams/{team}/cancel", headers=other).status_code == 404


# ── deadlines, without anyone calling the API ─────────────────────────────────────────────
def test_a_team_short_at_its_deadline_fails_by_itself(shop):
    ann, bea = shop.login("ann"), shop.login("bea")
    team = shop.open(ann).json()["result"]["team"]
    shop.join(bea, team["id"])
    assert shop.sweep() == [] or all(r.body["result"]["outcome"] != "settled" for r in shop.sweep())
    shop.clock.set(datetime.fromisoformat(team["deadline"]) + timedelta(seconds=30))
    metrics = shop.client.get("/metrics").text
    assert 'flywheel_mechanic_timers_due{kind="groupbuy_deadline"} 1.0' in metrics
    assert 'flywheel_mechanic_timers_late_seconds{kind="groupbuy_deadline"} 30.0' in metrics

    replies = shop.sweep()
    settled = [r for r in replies if r.body.get("result", {}).get("outcome") == "settled"]
    assert len(settled) == 1
    assert settled[0].body["result"]["team"]["status"] == "failed"
    assert sorted(e["type"] for e in settled[0].body["emitted"]) == ["groupbuy.failed"] * 2
    assert shop.states() == {"ann": "in_group", "bea": "in_group"}  # back, with a nudge
    nudges = [p for p in shop.outbox("send_message") if "差一点就成团" in p["params"]["text"]]
    assert len(nudges) == 2
    assert shop.count(Voucher) == 0
    metrics = shop.client.get("/metrics").text
    assert 'flywheel_mechanic_timers_due{kind="groupbuy_deadline"} 0.0' in metrics
    assert 'flywheel_mechanic_timer_lateness_seconds_count{kind="groupbuy_deadline"} 1.0' in metrics
    assert shop.sweep() == []  # settled once


def test_a_team_one_short_is_completed_when_the_campaign_allows_it(engine, clock):
    shop = Shop(engine, clock, lunch(on_short="auto_complete", auto_complete_max_missing=1))
    ann, bea = shop.login("ann"), shop.login("bea")
    team = shop.open(ann).json()["result"]["team"]
    shop.join(bea, team["id"])
    shop.clock.set(datetime.fromisoformat(team["deadline"]))
    [settled] = [r for r in shop.sweep() if r.body["type"] == "groupbuy.deadline"]
    state = settled.body["result"]["team"]
    assert state["status"] == "succeeded" and state["virtual_seats"] == 1
    assert state["close_reason"] == "auto_completed"
    assert shop.states() == {"ann": "activated", "bea": "activated"}
    ann, bea = shop.login("ann", in_group=False), shop.login("bea", in_group=False)  # fresh tokens
    assert len(shop.vouchers(ann)) == 1 and len(shop.vouchers(bea)) == 1


def test_a_team_ttl_never_runs_past_the_campaign_end(engine, clock):
    shop = Shop(engine, clock, lunch(team_ttl="P7D"))
    team = shop.open(shop.login("ann")).json()["result"]["team"]
    assert datetime.fromisoformat(team["deadline"]) == datetime(2026, 12, 3, 16, tzinfo=UTC)


# ── vouchers ──────────────────────────────────────────────────────────────────────────────
def _succeed(shop: Shop) -> list[dict[str, str]]:
    members = [shop.login(o) for o in ("ann", "bea", "cai")]
    team = shop.open(members[0]).json()["result"]["team"]["id"]
    for auth in members[1:]:
        assert shop.join(auth, team).status_code == 200
    return members


def test_a_voucher_code_is_forgiving_to_type_and_expires_by_itself(shop):
    ann, bea, cai = _succeed(shop)
    code = shop.vouchers(ann)[0]["code"]
    typed = f"{code[:4]}-{code[4:8]} {code[8:]}".lower()
    r = shop.client.post(f"/v1/vouchers/{typed}/redeem", headers=shop.admin)
    assert r.status_code == 200, r.text
    qr = shop.vouchers(bea)[0]["qr"]
    assert shop.client.get(f"/v1/vouchers/{qr}", headers=shop.admin).json()["status"] == "issued"

    r = shop.client.post(f"/v1/vouchers/{shop.vouchers(cai)[0]['code']}/void", headers=shop.admin)
    assert r.status_code == 200 and r.json()["result"]["voucher"]["status"] == "voided"

    shop.clock.advance(timedelta(days=3))  # valid_for P3D
    bea = shop.login("bea", in_group=False)  # a fresh token
    bea_code = shop.vouchers(bea)[0]["code"]
    assert shop.vouchers(bea)[0]["status"] == "expired"  # shown expired before the sweep
    refused(
        shop.client.post(f"/v1/vouchers/{bea_code}/redeem", headers=shop.admin), "voucher_expired"
    )
    expired = [r for r in shop.sweep() if r.body["type"] == "voucher.expire"]
    assert len(expired) == 1  # ann's was redeemed and cai's voided: only bea's expires
    with shop.engine.connect() as conn:
        statuses = dict(conn.execute(select(Voucher.code, Voucher.status)).all())  # type: ignore[call-overload]
    assert sorted(statuses.values()) == ["expired", "redeemed", "voided"]
    assert shop.client.get("/v1/vouchers/NOSUCHCODE00", headers=shop.admin).status_code == 404


def test_vouchers_issued_together_answer_in_order_and_an_origin_issues_once(engine):
    """`issue_many` (a team's success): each voucher once for its origin, in the order asked;
    an origin that issued before answers its voucher as it stands, and no second one."""
    from app.mechanics.vouchers import service as vouchers

    tenant_id, _ = new_tenant(engine)
    now = datetime(2026, 12, 2, 4, tzinfo=UTC)
    with engine.begin() as conn:
        ids = [
            conn.execute(
                Member.__table__.insert()  # type: ignore[attr-defined]
                .values(tenant_id=tenant_id, external_id=f"m-{i}", created_at=now)
                .returning(Member.id)  # type: ignore[call-overload]
            ).scalar_one()
            for i in range(3)
        ]

    def rows(origins: list[str]) -> list[dict[str, Any]]:
        return [
            vouchers.new_voucher(
                tenant_id=tenant_id,
                member_id=ids[i],
                name="lunch 75%",
                discount_percent=75,
                valid_for=timedelta(days=3),
                origin=origin,
                now=now,
            )
            for i, origin in enumerate(origins)
        ]

    with engine.begin() as conn:
        (first,) = vouchers.issue_many(conn, rows(["team:1:b"]))
    with engine.begin() as conn:
        issued = vouchers.issue_many(conn, rows(["team:1:a", "team:1:b", "team:1:c"]))
    assert [v.origin for v in issued] == ["team:1:a", "team:1:b", "team:1:c"]
    assert issued[1].code == first.code and issued[1].id == first.id
    assert issued[1].member_id == ids[0]  # as issued the first time, not as asked again
    assert len({v.code for v in issued}) == 3
    assert issued[0].expires_at == now + timedelta(days=3)
    assert count(engine, Voucher) == 3


def test_members_see_only_their_own_teams_and_vouchers(shop):
    ann, _, _ = _succeed(shop)
    dan = shop.login("dan")
    assert shop.vouchers(dan) == []
    assert shop.client.get("/v1/member/teams", headers=dan).json()["teams"] == []
    mine = shop.client.get("/v1/member/teams", headers=ann).json()["teams"]
    assert len(mine) == 1 and mine[0]["status"] == "succeeded"
    assert "member_id" not in json.dumps(mine)  # teammates show as nickname and avatar only
    assert shop.client.get("/v1/member/vouchers").status_code == 401


# ── pay to join ───────────────────────────────────────────────────────────────────────────
PAY = {"join_mode": "pay", "price_fen": 2400, "discount_percent": None, "voucher": None}


def paid(shop: Shop, openid: str, team: str, order: str, amount: int = 2400) -> Any:
    r = shop.shop.send(event("order.paid", openid, order_id=order, amount_fen=amount, team_id=team))
    assert r.status_code == 200, r.text
    return r.json()


def test_pay_to_join_holds_seats_releases_unpaid_ones_and_refunds_a_late_payer(engine, clock):
    shop = Shop(engine, clock, lunch(**PAY))
    ann, bea, cai, dan = (shop.login(o) for o in ("ann", "bea", "cai", "dan"))
    r = shop.open(ann)
    team = r.json()["result"]["team"]
    assert team["members"][0]["paid"] is False and team["members"][0]["hold_until"]
    assert funnel_state(r) == ("in_group", "acquire")  # nothing moves before the payment
    body = paid(shop, "ann", team["id"], "o-ann")
    assert body["result"]["outcome"] == "confirmed"
    assert shop.states()["ann"] == "teaming"

    assert shop.join(bea, team["id"]).json()["result"]["outcome"] == "held"
    shop.clock.advance(timedelta(minutes=15))  # bea's payment window passes unpaid
    released = [r for r in shop.sweep() if r.body["type"] == "groupbuy.hold_expired"]
    assert [r.body["result"]["outcome"] for r in released] == ["released"]
    cai, dan = shop.login("cai", in_group=False), shop.login("dan", in_group=False)
    shop.join(cai, team["id"])
    r = shop.join(dan, team["id"])
    assert r.json()["result"]["team"]["seats_left"] == 0  # held seats count: full
    refused(shop.join(shop.login("eve"), team["id"]), "team_full")

    late = paid(shop, "bea", team["id"], "o-bea")  # bea pays after losing her seat
    assert late["result"] == {
        "outcome": "refunded",
        "reason": "team_full",
        "team": late["result"]["team"],
    }
    assert late["result"]["team"]["seats_taken"] == 3  # never overfull
    [refund] = shop.outbox("refund")
    assert refund["params"]["order_id"] == "o-bea"
    assert refund["params"]["idempotency_key"] == "o-bea" and refund["params"]["amount_fen"] == 2400
    assert shop.outbox("fulfil_order") == []  # nothing is fulfilled before the team succeeds

    paid(shop, "cai", team["id"], "o-cai")
    done = paid(shop, "dan", team["id"], "o-dan")
    assert done["result"]["team"]["status"] == "succeeded"
    fulfil = shop.outbox("fulfil_order")
    assert sorted(p["params"]["order_id"] for p in fulfil) == ["o-ann", "o-cai", "o-dan"]
    assert shop.states() == {
        "ann": "activated",
        "bea": "in_group",
        "cai": "activated",
        "dan": "activated",
        "eve": "in_group",
    }
    again = paid(shop, "dan", team["id"], "o-dan")  # the shop repeats itself (new webhook-id)
    assert again["result"]["outcome"] == "already_confirmed"
    assert len(shop.outbox("refund")) == 1


def test_a_late_payment_opens_a_new_team_when_the_campaign_says_so(engine, clock):
    shop = Shop(engine, clock, lunch(**PAY, on_late_payment="new_team", max_teams_led_per_member=2))
    ann, bea = shop.login("ann"), shop.login("bea")
    team = shop.open(ann).json()["result"]["team"]["id"]
    shop.join(bea, team)
    shop.clock.advance(timedelta(minutes=16))
    shop.sweep()  # both holds released; the lone leader's team is cancelled
    body = paid(shop, "bea", team, "o-bea")
    assert body["result"]["outcome"] == "new_team" and body["result"]["reason"] == "team_cancelled"
    fresh = body["result"]["team"]
    assert fresh["id"] != team and fresh["members"][0]["role"] == "leader"
    assert fresh["members"][0]["paid"] is True
    assert shop.outbox("refund") == []


def test_a_failed_paid_team_refunds_every_payer_once(engine, clock):
    """…and refunds the payment system never acknowledges are listed for manual handling."""
    shop = Shop(engine, clock, lunch(**PAY))
    ann, bea = shop.login("ann"), shop.login("bea")
    team = shop.open(ann).json()["result"]["team"]
    paid(shop, "ann", team["id"], "o-ann")
    shop.join(bea, team["id"])
    paid(shop, "bea", team["id"], "o-bea")
    shop.clock.set(datetime.fromisoformat(team["deadline"]))
    shop.sweep()
    shop.sweep()
    refunds = shop.outbox("refund")
    assert sorted((p["params"]["order_id"], p["params"]["reason"]) for p in refunds) == [
        ("o-ann", "deadline_short"),
        ("o-bea", "deadline_short"),
    ]
    refunds_fail = Receiver(refuse=lambda action: action["type"] == "refund")
    with refunds_fail as payments:  # messages arrive; the payment integration is down for good
        r = shop.client.put("/v1/action-endpoint", json={"url": payments.url}, headers=shop.admin)
        assert r.status_code == 200, r.text
        for wait in (0, *BACKOFF):
            shop.clock.advance(timedelta(seconds=wait))
            while deliver(shop.app):
                pass
        tried = [
            c["body"]["params"]["idempotency_key"]
            for c in payments.calls
            if c["body"]["type"] == "refund"
        ]
    assert sorted(set(tried)) == ["o-ann", "o-bea"] and len(tried) == 2 * MAX_ATTEMPTS
    r = shop.client.get(
        "/v1/deliveries", params={"type": "refund", "status": "dead"}, headers=shop.admin
    )
    dead = [
        shop.client.get(f"/v1/deliveries/{d['id']}", headers=shop.admin).json() for d in r.json()
    ]
    assert sorted(d["payload"]["params"]["order_id"] for d in dead) == ["o-ann", "o-bea"]


def test_a_tiered_team_settles_its_price_at_the_deadline_and_refunds_the_difference(engine, clock):
    tiers = [{"min_size": 3, "price_fen": 2000}, {"min_size": 4, "price_fen": 1800}]
    shop = Shop(engine, clock, lunch(**PAY, tiers=tiers, max_size=5, team_size=2))
    members = [shop.login(o) for o in ("ann", "bea", "cai", "dan")]
    team = shop.open(members[0]).json()["result"]["team"]
    assert team["team_size"] == 5 and team["min_size"] == 2
    paid(shop, "ann", team["id"], "o-ann")
    for name, auth in zip(("bea", "cai", "dan"), members[1:], strict=True):
        shop.join(auth, team["id"])
        paid(shop, name, team["id"], f"o-{name}")
    shop.clock.set(datetime.fromisoformat(team["deadline"]))
    [settled] = [r for r in shop.sweep() if r.body["type"] == "groupbuy.deadline"]
    assert settled.body["result"]["team"]["status"] == "succeeded"
    assert settled.body["result"]["team"]["price_fen"] == 1800  # 4 members reached tier 2
    partial = shop.outbox("refund")
    assert len(partial) == 4 and {p["params"]["amount_fen"] for p in partial} == {600}
    assert {p["params"]["idempotency_key"] for p in partial} == {
        f"o-{n}:tier" for n in ("ann", "bea", "cai", "dan")
    }


# ── the same steps from the merchant's backend ────────────────────────────────────────────
def test_teams_can_be_driven_by_webhooks_from_the_merchants_backend(shop):
    for openid in ("ann", "bea", "cai"):
        shop.login(openid)
    backend = Source(shop.client, shop.admin, shop.clock, "mini-backend")
    r = backend.send(event("groupbuy.open", "ann", funnel="office-lunch", campaign="lunch-team"))
    assert r.status_code == 200, r.text
    team = r.json()["result"]["team"]["id"]
    assert backend.send(event("groupbuy.join", "bea", team=team)).status_code == 200
    r = backend.send(event("groupbuy.join", "cai", team=team), msg_id="join-cai")
    assert r.json()["result"]["team"]["status"] == "succeeded"
    again = backend.send(event("groupbuy.join", "cai", team=team), msg_id="join-cai")
    assert again.content == r.content and again.headers["idempotent-replayed"] == "true"
    r = backend.send(event("groupbuy.join", "dan", team=team))
    assert r.status_code == 409 and r.json()["code"] == "team_closed"
    r = backend.send(event("groupbuy.join", "dan"))
    assert r.status_code == 422 and r.json()["errors"][0]["path"] == "data.team"
    r = backend.send(event("groupbuy.join", "dan", team="tm_nosuchteam"))  # a body's reference
    assert r.status_code == 422 and r.json()["code"] == "invalid_reference"
    assert shop.states() == {"ann": "activated", "bea": "activated", "cai": "activated"}


def test_new_customers_only_join_limits_and_a_leader_price(engine, clock):
    shop = Shop(
        engine,
        clock,
        lunch(
            new_customers_only=True,
            max_teams_joined_per_member=1,
            price_fen=2400,
            discount_percent=None,
            leader_price_fen=1900,
        ),
    )
    ann, bea, cai, dan = (shop.login(o) for o in ("ann", "bea", "cai", "dan"))
    assert (
        shop.shop.send(event("order.paid", "cai", order_id="o-old", amount_fen=3000)).status_code
        == 200
    )  # cai is a customer already
    team = shop.open(ann).json()["result"]["team"]
    assert team["price_fen"] == 2400 and team["leader_price_fen"] == 1900
    refused(shop.join(cai, team["id"]), "new_customers_only")  # 老带新: the leader may be old
    assert shop.join(bea, team["id"]).status_code == 200
    assert shop.join(dan, team["id"]).status_code == 200  # succeeded
    second = shop.open(cai).json()["result"]["team"]["id"]
    refused(shop.join(bea, second), "join_limit_reached")  # bea joined one team already


def test_a_second_payment_and_a_payment_after_the_campaign_are_refunded(engine, clock):
    shop = Shop(engine, clock, lunch(**PAY, on_late_payment="new_team"))
    ann, bea = shop.login("ann"), shop.login("bea")
    team = shop.open(ann).json()["result"]["team"]
    paid(shop, "ann", team["id"], "o-ann")
    twice = paid(shop, "ann", team["id"], "o-ann-2")
    assert (twice["result"]["outcome"], twice["result"]["reason"]) == ("refunded", "already_paid")
    shop.join(bea, team["id"])
    shop.clock.set(datetime(2026, 12, 4, tzinfo=UTC))  # past the campaign: the team failed
    shop.sweep()
    late = paid(shop, "bea", team["id"], "o-bea")  # no new team can open now: refunded
    assert (late["result"]["outcome"], late["result"]["reason"]) == ("refunded", "team_failed")
    assert sorted(p["params"]["order_id"] for p in shop.outbox("refund")) == [
        "o-ann",
        "o-ann-2",
        "o-bea",
    ]
    assert shop.count(Team) == 1
