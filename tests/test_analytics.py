"""The funnel report against an independent count: a hypothesis-generated stage history,
written to the real database (SQLite and PostgreSQL), counted naively in Python, must equal
what the SQL report, its breakdowns and its daily series say."""

from __future__ import annotations

import json
import math
from collections import Counter, defaultdict
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from datetime import UTC, date, datetime, timedelta
from types import SimpleNamespace
from typing import Any
from zoneinfo import ZoneInfo

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from sqlalchemy import Engine, delete, func, insert, select

from app.analytics.funnel import Period, Scope, breakdown, daily, nth_of_two, report
from app.clock import FrozenClock
from app.engine.state import StageChange
from app.funnels.entries import BOUNDS, HOUR_US, pair_t, roll_up, roll_up_all, rollup_t, tally
from app.funnels.store import funnel_t, history_t, instance_t, record_stage_changes
from app.members.models import Member
from tests.conftest import T0, Client, Source, app_for, event, new_tenant, tenant_with_funnel
from tests.factories import minimal

member_t = Member.__table__  # type: ignore[attr-defined]
STAGES = ("acquire", "activate", "retain", "revenue")
CHANNELS = (None, "poster", "qr")
CAMPAIGNS = (None, "spring", "summer")
N_MEMBERS = 8
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
                lambda k, minutes, us: (
                    base + k * STEP + timedelta(minutes=minutes, microseconds=us)
                ),
                st.integers(-6, 30),
                st.sampled_from([0, 0, 30, 45]),  # :30 and :45: local midnights in Kolkata, Nepal
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


def _in(period: Period, at: datetime | None) -> bool:
    return at is not None and period.start <= at < period.end


def _firsts(history: list[Stay], version: int | None) -> dict[int, dict[str, Stay]]:
    """Each member's first stay in each stage, ever (of one version, or of any)."""
    firsts: dict[int, dict[str, Stay]] = defaultdict(dict)
    for s in sorted(history, key=lambda s: s.at):  # stable: the order written breaks ties
        if version is None or s.version == version:
            firsts[s.member].setdefault(s.stage, s)
    return firsts


def _at(first: dict[str, Stay], stage: str) -> datetime | None:
    return first[stage].at if stage in first else None


def _nearest_rank(values: list[float], pct: int) -> float | None:
    if not values:
        return None
    values = sorted(values)
    return values[math.ceil(len(values) * pct / 100) - 1]


def naive_report(history: list[Stay], period: Period, version: int | None) -> list[dict[str, Any]]:
    firsts = _firsts(history, version).values()
    w = period.window
    out = []
    for i, stage in enumerate(STAGES):
        members = [t for t in firsts if _in(period, _at(t, stage))]
        row: dict[str, Any] = {"stage": stage, "entered": len(members)}
        if i + 1 < len(STAGES):
            nxt = STAGES[i + 1]
            delays = [
                (t[nxt].at - t[stage].at).total_seconds()
                for t in members
                if _within(_at(t, stage), _at(t, nxt), w)
            ]
            row.update(
                converted=len(delays),
                dropped=len(members) - len(delays),
                median_seconds=_nearest_rank(delays, 50),
                p90_seconds=_nearest_rank(delays, 90),
            )
        first = STAGES[0]
        row["reached_from_first"] = sum(
            1
            for t in firsts
            if _in(period, _at(t, first)) and _within(_at(t, first), _at(t, stage), w)
        )
        out.append(row)
    return out


def naive_breakdown(
    history: list[Stay], period: Period, value_of: Any
) -> dict[Any, list[tuple[int, int]]]:
    """Entries by the value of the stage's first stay; reached by the first stage's."""
    out: dict[Any, list[list[int]]] = {}
    for t in _firsts(history, None).values():
        first = t.get(STAGES[0])
        for i, stage in enumerate(STAGES):
            if stage in t and _in(period, t[stage].at):
                out.setdefault(value_of(t[stage]), [[0, 0] for _ in STAGES])[i][0] += 1
            if first and _in(period, first.at) and _within(first.at, _at(t, stage), period.window):
                out.setdefault(value_of(first), [[0, 0] for _ in STAGES])[i][1] += 1
    return {v: [(e, r) for e, r in counts] for v, counts in out.items()}


def naive_daily(history: list[Stay], period: Period) -> dict[str, dict[str, int]]:
    days: dict[str, Counter[str]] = defaultdict(Counter)
    for t in _firsts(history, None).values():
        for stage, s in t.items():
            if _in(period, s.at):
                days[s.at.astimezone(period.zone).date().isoformat()][stage] += 1
    return {d: dict(by) for d, by in days.items()}


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
    rolled: int,
) -> None:
    """The stays through the write path's own recording, in time order, then `rolled` pairs
    (of the oldest) counted into the roll-up: the report must not care how many."""
    with engine.begin() as conn:
        for table in (history_t, pair_t, rollup_t):
            conn.execute(delete(table))
        for s in sorted(history, key=lambda s: s.at):
            record_stage_changes(
                conn,
                tenant_id=tenant_id,
                funnel_id=funnel_id,
                member_id=members[s.member],
                instance_id=instances[s.member],
                version=s.version,
                campaign=s.campaign,
                changes=[StageChange(None, s.stage, None, s.stage, s.at)],
                event_type="test",
                event_ref=None,
            )
    if rolled:
        roll_up(engine, rolled)


ZONES = ("Asia/Shanghai", "Europe/Berlin", "America/New_York", "Asia/Kolkata", "Asia/Kathmandu")
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
        rolled=st.sampled_from([0, 7, 10_000]),
    )
    def check(
        history: list[Stay],
        zone: str,
        first_day: int,
        days: int,
        window_h: int,
        version: int | None,
        rolled: int,
    ) -> None:
        _write(engine, tenant_id, funnel_id, members, instances, history, rolled)
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


def test_report_is_exact_where_hours_buckets_and_windows_cut(engine: Engine) -> None:
    """The roll-up counts whole hours and delay buckets; the report must still be exact where
    a local midnight cuts an hour (Kolkata, +5:30) and where the window cuts a bucket, with
    the pairs rolled up or not."""
    tenant_id, funnel_id, members, instances = _setup(engine)
    zone = ZoneInfo("Asia/Kolkata")
    start = datetime(2027, 3, 14, tzinfo=zone)  # 2027-03-13 18:30 UTC
    period = Period(start, start + timedelta(days=2), timedelta(hours=5), zone)
    us, h, m = timedelta(microseconds=1), timedelta(hours=1), timedelta(minutes=1)
    split = datetime(2027, 3, 14, 18, tzinfo=UTC)  # holds the local midnight of the 15th
    acquired = [  # (when, how long until activation)
        (start - us, h),  # before the range
        (start, 5 * h),  # on its first instant, converting exactly at the window
        (start + 80 * m, 5 * h + us),  # a microsecond too late
        (start + 2 * h, 5 * h),
        (start + 3 * h, 7 * m),
        (split + 10 * m, 10 * m),  # 23:40 and 23:50 on the 14th
        (split + 40 * m, h),  # 00:10 on the 15th
        (start + 4 * h, 5 * h - us),
    ]
    history = [Stay(i, "acquire", at, None, 1) for i, (at, _) in enumerate(acquired)]
    history += [Stay(i, "activate", at + d, None, 1) for i, (at, d) in enumerate(acquired)]
    scope = Scope(tenant_id, funnel_id, None, STAGES)
    for rolled in (0, 10_000):
        _write(engine, tenant_id, funnel_id, members, instances, history, rolled)
        with engine.connect() as conn:
            got = report(conn, scope, period)["stages"]
            series = daily(conn, scope, period)
        acquire = got[0]
        assert (acquire["entered"], acquire["converted"]) == (7, 6), rolled
        assert (acquire["median_seconds"], acquire["p90_seconds"]) == (3600.0, 18000.0)
        assert got[1]["entered"] == 8  # the first member activated inside the range
        want = naive_report(history, period, None)
        assert [{k: g[k] for k in w} for g, w in zip(got, want, strict=True)] == want
        assert [(r["acquire"], r["activate"]) for r in series] == [(6, 7), (1, 1)]


# Delays at and either side of the buckets' bounds (and negative ones, never counted); first
# entries either side of hour and day boundaries, before 1970 too (slots floor, not truncate).
_DELAYS = st.one_of(
    st.sampled_from(BOUNDS).flatmap(lambda b: st.sampled_from([b - 1, b, b + 1])),
    st.integers(-(10**12), 10**14),
)
_ATS = st.one_of(
    st.integers(-3, 3)
    .map(lambda d: d * 24 * HOUR_US + 1_800_000_000_000_000)
    .flatmap(lambda t: st.sampled_from([t - 1, t, t + 1])),
    st.integers(-(2 * 24 * HOUR_US), 2_000_000_000_000_000),
)


def test_the_roll_up_counts_as_tally_does(engine: Engine) -> None:
    """`roll_up` counts in SQL (a CASE for the bucket, floored slots); `tally`, in Python, is
    its reference: after any number of chunks, the roll-up holds what tally makes of the
    pairs rolled up, and every pair is marked once."""
    tenant_id, funnel_id, members, _ = _setup(engine)

    @settings(suppress_health_check=[HealthCheck.too_slow], deadline=None)
    @given(
        pairs=st.lists(
            st.tuples(
                st.sampled_from(members), st.integers(1, 2), st.integers(0, 3), _ATS, _DELAYS
            ),
            unique_by=lambda p: p[:3],
            max_size=40,
        ),
        chunk=st.integers(1, 50),
    )
    def check(pairs: list[tuple[int, int, int, int, int]], chunk: int) -> None:
        rows = [
            {
                "tenant_id": tenant_id,
                "funnel_id": funnel_id,
                "member_id": m,
                "version": v,
                "a": a,
                "b": 3,
                "at_us": at,
                "delay_us": delay,
                "rolled": False,
            }
            for m, v, a, at, delay in pairs
        ]
        with engine.begin() as conn:
            conn.execute(delete(pair_t))
            conn.execute(delete(rollup_t))
            if rows:
                conn.execute(insert(pair_t), rows)
        assert roll_up_all(engine, chunk) == len(rows)
        want = tally(SimpleNamespace(**r) for r in rows)
        with engine.connect() as conn:
            got = conn.execute(select(rollup_t)).all()
            assert not conn.execute(select(func.count()).where(~pair_t.c.rolled)).scalar_one()
        keys = ("funnel_id", "version", "a", "b", "span", "slot", "bucket", "tenant_id")
        assert {tuple(getattr(r, k) for k in keys): r.n for r in got} == dict(want)

    check()


def test_concurrent_roll_ups_count_every_pair_once(engine: Engine) -> None:
    """Workers on several instances roll up at once: each pair is counted exactly once."""
    tenant_id, funnel_id, members, instances = _setup(engine)
    history = [
        Stay(i % N_MEMBERS, stage, BASE + i * timedelta(minutes=7), None, 1 + i % 2)
        for i, stage in enumerate(STAGES * 10)
    ]
    _write(engine, tenant_id, funnel_id, members, instances, history, rolled=0)
    with engine.connect() as conn:
        pairs = conn.execute(select(func.count()).select_from(pair_t)).scalar_one()
        want = conn.execute(select(func.count()).where(pair_t.c.delay_us >= 0)).scalar_one()

    def work() -> int:
        return roll_up_all(engine, limit=3)

    with ThreadPoolExecutor(4) as pool:
        done = sum(pool.map(lambda _: work(), range(4)))
    with engine.connect() as conn:
        for span in (1, 24):  # each pair in its hour and in its day
            total = select(func.sum(rollup_t.c.n)).where(rollup_t.c.span == span)
            assert conn.execute(total).scalar_one() == want
        assert conn.execute(select(func.count()).where(~pair_t.c.rolled)).scalar_one() == 0
    assert done == pairs


def test_the_migration_backfills_the_pairs_the_write_path_writes(engine: Engine) -> None:
    """Upgrading a database that has stage history but no pairs yet derives the same pairs
    as the write path does (the same function), so reports do not start from zero."""
    from alembic import command
    from app.migrations import alembic_config

    tenant_id, funnel_id, members, instances = _setup(engine)
    at = BASE
    history = []
    for i, stage in enumerate(["acquire", "activate", "acquire", "revenue", "retain"]):
        history.append(Stay(i % 3, stage, at + i * STEP, "spring" if i % 2 else None, 1 + i % 2))
    _write(engine, tenant_id, funnel_id, members, instances, history, rolled=0)

    def pairs() -> list[Any]:
        with engine.connect() as conn:
            return sorted(tuple(r) for r in conn.execute(select(pair_t)))

    written = pairs()
    assert len(written) > 10
    config = alembic_config(engine.url.render_as_string(hide_password=False))
    command.downgrade(config, "55c0976a35f4")  # the revision before the pairs
    command.upgrade(config, "head")
    assert pairs() == written


@given(
    mine=st.lists(st.integers(0, 50), max_size=12).map(sorted),
    other=st.lists(st.integers(0, 50), max_size=12).map(sorted),
    data=st.data(),
)
def test_the_nth_of_two_sorted_lists(mine: list[int], other: list[int], data: Any) -> None:
    """The percentile search: the n-th of the loose delays and the rolled-up ones, which the
    database hands out one at a time."""
    both = sorted(mine + other)
    if not both:
        return
    n = data.draw(st.integers(1, len(both)))
    calls: list[int] = []

    def nth(k: int) -> int:
        calls.append(k)
        return other[k - 1]

    assert nth_of_two(n, mine, len(other), nth) == both[n - 1]
    assert len(calls) <= len(mine).bit_length() + 1


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

    # Once the workers have rolled the first entries up, the report says the same.
    assert roll_up_all(mini.client.app.state.engine) > 0  # type: ignore[attr-defined]
    assert mini.get("/v1/reports/funnels/mini", **{"from": day, "to": day}) == body

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
