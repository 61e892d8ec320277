"""First entries: the funnel report's own index, kept by the write path.

The report asks: of the members whose first entry into a stage falls in a range, how many
entered the next stage within a window, and how long did that take? Answered from the stage
history with a GROUP BY member, that took 35 s on SQLite and 11 s on PostgreSQL over a
million members (bench/report.py), where the report has half a second. So the write path
keeps the answer's ingredients as it goes:

- **Pairs** (`stage_pair`). A member's first entry into stage b writes the pair (b, b) and,
  for each stage a they entered before, the pair (a, b) in AARRR order (a ≤ b): when a was
  first entered and how long after that b was (negative when the member reached the later
  stage first). Once per member, version and pair; never updated, so concurrent writers
  never wait on each other here. Version 0 holds the entries of every version.
- **Roll-up** (`stage_rollup`). A background round (`roll_up`, run by the workers) counts
  pairs by pair, delay bucket (`BOUNDS`: 1/8-octave geometric) and the UTC hour, and the
  UTC day, of a's entry; it marks them `rolled` in the same transaction.

The report (app/analytics/funnel.py) sums the roll-up over the whole days and hours inside
its range and reads everything else exactly from the pairs: the range's ragged ends (zones
at :30 and :45 from UTC), the bucket the window cuts through, the buckets holding the
percentiles, and pairs not rolled up yet. Its answers are exact in any state of the roll-up.

Why not add to the roll-up in the write path: every acquisition of the same hour adds to
the same row, so on PostgreSQL concurrent writers would queue on that row's lock (and could
deadlock with the member locks they hold). The worker is the roll-up's only writer.
"""

from __future__ import annotations

from bisect import bisect_right
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from sqlalchemy import Connection, Engine, Table, bindparam, func, insert, select, text

from app.engine.definition import STAGES
from app.funnels.models import StagePair, StageRollup
from app.funnels.pending import Pending
from app.prepared import Prepared

pair_t: Table = StagePair.__table__  # type: ignore[attr-defined]
rollup_t: Table = StageRollup.__table__  # type: ignore[attr-defined]

ALL_VERSIONS = 0
# The partial index's own words: SQLite uses ix_stage_pair_unrolled only for a query that
# says exactly this (SQLAlchemy's NOT of a boolean column comes out as `rolled = 0`).
UNROLLED = text("NOT rolled")
HOUR_US = 3_600_000_000
STAGE_INDEX = {stage: i for i, stage in enumerate(STAGES)}


def _bounds() -> tuple[int, ...]:
    """Delay buckets in µs: [0], [1 µs, 1 s), then whole seconds growing by 2^(1/8) (about
    9% wide) up to two years; the last is open-ended. Bucket 0 holds only the zero delay,
    so a stage's own entries (delay 0) never need a boundary read."""
    out = [0, 1, 1_000_000]
    step = 2 ** (1 / 8)
    seconds = 1.0
    while seconds < 2 * 365 * 86_400:
        seconds *= step
        us = round(seconds) * 1_000_000
        if us > out[-1]:
            out.append(us)
    return tuple(out)


BOUNDS = _bounds()


def bucket(delay_us: int) -> int:
    """The bucket k holding a delay ≥ 0: BOUNDS[k] ≤ delay < BOUNDS[k + 1]."""
    return bisect_right(BOUNDS, delay_us) - 1


def upper(k: int) -> int | None:
    """The largest delay in bucket k, None for the open-ended last one."""
    return BOUNDS[k + 1] - 1 if k + 1 < len(BOUNDS) else None


_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)


def epoch_us(moment: datetime) -> int:
    """An aware datetime as integer µs since the Unix epoch, exactly."""
    if moment.utcoffset() is None:
        raise ValueError("naive datetime; use aware UTC datetimes")
    delta = moment - _EPOCH
    return (delta.days * 86_400 + delta.seconds) * 1_000_000 + delta.microseconds


@dataclass(frozen=True)
class Entry:
    """A member entering a stage (from StageChange), as the pairs need it."""

    stage: str
    at: datetime
    campaign: str | None


_FIRSTS = Prepared(
    select(pair_t.c.version, pair_t.c.a, pair_t.c.at_us, pair_t.c.campaign).where(
        pair_t.c.funnel_id == bindparam("b_funnel"),
        pair_t.c.member_id == bindparam("b_member"),
        pair_t.c.version.in_([bindparam("b_version"), ALL_VERSIONS]),
        pair_t.c.a == pair_t.c.b,
    )
)
_INSERT_PAIRS = Prepared(insert(pair_t))


def pairs_for(
    known: dict[tuple[int, int], tuple[int, str | None]],
    version: int,
    entries: Iterable[Entry],
) -> list[tuple[int, int, int, int, int, str | None]]:
    """The pairs (version, a, b, at_us, delay_us, campaign) that `entries` add, given the
    first entries `known` as {(version, stage index): (at_us, campaign)}, which it updates.
    Pure: the write path, the migration's backfill and the benchmark's loader share it."""
    out = []
    for entry in entries:
        x, t = STAGE_INDEX[entry.stage], epoch_us(entry.at)
        for v in (version, ALL_VERSIONS):
            if (v, x) in known:
                continue  # not a first entry
            out.append((v, x, x, t, 0, entry.campaign))
            for (v2, y), (ty, cy) in list(known.items()):
                if v2 != v:
                    continue
                if y < x:
                    out.append((v, y, x, ty, t - ty, cy))
                else:
                    out.append((v, x, y, t, ty - t, entry.campaign))
            known[(v, x)] = (t, entry.campaign)
    return out


def record(
    conn: Connection,
    *,
    tenant_id: int,
    funnel_id: int,
    member_id: int,
    version: int,
    entries: Sequence[Entry],
    pending: Pending | None = None,
) -> None:
    """Add the pairs of a member's stage entries (callers hold the member's lock, so the
    first entries read here cannot change before the insert). One read, one insert; with
    `pending` (the dispatcher's batch), the insert at the batch's end, and the first
    entries read once for the batch's members, the pending ones laid over."""
    if not entries:
        return
    if pending is not None:
        firsts = pending.firsts(conn, funnel_id, member_id, version)
    else:
        params = {"b_funnel": funnel_id, "b_member": member_id, "b_version": version}
        firsts = _FIRSTS.rows(conn, params)
    known = {(v, a): (at_us, campaign) for v, a, at_us, campaign in firsts}
    rows = pair_rows(tenant_id, funnel_id, member_id, pairs_for(known, version, entries))
    if pending is not None:
        pending.add_pairs(rows)
    else:
        _INSERT_PAIRS.run_many(conn, rows)


def pair_rows(
    tenant_id: int,
    funnel_id: int,
    member_id: int,
    pairs: Iterable[tuple[int, int, int, int, int, str | None]],
) -> list[dict[str, Any]]:
    """`pairs_for`'s pairs as stage_pair rows, not rolled up yet."""
    keys = ("version", "a", "b", "at_us", "delay_us", "campaign")
    owner = {"funnel_id": funnel_id, "member_id": member_id, "tenant_id": tenant_id}
    return [{**owner, **dict(zip(keys, p, strict=True)), "rolled": False} for p in pairs]


# ── the roll-up ──────────────────────────────────────────────────────────────────────────────
ROLL_CHUNK = 5000  # pairs per transaction: the SQLite writer is held for milliseconds
_KEYS = ("funnel_id", "version", "a", "b", "span", "slot", "bucket")
SPANS = (1, 24)  # the roll-up's slots: hours and days
_ROLLUP_COLS = (*_KEYS, "tenant_id", "n")


def tally(pairs: Iterable[Any]) -> Counter[tuple[int, ...]]:
    """Roll-up counts of `pairs` (rows with funnel_id, version, a, b, tenant_id, at_us and
    delay_us), keyed as the roll-up's primary key and tenant_id: each pair in its hour and
    its day. A pair whose later stage came first (negative delay) is never a conversion,
    and is not counted. (`roll_up` counts in SQL, `_count_sql`; this is its reference, and the
    benchmark's loader builds its roll-up with it.)"""
    out: Counter[tuple[int, ...]] = Counter()
    for r in pairs:
        if r.delay_us >= 0:
            k = bucket(r.delay_us)
            for span in SPANS:
                slot = r.at_us // (span * HOUR_US)
                out[(r.funnel_id, r.version, r.a, r.b, span, slot, k, r.tenant_id)] += 1
    return out


def _bucket_sql(lo: int = 0, hi: int = len(BOUNDS)) -> str:
    """`bucket(delay_us)` as SQL, for a delay in [BOUNDS[lo], BOUNDS[hi]): a CASE halving
    the range at each level, so a pair costs 8 comparisons, not one per bound."""
    if hi - lo == 1:
        return str(lo)
    mid = (lo + hi) // 2
    return (
        f"CASE WHEN delay_us < {BOUNDS[mid]} THEN {_bucket_sql(lo, mid)} "
        f"ELSE {_bucket_sql(mid, hi)} END"
    )


def _count_sql(taken: str) -> str:
    """Add the pairs in `taken` (a table or CTE with funnel_id, version, a, b, tenant_id,
    at_us, delay_us) to the roll-up: `tally` in one statement, its rows in key order (two
    workers adding to the same rows lock them in one order, so never deadlock). A slot is
    at_us floored to the span (SQL's integer division truncates towards zero)."""
    width = f"(spans.span * {HOUR_US})"
    slot = f"(at_us - CASE WHEN at_us < 0 THEN {width} - 1 ELSE 0 END) / {width}"
    keys = ", ".join(_KEYS)
    return (
        f"INSERT INTO stage_rollup ({', '.join(_ROLLUP_COLS)}) "  # noqa: S608 - constants, no input
        f"SELECT funnel_id, version, a, b, spans.span, {slot}, {_bucket_sql()}, tenant_id, "
        f"count(*) FROM {taken} CROSS JOIN "
        f"(SELECT {SPANS[0]} AS span UNION ALL SELECT {SPANS[1]}) AS spans "
        "WHERE delay_us >= 0 GROUP BY 1, 2, 3, 4, 5, 6, 7, 8 ORDER BY 1, 2, 3, 4, 5, 6, 7 "
        f"ON CONFLICT ({keys}) DO UPDATE SET n = stage_rollup.n + excluded.n"
    )


# Take a chunk of pairs not rolled up yet, mark them and count them, all in the database
# (counting 5,000 pairs in Python held the SQLite writer ~35 ms of the ~68 a chunk took).
# By physical row address (SQLite's rowid, PostgreSQL's ctid): a row-value IN over the
# five-column key made PostgreSQL scan the table for every chunk (259 pairs/s measured).
# PostgreSQL: one statement, the marking a data-modifying WITH. SQLite has none, so the
# chunk goes through a temporary table of the connection's (in memory: temp_store), which
# keeps what is marked and what is counted the same rows.
_ROLL_POSTGRES = text(
    "WITH taken AS (UPDATE stage_pair SET rolled = true WHERE ctid = ANY(ARRAY("  # noqa: S608 - constants
    "SELECT ctid FROM stage_pair WHERE NOT rolled LIMIT :n FOR UPDATE SKIP LOCKED)) "
    "RETURNING funnel_id, version, a, b, tenant_id, at_us, delay_us), "
    f"counted AS ({_count_sql('taken')}) "
    "SELECT count(*) FROM taken"
)
_ROLL_SQLITE = (
    text(
        "CREATE TEMP TABLE IF NOT EXISTS roll_taken (pair INTEGER PRIMARY KEY, funnel_id, "
        "version, a, b, tenant_id, at_us, delay_us)"
    ),
    text("DELETE FROM temp.roll_taken"),
    text(
        "INSERT INTO temp.roll_taken SELECT rowid, funnel_id, version, a, b, tenant_id, at_us, "
        "delay_us FROM stage_pair WHERE NOT rolled LIMIT :n"
    ),
    text("UPDATE stage_pair SET rolled = 1 WHERE rowid IN (SELECT pair FROM temp.roll_taken)"),
    text(_count_sql("temp.roll_taken")),
)


def roll_up(engine: Engine, limit: int = ROLL_CHUNK) -> int:
    """Count up to `limit` pairs into the roll-up and mark them; returns how many. Several
    workers may run it on PostgreSQL: each skips the pairs another has locked, and adds to
    the roll-up's rows in one order, so two never deadlock."""
    with engine.begin() as conn:
        if conn.dialect.name == "postgresql":
            return int(conn.execute(_ROLL_POSTGRES, {"n": limit}).scalar_one())
        make, clear, take, mark, count = _ROLL_SQLITE
        conn.execute(make)
        conn.execute(clear)
        taken = conn.execute(take, {"n": limit}).rowcount
        if taken:
            conn.execute(mark)
            conn.execute(count)
        return int(taken)


def roll_up_all(engine: Engine, limit: int = ROLL_CHUNK) -> int:
    """Roll up until no pair is left (migrations, the benchmark's loader, tests)."""
    total = 0
    while n := roll_up(engine, limit):
        total += n
    return total


def unrolled(conn: Connection) -> int:
    """Pairs not counted into the roll-up yet (a gauge: the roll-up's lag)."""
    stmt = select(func.count()).select_from(pair_t).where(UNROLLED)
    return int(conn.execute(stmt).scalar_one())
