"""Plain factory functions for funnel documents."""

from __future__ import annotations

import copy
import json
from typing import Any

from tests.conftest import FUNNELS


def office_lunch() -> dict[str, Any]:
    return json.loads((FUNNELS / "office-lunch.json").read_text(encoding="utf-8"))


def minimal(**overrides: Any) -> dict[str, Any]:
    doc: dict[str, Any] = {
        "key": "mini",
        "name": "Minimal",
        "entry": {"events": ["member.joined"]},
        "initial": "joined",
        "states": {
            "joined": {"stage": "acquire"},
            "active": {"stage": "activate"},
            "buyer": {"stage": "revenue", "final": True},
        },
        "transitions": [
            {"from": "joined", "to": "active", "event": "message.posted"},
            {
                "from": "active",
                "to": "buyer",
                "event": "order.paid",
                "guard": "event.amount_fen >= 3000",
            },
        ],
    }
    doc.update(copy.deepcopy(overrides))
    return doc


def welcome(**overrides: Any) -> dict[str, Any]:
    """A funnel with actions and a timer: joined members get a welcome; silent ones a nudge
    after an hour; a paid order of 30 yuan or more makes a buyer and earns a voucher."""
    doc: dict[str, Any] = {
        "key": "welcome",
        "name": "Welcome",
        "entry": {"events": ["member.joined"]},
        "initial": "joined",
        "custom_events": [{"name": "poll.answered"}],
        "states": {
            "joined": {
                "stage": "acquire",
                "on_enter": [{"type": "send_message", "template": "Welcome {{ member.nickname }}"}],
            },
            "nudged": {"stage": "acquire"},
            "active": {"stage": "activate"},
            "buyer": {"stage": "revenue", "final": True},
        },
        "transitions": [
            {"from": "joined", "to": "active", "event": "message.posted"},
            {"from": "joined", "to": "active", "event": "poll.answered"},
            {
                "from": "joined",
                "to": "nudged",
                "after": "PT1H",
                "actions": [{"type": "send_message", "template": "Say hello!"}],
            },
            {"from": "nudged", "to": "active", "event": "message.posted"},
            {
                "from": "active",
                "to": "buyer",
                "event": "order.paid",
                "guard": "event.amount_fen >= 3000",
                "actions": [{"type": "issue_voucher", "voucher": "next-lunch", "value_fen": 500}],
            },
        ],
    }
    doc.update(copy.deepcopy(overrides))
    return doc
