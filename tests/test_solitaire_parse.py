"""Reading solitaire replies as group members really write them."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from app.mechanics.solitaire.parse import NotUnderstood, Reply, is_reply, parse

MENU = [
    {"sku": "braised-pork", "name": "红烧肉饭"},
    {"sku": "tomato-egg", "name": "番茄炒蛋饭"},
    {"sku": "veg-set", "name": "素食套餐"},
    {"sku": "pork", "name": "肉饭"},  # a name inside another: the longer one wins
]


@pytest.mark.parametrize(
    ("text", "items", "note"),
    [
        ("+1 红烧肉饭", [("braised-pork", 1)], None),
        ("+2 番茄炒蛋饭", [("tomato-egg", 2)], None),
        ("＋１　红烧肉饭", [("braised-pork", 1)], None),  # full-width plus, digit and space
        ("+红烧肉饭×2", [("braised-pork", 2)], None),
        ("+红烧肉饭x3 素食套餐*1", [("braised-pork", 3), ("veg-set", 1)], None),
        ("+ 红烧肉饭＊２", [("braised-pork", 2)], None),  # full-width asterisk and digit
        ("+2份红烧肉饭 不要辣", [("braised-pork", 2)], "不要辣"),
        ("+红烧肉饭 2份, 少饭", [("braised-pork", 2)], "少饭"),
        ("+1 肉饭", [("pork", 1)], None),
        ("+1 veg-set", [("veg-set", 1)], None),
    ],
)
def test_short_replies(text, items, note):
    got = parse(text, MENU, roster=False, last_seq=0)
    assert isinstance(got, Reply), got
    assert sorted((i["sku"], i["qty"]) for i in got.items) == sorted(items)
    assert got.note == note


def test_the_copied_list_with_one_new_line():
    text = (
        "#接龙 今日午餐接龙\n"
        "11:30 前台自取\n"
        "1. 小王  红烧肉饭×1\n"
        "2. 🌸Lily🌸  番茄炒蛋饭×2\n"
        "3. 阿May😊 素食套餐×1 少饭\n"
    )
    got = parse(text, MENU, roster=False, last_seq=2)
    assert isinstance(got, Reply), got
    assert got.items == [{"sku": "veg-set", "qty": 1}] and got.note == "少饭"
    unnumbered = "#接龙 今日午餐接龙\n1. 小王  红烧肉饭×1\n🌸Lily🌸 番茄炒蛋饭"
    got = parse(unnumbered, MENU, roster=False, last_seq=1)
    assert isinstance(got, Reply) and got.items == [{"sku": "tomato-egg", "qty": 1}]


@pytest.mark.parametrize(
    ("text", "last_seq", "reason"),
    [
        ("+1 宫保鸡丁", 0, "no item of the menu"),
        ("+0 红烧肉饭", 0, "+0"),
        ("#接龙 午餐\n1. 小王 红烧肉饭", 1, "no new line"),
        ("#接龙 午餐\n1. 小王 红烧肉饭\n2. A 素食套餐\n3. B 素食套餐", 1, "more than one"),
        ("+红烧肉饭×0", 0, "quantity of 0"),
    ],
)
def test_malformed_replies_say_why(text, last_seq, reason):
    got = parse(text, MENU, roster=False, last_seq=last_seq)
    assert isinstance(got, NotUnderstood) and reason in got.reason


def test_roster_replies_take_a_name():
    assert parse("+1 张三 带家属", MENU, roster=True, last_seq=0) == Reply([], "张三 带家属")
    assert parse("+1", MENU, roster=True, last_seq=0) == Reply([], None)


def test_chatter_is_not_a_reply():
    assert not is_reply("今天的红烧肉饭真好吃")
    assert not is_reply("1+1=2")
    assert is_reply("  ＋1 红烧肉饭") and is_reply("#接龙 午餐\n1. 小王 红烧肉饭")


@given(st.text(max_size=200))
def test_any_text_is_read_or_refused_never_crashes(text):
    got = parse(text, MENU, roster=False, last_seq=3)
    assert isinstance(got, Reply | NotUnderstood)
    if isinstance(got, Reply):
        assert got.items and all(i["qty"] >= 1 for i in got.items)
