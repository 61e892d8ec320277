"""Validation a marketer can act on: every problem at once, each with its JSON path."""

from __future__ import annotations

import json

import pytest

from app.engine import compile_document, load_and_compile
from app.errors import InvalidDefinition
from tests.conftest import EXAMPLE_FUNNELS
from tests.factories import minimal, office_lunch


def problems(doc) -> dict[str, str]:
    with pytest.raises(InvalidDefinition) as info:
        if isinstance(doc, (str, bytes)):
            load_and_compile(doc)
        else:
            compile_document(doc)
    return {p.path: p.message for p in info.value.problems}


@pytest.mark.parametrize("path", EXAMPLE_FUNNELS, ids=lambda p: p.name)
def test_every_example_funnel_is_valid(path):
    funnel = load_and_compile(path.read_bytes())
    assert funnel.definition.states


def test_unknown_target_state_with_suggestion():
    doc = minimal()
    doc["states"]["payed"] = doc["states"].pop("buyer")
    doc["transitions"][1]["to"] = "paid"
    found = problems(doc)
    assert found["transitions[1].to"] == 'no state named "paid"; did you mean "payed"?'


def test_all_problems_are_reported_at_once():
    doc = minimal(initial="start")
    doc["transitions"][0]["to"] = "nowhere"
    doc["transitions"][1]["event"] = "order.payed"
    doc["transitions"][1]["guard"] = "event.amount_fen >="
    found = problems(doc)
    assert set(found) >= {
        "initial",
        "transitions[0].to",
        "transitions[1].event",
        "transitions[1].guard",
    }
    assert found["transitions[1].event"].startswith(
        'unknown event "order.payed"; did you mean "order.paid" or "order.placed"?'
    )
    assert found["transitions[1].guard"].startswith("guard does not compile: syntax error")


def test_unreachable_state():
    doc = minimal()
    doc["states"]["orphan"] = {"stage": "refer"}
    assert problems(doc) == {
        "states.orphan": '"orphan" cannot be reached from the initial state "joined"'
    }


def test_transition_out_of_a_final_state():
    doc = minimal()
    doc["transitions"].append({"from": "buyer", "to": "active", "event": "message.posted"})
    assert (
        problems(doc)["transitions[2].from"]
        == '"buyer" is a final state; no transition can leave it'
    )


def test_timer_that_can_never_fire():
    doc = minimal()
    doc["transitions"] += [
        {"from": "joined", "to": "buyer", "after": "P1D"},
        {"from": "joined", "to": "active", "after": "P3D"},
    ]
    assert problems(doc) == {
        "transitions[3].after": 'never fires: from "joined" transitions[2] always fires first'
    }


def test_cron_that_never_fires():
    doc = minimal()
    doc["transitions"].append({"from": "joined", "to": "buyer", "cron": "0 0 30 2 *"})
    assert problems(doc)["transitions[2].cron"] == '"0 0 30 2 *" never fires (no such date)'


def test_event_transition_shadowed_by_an_unguarded_twin():
    doc = minimal()
    doc["transitions"].append({"from": "joined", "to": "buyer", "event": "message.posted"})
    assert "never fires" in problems(doc)["transitions[2].event"]


def test_guard_reading_unknown_names():
    doc = minimal()
    doc["transitions"][1]["guard"] = "order.amount > 3 && os.system('x')"
    assert "unknown names order, os" in problems(doc)["transitions[1].guard"]


def test_guard_comprehension_variables_are_allowed():
    doc = minimal()
    doc["transitions"][1]["guard"] = 'event.tags.exists(t, t == "vip")'
    compile_document(doc)


def test_unknown_mechanic_reference():
    doc = office_lunch()
    doc["transitions"][4]["actions"] = [
        {"type": "call_mechanic", "mechanic": "groupbuy.lunch-teem", "operation": "remind"}
    ]
    assert problems(doc)["transitions[4].actions[0].mechanic"] == (
        'no mechanic named "groupbuy.lunch-teem"; did you mean "groupbuy.lunch-team"?'
    )


def test_template_with_unknown_field():
    doc = minimal()
    doc["states"]["joined"]["on_enter"] = [
        {"type": "send_message", "template": "hi {{ user.name }}"}
    ]
    assert "unknown name" in problems(doc)["states.joined.on_enter[0].template"]


def test_duplicate_keys_are_reported_with_their_path():
    text = json.dumps(minimal())
    text = text.replace(
        '"joined": {"stage": "acquire"}', '"joined": {"stage": "acquire", "stage": "retain"}'
    )
    assert problems(text) == {
        "states.joined.stage": 'duplicate key "stage": only the last value would be kept'
    }


def test_unknown_key_suggests_the_right_one():
    doc = minimal()
    doc["transitions"][0]["gaurd"] = "true"
    assert problems(doc) == {"transitions[0].gaurd": 'unknown key "gaurd"; did you mean "guard"?'}


def test_structural_errors_have_document_paths():
    doc = minimal()
    doc["states"]["joined"]["stage"] = "acquisition"
    doc["transitions"][0]["after"] = "P1M"
    doc["states"]["joined"]["on_enter"] = [{"type": "teleport"}]
    found = problems(doc)
    assert "acquire" in found["states.joined.stage"]
    assert "years and months" in found["transitions[0].after"]
    assert "teleport" in found["states.joined.on_enter[0]"]


def test_transition_needs_exactly_one_trigger():
    doc = minimal()
    del doc["transitions"][0]["event"]
    assert problems(doc) == {
        "transitions[0]": "needs exactly one trigger of event, after, cron or at"
    }


def test_referral_depth_above_two_is_refused():
    doc = office_lunch()
    doc["mechanics"]["referral"]["colleagues"]["depth"] = 3
    assert "less than or equal to 2" in problems(doc)["mechanics.referral.colleagues.depth"]


def test_group_buy_configuration_is_checked():
    doc = office_lunch()
    team = doc["mechanics"]["groupbuy"]["lunch-team"]
    team["team_size"] = 60
    team["price_fen"] = 100  # and discount_percent: both set
    found = problems(doc)
    assert "mechanics.groupbuy.lunch-team.team_size" in found


def test_bad_json_and_non_objects():
    assert problems("{") == {
        "": "not valid JSON: Expecting property name enclosed in double quotes at line 1 column 2"
    }
    assert problems("[]") == {"": "a funnel definition is a JSON object"}


def test_bad_time_zone_duration_and_local_time():
    doc = minimal(timezone="Mars/Olympus")
    doc["transitions"][0] = {"from": "joined", "to": "active", "at": {"time": "25:00"}}
    found = problems(doc)
    assert "IANA time zone" in found["timezone"]
    assert "24-hour time" in found["transitions[0].at.time"]


def test_migration_targets_must_exist():
    doc = minimal(migrations=[{"from_version": 1, "states": {"old": "gone"}}])
    assert list(problems(doc)) == ["migrations[0].states.old"]
