"""Solitaire rules, pure: pricing a line, member limits, what closing does, and the texts
(the group message and the kitchen's summary). No I/O, no clock."""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from app import csvfile
from app.errors import FieldProblem

# Why an entry is refused (409 `code`).
NOT_OPEN = "list_not_open"
JOINING_CLOSED = "joining_closed"
EDITING_CLOSED = "editing_closed"
SOLD_OUT = "sold_out"
LINE_LIMIT = "line_limit_reached"
ITEM_LIMIT = "item_limit_reached"
NOT_YOUR_LINE = "not_your_line"
WITHDRAWN = "line_withdrawn"
NOT_IN_GROUP = "not_in_group"

MAX_QTY = 999


@dataclass(frozen=True)
class Priced:
    items: list[dict[str, Any]]  # [{sku, name, qty, price_fen}]
    total_fen: int


def price(
    menu: Mapping[str, Mapping[str, Any]], ordered: Sequence[Mapping[str, Any]], roster: bool
) -> tuple[Priced | None, list[FieldProblem]]:
    """Check and price what a member ordered; problems carry the JSON path at fault."""
    problems: list[FieldProblem] = []
    if roster:
        if ordered:
            problems.append(FieldProblem("data.items", "a roster list takes names, not items"))
        return Priced([], 0), problems
    if not ordered:
        problems.append(FieldProblem("data.items", "order at least one item"))
    merged: dict[str, int] = {}
    for i, entry in enumerate(ordered):
        sku, qty = entry.get("sku"), entry.get("qty", 1)
        if sku not in menu:
            known = ", ".join(sorted(menu))
            problems.append(FieldProblem(f"data.items[{i}].sku", f'no item "{sku}" ({known})'))
            continue
        if not isinstance(qty, int) or isinstance(qty, bool) or not 1 <= qty <= MAX_QTY:
            problems.append(FieldProblem(f"data.items[{i}].qty", f"a whole number 1–{MAX_QTY}"))
            continue
        merged[str(sku)] = merged.get(str(sku), 0) + qty
    if problems:
        return None, problems
    items = [
        {"sku": s, "name": menu[s]["name"], "qty": q, "price_fen": menu[s]["price_fen"]}
        for s, q in merged.items()
    ]
    return Priced(items, sum(i["qty"] * i["price_fen"] for i in items)), []


def member_refusal(
    options: Mapping[str, Any],
    menu: Mapping[str, Mapping[str, Any]],
    other_lines: Sequence[Sequence[Mapping[str, Any]]],
    new_items: Sequence[Mapping[str, Any]],
    adding: bool,
) -> tuple[str, str] | None:
    """Per-member limits: lines per list, quantity per item across the member's lines."""
    cap = options.get("max_lines_per_member")
    if adding and cap is not None and len(other_lines) >= cap:
        return LINE_LIMIT, f"you have {len(other_lines)} line(s) on this list, the most it allows"
    for item in new_items:
        limit = menu[item["sku"]].get("max_per_member")
        if limit is None:
            continue
        had = sum(i["qty"] for line in other_lines for i in line if i["sku"] == item["sku"])
        if had + item["qty"] > limit:
            return ITEM_LIMIT, (
                f"{menu[item['sku']]['name']}: at most {limit} per member "
                f"(you have {had} on other lines)"
            )
    return None


@dataclass
class ClosePlan:
    cancel_reason: str | None = None
    unmade: list[str] = field(default_factory=list)  # skus short of their minimum
    lines: dict[int, Priced] = field(default_factory=dict)  # seq → what is actually made


def plan_close(
    menu: Mapping[str, Mapping[str, Any]],
    options: Mapping[str, Any],
    live: Sequence[tuple[int, Sequence[Mapping[str, Any]]]],
    roster: bool,
) -> ClosePlan:
    """At close: items short of `min_to_make` are not made (taken off every line), and a list
    whose remaining total is under `min_total_fen` is cancelled."""
    plan = ClosePlan()
    if roster:
        plan.lines = {seq: Priced([], 0) for seq, _ in live}
        return plan
    totals: dict[str, int] = {}
    for _, items in live:
        for i in items:
            totals[i["sku"]] = totals.get(i["sku"], 0) + i["qty"]
    plan.unmade = sorted(
        sku
        for sku, n in totals.items()
        if menu.get(sku, {}).get("min_to_make") is not None and n < menu[sku]["min_to_make"]
    )
    for seq, items in live:
        kept = [dict(i) for i in items if i["sku"] not in plan.unmade]
        plan.lines[seq] = Priced(kept, sum(i["qty"] * i["price_fen"] for i in kept))
    total = sum(p.total_fen for p in plan.lines.values())
    minimum = options.get("min_total_fen")
    if not live:
        plan.cancel_reason = "no_orders"
    elif minimum is not None and total < minimum:
        plan.cancel_reason = "minimum_not_reached"
    return plan


# ── texts ─────────────────────────────────────────────────────────────────────────────────
WORDS: dict[str, dict[str, Any]] = {
    "zh": {
        "withdrawn": "(已撤回)",
        "total": "合计",
        "lines": "共 {n} 单",
        "for": "代",
        "status": {
            "scheduled": "未开始",
            "open": "进行中",
            "closed": "已截止",
            "fulfilled": "已完成",
            "cancelled": "已取消",
        },
        "sep": "、",
    },
    "en": {
        "withdrawn": "(withdrawn)",
        "total": "Total",
        "lines": "{n} orders",
        "for": "for",
        "status": {
            "scheduled": "not open yet",
            "open": "open",
            "closed": "closed",
            "fulfilled": "fulfilled",
            "cancelled": "cancelled",
        },
        "sep": ", ",
    },
}


def yuan(fen: int) -> str:
    return f"¥{fen // 100}.{fen % 100:02d}"


def render_text(sl: Mapping[str, Any], lines: Sequence[Mapping[str, Any]], lang: str) -> str:
    """The list as the plain text a bot posts in the group:
    title, note, numbered lines `1. nickname  item×2`, totals."""
    w = WORDS[lang]
    status = w["status"][sl["status"]]
    out = [
        f"#接龙 {sl['title']} [{status}]"
        if lang == "zh"
        else f"#Solitaire {sl['title']} [{status}]"
    ]
    if sl.get("note"):
        out.append(str(sl["note"]))
    totals: dict[str, tuple[str, int]] = {}
    live = 0
    for line in lines:
        who = line["nickname"] or "?"
        if line.get("on_behalf_of"):
            who = f"{who} ({w['for']} {line['on_behalf_of']})"
        if line["status"] == "withdrawn":
            out.append(f"{line['seq']}. {w['withdrawn']}")
            continue
        live += 1
        what = w["sep"].join(f"{i['name']}×{i['qty']}" for i in line["items"])
        extra = "  ".join(x for x in (what, line.get("pickup") or "", line.get("note") or "") if x)
        out.append(f"{line['seq']}. {who}  {extra}".rstrip())
        for i in line["items"]:
            name, n = totals.get(i["sku"], (i["name"], 0))
            totals[i["sku"]] = (name, n + i["qty"])
    summary = w["sep"].join(f"{name}×{n}" for name, n in totals.values())
    amount = sum(line["total_fen"] for line in lines if line["status"] != "withdrawn")
    tail = w["lines"].format(n=live)
    if totals:
        tail = f"{tail}; {summary}; {yuan(amount)}"
    out.append(f"{w['total']}: {tail}")
    return "\n".join(out)


def kitchen(
    menu_items: Sequence[Mapping[str, Any]],
    lines: Sequence[Mapping[str, Any]],
    unmade: Sequence[str] = (),
) -> dict[str, Any]:
    """Totals per item, per pickup point and per member, over the live lines."""
    live = [line for line in lines if line["status"] != "withdrawn"]
    per_item = {
        i["sku"]: {
            "sku": i["sku"],
            "name": i["name"],
            "quantity": 0,
            "amount_fen": 0,
            "made": i["sku"] not in unmade,
        }
        for i in menu_items
    }
    per_pickup: dict[str, dict[str, int]] = {}
    per_member: dict[str, dict[str, Any]] = {}
    for line in live:
        who = line["nickname"] or "?"
        member = per_member.setdefault(
            who, {"member": who, "lines": [], "items": {}, "total_fen": 0}
        )
        member["lines"].append(line["seq"])
        member["total_fen"] += line["total_fen"]
        spot = per_pickup.setdefault(line.get("pickup") or "", {})
        for i in line["items"]:
            row = per_item[i["sku"]]
            row["quantity"] += i["qty"]
            row["amount_fen"] += i["qty"] * i["price_fen"]
            spot[i["sku"]] = spot.get(i["sku"], 0) + i["qty"]
            member["items"][i["sku"]] = member["items"].get(i["sku"], 0) + i["qty"]
    return {
        "items": list(per_item.values()),
        "pickup_points": [{"pickup": k, "items": v} for k, v in per_pickup.items()],
        "members": list(per_member.values()),
        "lines": len(live),
        "total_fen": sum(line["total_fen"] for line in live),
    }


def kitchen_csv(summary: Mapping[str, Any]) -> bytes:
    """The kitchen summary as CSV (app.csvfile: UTF-8 with a BOM for spreadsheets)."""

    def rows() -> Iterator[list[Any]]:
        for i in summary["items"]:
            yield ["item", i["name"], i["sku"], i["quantity"], f"{i['amount_fen'] / 100:.2f}"]
        for p in summary["pickup_points"]:
            for sku, n in p["items"].items():
                yield ["pickup", p["pickup"], sku, n, ""]
        for m in summary["members"]:
            for sku, n in m["items"].items():
                yield ["member", m["member"], sku, n, ""]
            yield ["member_total", m["member"], "", "", f"{m['total_fen'] / 100:.2f}"]

    return csvfile.table(["section", "name", "sku", "quantity", "amount_yuan"], rows())
