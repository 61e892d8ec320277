"""The funnel report against an independent count: a hypothesis-generated stage history,
written to the real database (SQLite and PostgreSQL), counted naively in Python, must equal
what the SQL report, its breakdowns and its daily series say."""

from __future__ import annotations

import json
import math
from collections import defaultdict
from dataclasses import dataclass
from datetime import UTC, date, datetime, timedelta
from typing import Any
from zoneinfo import ZoneInfo

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from sqlalchemy import Engine, delete, insert, select

from app.analytics.funnel import Period, Scope, breakdown, daily, report
from app.clock import FrozenClock
from app.funnels.store import funnel_t, history_t, instance_t
from app.members.models import Member
from tests.conftest import T0, Client, Source, app_for, event, new_tenant, tenant_with_funnel
from tests.factories import minimal

member_t = Member.__table__  # type: ignore[attr-defined]
STAGES = ("acquire", "activate", "retain", "revenue")
CHANNELS = (None, "poster", "qr")
CAMPAIGNS = (None, "spring", "summer")
N_MEMBERS = 6
STEP = timedelta(hours=5)  # entries fall on a 5-hour grid plus jitter: exact window ties happen


@dataclass(frozen=True)
class Stay:
    member: int  # index into the members
    stage: str
    at: datetime
    campaign: str | None
    version: int


def stays(base: datetime) -> st.SearchStrategy[list[Stay]]:
    return st.lists(
        st.builds(
            Stay,
            member=st.integers(0, N_MEMBERS - 1),
            stage=st.sampled_from(STAGES),
            at=st.builds(
                lambda k, us: base + k * STEP + timedelta(microseconds=us),
                st.integers(-6, 30),
                st.sampled_from([0, 0, 1, 999_999]),
            ),
            campaign=st.sampled_from(CAMPAIGNS),
            version=st.sampled_from([1, 1, 2]),
        ),
        max_size=40,
    )


# ── the naive count ─────────────────────────────────────────────────────────────────────────
def _within(a: datetime | None, b: datetime | None, window: timedelta) -> bool:
    return a is not None and b is not None and a <= b <= a + window


def _firsts(
    history: list[Stay], period: Period, key: Any, version: int | None
) -> dict[Any, dict[str, datetime]]:
    firsts: dict[Any, dict[str, datetime]] = defaultdict(dict)
    for s in history:
        if version is not None and s.version != version:
            continue
        if period.start <= s.at < period.end + period.window:
            mine = firsts[key(s)]
            mine[s.stage] = min(mine.get(s.stage, s.at), s.at)
    return firsts


def _nearest_rank(values: list[float], pct: int) -> float | None:
    if not values:
        return None
    values = sorted(values)
    return values[math.ceil(len(values) * pct / 100) - 1]


def naive_report(history: list[Stay], period: Period, version: int | None) -> list[dict[str, Any]]:
    firsts = _firsts(history, period, lambda s: s.member, version)
    w = period.window

    def cohort(t: dict[str, datetime], stage: str) -> bool:
        return stage in t and t[stage] < period.end

    out = []
    for i, stage in enumerate(STAGES):
        members = [t for t in firsts.values() if cohort(t, stage)]
        row: dict[str, Any] = {"stage": stage, "entered": len(members)}
        if i + 1 < len(STAGES):
            nxt = STAGES[i + 1]
            delays = [
                (t[nxt] - t[stage]).total_seconds()
                for t in members
                if _within(t[stage], t.get(nxt), w)
            ]
            row.update(
                converted=len(delays),
                dropped=len(members) - len(delays),
                median_seconds=_nearest_rank(delays, 50),
                p90_seconds=_nearest_rank(delays, 90),
            )
        first = STAGES[0]
        row["reached_from_first"] = sum(
            1 for t in firsts.values() if cohort(t, first) and _within(t[first], t.get(stage), w)
        )
        out.append(row)
    return out


def naive_breakdown(
    history: list[Stay], period: Period, value_of: Any
) -> dict[Any, list[tuple[int, int]]]:
    firsts = _firsts(history, period, lambda s: (s.member, value_of(s)), None)
    out: dict[Any, list[tuple[int, int]]] = {}
    for (_, value), t in firsts.items():
        counts = out.setdefault(value, [(0, 0)] * len(STAGES))
        t0 = t.get(STAGES[0])
        for i, stage in enumerate(STAGES):
            entered = int(stage in t and t[stage] < period.end)
            reached = int(
                t0 is not None and t0 < period.end and _within(t0, t.get(stage), period.window)
            )
            counts[i] = (counts[i][0] + entered, counts[i][1] + reached)
    return out


def naive_daily(history: list[Stay], period: Period) -> dict[str, dict[str, int]]:
    seen: dict[str, dict[str, set[int]]] = defaultdict(lambda: defaultdict(set))
    for s in history:
        if period.start <= s.at < period.end:
            seen[s.at.astimezone(period.zone).date().isoformat()][s.stage].add(s.member)
    return {d: {stage: len(m) for stage, m in by.items()} for d, by in seen.items()}


# ── the database side ───────────────────────────────────────────────────────────────────────
def _setup(engine: Engine) -> tuple[int, int, list[int], list[int]]:
    tenant_id = tenant_with_funnel(engine, "mini", minimal(), T0)
    members, instances = [], []
    with engine.begin() as conn:
        funnel_id = conn.execute(select(funnel_t.c.id)).scalar_one()
        for i in range(N_MEMBERS):
            mid = conn.execute(
                insert(member_t).returning(member_t.c.id),
                {
                    "tenant_id": tenant_id,
                    "external_id": f"m{i}",
                    "attributes": {},
                    "created_at": T0,
                    "acquired_channel": CHANNELS[i % len(CHANNELS)],
                },
            ).scalar_one()
            iid = conn.execute(
                insert(instance_t).returning(instance_t.c.id),
                {
                    "tenant_id": tenant_id,
                    "funnel_id": funnel_id,
                    "member_id": mid,
                    "version": 1,
                    "status": "active",
                    "data": {},
                    "updated_at": T0,
                },
            ).scalar_one()
            members.append(mid)
            instances.append(iid)
    return tenant_id, funnel_id, members, instances


def _write(
    engine: Engine,
    tenant_id: int,
    funnel_id: int,
    members: list[int],
    instances: list[int],
    history: list[Stay],
) -> None:
    with engine.begin() as conn:
        conn.execute(delete(history_t))
        if history:
            conn.execute(
                insert(history_t),
                [
                    {
                        "tenant_id": tenant_id,
                        "funnel_id": funnel_id,
                        "member_id": members[s.member],
                        "instance_id": instances[s.member],
                        "version": s.version,
                        "campaign": s.campaign,
                        "stage": s.stage,
                        "state": s.stage,
                        "entered_at": s.at,
                        "entered_by": "test",
                    }
                    for s in history
                ],
            )


ZONES = ("Asia/Shanghai", "Europe/Berlin", "America/New_York")
# Around the spring daylight-saving change in Berlin and New York (2027-03-14 and 03-28).
BASE = datetime(2027, 3, 13, 0, 0, tzinfo=UTC)


def test_report_equals_a_naive_count(engine: Engine) -> None:
    tenant_id, funnel_id, members, instances = _setup(engine)

    @settings(suppress_health_check=[HealthCheck.too_slow], deadline=None)
    @given(
        history=stays(BASE),
        zone=st.sampled_from(ZONES),
        first_day=st.integers(0, 3),
        days=st.integers(1, 4),
        window_h=st.sampled_from([5, 10, 24, 50]),
        version=st.sampled_from([None, 1]),
    )
    def check(
        history: list[Stay],
        zone: str,
        first_day: int,
        days: int,
        window_h: int,
        version: int | None,
    ) -> None:
        _write(engine, tenant_id, funnel_id, members, instances, history)
        tz = ZoneInfo(zone)
        d0 = date(2027, 3, 13) + timedelta(days=first_day)
        start = datetime(d0.year, d0.month, d0.day, tzinfo=tz)
        d1 = d0 + timedelta(days=days)
        end = datetime(d1.year, d1.month, d1.day, tzinfo=tz)
        period = Period(start, end, timedelta(hours=window_h), tz)
        scope = Scope(tenant_id, funnel_id, version, STAGES)
        with engine.connect() as conn:
            got = report(conn, scope, period)["stages"]
            by_campaign = breakdown(
                conn, Scope(tenant_id, funnel_id, None, STAGES), period, "campaign"
            )
            by_channel = breakdown(
                conn, Scope(tenant_id, funnel_id, None, STAGES), period, "channel"
            )
            series = daily(conn, Scope(tenant_id, funnel_id, None, STAGES), period)

        want = naive_report(history, period, version)
        for g, w in zip(got, want, strict=True):
            assert {k: g[k] for k in w} == w

        campaigns = naive_breakdown(history, period, lambda s: s.campaign)
        assert {
            row["value"]: [(s["entered"], s["reached_from_first"]) for s in row["stages"]]
            for row in by_campaign
        } == campaigns
        channels = naive_breakdown(history, period, lambda s: CHANNELS[s.member % len(CHANNELS)])
        assert {
            row["value"]: [(s["entered"], s["reached_from_first"]) for s in row["stages"]]
            for row in by_channel
        } == channels

        expected = naive_daily(history, period)
        assert [row["date"] for row in series] == [
            (d0 + timedelta(days=i)).isoformat() for i in range(days)
        ]
        for row in series:
            assert {s: row[s] for s in STAGES if row[s]} == expected.get(row["date"], {})

    check()


# ── through the API, from real webhooks ─────────────────────────────────────────────────────
class Mini:
    """A tenant with the minimal funnel (acquire → activate → revenue) and a group bot."""

    def __init__(self, engine: Engine, clock: FrozenClock) -> None:
        clock.set(T0)
        self.client = Client(app_for(engine, clock))
        self.clock = clock
        _, self.admin = new_tenant(engine)
        r = self.client.put("/v1/funnels/mini", json=minimal(), headers=self.admin)
        assert r.status_code == 201, r.text
        self.bot = Source(self.client, self.admin, clock)

    def send(self, type_: str, member: str, **data: object) -> None:
        r = self.bot.send(event(type_, member, **data))
        assert r.status_code == 200, r.text

    def get(self, url: str, **params: object) -> Any:
        r = self.client.get(url, params=params, headers=self.admin)
        assert r.status_code == 200, r.text
        return r.json() if r.headers["content-type"].startswith("application/json") else r.text


@pytest.fixture
def mini(engine: Engine, clock: FrozenClock) -> Mini:
    return Mini(engine, clock)


def test_the_report_counts_what_webhooks_did(mini: Mini) -> None:
    # Five members join (three from the poster, two invited by m0); four talk, two buy.
    for i in range(5):
        who = {"channel": "poster"} if i < 3 else {"channel": "invite", "inviter_id": "m0"}
        mini.send("member.joined", f"m{i}", group_id="g1", **who)
    mini.clock.advance(timedelta(hours=1))
    for i in range(4):
        mini.send("message.posted", f"m{i}", group_id="g1", message_id=f"msg{i}")
    mini.clock.advance(timedelta(hours=2))
    for i in (0, 3):
        mini.send("order.paid", f"m{i}", order_id=f"o{i}", amount_fen=5000)
    mini.send("order.paid", "m4", order_id="o4", amount_fen=5000)  # m4 never talked: no move

    day = T0.astimezone(ZoneInfo("Asia/Shanghai")).date().isoformat()
    body = mini.get("/v1/reports/funnels/mini", **{"from": day, "to": day})
    assert body["timezone"] == "Asia/Shanghai" and body["window"] == "P30D"
    acquire, activate, revenue = body["stages"]
    assert (acquire["entered"], activate["entered"], revenue["entered"]) == (5, 4, 2)
    assert acquire["converted"] == 4 and acquire["dropped"] == 1 and acquire["conversion"] == 0.8
    assert acquire["median_seconds"] == 3600.0 and acquire["p90_seconds"] == 3600.0
    assert activate["converted"] == 2 and activate["median_seconds"] == 7200.0
    assert revenue["conversion_from_first"] == 0.4 and revenue["reached_from_first"] == 2
    assert body["daily"] == [{"date": day, "acquire": 5, "activate": 4, "revenue": 2}]

    # A one-hour window: the joins converted in exactly an hour, the purchases took two.
    short = mini.get("/v1/reports/funnels/mini", **{"from": day, "to": day, "window": "PT1H"})
    assert [s.get("converted") for s in short["stages"]] == [4, 0, None]

    by_channel = mini.get("/v1/reports/funnels/mini/breakdown", by="channel", **{"from": day})
    counts = {v["value"]: [s["entered"] for s in v["stages"]] for v in by_channel["values"]}
    assert counts == {"poster": [3, 3, 1], "invite": [2, 1, 1]}
    by_inviter = mini.get("/v1/reports/funnels/mini/breakdown", by="inviter", **{"from": day})
    assert {v["value"]: v["stages"][0]["entered"] for v in by_inviter["values"]} == {
        None: 3,
        "m0": 2,
    }
    by_group = mini.get("/v1/reports/funnels/mini/breakdown", by="group", **{"from": day})
    assert [v["value"] for v in by_group["values"]] == ["g1"]

    csv_text = mini.get("/v1/reports/funnels/mini", format="csv", **{"from": day, "to": day})
    lines = csv_text.lstrip("\ufeff").splitlines()
    assert lines[0].startswith("stage,entered,next_stage,converted")
    assert lines[1].startswith("acquire,5,activate,4,1,0.8,3600.0,3600.0,5,1.0")

    members = mini.get("/v1/reports/funnels/mini/members", stage="revenue")
    rows = members.lstrip("\ufeff").splitlines()
    assert rows[0].split(",")[:3] == ["external_id", "nickname", "stage"]
    assert sorted(r.split(",")[0] for r in rows[1:]) == ["m0", "m3"]
    assert "invite" in next(r for r in rows[1:] if r.startswith("m3"))


def test_first_touch_attribution_is_kept(mini: Mini) -> None:
    mini.send("member.scanned", "m1", channel="qr-lobby")
    mini.send("member.joined", "m1", group_id="g2", channel="poster", inviter_id="m9")
    mini.send("member.joined", "m1", group_id="g3", channel="other", inviter_id="m8")
    by = mini.get("/v1/reports/funnels/mini/breakdown", by="channel")
    assert [v["value"] for v in by["values"]] == ["qr-lobby"]
    by = mini.get("/v1/reports/funnels/mini/breakdown", by="group")
    assert [v["value"] for v in by["values"]] == ["g2"]
    by = mini.get("/v1/reports/funnels/mini/breakdown", by="inviter")
    assert [v["value"] for v in by["values"]] == ["m9"]


@pytest.mark.parametrize(
    ("params", "path"),
    [
        ({"from": "2026-12-05", "to": "2026-12-01"}, "query:from"),
        ({"from": "2020-01-01", "to": "2026-12-01"}, "query:to"),
        ({"window": "P1M"}, "query:window"),
        ({"window": "soon"}, "query:window"),
        ({"from": "yesterday"}, "query:from"),
        ({"version": 0}, "query:version"),
    ],
)
def test_bad_report_parameters_are_problems_with_the_parameter_named(
    mini: Mini, params: dict[str, object], path: str
) -> None:
    r = mini.client.get("/v1/reports/funnels/mini", params=params, headers=mini.admin)
    assert r.status_code == 422, r.text
    assert r.headers["content-type"].startswith("application/problem+json")
    assert path in [e["path"] for e in r.json()["errors"]]


def test_reports_of_unknown_funnels_stages_and_dimensions(mini: Mini) -> None:
    r = mini.client.get("/v1/reports/funnels/nope", headers=mini.admin)
    assert r.status_code == 404
    r = mini.client.get("/v1/reports/funnels/mini", params={"version": 9}, headers=mini.admin)
    assert r.status_code == 404
    r = mini.client.get("/v1/reports/funnels/mini/members?stage=sleep", headers=mini.admin)
    assert r.status_code == 422 and r.json()["errors"][0]["path"] == "query:stage"
    r = mini.client.get("/v1/reports/funnels/mini/breakdown?by=color", headers=mini.admin)
    assert r.status_code == 422 and r.json()["errors"][0]["path"] == "query:by"
    r = mini.client.get("/v1/reports/funnels/mini")
    assert r.status_code == 401


# ── what-if replay ──────────────────────────────────────────────────────────────────────────
def _traffic(mini: Mini) -> None:
    for i in range(4):
        mini.send("member.joined", f"m{i}", group_id="g1")
    mini.clock.advance(timedelta(minutes=5))
    for i in range(3):
        mini.send("message.posted", f"m{i}", group_id="g1", message_id=f"x{i}")
    mini.clock.advance(timedelta(minutes=5))
    mini.send("order.paid", "m0", order_id="o0", amount_fen=5000)
    mini.send("order.paid", "m3", order_id="o3", amount_fen=5000)


def _draft() -> dict[str, Any]:
    """Activation by a purchase instead of a message."""
    doc = minimal()
    doc["transitions"][0] = {"from": "joined", "to": "active", "event": "order.paid"}
    return doc


def test_replay_counts_what_a_draft_would_have_done_and_writes_nothing(
    mini: Mini, engine: Engine, tmp_path: Any, monkeypatch: pytest.MonkeyPatch, capsys: Any
) -> None:
    _traffic(mini)
    day = T0.astimezone(ZoneInfo("Asia/Shanghai")).date().isoformat()
    before = mini.get("/v1/reports/funnels/mini")
    r = mini.client.post(
        "/v1/reports/funnels/mini/replay",
        json={"definition": _draft(), "from": day, "to": day},
        headers=mini.admin,
    )
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["events"] == 9 and body["members"] == 4
    assert [(s["stage"], s["real"], s["would"]) for s in body["stages"]] == [
        ("acquire", 4, 4),
        ("activate", 3, 2),
        ("revenue", 1, 0),
    ]
    assert mini.get("/v1/reports/funnels/mini") == before  # nothing written

    bad = _draft()
    bad["transitions"][0]["to"] = "nowhere"
    r = mini.client.post(
        "/v1/reports/funnels/mini/replay",
        json={"definition": bad, "from": day, "to": day},
        headers=mini.admin,
    )
    assert r.status_code == 422
    assert any(e["path"].startswith("definition.transitions[0]") for e in r.json()["errors"])
    r = mini.client.post(
        "/v1/reports/funnels/mini/replay",
        json={"definition": {**_draft(), "key": "other"}, "from": day, "to": day},
        headers=mini.admin,
    )
    assert r.status_code == 422 and r.json()["errors"][0]["path"] == "definition.key"

    # The CLI: the same numbers, with a progress bar on stderr.
    from app.cli import main
    from app.config import get_settings

    draft = tmp_path / "draft.json"
    draft.write_text(json.dumps(_draft()))
    monkeypatch.setenv("FLYWHEEL_DATABASE_URL", engine.url.render_as_string(hide_password=False))
    get_settings.cache_clear()
    try:
        args = ["replay", str(draft), "--tenant", "acme", "--from", day, "--to", day]
        assert main(args) == 0
        out, err = capsys.readouterr()
        assert "100%" in err and "9/9 events" in err
        assert "activate            3          2         -1" in out
        assert main([*args[:1], "mini:1", *args[2:], "--json"]) == 0
        result = json.loads(capsys.readouterr().out)
        assert [s["would"] for s in result["stages"]] == [4, 3, 1]  # the live version itself
        assert main([*args[:1], "mini:7", *args[2:]]) == 1
        assert "no version 7" in capsys.readouterr().err
    finally:
        get_settings.cache_clear()
