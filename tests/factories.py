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
