"""The CLI: validate, simulate (a dry run), migrate and bootstrap against a real SQLite file."""

from __future__ import annotations

import json

import pytest

from app.cli import main
from tests.conftest import EXAMPLE_FUNNELS, FUNNELS
from tests.factories import minimal

SAMPLE = FUNNELS / "office-lunch.events.jsonl"


def test_validate_examples_and_a_broken_file(tmp_path, capsys):
    assert main(["validate", *map(str, EXAMPLE_FUNNELS)]) == 0
    broken = minimal()
    broken["transitions"][0]["to"] = "activ"
    path = tmp_path / "broken.json"
    path.write_text(json.dumps(broken))
    assert main(["validate", str(path)]) == 1
    assert (
        'transitions[0].to: no state named "activ"; did you mean "active"?'
        in capsys.readouterr().out
    )


def test_simulate_takes_a_member_from_acquire_to_refer(capsys):
    assert main(["simulate", str(FUNNELS / "office-lunch.json"), str(SAMPLE), "--json"]) == 0
    steps = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    stages = [s["stage"] for s in steps if s["member"] == "xiaowang" and s["matched"]]
    for stage in ("acquire", "activate", "retain", "revenue", "refer"):
        assert stage in stages
    assert (
        stages.index("acquire")
        < stages.index("activate")
        < stages.index("retain")
        < stages.index("revenue")
        < stages.index("refer")
    )
    last = [s for s in steps if s["member"] == "xiaowang"][-1]
    assert (last["state"], last["status"]) == ("advocate", "completed")
    # timers fire between events: lily's reminder a day after she scanned
    assert any(s["member"] == "lily" and s["timer"] == "t1" and s["matched"] for s in steps)


def test_simulate_human_output_shows_state_stage_and_actions(capsys):
    assert main(["simulate", str(FUNNELS / "office-lunch.json"), str(SAMPLE)]) == 0
    out = capsys.readouterr().out
    assert "advocate [refer] (completed)" in out and "send_message" in out


def test_simulate_refuses_a_timeline_going_back(tmp_path, capsys):
    events = tmp_path / "e.jsonl"
    events.write_text(
        '{"at": "2026-12-01T10:00:00+08:00", "type": "member.joined"}\n'
        '{"at": "2026-12-01T09:00:00+08:00", "type": "message.posted"}\n'
    )
    funnel = tmp_path / "f.json"
    funnel.write_text(json.dumps(minimal()))
    with pytest.raises(ValueError, match="back in time"):
        main(["simulate", str(funnel), str(events)])


def test_bootstrap_migrate_load_and_create_key(tmp_path, monkeypatch, capsys):
    from app.config import get_settings

    monkeypatch.setenv("FLYWHEEL_DATABASE_URL", f"sqlite:///{tmp_path}/cli.db")
    get_settings.cache_clear()
    try:
        assert main(["migrate"]) == 0
        files = [str(p) for p in EXAMPLE_FUNNELS]
        assert main(["load-funnels", "--tenant", "demo", *files]) == 0
        assert main(["load-funnels", "--tenant", "demo", *files]) == 0  # unchanged: no new versions
        out = capsys.readouterr().out
        assert "published version 1" in out and "unchanged, version 1" in out
        assert "flywheel create-key demo" in out
        assert main(["create-key", "demo"]) == 0
        assert "fw_" in capsys.readouterr().out
        assert main(["create-key", "nobody"]) == 1
    finally:
        get_settings.cache_clear()
