"""Prepared statements (app/prepared.py) store exactly what `Connection.execute` stores, on
both databases, and fail the way it fails."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta, timezone

import pytest
from sqlalchemy import Column, Integer, MetaData, String, Table, bindparam, delete, insert, select
from sqlalchemy.exc import DBAPIError, IntegrityError

from app.events.models import EventLog
from app.mechanics.community.models import GroupMember
from app.members.models import Member
from app.prepared import Many, Prepared
from app.timers.models import Timer
from tests.conftest import new_tenant
from tests.test_write_path import counted

event_t: Table = EventLog.__table__  # type: ignore[attr-defined]
member_t: Table = Member.__table__  # type: ignore[attr-defined]
group_member_t: Table = GroupMember.__table__  # type: ignore[attr-defined]
timer_t: Table = Timer.__table__  # type: ignore[attr-defined]

BEIJING = timezone(timedelta(hours=8))


def _event(tenant_id: int, key: str, at: datetime) -> dict[str, object]:
    return {
        "tenant_id": tenant_id,
        "source": "bot",
        "dedupe_key": key,
        "digest": "d",
        "type": "message.posted",
        "occurred_at": at,
        "received_at": at,
        "data": {"text": '你好 "quoted"', "n": [1, None, 2.5], "none": None},
    }


def test_a_prepared_insert_stores_what_connection_execute_stores(engine):
    tenant_id, _ = new_tenant(engine)
    at = datetime(2026, 11, 23, 20, 15, 30, 123456, tzinfo=BEIJING)  # not UTC, microseconds
    prepared = Prepared(insert(event_t).returning(event_t.c.id))
    with engine.begin() as conn:
        via_core = conn.execute(
            insert(event_t).returning(event_t.c.id), _event(tenant_id, "core", at)
        ).scalar_one()
        via_prepared = prepared.scalar(conn, _event(tenant_id, "prepared", at))
    assert isinstance(via_prepared, int) and via_prepared != via_core
    with engine.connect() as conn:
        rows = {
            r.dedupe_key: r._asdict()
            for r in conn.execute(select(event_t).where(event_t.c.tenant_id == tenant_id))
        }
    core, mine = rows["core"], rows["prepared"]
    for r in (core, mine):
        del r["id"], r["dedupe_key"]
    assert mine == core
    assert mine["occurred_at"] == at and mine["occurred_at"].tzinfo is not None
    assert mine["data"]["text"] == '你好 "quoted"'


def test_updates_selects_and_many_rows(engine):
    tenant_id, _ = new_tenant(engine)
    at = datetime(2026, 11, 23, 12, tzinfo=UTC)
    respond = Prepared(
        event_t.update()
        .where(event_t.c.id == bindparam("b_id"))
        .values(status_code=200, digest=bindparam("b_digest"))
    )
    keys = Prepared(
        select(event_t.c.dedupe_key, event_t.c.status_code)
        .where(event_t.c.tenant_id == bindparam("b_tenant"))
        .order_by(event_t.c.dedupe_key)
    )
    with engine.begin() as conn:
        Prepared(insert(event_t)).run_many(conn, [_event(tenant_id, k, at) for k in "abc"])
        first = conn.execute(select(event_t.c.id).where(event_t.c.dedupe_key == "a")).scalar()
        assert respond.run(conn, {"b_id": first, "b_digest": "d"}) == 1
        assert respond.run(conn, {"b_id": -1, "b_digest": "d"}) == 0
        assert keys.rows(conn, {"b_tenant": tenant_id}) == [("a", 200), ("b", None), ("c", None)]
        Prepared(insert(event_t)).run_many(conn, [])  # nothing to write: no statement


def test_records_read_back_what_connection_execute_reads(engine):
    """Aware datetimes, JSON with CJK text and nulls, NULL columns: the same values as
    SQLAlchemy's rows, by the same attribute names."""
    tenant_id, _ = new_tenant(engine)
    at = datetime(2026, 11, 23, 20, 15, 30, 123456, tzinfo=BEIJING)
    by_tenant = select(event_t).where(event_t.c.tenant_id == bindparam("b_tenant"))
    with engine.begin() as conn:
        Prepared(insert(event_t)).run_many(conn, [_event(tenant_id, k, at) for k in "ab"])
        core = conn.execute(by_tenant.order_by(event_t.c.id), {"b_tenant": tenant_id}).all()
        prepared = Prepared(by_tenant.order_by(event_t.c.id))
        mine = prepared.records(conn, {"b_tenant": tenant_id})
        again = prepared.records(conn, {"b_tenant": tenant_id})  # its shape is kept
        assert prepared.record(conn, {"b_tenant": -1}) is None
        first = prepared.record(conn, {"b_tenant": tenant_id})
    assert (
        [r._asdict() for r in mine] == [r._asdict() for r in core] == [r._asdict() for r in again]
    )
    assert first is not None and first.dedupe_key == "a" and first.member_id is None
    assert first._mapping == core[0]._mapping  # by name, as SQLAlchemy's rows
    assert first.received_at == at and first.received_at.tzinfo is not None
    assert first.data == {"text": '你好 "quoted"', "n": [1, None, 2.5], "none": None}


def test_a_constant_column_default_is_filled_in_as_sqlalchemy_would(engine):
    tenant_id, _ = new_tenant(engine)
    now = datetime(2026, 11, 23, tzinfo=UTC)
    with engine.begin() as conn:
        member_id = conn.execute(
            insert(member_t).returning(member_t.c.id),
            {"tenant_id": tenant_id, "external_id": "m-1", "attributes": {}, "created_at": now},
        ).scalar_one()
        Prepared(insert(group_member_t)).run(
            conn,
            {"tenant_id": tenant_id, "group_id": "g1", "member_id": member_id, "joined_at": now},
        )
        row = conn.execute(select(group_member_t)).one()
    assert (row.role, row.messages, row.warned_at) == ("member", 0, None)


def test_what_it_cannot_do_is_refused_before_anything_runs(engine):
    computed = Table(
        "computed",
        MetaData(),
        Column("id", Integer, primary_key=True),
        Column("tag", String, default=lambda: "made"),
    )
    expanding = delete(timer_t).where(timer_t.c.key.in_(bindparam("b_keys", expanding=True)))
    with engine.begin() as conn:
        with pytest.raises(TypeError, match="pass tag"):
            Prepared(insert(computed)).run(conn, {"id": 1})
        with pytest.raises(TypeError, match="IN lists"):
            Prepared(expanding).run(conn, {"b_keys": ["a"]})


def test_driver_errors_are_sqlalchemys_and_listeners_see_every_statement(engine):
    tenant_id, _ = new_tenant(engine)
    at = datetime(2026, 11, 23, tzinfo=UTC)
    add = Prepared(insert(event_t))
    with engine.connect() as conn, conn.begin(), counted(engine) as seen:
        add.run(conn, _event(tenant_id, "once", at))
        with pytest.raises(IntegrityError):
            add.run(conn, _event(tenant_id, "once", at))  # the same idempotency key
    assert seen["INSERT event"] == 2


def test_a_datetime_bound_again_and_again_stores_each_value_it_was_given(engine):
    """Binding remembers the last datetime object it turned into the driver's value: the
    same object again, another object of the same instant, and then a different instant
    each store their own value."""
    tenant_id, _ = new_tenant(engine)
    first = datetime(2026, 11, 23, 20, 15, 30, 123456, tzinfo=BEIJING)
    same_instant = first.astimezone(UTC)
    later = first + timedelta(microseconds=1)
    prepared = Prepared(insert(event_t).returning(event_t.c.id))
    sent = [("a", first), ("b", first), ("c", same_instant), ("d", later), ("e", first)]
    with engine.begin() as conn:
        for key, at in sent:
            prepared.scalar(conn, _event(tenant_id, key, at))
    with engine.connect() as conn:
        stored = dict(
            conn.execute(
                select(event_t.c.dedupe_key, event_t.c.occurred_at).where(
                    event_t.c.tenant_id == tenant_id
                )
            ).all()
        )
    assert stored == {key: at for key, at in sent}
    assert stored["d"] - stored["a"] == timedelta(microseconds=1)


# ── Many: a batch's rows in one statement ─────────────────────────────────────────────────
_ROW = ("tenant_id", "source", "dedupe_key", "digest", "type", "occurred_at", "received_at", "data")


def test_many_rows_store_what_connection_execute_stores(engine):
    """PostgreSQL takes the rows as one JSON parameter: unicode, quotes, nested JSON, NULLs
    and datetimes in other zones arrive as `Connection.execute` stores them."""
    from app.db import insert_rows

    tenant_id, _ = new_tenant(engine)
    at = datetime(2026, 11, 23, 20, 15, 30, 123456, tzinfo=BEIJING)
    many = Many(insert_rows(event_t, _ROW), insert(event_t))
    rows = [
        {**_event(tenant_id, f"many-{i}", at + timedelta(seconds=i)), "digest": None}
        for i in range(3)
    ]
    with engine.begin() as conn:
        conn.execute(
            insert(event_t), [{**r, "dedupe_key": f"core-{i}"} for i, r in enumerate(rows)]
        )
        with counted(engine) as seen:
            many.run(conn, rows)
            many.run(conn, [])  # nothing to write: no statement
    assert sum(seen.values()) == 1, seen
    with engine.connect() as conn:
        stored = {
            r.dedupe_key: r._asdict()
            for r in conn.execute(select(event_t).where(event_t.c.tenant_id == tenant_id))
        }
    for i in range(3):
        core, mine = stored[f"core-{i}"], stored[f"many-{i}"]
        for r in (core, mine):
            del r["id"], r["dedupe_key"]
        assert mine == core
        assert mine["occurred_at"] == at + timedelta(seconds=i)


@pytest.mark.postgres
def test_many_rows_refuse_a_value_too_long_for_its_column_on_postgresql(postgres_url):
    """Read as the column's type, a value too long is an error (as a row's own INSERT), not
    cut short as a cast to varchar(n) would. (SQLite stores strings of any length.)"""
    from app.db import insert_rows, make_engine

    engine = make_engine(postgres_url)
    try:
        with engine.begin() as conn:
            tenant_id = conn.execute(select(event_t.c.tenant_id).limit(1)).scalar()
        many = Many(insert_rows(event_t, _ROW), insert(event_t))
        row = _event(tenant_id or 0, "k" * 201, datetime(2026, 11, 23, tzinfo=UTC))
        with pytest.raises(DBAPIError, match="too long"), engine.begin() as conn:
            many.run(conn, [row])
    finally:
        engine.dispose()


@pytest.mark.postgres
@pytest.mark.parametrize("plans", ["force_custom_plan", "force_generic_plan"])
def test_rows_joined_to_a_table_are_looked_up_by_its_index(postgres_url, plans):
    """A batch's rows bound as one parameter and joined to a table (a batch closing its
    members' stages, dropping their timers) look each row up by the table's index, whether
    the server plans for the values bound (a statement's first runs) or for any (a prepared
    statement's generic plan). The planner took the rows to be 100 and read a table of a
    few thousand rows whole into a hash for each batch, a cost that grew with the table."""
    from app.db import make_engine, unnested
    from app.prepared import as_one

    probe = Table(
        "unnested_probe",
        MetaData(),
        Column("id", Integer, primary_key=True),
        Column("k", Integer, index=True),
        Column("note", String(20)),
    )
    engine = make_engine(postgres_url)
    try:
        with engine.begin() as conn:
            probe.drop(conn, checkfirst=True)
            probe.create(conn)
            conn.execute(insert(probe), [{"k": i, "note": "x"} for i in range(20_000)])
            conn.exec_driver_sql("ANALYZE unnested_probe")
        rows = unnested({"b_k": probe.c.k, "b_note": probe.c.note})
        stmt = probe.update().where(probe.c.k == rows.c.b_k).values(note=rows.c.b_note)
        compiled = stmt.compile(dialect=engine.dialect)
        params = as_one([{"b_k": k, "b_note": "y"} for k in range(0, 3200, 200)])
        with engine.begin() as conn:
            conn.exec_driver_sql(f"SET LOCAL plan_cache_mode = {plans}")
            plan = "\n".join(
                r[0] for r in conn.exec_driver_sql("EXPLAIN " + compiled.string, params)
            )
            assert "Seq Scan on unnested_probe" not in plan, plan
            assert "Index Scan using ix_unnested_probe_k" in plan, plan
            Prepared(stmt).run(conn, params)
            changed = conn.execute(select(probe.c.k).where(probe.c.note == "y")).scalars()
            assert sorted(changed) == list(range(0, 3200, 200))
    finally:
        with engine.begin() as conn:
            probe.drop(conn, checkfirst=True)
        engine.dispose()
