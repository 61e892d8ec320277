"""Solitaire ordering (群接龙) end to end over HTTP — SQLite and PostgreSQL."""

from __future__ import annotations

import csv
import io
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest

from app.events.dispatch import apply_batch
from app.mechanics.solitaire.schedule import due_openings
from app.mechanics.solitaire.service import ANNOUNCE_EVERY
from app.mechanics.vouchers.models import Voucher
from tests.conftest import command, event
from tests.test_groupbuy import Shop, refused

OPENS_1030 = datetime(2026, 12, 1, 2, 30, tzinfo=UTC)  # 10:30 in Shanghai
MENU = {
    "braised-pork": ("红烧肉饭", 3200),
    "tomato-egg": ("番茄炒蛋饭", 2600),
    "veg-set": ("素食套餐", 2400),
}


@pytest.fixture
def shop(engine, clock) -> Shop:
    return Shop(engine, clock)


def open_list(shop: Shop, **body: Any) -> dict[str, Any]:
    body = {"group": "office-lunch-perks", "funnel": "office-lunch", "campaign": "lunch", **body}
    r = shop.client.post("/v1/solitaire/lists", json=body, headers=shop.admin)
    assert r.status_code == 200, r.text
    return r.json()["result"]["list"]  # type: ignore[no-any-return]


def append(shop: Shop, auth: dict[str, str], list_id: str, **line: Any) -> Any:
    return shop.client.post(f"/v1/member/solitaire/{list_id}/lines", json=line, headers=auth)


def test_a_scheduled_lunch_list_from_opening_to_the_kitchen(shop):
    members = {f"w{i:02d}": shop.login(f"w{i:02d}") for i in range(30)}
    # office-lunch schedules the list: "30 10 * * 1-5" in Asia/Shanghai, group office-lunch-perks
    shop.sweep()  # 10:00: the 10:30 list is created, scheduled (an hour's lookahead)
    listed = shop.client.get(
        "/v1/solitaire/lists", params={"group": "office-lunch-perks"}, headers=shop.admin
    ).json()["lists"]
    assert len(listed) == 1
    sl = listed[0]
    assert sl["status"] == "scheduled" and sl["opens_at"] == OPENS_1030.isoformat()
    assert sl["closes_at"] == (OPENS_1030 + timedelta(minutes=30)).isoformat()
    assert sl["join_until"] == (OPENS_1030 + timedelta(minutes=25)).isoformat()
    first = members["w00"]
    refused(append(shop, first, sl["id"], items=[{"sku": "veg-set"}]), "list_not_open")

    shop.clock.set(OPENS_1030)
    opened = [r for r in shop.sweep() if r.body["type"] == "solitaire.open_due"]
    assert [r.body["result"]["outcome"] for r in opened] == ["opened"]
    assert len(shop.client.get("/v1/solitaire/lists", headers=shop.admin).json()["lists"]) == 1

    skus = list(MENU)
    for n, auth in enumerate(members.values()):
        shop.clock.advance(timedelta(seconds=20))
        line = {"items": [{"sku": skus[n % 3], "qty": 1 + n % 2}], "pickup": "A座大堂"}
        r = append(shop, auth, sl["id"], **line)
        assert r.status_code == 200, r.text
        assert r.json()["result"]["line"] == n + 1
    # 3 change, 2 withdraw (their numbers stay, shown withdrawn)
    for openid in ("w03", "w04", "w05"):
        seq = int(openid[1:]) + 1
        r = shop.client.patch(
            f"/v1/member/solitaire/{sl['id']}/lines/{seq}",
            json={"items": [{"sku": "braised-pork", "qty": 2}], "note": "少饭"},
            headers=members[openid],
        )
        assert r.status_code == 200, r.text
    for openid in ("w01", "w02"):
        seq = int(openid[1:]) + 1
        r = shop.client.post(
            f"/v1/member/solitaire/{sl['id']}/lines/{seq}/withdraw", headers=members[openid]
        )
        assert r.status_code == 200, r.text
    refused(  # someone else's line
        shop.client.post(
            f"/v1/member/solitaire/{sl['id']}/lines/1/withdraw", headers=members["w09"]
        ),
        "not_your_line",
    )
    shop.clock.set(OPENS_1030 + timedelta(minutes=25))  # new lines stop at 10:55
    refused(append(shop, first, sl["id"], items=[{"sku": "veg-set"}]), "joining_closed")
    r = shop.client.patch(  # edits still allowed until 11:00
        f"/v1/member/solitaire/{sl['id']}/lines/1", json={"note": "不要香菜"}, headers=first
    )
    assert r.status_code == 200, r.text

    shop.clock.set(OPENS_1030 + timedelta(minutes=30))
    closed = [r for r in shop.sweep() if r.body["type"] == "solitaire.close_due"]
    assert len(closed) == 1 and closed[0].body["result"]["list"]["status"] == "closed"

    # the group text
    text = shop.client.get(f"/v1/solitaire/lists/{sl['id']}/text", headers=shop.admin).text
    lines = text.splitlines()
    assert lines[0] == "#接龙 今日午餐接龙 [已截止]" and lines[1] == "11:30 前台自取"
    assert lines[2] == "1. w00  红烧肉饭×1  A座大堂  不要香菜"
    assert lines[3] == "2. (已撤回)" and lines[4] == "3. (已撤回)"
    assert lines[5] == "4. w03  红烧肉饭×2  A座大堂  少饭"
    assert lines[-1].startswith("合计: 共 28 单; ")
    english = shop.client.get(
        f"/v1/solitaire/lists/{sl['id']}/text", params={"lang": "en"}, headers=shop.admin
    ).text
    assert english.splitlines()[0] == "#Solitaire 今日午餐接龙 [closed]"
    assert "2. (withdrawn)" in english and "28 orders" in english

    # the kitchen summary: expected totals from what each member ordered
    expected: dict[str, int] = {}
    for n in range(30):
        openid = f"w{n:02d}"
        if openid in ("w01", "w02"):
            continue
        sku, qty = (
            ("braised-pork", 2) if openid in ("w03", "w04", "w05") else (skus[n % 3], 1 + n % 2)
        )
        expected[sku] = expected.get(sku, 0) + qty
    summary = shop.client.get(f"/v1/solitaire/lists/{sl['id']}/summary", headers=shop.admin).json()
    assert {i["sku"]: i["quantity"] for i in summary["items"]} == expected
    assert summary["lines"] == 28 and len(summary["members"]) == 28
    assert summary["pickup_points"] == [{"pickup": "A座大堂", "items": expected}]
    assert summary["total_fen"] == sum(MENU[s][1] * q for s, q in expected.items())
    raw = shop.client.get(
        f"/v1/solitaire/lists/{sl['id']}/summary", params={"format": "csv"}, headers=shop.admin
    )
    assert raw.headers["content-type"].startswith("text/csv")
    assert raw.content.startswith("\ufeff".encode())
    rows = list(csv.reader(io.StringIO(raw.content.decode("utf-8-sig"))))
    assert rows[0] == ["section", "name", "sku", "quantity", "amount_yuan"]
    assert [
        "item",
        "红烧肉饭",
        "braised-pork",
        str(expected["braised-pork"]),
        f"{expected['braised-pork'] * 32:.2f}",
    ] in rows

    # funnels moved to revenue, and the early-order drink reached exactly the first 20
    states = shop.states()
    assert sum(1 for s in states.values() if s == "customer") == 28
    assert states["w01"] == states["w02"] == "in_group"
    drinks = [
        p for p in shop.outbox("issue_voucher") if p["params"]["voucher"] == "免费饮品/例汤/小菜"
    ]
    assert len(drinks) == 20
    early = {p["member"]["id"] for p in drinks}
    assert early == {f"w{n:02d}" for n in range(30) if n not in (1, 2)} - {
        f"w{n:02d}" for n in range(22, 30)
    }
    assert shop.count(Voucher) == 20
    refused(append(shop, first, sl["id"], items=[{"sku": "veg-set"}]), "list_not_open")
    r = shop.client.post(f"/v1/solitaire/lists/{sl['id']}/fulfil", headers=shop.admin)
    assert r.status_code == 200 and r.json()["result"]["list"]["status"] == "fulfilled"


def test_sold_out_items_are_refused_with_what_remains_and_stock_returns_on_withdrawal(shop):
    ann, bea = shop.login("ann"), shop.login("bea")
    definition = {
        "title": "Dumplings",
        "items": [
            {"sku": "pork", "name": "猪肉饺", "price_fen": 1500, "stock": 3},
            {"sku": "veg", "name": "素饺", "price_fen": 1200, "stock": 5},
        ],
    }
    sl = open_list(shop, funnel=None, campaign=None, definition=definition)
    assert append(shop, ann, sl["id"], items=[{"sku": "pork", "qty": 2}]).status_code == 200
    r = append(shop, bea, sl["id"], items=[{"sku": "pork", "qty": 2}])
    refused(r, "sold_out")
    assert "only 1 left" in r.json()["detail"] and "素饺×5" in r.json()["detail"]
    assert {e["path"]: e["message"] for e in r.json()["errors"]} == {
        "available.pork": "1 left",
        "available.veg": "5 left",
    }
    assert (
        shop.client.post(
            f"/v1/member/solitaire/{sl['id']}/lines/1/withdraw", headers=ann
        ).status_code
        == 200
    )
    r = append(shop, bea, sl["id"], items=[{"sku": "pork", "qty": 3}, {"sku": "veg", "qty": 5}])
    assert r.status_code == 200, r.text
    assert r.json()["result"]["line"] == 2  # numbers are never reused
    assert r.json()["result"]["list"]["status"] == "closed"  # everything sold out
    assert r.json()["result"]["list"]["close_reason"] == "sold_out"

    refused(append(shop, ann, sl["id"], items=[{"sku": "veg"}]), "list_not_open")


def test_bad_lines_are_422_with_the_path(shop):
    ann = shop.login("ann")
    sl = open_list(shop)
    r = append(shop, ann, sl["id"], items=[{"sku": "braised-pork"}, {"sku": "beef", "qty": 1}])
    assert r.status_code == 422
    assert r.json()["errors"][0]["path"] == "data.items[1].sku"
    r = append(shop, ann, sl["id"], items=[{"sku": "braised-pork"}], pickup="C座")
    assert r.status_code == 422 and r.json()["errors"][0]["path"] == "data.pickup"
    r = append(shop, ann, sl["id"], items=[{"sku": "braised-pork", "qty": 0}])
    assert r.status_code == 422
    for _ in range(2):  # max_lines_per_member: 2
        assert append(shop, ann, sl["id"], items=[{"sku": "veg-set"}]).status_code == 200
    refused(append(shop, ann, sl["id"], items=[{"sku": "veg-set"}]), "line_limit_reached")
    r = shop.client.get(f"/v1/member/solitaire/{sl['id']}", headers=ann)
    assert [x["mine"] for x in r.json()["lines"]] == [True, True]
    assert "member_id" not in r.text


def test_minimums_at_close_drop_short_items_and_cancel_a_small_list(shop):
    ann, bea = shop.login("ann"), shop.login("bea")
    definition = {
        "title": "Hotpot",
        "min_total_fen": 5000,
        "items": [
            {"sku": "beef", "name": "肥牛", "price_fen": 3000, "min_to_make": 2},
            {"sku": "tofu", "name": "豆腐", "price_fen": 800},
        ],
    }
    sl = open_list(shop, funnel=None, campaign=None, definition=definition)
    append(shop, ann, sl["id"], items=[{"sku": "beef"}, {"sku": "tofu", "qty": 2}])
    append(shop, bea, sl["id"], items=[{"sku": "tofu", "qty": 5}])
    r = shop.client.post(f"/v1/solitaire/lists/{sl['id']}/close", headers=shop.admin)
    assert r.status_code == 200, r.text
    closed = r.json()["result"]["list"]
    # beef (1 < 2) is not made; the rest is 7 × 8 yuan = 56 yuan ≥ 50: the list runs
    assert closed["status"] == "closed"
    summary = shop.client.get(f"/v1/solitaire/lists/{sl['id']}/summary", headers=shop.admin).json()
    assert {i["sku"]: (i["quantity"], i["made"]) for i in summary["items"]} == {
        "beef": (0, False),
        "tofu": (7, True),
    }
    small = open_list(shop, funnel=None, campaign=None, definition=definition)
    append(shop, ann, small["id"], items=[{"sku": "tofu"}])
    r = shop.client.post(f"/v1/solitaire/lists/{small['id']}/close", headers=shop.admin)
    assert r.json()["result"]["list"]["status"] == "cancelled"
    assert r.json()["result"]["list"]["close_reason"] == "minimum_not_reached"
    assert [e["type"] for e in r.json()["emitted"]] == ["solitaire.cancelled"]


def test_the_group_bot_appends_replies_and_answers_what_it_cannot_read(shop):
    for openid in ("ann", "bea", "cai"):
        shop.login(openid)
    sl = open_list(shop)

    def said(text: str, who: str) -> Any:  # a second apart: each change is announced at once
        shop.clock.advance(ANNOUNCE_EVERY)
        data = {"group_id": "office-lunch-perks", "message_id": text, "text": text}
        return shop.bot.send(event("message.posted", who, **data))

    r = said("＋１　红烧肉饭", "ann")
    assert r.status_code == 200, r.text
    assert r.json()["result"]["outcome"] == "appended" and r.json()["result"]["line"] == 1
    copied = "#接龙 今日午餐接龙\n1. ann  红烧肉饭×1\n2. 🌸bea🌸 番茄炒蛋饭×2 不要葱"
    r = said(copied, "bea")
    assert r.json()["result"]["line"] == 2
    r = said("+1 宫保鸡丁", "cai")  # not on the menu: told, not dropped
    assert r.status_code == 200 and r.json()["result"]["outcome"] == "not_understood"
    [help_msg] = [p for p in shop.outbox("send_message") if p["params"].get("list") == sl["id"]]
    assert help_msg["member"] == {"id": "cai"} and "接龙格式" in help_msg["params"]["text"]
    r = said("今天的红烧肉饭真香", "cai")  # chatter stays chatter
    assert "result" not in r.json()
    lines = shop.client.get(f"/v1/solitaire/lists/{sl['id']}", headers=shop.admin).json()["lines"]
    assert [(x["seq"], x["nickname"], x["items"][0]["qty"], x["note"]) for x in lines] == [
        (1, "ann", 1, None),
        (2, "bea", 2, "不要葱"),
    ]
    r = said("+3 红烧肉饭", "ann")  # over the per-member line limit? no: a second line is fine
    assert r.json()["result"]["line"] == 3
    r = said("+1 素食套餐", "ann")  # a third line: the limit is 2, she is told why
    assert r.json()["result"]["outcome"] == "refused"
    assert r.json()["result"]["reason"] == "line_limit_reached"
    # the bot keeps one message per list up to date: "x / N" and the state
    updates = [p["params"] for p in shop.outbox("update_list_message")]
    assert [u["count"] for u in updates] == [0, 1, 2, 3]  # opened, then each append
    assert {u["message_key"] for u in updates} == {f"solitaire:{sl['id']}"}
    assert [u["revision"] for u in updates] == sorted({u["revision"] for u in updates})
    assert updates[-1]["capacity"] == 180 and updates[-1]["status"] == "open"
    assert updates[-1]["text"].splitlines()[0] == "#接龙 今日午餐接龙 [进行中]"


def test_only_members_of_the_group_may_append(shop):
    ann = shop.login("ann")  # joined office-lunch-perks
    sl = open_list(shop, group="g-other")
    r = append(shop, ann, sl["id"], items=[{"sku": "veg-set"}])
    assert r.status_code == 403 and r.json()["code"] == "not_in_group"
    shop.bot.send(event("member.joined", "ann", group_id="g-other"))
    assert append(shop, ann, sl["id"], items=[{"sku": "veg-set"}]).status_code == 200
    shop.bot.send(event("member.left", "ann", group_id="g-other"))
    r = append(shop, ann, sl["id"], items=[{"sku": "veg-set"}])
    assert r.status_code == 403


def test_a_scheduled_opening_makes_one_list_however_many_workers_look(shop):
    shop.clock.set(OPENS_1030 + timedelta(minutes=5))  # the service was down at 10:30
    now = shop.clock.now()
    for _ in range(3):  # three workers, or three rounds
        with shop.engine.connect() as conn:
            openings = due_openings(conn, now)
        assert [o.data["group"] for o in openings] == ["office-lunch-perks"]
        assert all(r.ok for r in apply_batch(shop.engine, openings, now))
    [sl] = shop.client.get("/v1/solitaire/lists", headers=shop.admin).json()["lists"]
    assert sl["status"] == "open" and sl["opens_at"] == OPENS_1030.isoformat()
    shop.clock.set(OPENS_1030 + timedelta(minutes=31))  # the window passed: nothing new
    with shop.engine.connect() as conn:
        assert [o.data["opens_at"] for o in due_openings(conn, shop.clock.now())] == []


def test_a_roster_takes_names_and_a_delivery_list_takes_addresses(shop):
    ann, bea = shop.login("ann"), shop.login("bea")
    hike = open_list(
        shop, funnel=None, campaign=None, definition={"title": "周六徒步", "roster": True}
    )
    r = append(shop, ann, hike["id"], note="带两瓶水")
    assert r.status_code == 200, r.text
    r = append(shop, bea, hike["id"], on_behalf_of="老李", note="老李和家属")
    assert r.json()["result"]["line"] == 2
    refused_items = append(shop, ann, hike["id"], items=[{"sku": "x"}])
    assert refused_items.status_code == 422
    text = shop.client.get(f"/v1/solitaire/lists/{hike['id']}/text", headers=shop.admin).text
    assert text.splitlines()[1:3] == ["1. ann  带两瓶水", "2. bea (代 老李)  老李和家属"]
    r = shop.client.post(f"/v1/solitaire/lists/{hike['id']}/close", headers=shop.admin)
    assert sorted(e["type"] for e in r.json()["emitted"]) == ["solitaire.closed"] * 2

    delivery = {
        "title": "夜宵",
        "ask_address": True,
        "items": [{"sku": "noodles", "name": "牛肉面", "price_fen": 2200}],
    }
    sl = open_list(shop, funnel=None, campaign=None, definition=delivery)
    r = append(shop, ann, sl["id"], items=[{"sku": "noodles"}])
    assert r.status_code == 422 and r.json()["errors"][0]["path"] == "data.address"
    r = append(shop, ann, sl["id"], items=[{"sku": "noodles"}], address="B座1203")
    assert r.status_code == 200, r.text


def test_a_burst_of_appends_updates_the_list_message_once_with_the_final_list(shop):
    """Appends applied in one batch (group commit under load) render the list's message once,
    after the batch's last event: the bot edits one message, so the final state says all."""
    who = [f"w{i}" for i in range(5)]
    for openid in who:
        shop.login(openid)
    sl = open_list(shop)
    before = len(shop.outbox("update_list_message"))
    line = {"list": sl["id"], "items": [{"sku": "veg-set", "qty": 1}]}
    burst = [command(shop.tenant_id, "solitaire.append", w, **line) for w in who]
    burst.insert(2, command(shop.tenant_id, "solitaire.append", "w0", list=sl["id"], items=[]))
    replies = apply_batch(shop.engine, burst, shop.clock.advance(ANNOUNCE_EVERY))
    assert [r.status for r in replies] == [200, 200, 422, 200, 200, 200]  # one bad line
    assert all("lines" not in r.body["result"]["list"] for r in replies if r.ok)  # lean answers
    updates = [u["params"] for u in shop.outbox("update_list_message")][before:]
    assert len(updates) == 1
    [update] = updates
    assert update["count"] == 5 and update["revision"] == replies[-1].body["event_id"]
    numbered = [ln for ln in update["text"].splitlines() if ln[:1].isdigit() and ". " in ln]
    assert [ln.split(". ")[1].split()[0] for ln in numbered] == who  # every line, in order


def test_a_busy_list_is_announced_once_a_second_and_its_last_change_is_not_lost(shop):
    """While a list is open its message goes out at most once per ANNOUNCE_EVERY: changes in
    between mark it due, and the next change after that, or else the sweep, sends the list as
    it is then. Opening and closing are announced at once."""
    members = [shop.login(f"p{i}") for i in range(5)]
    sl = open_list(shop)
    t0 = shop.clock.now()

    def updates() -> list[dict[str, Any]]:
        found = [u["params"] for u in shop.outbox("update_list_message")]
        return [u for u in found if u["list"] == sl["id"]]  # (the campaign's own list opens too)

    def sweep_at(offset: timedelta) -> list[str]:
        shop.clock.set(t0 + offset)
        return [r.body["type"] for r in shop.sweep() if r.body["type"] == "solitaire.announce"]

    assert [u["count"] for u in updates()] == [0]  # the opening, at once
    for n, offset in enumerate((timedelta(0), ANNOUNCE_EVERY / 2)):
        shop.clock.set(t0 + offset)
        assert append(shop, members[n], sl["id"], items=[{"sku": "veg-set"}]).status_code == 200
    assert len(updates()) == 1  # paced: within a second of the opening's message
    assert sweep_at(ANNOUNCE_EVERY * 0.9) == []  # not due yet
    assert sweep_at(ANNOUNCE_EVERY) == ["solitaire.announce"]  # the last change, not lost
    assert [u["count"] for u in updates()] == [0, 2]
    assert sweep_at(ANNOUNCE_EVERY * 1.1) == []  # sent once

    shop.clock.set(t0 + ANNOUNCE_EVERY * 1.2)  # paced again, due a second after the last
    assert append(shop, members[2], sl["id"], items=[{"sku": "veg-set"}]).status_code == 200
    shop.clock.set(t0 + ANNOUNCE_EVERY * 2.1)  # a change after that is announced at once
    assert append(shop, members[3], sl["id"], items=[{"sku": "veg-set"}]).status_code == 200
    assert [u["count"] for u in updates()] == [0, 2, 4]
    assert sweep_at(ANNOUNCE_EVERY * 3) == []  # nothing left due

    shop.clock.set(t0 + ANNOUNCE_EVERY * 3.1)
    assert append(shop, members[4], sl["id"], items=[{"sku": "veg-set"}]).status_code == 200
    r = shop.client.post(f"/v1/solitaire/lists/{sl['id']}/close", headers=shop.admin)
    assert r.status_code == 200, r.text
    assert [(u["count"], u["status"]) for u in updates()][-1] == (5, "closed")  # at once
    assert sweep_at(ANNOUNCE_EVERY * 5) == []  # the close's message covered the paced one
    revisions = [u["revision"] for u in updates()]
    assert revisions == sorted(set(revisions))


def test_work_deferred_by_a_rolled_back_event_is_dropped_and_failing_work_is_skipped(engine):
    from app.events.dispatch import BatchCache

    ran: list[str] = []
    cache = BatchCache()
    cache.begin_event()
    cache.defer("list", lambda conn: ran.append("kept") or 1)
    cache.end_event()
    cache.begin_event()  # this event fails: its savepoint rolls back, end_event never comes
    cache.defer("list", lambda conn: ran.append("rolled back") or 1)
    cache.begin_event()
    cache.defer("other", lambda conn: 1 // 0)  # a bug in deferred work
    cache.end_event()
    with engine.connect() as conn, conn.begin():
        assert cache.run_deferred(conn) == 1
        assert cache.run_deferred(conn) == 0  # run once
    assert ran == ["kept"]
