"""Chat groups through the bot's webhooks and the admin API — SQLite and PostgreSQL: the
welcome, thresholds and owner approval, moderation with appeals, activity and roles, health,
pruning, milestones, the monthly top and broadcasts."""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest

from tests.conftest import event
from tests.test_groupbuy import GROUP, LUNCH, Shop

CLUB = "skin-lovers"


class Club(Shop):
    """The office-lunch shop with its groups registered through the admin API."""

    def group(self, group_id: str = GROUP, **body: Any) -> dict[str, Any]:
        r = self.client.put(
            f"/v1/groups/{group_id}", json={"name": "午餐福利群", **body}, headers=self.admin
        )
        assert r.status_code in (200, 201), r.text
        return r.json()  # type: ignore[no-any-return]

    def joins(self, openid: str, group_id: str = GROUP, **member: Any) -> Any:
        ev = event("member.joined", openid, group_id=group_id)
        if member:
            ev["member"] = {"id": openid, **member}
        r = self.bot.send(ev)
        assert r.status_code == 200, r.text
        return r

    def says(self, openid: str, text: str, group_id: str = GROUP, **data: Any) -> Any:
        self.n = getattr(self, "n", 0) + 1
        ev = event("message.posted", openid, group_id=group_id, message_id=f"m{self.n}", text=text)
        ev["data"].update(data)  # type: ignore[union-attr]
        r = self.bot.send(ev)
        assert r.status_code == 200, r.text
        return r

    def actions(self, kind: str, source: str = "community.") -> list[dict[str, Any]]:
        return [a for a in self.outbox(kind) if a["source"].startswith(source)]

    def get(self, path: str) -> Any:
        r = self.client.get(path, headers=self.admin)
        assert r.status_code == 200, r.text
        return r.json()


@pytest.fixture
def club(engine, clock) -> Club:
    return Club(engine, clock)


# ── groups and the welcome ────────────────────────────────────────────────────────────────
def test_a_member_who_joins_gets_the_welcome_with_the_groups_rules_once(club):
    made = club.group(
        kind="product",
        purpose="每天的午餐优惠",
        rules="不发广告，不刷屏",
        welcome="欢迎 {{ member.nickname }} 加入{{ group.name }}！群规：{{ group.rules }}",
        capacity=300,
    )
    assert made["members"] == 0 and made["capacity"] == 300
    assert [w["path"] for w in made["warnings"]] == ["capacity"]  # the seeds advise 100
    club.joins("ann", nickname="Ann")
    club.joins("ann", nickname="Ann")  # the bot repeats itself: no second welcome
    [welcome] = club.actions("send_message")
    assert welcome["params"]["text"] == "欢迎 Ann 加入午餐福利群！群规：不发广告，不刷屏"
    assert welcome["member"] == {"id": "ann"}
    assert club.get(f"/v1/groups/{GROUP}")["members"] == 1
    assert [g["group_id"] for g in club.get("/v1/groups")] == [GROUP]


def test_group_settings_are_validated_with_the_json_path_at_fault(club):
    bad = {
        "name": "x",
        "kind": "party",
        "capacity": 501,
        "settings": {"moderation": {"strike_window": "a week"}, "timezone": "Mars/Base"},
    }
    r = club.client.put(f"/v1/groups/{GROUP}", json=bad, headers=club.admin)
    assert r.status_code == 422 and r.headers["content-type"] == "application/problem+json"
    paths = {e["path"] for e in r.json()["errors"]}
    assert {"kind", "capacity", "settings.moderation.strike_window", "settings.timezone"} <= paths
    r = club.client.put(f"/v1/groups/{GROUP}/words", json={"words": ["x"]}, headers=club.admin)
    assert r.status_code == 404  # no such group yet
    club.group()
    r = club.client.put(
        f"/v1/groups/{GROUP}/words", json={"patterns": ["ok", "(unclosed"]}, headers=club.admin
    )
    assert r.status_code == 422 and [e["path"] for e in r.json()["errors"]] == ["patterns[1]"]


def test_a_full_group_tells_the_owner_once_a_day(club):
    club.group(capacity=2)
    for who in ("ann", "bo", "cy"):
        club.joins(who)
    [full] = club.actions("group_full")
    assert full["params"] == {"group_id": GROUP, "members": 2, "capacity": 2}
    assert full["member"] is None


# ── entry thresholds and approval ─────────────────────────────────────────────────────────
def request(club: Club, openid: str, **data: Any) -> dict[str, Any]:
    ev = event("member.join_requested", openid, group_id=GROUP, **data)
    r = club.bot.send(ev)
    assert r.status_code == 200, r.text
    return r.json()["result"]  # type: ignore[no-any-return]


def test_a_join_request_that_fails_thresholds_is_refused_with_each_reason(club):
    club.group(
        settings={
            "entry": {
                "invite_codes": ["LUNCH2026"],
                "min_level": 2,
                "min_spend_fen": 5000,
                "paid_sku": "perks-pass",
            }
        }
    )
    result = request(club, "dan")
    assert result["decision"] == "refused"
    codes = [r["code"] for r in result["request"]["reasons"]]
    assert codes == ["invite_code", "membership_level", "paid_entry", "min_spend"]
    [refusal] = club.actions("refuse_join")
    assert refusal["member"] == {"id": "dan"} and len(refusal["params"]["reasons"]) == 4
    # dan buys the pass (¥39.90) and lunch (¥32), a refunded order does not count
    paid = [("o1", "perks-pass", 3990), ("o2", "braised-pork", 3200), ("o3", "veg-set", 2400)]
    for order, sku, fen in paid:
        r = club.shop.send(
            event("order.paid", "dan", order_id=order, amount_fen=fen, items=[{"sku": sku}])
        )
        assert r.status_code == 200, r.text
    club.shop.send(event("order.refunded", "dan", order_id="o3", amount_fen=2400))
    ev = event("member.join_requested", "dan", group_id=GROUP, invite_code=" lunch2026 ")
    ev["member"] = {"id": "dan", "attributes": {"level": 3}}
    result = club.bot.send(ev).json()["result"]
    assert result["decision"] == "approved", result
    [approval] = club.actions("approve_join")
    assert approval["params"]["group_id"] == GROUP
    # once in, a request is answered without a new decision
    club.joins("dan")
    assert request(club, "dan")["decision"] == "already_member"


def test_owner_approval_queues_requests_and_tells_the_bot_the_decision(club):
    club.group(settings={"entry": {"approval": "owner"}})
    first = request(club, "eve")
    assert first["decision"] == "pending"
    assert request(club, "eve")["request"]["id"] == first["request"]["id"]  # not queued twice
    request(club, "fay")
    [notice, _] = club.actions("join_request_pending")
    assert notice["params"]["member"] == "eve" and notice["member"] is None
    queue = club.get(f"/v1/groups/{GROUP}/join-requests?status=pending")
    assert [q["member_id"] for q in queue] and len(queue) == 2
    eve, fay = sorted(queue, key=lambda q: q["id"])
    r = club.client.post(f"/v1/groups/join-requests/{eve['id']}/approve", headers=club.admin)
    assert r.status_code == 200 and r.json()["result"]["status"] == "approved"
    r = club.client.post(
        f"/v1/groups/join-requests/{fay['id']}/deny",
        json={"note": "本群仅限本楼同事"},
        headers=club.admin,
    )
    assert r.json()["result"]["status"] == "denied"
    r = club.client.post(f"/v1/groups/join-requests/{fay['id']}/approve", headers=club.admin)
    assert r.status_code == 409 and r.json()["code"] == "already_decided"
    assert [a["member"]["id"] for a in club.actions("approve_join")] == ["eve"]
    [denied] = club.actions("refuse_join")
    assert denied["params"]["reasons"] == ["本群仅限本楼同事"]
    assert club.get(f"/v1/groups/{GROUP}/join-requests?status=pending") == []
    r = club.bot.send(event("member.join_requested", "gus", group_id="nowhere"))
    assert r.status_code == 404 and "PUT /v1/groups/nowhere" in r.json()["detail"]


# ── moderation ────────────────────────────────────────────────────────────────────────────
WORDS = [f"违禁词{i:05d}" for i in range(9_998)] + ["微信", "代购"]


def test_first_hit_warns_second_removes_and_an_appeal_reverses_it(club):
    club.group()
    r = club.client.put(
        f"/v1/groups/{GROUP}/words",
        json={"words": WORDS, "patterns": [r"1[3-9]\d{9}"]},
        headers=club.admin,
    )
    assert r.status_code == 200 and r.json()["words"] == 10_000
    for who in ("ann", "bo", "boss"):
        club.joins(who)
    r = club.client.put(
        f"/v1/groups/{GROUP}/members/boss/role", json={"role": "owner"}, headers=club.admin
    )
    assert r.status_code == 200
    club.says("bo", "今天的红烧肉很好吃")  # clean
    club.says("boss", "加我微信 shop.vip 订餐")  # the owner is exempt
    club.says("ann", "有需要的加 微 信 哦")  # spaced out to dodge the filter: still a hit
    [warning] = club.actions("warn_member")
    assert warning["member"] == {"id": "ann"} and "违反了群规" in warning["params"]["reason"]
    assert warning["params"]["message_id"] and warning["params"]["rule"] == "word"
    club.says("ann", "看这里 https://spam.example.com/deal")  # an ad link: second strike
    [removal] = club.actions("remove_member")
    assert removal["member"] == {"id": "ann"} and removal["params"]["rule"] == "link"
    decisions = club.get(f"/v1/groups/{GROUP}/moderation")
    assert [(d["action"], d["matched"]) for d in decisions] == [
        ("remove", "https://spam.example.com/deal"),
        ("warn", "微信"),
    ]
    assert decisions[1]["excerpt"] == "有需要的加 微 信 哦"
    members = {m["external_id"] for m in club.get(f"/v1/groups/{GROUP}/members")}
    assert "ann" not in members
    # ann appeals the removal: reversed, and the bot is asked to let her back in
    r = club.client.post(
        f"/v1/groups/moderation/{decisions[0]['id']}/reverse",
        json={"note": "a link to our own menu"},
        headers=club.admin,
    )
    assert r.status_code == 200 and r.json()["result"]["status"] == "reversed"
    [readmit] = club.actions("readmit_member")
    assert readmit["member"] == {"id": "ann"}
    r = club.client.post(f"/v1/groups/moderation/{decisions[0]['id']}/reverse", headers=club.admin)
    assert r.status_code == 409 and r.json()["code"] == "already_reversed"
    # bo posts a phone number (a pattern) and a QR image: warned, then removed
    club.says("bo", "电话 13800138000")
    club.says("bo", "", kind="image", has_qr=True)
    assert [a["member"]["id"] for a in club.actions("remove_member")] == ["ann", "bo"]
    # a strike outside the window does not count
    club.clock.set(club.clock.now() + timedelta(days=31))
    club.joins("bo")
    club.says("bo", "代购请私聊")
    assert [a["member"]["id"] for a in club.actions("warn_member")] == ["ann", "bo", "bo"]


def test_moderation_can_be_tuned_per_group(club):
    club.group(
        settings={
            "moderation": {
                "links": "flag",
                "allowed_domains": ["jd.com"],
                "qr_codes": "off",
                "mini_programs": "flag",
            }
        }
    )
    club.joins("cy")
    club.says("cy", "我们的店 https://m.jd.com/shop/1")  # allowed
    club.says("cy", "", kind="image", has_qr=True)  # QR rule off
    assert club.actions("warn_member") == []
    club.says("cy", "", kind="mini_program", title="别家外卖")
    [warn] = club.actions("warn_member")
    assert warn["params"]["rule"] == "mini_program"


# ── activity, roles and health ────────────────────────────────────────────────────────────
def test_members_are_classified_from_activity_and_health_follows_the_20_80_rule(club):
    club.group(
        settings={
            "roles": {"opinion_leader_messages": 6, "active_messages": 3},
            "health": {"active_floor_percent": 30, "min_members": 4},
            "moderation": {"allowed_domains": ["jd.com"]},
        }
    )
    for who in ("lea", "sam", "qin", "ola", "oli", "omi", "ona", "oz", "pat", "ros"):
        club.joins(who)
    for _ in range(6):
        club.says("lea", "今天推荐红烧肉，配汤很好")
    for i in range(5):
        club.says("sam", f"分享一个好店 https://m.jd.com/{i}")
    for _ in range(3):
        club.says("qin", "请问今天有素食吗？")
    members = {m["external_id"]: m for m in club.get(f"/v1/groups/{GROUP}/members")}
    assert members["lea"]["persona"] == "opinion_leader" and members["lea"]["protected"]
    assert members["sam"]["persona"] == "sharer"
    assert members["qin"]["persona"] == "seeker"
    assert members["ola"]["persona"] == "onlooker" and not members["ola"]["active"]
    assert members["lea"]["messages"] == 6
    health = club.get(f"/v1/groups/{GROUP}/health")
    assert (health["members"], health["active"], health["active_percent"]) == (10, 3, 30.0)
    assert health["healthy"] is True
    club.joins("new")  # 3 of 11 active: below the 30% floor
    health = club.get(f"/v1/groups/{GROUP}/health")
    assert health["healthy"] is False and health["personas"]["onlooker"] == 8
    club.clock.set(datetime(2026, 12, 2, 1, 0, tzinfo=UTC))  # 09:00 in Shanghai: the check
    club.sweep()
    club.sweep()
    [alert] = club.actions("group_health_alert")
    assert alert["params"]["active_percent"] == pytest.approx(27.3)


def test_broadcast_sends_one_message_to_each_group(club):
    club.group()
    club.group("office-lunch-b")
    r = club.client.post(
        "/v1/broadcasts",
        json={"groups": [GROUP, "office-lunch-b"], "text": "今天 10:30 开始接龙"},
        headers={**club.admin, "Idempotency-Key": "menu-1"},
    )
    assert r.status_code == 200, r.text
    again = club.client.post(
        "/v1/broadcasts",
        json={"groups": [GROUP, "office-lunch-b"], "text": "今天 10:30 开始接龙"},
        headers={**club.admin, "Idempotency-Key": "menu-1"},
    )
    assert again.headers.get("Idempotent-Replayed") == "true"
    sent = club.actions("send_message", "community.broadcast")
    assert [s["params"]["group_id"] for s in sent] == [GROUP, "office-lunch-b"]
    assert all(s["params"]["to"] == "group" for s in sent)
    r = club.client.post(
        "/v1/broadcasts", json={"groups": [GROUP, "ghost"], "text": "hi"}, headers=club.admin
    )
    assert r.status_code == 404 and [e["path"] for e in r.json()["errors"]] == ["groups[1]"]


# ── pruning ───────────────────────────────────────────────────────────────────────────────
def pruning_funnel() -> dict[str, Any]:
    doc = json.loads(json.dumps(LUNCH))
    doc["mechanics"]["pruning"] = {
        "quiet-week": {
            "groups": [GROUP],
            "no_message_for": "P7D",
            "warn_grace": "P2D",
            "at": "21:00",
        }
    }
    return doc


def test_pruning_warns_then_removes_the_inactive_and_spares_protected_members(engine, clock):
    club = Club(engine, clock, pruning_funnel())
    club.group()
    start = club.clock.now()
    for who in ("owner", "admin", "star", "ann", "bo", "cy"):
        club.joins(who)
    for who, role in (("owner", "owner"), ("admin", "admin"), ("star", "opinion_leader")):
        r = club.client.put(
            f"/v1/groups/{GROUP}/members/{who}/role", json={"role": role}, headers=club.admin
        )
        assert r.status_code == 200
    club.clock.set(start + timedelta(days=5))
    club.says("cy", "我还在")  # cy is active
    # day 8 at 21:00 Shanghai (13:00 UTC): ann, bo silent for 8 days; cy for 3
    club.clock.set(datetime(2026, 12, 8, 13, 0, tzinfo=UTC))
    club.sweep()
    warned = [a["member"]["id"] for a in club.actions("send_message", "pruning.")]
    assert warned == ["ann", "bo"]
    club.clock.set(datetime(2026, 12, 9, 3, 0, tzinfo=UTC))
    club.says("bo", "不好意思，最近忙")  # bo speaks up: the warning is cleared
    club.clock.set(datetime(2026, 12, 10, 13, 0, tzinfo=UTC))  # two days after the warning
    club.sweep()
    removed = [a["member"]["id"] for a in club.actions("remove_member", "pruning.")]
    assert removed == ["ann"]
    left = {m["external_id"] for m in club.get(f"/v1/groups/{GROUP}/members")}
    assert left == {"owner", "admin", "star", "bo", "cy"}
    club.sweep()  # the same day again: nothing more
    assert len(club.actions("remove_member", "pruning.")) == 1


# ── milestones, the monthly top ───────────────────────────────────────────────────────────
def milestone_funnel() -> dict[str, Any]:
    doc = json.loads(json.dumps(LUNCH))
    packet = {"actions": [{"type": "pay_red_packet", "amount_fen": 188, "note": "欢迎"}]}
    doc["mechanics"]["rewards"].update(
        {
            "welcome-packet": {
                "kind": "milestone",
                "title": "新人红包",
                "on": "member_joined",
                "groups": [GROUP],
                "reward": packet,
            },
            "size-packet": {
                "kind": "milestone",
                "title": "满员红包",
                "on": "group_size",
                "sizes": [3, 1000],
                "groups": [GROUP],
                "reward": {"actions": [{"type": "pay_red_packet", "amount_fen": 1000}]},
            },
            "birthday": {
                "kind": "milestone",
                "title": "生日红包",
                "on": "birthday",
                "groups": [GROUP],
                "reward": {"points": 88},
            },
            "new-year": {
                "kind": "milestone",
                "title": "元旦红包",
                "on": "holiday",
                "dates": ["01-01"],
                "groups": [GROUP],
                "at": "08:00",
                "reward": {"actions": [{"type": "pay_red_packet", "amount_fen": 2000}]},
            },
            "top3": {
                "kind": "monthly_top",
                "title": "月度活跃前三",
                "groups": [GROUP],
                "top": 3,
                "reward": {"points": 100},
            },
        }
    )
    return doc


def test_milestone_red_packets_and_the_monthly_top_three(engine, clock):
    club = Club(engine, clock, milestone_funnel())
    club.group()
    club.joins("ann", attributes={"birthday": "1990-12-02"})
    club.joins("ann")
    club.joins("bo")
    packets = club.actions("pay_red_packet", "rewards.welcome-packet")
    assert [p["member"]["id"] for p in packets] == ["ann", "bo"]
    assert club.actions("pay_red_packet", "rewards.size-packet") == []
    club.joins("cy")  # the third member: the group passes 3
    club.joins("dee")
    [size] = club.actions("pay_red_packet", "rewards.size-packet")
    assert size["member"] is None and size["params"]["milestone"] == 3
    for who, n in (("ann", 5), ("bo", 9), ("cy", 2), ("dee", 7)):
        for _ in range(n):
            club.says(who, "好吃")
    club.clock.set(datetime(2026, 12, 2, 2, 0, tzinfo=UTC))  # ann's birthday, 10:00 local
    club.sweep()
    club.sweep()
    grants = [g for g in club.outbox("grant_points") if g["source"] == "rewards.birthday"]
    assert [(g["member"]["id"], g["params"]["points"]) for g in grants] == [("ann", 88)]
    club.clock.set(datetime(2026, 12, 31, 23, 30, tzinfo=UTC))  # 07:30 on Jan 1st: too early
    club.sweep()
    assert club.actions("pay_red_packet", "rewards.new-year") == []
    club.clock.set(datetime(2027, 1, 1, 1, 30, tzinfo=UTC))  # 09:30 on Jan 1st
    club.sweep()
    [holiday] = club.actions("pay_red_packet", "rewards.new-year")
    assert holiday["params"]["group_id"] == GROUP and holiday["params"]["amount_fen"] == 2000
    top = [g for g in club.outbox("grant_points") if g["source"] == "rewards.top3"]
    assert [g["member"]["id"] for g in top] == ["bo", "dee", "ann"]
    club.clock.set(datetime(2027, 1, 1, 5, 0, tzinfo=UTC))
    club.sweep()
    assert len([g for g in club.outbox("grant_points") if g["source"] == "rewards.top3"]) == 3


def test_a_solitaire_reply_counts_as_activity_and_is_moderated_like_any_message(club):
    club.group()
    r = club.client.put(f"/v1/groups/{GROUP}/words", json={"words": ["代购"]}, headers=club.admin)
    assert r.status_code == 200
    club.joins("ann")
    r = club.says("ann", "+1 红烧肉饭")  # taken as a solitaire reply (no list open today)
    assert r.json()["result"]["outcome"] == "no_open_list"
    club.says("ann", "+1 红烧肉饭 代购请私聊")
    [member] = club.get(f"/v1/groups/{GROUP}/members")
    assert member["messages"] == 2 and member["messages_in_window"] == 2
    [warning] = club.actions("warn_member")
    assert warning["member"] == {"id": "ann"}
