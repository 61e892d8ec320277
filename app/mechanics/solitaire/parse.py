"""Reading a solitaire reply posted in the group, pure.

Two shapes are common in WeChat groups:
- a short reply: `+1 宫保鸡丁`, `+2 红烧肉饭 番茄炒蛋饭`, `+红烧肉饭×2`, `+1` (a roster);
- the whole list copied back with one new line appended: `#接龙 …` then `1. 小王 红烧肉饭`,
  …, and `N. 我 番茄炒蛋饭×2`. The new line is the one numbered past the list's last number
  (or the last line, unnumbered).

Text is normalized with NFKC first, so full-width `＋１　红烧肉饭＊２` reads like `+1 红烧肉饭*2`.
Items are matched by name (longest first, so 红烧肉饭 wins over 肉饭) or by sku; a quantity is
`×2`, `x2`, `*2`, `2份` after a name, `2份` before it, or the `+N` of a short reply.
"""

from __future__ import annotations

import re
import unicodedata
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

HEADER = "#接龙"
_NUMBERED = re.compile(r"^\s*(\d{1,4})\s*[.、)](?!\d)\s*(.*)$")  # not a time: 11:30, 11.30
_UNIT = r"(?:份|个|盒|杯|碗)"
_SHORT = re.compile(r"^\s*\+\s*(\d{1,3})?\s*" + _UNIT + r"?\s*(.*)$", re.S)
_AFTER = re.compile(r"^\s*(?:[x×*]\s*(\d{1,3})|(\d{1,3})\s*(?:份|个|盒|杯|碗))")
_BEFORE = re.compile(r"(\d{1,3})\s*(?:份|个|盒|杯|碗)\s*$")
FORMAT_HELP = "接龙格式: +1 菜名 (例: +1 红烧肉饭, +红烧肉饭×2), 或复制接龙并在末尾加一行"


@dataclass(frozen=True)
class Reply:
    items: list[dict[str, Any]] = field(default_factory=list)  # [{sku, qty}]
    note: str | None = None


@dataclass(frozen=True)
class NotUnderstood:
    reason: str


def normalize(text: str) -> str:
    text = unicodedata.normalize("NFKC", text)
    return text.replace("\u3000", " ").replace("＋", "+").strip()


def is_reply(text: str) -> bool:
    """Does this group message look like a solitaire reply at all? (Chatter is left alone.)"""
    t = normalize(text)
    return t.startswith("+") or t.startswith(HEADER)


def parse(
    text: str, menu: Sequence[Mapping[str, Any]], roster: bool, last_seq: int
) -> Reply | NotUnderstood:
    t = normalize(text)
    if t.startswith(HEADER):
        return _copied(t, menu, roster, last_seq)
    short = _SHORT.match(t)
    if short is None:
        return NotUnderstood("not a solitaire reply")
    count = int(short.group(1)) if short.group(1) else None
    rest = short.group(2).strip()
    if roster:
        return Reply([], rest or None)
    if count is not None and count < 1:
        return NotUnderstood("+0 orders nothing")
    return _items(rest, menu, default_qty=count or 1)


def _copied(
    t: str, menu: Sequence[Mapping[str, Any]], roster: bool, last_seq: int
) -> Reply | NotUnderstood:
    body = [line for line in t.splitlines()[1:] if line.strip()]
    new: list[str] = []
    for line in body:
        m = _NUMBERED.match(line)
        if m and int(m.group(1)) > last_seq:
            new.append(m.group(2))
    if not new and body and not _NUMBERED.match(body[-1]):
        new = [body[-1]]  # appended without a number
    if not new:
        return NotUnderstood("no new line after the list's last number")
    if len(new) > 1:
        return NotUnderstood("more than one new line: add one line per reply")
    content = new[0].strip()
    if roster:
        return Reply([], content or None)
    # groups write the poster's name first, then the items: read past the name when that
    # leaves a reading (so the name does not end up in the note), else read it all
    if " " in content:
        without_name = _items(content.split(" ", 1)[1], menu, default_qty=1)
        if isinstance(without_name, Reply):
            return without_name
    return _items(content, menu, default_qty=1)


def _items(text: str, menu: Sequence[Mapping[str, Any]], default_qty: int) -> Reply | NotUnderstood:
    """Find menu items in free text, with their quantities; what is left is the note."""
    names = sorted(
        [(str(i["name"]), str(i["sku"])) for i in menu]
        + [(str(i["sku"]), str(i["sku"])) for i in menu],
        key=lambda p: -len(p[0]),
    )
    found: dict[str, int] = {}
    rest = text
    for name, sku in names:
        while True:
            at = rest.lower().find(name.lower())
            if at < 0:
                break
            before, after = rest[:at], rest[at + len(name) :]
            qty = default_qty
            m_after = _AFTER.match(after)
            m_before = _BEFORE.search(before)
            if m_after:
                qty = int(m_after.group(1) or m_after.group(2))
                after = after[m_after.end() :]
            elif m_before:
                qty = int(m_before.group(1))
                before = before[: m_before.start()]
            if qty < 1:
                return NotUnderstood(f"{name}: a quantity of 0")
            found[sku] = found.get(sku, 0) + qty
            rest = before + " " + after
    if not found:
        return NotUnderstood("no item of the menu in the reply")
    note = re.sub(r"\s+", " ", rest).strip(" ,，、;；") or None
    return Reply([{"sku": s, "qty": q} for s, q in found.items()], note)
