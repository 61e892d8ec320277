"""Storage: migrations match the models, SQLite pragmas, the JSON Schema file is in sync."""

from __future__ import annotations

import asyncio
import json
import shutil
import sqlite3
import threading
import time
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import Engine, text

from app.config import Settings
from app.db import WalCheckpointer, make_engine
from app.engine.definition import json_schema
from app.migrations import drift
from tests.conftest import FUNNELS


def test_migrations_have_no_drift_from_the_models(engine):
    assert drift(engine) == []


def test_sqlite_runs_in_wal_with_foreign_keys_and_a_roomy_checkpoint(engine):
    if engine.dialect.name != "sqlite":
        pytest.skip("SQLite pragmas; PostgreSQL has none")
    with engine.connect() as conn:
        assert conn.execute(text("PRAGMA journal_mode")).scalar() == "wal"
        assert conn.execute(text("PRAGMA foreign_keys")).scalar() == 1
        assert conn.execute(text("PRAGMA busy_timeout")).scalar() == 5000
        assert conn.execute(text("PRAGMA wal_autocheckpoint")).scalar() == 10000
        assert conn.execute(text("PRAGMA journal_size_limit")).scalar() == 64 * 1024 * 1024


def _rows_in_database_file(path: Path, tmp: Path) -> int:
    """The rows the database file itself holds: a copy of it without its WAL."""
    copy = tmp / "copy.db"
    shutil.copyfile(path, copy)
    with sqlite3.connect(copy) as conn:
        tables = conn.execute("SELECT count(*) FROM sqlite_master WHERE name = 't'").fetchone()
        return int(conn.execute("SELECT count(*) FROM t").fetchone()[0]) if tables[0] else 0


def _copied_so_far(path: Path, tmp: Path) -> int:
    """`_rows_in_database_file` while the checkpointer may be writing the file: a copy taken
    in the middle of its write is torn ("malformed"), which counts as not there yet."""
    try:
        return _rows_in_database_file(path, tmp)
    except sqlite3.DatabaseError:
        return 0


def _write_rows(engine: Engine, n: int) -> None:
    with engine.begin() as conn:
        conn.execute(text("CREATE TABLE t (x TEXT)"))
    with engine.begin() as conn:
        conn.execute(text("INSERT INTO t VALUES (:x)"), [{"x": "x" * 500} for _ in range(n)])


def test_the_checkpointer_copies_committed_rows_into_the_database_file(tmp_path):
    """The writer's commits leave ~40 MB of WAL before they copy any of it themselves; the
    service's checkpointer copies a few hundred KB within its interval, and stops when told."""
    path = tmp_path / "f.db"
    url = f"sqlite:///{path}"
    engine = make_engine(url)  # open throughout: the last connection to close checkpoints
    _write_rows(engine, 500)
    time.sleep(0.3)
    assert _rows_in_database_file(path, tmp_path) == 0  # still only in the WAL

    checkpointer = WalCheckpointer(url, interval=0.05)
    checkpointer.start()
    try:
        deadline = time.monotonic() + 10
        while _copied_so_far(path, tmp_path) < 500 and time.monotonic() < deadline:
            time.sleep(0.05)
    finally:
        checkpointer.stop()
    try:  # read with the checkpointer stopped, before the engine's close could checkpoint
        assert _rows_in_database_file(path, tmp_path) == 500
    finally:
        engine.dispose()
    assert not any(t.name == "flywheel-checkpoint" for t in threading.enumerate())


def _checkpoint_threads() -> int:
    return sum(t.name == "flywheel-checkpoint" for t in threading.enumerate())


async def _threads_while_running(app: Any) -> int:
    async with app.router.lifespan_context(app):
        return _checkpoint_threads()


def test_the_service_checkpoints_a_sqlite_file_while_it_runs_and_not_in_memory(tmp_path):
    from app.main import create_app

    url = f"sqlite:///{tmp_path / 'svc.db'}"
    for settings, expected in (
        (Settings(database_url=url, dispatch_mode="thread", workers="off"), 1),
        (Settings(database_url=url, workers="off", sqlite_checkpoint_seconds=0), 0),
        (Settings(database_url="sqlite://", workers="off"), 0),
    ):
        before = _checkpoint_threads()
        assert asyncio.run(_threads_while_running(create_app(settings))) - before == expected
        assert _checkpoint_threads() == before


def test_published_json_schema_is_generated_from_the_models():
    on_disk = json.loads((FUNNELS / "funnel.schema.json").read_text(encoding="utf-8"))
    assert on_disk == json_schema(), "run `make schema` to regenerate funnels/funnel.schema.json"


def test_schema_keys_equal_the_parser_keys():
    from app.engine.definition import FunnelDefinition

    schema = json_schema()
    fields = {f.alias or name for name, f in FunnelDefinition.model_fields.items()}
    assert set(schema["properties"]) == fields
    assert schema["additionalProperties"] is False


@pytest.mark.postgres
def test_a_pooled_connection_is_pinged_only_after_sitting_idle(postgres_url, monkeypatch):
    """The writer checks a connection out for every batch: one it used a moment ago goes out
    as it is (no round trip); one idle for a second or more is pinged first, and replaced
    if the server dropped it meanwhile (a restart), without the caller seeing an error."""
    import psycopg

    import app.db

    now = [1000.0]
    monkeypatch.setattr(app.db, "_monotonic", lambda: now[0])
    eng = make_engine(postgres_url, pool_size=1, max_overflow=0)
    pings: list[int] = []
    ping = eng.dialect.do_ping
    monkeypatch.setattr(eng.dialect, "do_ping", lambda c: pings.append(1) or ping(c))
    backend = text("SELECT pg_backend_pid()")
    try:
        with eng.connect() as conn:
            first = conn.execute(backend).scalar_one()
        now[0] += 0.5
        with eng.connect() as conn:
            assert conn.execute(backend).scalar_one() == first
        assert pings == []  # in use half a second ago: handed out unpinged
        admin = eng.url.set(drivername="postgresql").render_as_string(hide_password=False)
        with psycopg.connect(admin, autocommit=True) as c:
            c.execute("SELECT pg_terminate_backend(%s)", (first,))
        now[0] += 1.5
        with eng.connect() as conn:
            assert conn.execute(backend).scalar_one() != first  # a new connection
        assert pings == [1]
    finally:
        eng.dispose()
