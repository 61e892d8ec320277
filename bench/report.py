"""The funnel report over a generated history of 1,000,000 members (about 1.85 million
stage entries over 30 days) on SQLite and PostgreSQL: the report, a breakdown by channel and the
daily series, best of three, next to a bare COUNT(*) over the same rows in the same run."""

from __future__ import annotations

import random
import sqlite3
import time
import uuid
from collections.abc import Callable, Iterator
from datetime import UTC, date, datetime, timedelta
from itertools import pairwise
from typing import Any, NamedTuple
from zoneinfo import ZoneInfo

from sqlalchemy import Engine, func, select
from sqlalchemy.engine import make_url

from app.analytics.funnel import Scope, breakdown, daily, period_for, report
from app.db import make_engine, session_scope
from app.funnels.entries import Entry, pairs_for, roll_up_all, tally
from app.funnels.service import publish
from app.funnels.store import funnel_t, history_t
from app.migrations import upgrade
from app.tenancy.service import create_tenant

STAGES = ("acquire", "activate", "retain", "revenue", "refer")
ODDS = (1.0, 0.6, 0.35, 0.2, 0.05)  # share of the previous stage's members reaching each
CHANNELS = ("poster", "qr", "invite", "moments", "staff")
START = datetime(2026, 10, 1, tzinfo=UTC)
DAYS = 30
FUNNEL = {
    "key": "bench",
    "name": "Bench",
    "entry": {"events": ["member.joined"]},
    "initial": "acquire",
    "states": {s: {"stage": s} for s in STAGES},
    "transitions": [{"from": a, "to": b, "event": "order.paid"} for a, b in pairwise(STAGES)],
}


def _ts(t: datetime) -> str:
    return t.strftime("%Y-%m-%d %H:%M:%S.%f")


def history(members: int, seed: int = 11) -> Iterator[tuple[int, str, datetime]]:
    rng = random.Random(seed)  # noqa: S311 - reproducible data, not a secret
    span = DAYS * 86400
    for m in range(1, members + 1):
        at = START + timedelta(seconds=rng.uniform(0, span))
        for stage, odds in zip(STAGES, ODDS, strict=True):
            if rng.random() >= odds:
                break
            yield m, stage, at
            at += timedelta(seconds=rng.expovariate(1 / 86400))


def tenant_with(url: str, funnel: dict[str, Any]) -> tuple[Engine, int]:
    """Migrate `url` and create the tenant "bench" with `funnel` published (both benches)."""
    upgrade(url)
    engine = make_engine(url)
    now = datetime.now(UTC)
    with session_scope(engine) as session:
        tenant, _, _ = create_tenant(session, "bench", now)
        assert tenant.id is not None
        publish(session, tenant.id, funnel["key"], funnel, now)
        return engine, tenant.id


def setup(url: str) -> tuple[Engine, int, int]:
    engine, tenant_id = tenant_with(url, FUNNEL)
    with engine.connect() as conn:
        funnel_id = conn.execute(select(funnel_t.c.id)).scalar_one()
    return engine, tenant_id, funnel_id


TAIL = 1000  # the last members' pairs are left for the roll-up worker, as in a live service


def _pairs(
    entries: list[tuple[int, str, datetime]], members: int, tenant_id: int, funnel_id: int
) -> tuple[list[Any], list[Any]]:
    """The pairs the write path would have written for `entries` (its own derivation), all
    rolled up but the last TAIL members', and the roll-up rows counting them."""
    pairs: list[Any] = []
    rolled: list[Pair] = []
    known: dict[tuple[int, int], tuple[int, str | None]] = {}
    current = None
    for m, stage, at in entries:
        if m != current:
            current, known = m, {}
        done = m <= members - TAIL
        for v, a, b, at_us, delay, _ in pairs_for(known, 1, [Entry(stage, at, None)]):
            pairs.append((funnel_id, m, v, a, b, tenant_id, at_us, delay, None, done))
            if done:
                rolled.append(Pair(funnel_id, v, a, b, tenant_id, at_us, delay))
    rollup = [(*key, n) for key, n in tally(rolled).items()]
    return pairs, rollup


class Pair(NamedTuple):
    funnel_id: int
    version: int
    a: int
    b: int
    tenant_id: int
    at_us: int
    delay_us: int


def _rows(members: int, tenant_id: int, funnel_id: int) -> tuple[list[Any], ...]:
    rng = random.Random(5)  # noqa: S311
    now = _ts(START)
    member_rows = [
        (m, tenant_id, f"u{m}", "{}", now, rng.choice(CHANNELS), f"g{m % 50}")
        for m in range(1, members + 1)
    ]
    instance_rows = [
        (m, tenant_id, funnel_id, m, 1, "active", "acquire", "acquire", "{}", now)
        for m in range(1, members + 1)
    ]
    entries = list(history(members))
    history_rows = [
        (tenant_id, funnel_id, m, m, 1, stage, stage, _ts(at), "order.paid")
        for m, stage, at in entries
    ]
    return member_rows, instance_rows, history_rows, *_pairs(entries, members, tenant_id, funnel_id)


MEMBER_COLS = "id, tenant_id, external_id, attributes, created_at, acquired_channel, acquired_group"
INSTANCE_COLS = (
    "id, tenant_id, funnel_id, member_id, version, status, state, stage, data, updated_at"
)
HISTORY_COLS = (
    "tenant_id, funnel_id, member_id, instance_id, version, stage, state, entered_at, entered_by"
)
PAIR_COLS = "funnel_id, member_id, version, a, b, tenant_id, at_us, delay_us, campaign, rolled"
ROLLUP_COLS = "funnel_id, version, a, b, span, slot, bucket, tenant_id, n"
TABLES = (
    ("member", MEMBER_COLS),
    ("funnel_instance", INSTANCE_COLS),
    ("stage_history", HISTORY_COLS),
    ("stage_pair", PAIR_COLS),
    ("stage_rollup", ROLLUP_COLS),
)


def load_sqlite(path: str, rows: tuple[list[Any], ...]) -> None:
    db = sqlite3.connect(path)
    with db:
        for (table, cols), data in zip(TABLES, rows, strict=True):
            marks = ", ".join("?" * len(cols.split(",")))
            db.executemany(f"INSERT INTO {table} ({cols}) VALUES ({marks})", data)  # noqa: S608
    db.execute("ANALYZE")
    db.close()


def load_postgres(url: str, rows: tuple[list[Any], ...]) -> None:
    import psycopg

    with psycopg.connect(url) as conn, conn.cursor() as cur:
        for (table, cols), data in zip(TABLES, rows, strict=True):
            with cur.copy(f"COPY {table} ({cols}) FROM STDIN") as copy:
                for row in data:
                    copy.write_row(row)
        conn.commit()
    # What autovacuum does to a table at rest: statistics, and the visibility map that lets
    # the report read the pairs' indexes without visiting the heap.
    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute("VACUUM ANALYZE")


def best(fn: Callable[[], Any], runs: int = 3) -> float:
    times = []
    for _ in range(runs):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return min(times)


def measure_one(url: str, members: int, load: Callable[[Any], None]) -> dict[str, Any]:
    engine, tenant_id, funnel_id = setup(url)
    t = time.perf_counter()
    rows = _rows(members, tenant_id, funnel_id)
    load(rows)
    loaded = time.perf_counter() - t
    zone = ZoneInfo("Asia/Shanghai")
    period = period_for(zone, date(2026, 10, 30), date(2026, 10, 1), date(2026, 10, 30), "P7D")
    scope = Scope(tenant_id, funnel_id, None, STAGES)
    h = history_t.c
    with engine.connect() as conn:

        def bare() -> Any:
            return conn.execute(
                select(func.count()).where(
                    h.tenant_id == tenant_id,
                    h.funnel_id == funnel_id,
                    h.entered_at >= period.start,
                    h.entered_at < period.end + period.window,
                )
            ).scalar_one()

        out = {
            "members": members,
            "stage_entries": len(rows[2]),
            "load_s": round(loaded, 1),
            "count_s": round(best(bare), 3),
            "report_s": round(best(lambda: report(conn, scope, period)), 3),
            "breakdown_s": round(best(lambda: breakdown(conn, scope, period, "channel")), 3),
            "daily_s": round(best(lambda: daily(conn, scope, period)), 3),
        }
        out["entered"] = [s["entered"] for s in report(conn, scope, period)["stages"]]
    t = time.perf_counter()
    tail = roll_up_all(engine)
    out["pairs"] = len(rows[3])
    out["rollup_rows"] = len(rows[4])
    out["rollup_pairs_per_s"] = round(tail / (time.perf_counter() - t))
    with engine.connect() as conn:
        assert [s["entered"] for s in report(conn, scope, period)["stages"]] == out["entered"]
    engine.dispose()
    return out


def measure(members: int, tmp: str, pg_server: str | None) -> dict[str, Any]:
    results: dict[str, Any] = {}
    path = f"{tmp}/report.db"
    results["sqlite"] = measure_one(f"sqlite:///{path}", members, lambda r: load_sqlite(path, r))
    if pg_server:
        import psycopg

        server = make_url(pg_server)
        name = f"flywheel_report_{uuid.uuid4().hex[:8]}"
        admin = server.set(drivername="postgresql", database="postgres")
        admin_dsn = admin.render_as_string(hide_password=False)
        with psycopg.connect(admin_dsn, autocommit=True) as c:
            c.execute(f'CREATE DATABASE "{name}"')
        try:
            url = server.set(database=name).render_as_string(hide_password=False)
            dsn = server.set(drivername="postgresql", database=name).render_as_string(
                hide_password=False
            )
            results["postgres"] = measure_one(url, members, lambda r: load_postgres(dsn, r))
        finally:
            with psycopg.connect(admin_dsn, autocommit=True) as c:
                c.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
    return results


def markdown(results: dict[str, Any]) -> str:
    rows = [
        "| database | stage entries | COUNT(*) s | report s | vs COUNT | by channel s | daily s |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for db, r in results.items():
        rows.append(
            f"| {db} | {r['stage_entries']:,} | {r['count_s']} | {r['report_s']} | "
            f"{r['report_s'] / r['count_s']:.1f}× | {r['breakdown_s']} | {r['daily_s']} |"
        )
    any_ = next(iter(results.values()))
    return (
        f"\n## Funnel report\n\n{any_['members']:,} members, 30 days of history (5 stages, "
        "each reached by 60/35/20/5% of the previous one), a 7-day conversion window; best of "
        "three, next to a bare COUNT(*) over the same rows in the same run.\n\n"
        + "\n".join(rows)
        + "\n"
    )
