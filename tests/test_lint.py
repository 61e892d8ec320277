"""Platform rules as lint: a reward for sharing, liking or helping (集赞, 助力, 砍价) and a
group-buy with no stated end are warned about, with the JSON path, when a funnel is
validated or published — and a clean funnel gets no warning."""

from __future__ import annotations

import copy
import json

import pytest

from app.engine.definition import FunnelDefinition
from app.engine.lint import induced, platform_warnings
from tests.conftest import FUNNELS, new_tenant
from tests.test_groupbuy import LUNCH


def with_induced_rewards() -> dict:  # type: ignore[type-arg]
    doc = copy.deepcopy(LUNCH)
    doc["custom_events"] = [{"name": "post.liked"}, {"name": "bargain.helped"}]
    doc["transitions"] += [
        {
            "from": "in_group",
            "to": "in_group",
            "event": "post.liked",
            "actions": [{"type": "grant_points", "points": 5}],
        },
        {"from": "in_group", "to": "advocate", "event": "bargain.helped"},
    ]
    doc["states"]["advocate"]["on_enter"] = [{"type": "pay_red_packet", "amount_fen": 100}]
    doc["mechanics"]["referral"]["colleagues"]["qualify_event"] = "post.liked"
    del doc["mechanics"]["groupbuy"]["lunch-team"]["ends_at"]
    return doc


def test_rewards_for_likes_and_helps_and_open_ended_group_buys_are_warned_about():
    doc = with_induced_rewards()
    n = len(LUNCH["transitions"])
    warnings = {w.path: w.message for w in platform_warnings(FunnelDefinition.model_validate(doc))}
    assert set(warnings) == {
        f"transitions[{n}].actions",
        f"transitions[{n + 1}].event",
        "mechanics.referral.colleagues.qualify_event",
        "mechanics.groupbuy.lunch-team.ends_at",
    }
    assert "集赞" in warnings[f"transitions[{n}].actions"]


@pytest.mark.parametrize("path", sorted(FUNNELS.glob("*.json")))
def test_the_example_funnels_break_no_platform_rule(path):
    if path.name == "funnel.schema.json":
        return
    doc = json.loads(path.read_text())
    assert platform_warnings(FunnelDefinition.model_validate(doc)) == []


def test_induced_names():
    for name in ("post.liked", "share.completed", "moments.shared", "bargain.helped", "zhuli.done"):
        assert induced(name), name
    for name in ("order.paid", "member.joined", "review.posted", "shareholder.met", "likely.x"):
        assert not induced(name), name


def test_validate_and_publish_answer_with_the_warnings(engine, client):
    _, admin = new_tenant(engine)
    doc = with_induced_rewards()
    r = client.post("/v1/funnels/validate", json=doc, headers=admin)
    assert r.status_code == 200, r.text
    assert r.json()["valid"] is True and len(r.json()["warnings"]) == 4
    r = client.put("/v1/funnels/office-lunch", json=doc, headers=admin)
    assert r.status_code == 201, r.text  # a warning does not stop publishing
    paths = [w["path"] for w in r.json()["warnings"]]
    assert "mechanics.groupbuy.lunch-team.ends_at" in paths
    r = client.get("/v1/funnels/office-lunch/versions/1", headers=admin)
    assert len(r.json()["warnings"]) == 4
    r = client.post("/v1/funnels/validate", json=LUNCH, headers=admin)
    assert r.json()["warnings"] == []
