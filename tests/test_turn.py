"""Turns at SQLite's write lock (app/turn.py): the dispatcher's writer gives way to the
service's other writers (workers' rounds, admin writes), across processes and threads."""

from __future__ import annotations

import multiprocessing
import os
import shutil
import sqlite3
import threading
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import text
from sqlalchemy.exc import OperationalError

from app.db import GIVES_WAY, make_engine
from app.events.dispatch import Inbound, apply_batch
from app.turn import turn_for
from tests.conftest import new_tenant

SPAWN = multiprocessing.get_context("spawn")


def _ask_and_hold(path: str, asked: Any, release: Any) -> None:
    turn = turn_for(path)
    turn.ask()
    asked.set()
    release.wait(60)
    turn.done()


def _ask_and_die(path: str, asked: Any) -> None:
    turn_for(path).ask()
    asked.set()
    os._exit(1)  # no `done`: the operating system drops the lock


def _giving_way(turn: Any) -> tuple[threading.Thread, list[float]]:
    waited: list[float] = []
    t = threading.Thread(target=lambda: waited.append(turn.give_way(limit=60)))
    t.start()
    return t, waited


def test_the_writer_waits_while_another_process_asks(tmp_path: Path) -> None:
    db = str(tmp_path / "turn.db")
    asked, release = SPAWN.Event(), SPAWN.Event()
    child = SPAWN.Process(target=_ask_and_hold, args=(db, asked, release))
    child.start()
    try:
        assert asked.wait(60)
        turn = turn_for(db)
        assert turn.asked()
        t, waited = _giving_way(turn)
        t.join(0.3)
        assert t.is_alive(), "the writer went ahead of an asker"
        release.set()
        t.join(30)
        assert not t.is_alive() and waited[0] < 60
        child.join(30)
        assert not turn.asked()
    finally:
        release.set()
        child.join(30)


def test_an_asker_that_dies_leaves_no_ask_behind(tmp_path: Path) -> None:
    db = str(tmp_path / "turn.db")
    asked = SPAWN.Event()
    child = SPAWN.Process(target=_ask_and_die, args=(db, asked))
    child.start()
    assert asked.wait(60)
    child.join(30)
    assert child.exitcode == 1
    turn = turn_for(db)
    assert not turn.asked()
    assert turn.give_way() == 0.0


def test_threads_of_one_process_hold_the_ask_until_the_last_is_done(tmp_path: Path) -> None:
    turn = turn_for(str(tmp_path / "turn.db"))
    turn.ask()
    turn.ask()
    turn.done()
    assert turn.asked()  # one thread still asks
    t, _ = _giving_way(turn)
    t.join(0.3)
    assert t.is_alive()
    turn.done()
    t.join(30)
    assert not t.is_alive() and not turn.asked()


def test_a_writer_gives_way_for_at_most_its_limit(tmp_path: Path) -> None:
    turn = turn_for(str(tmp_path / "turn.db"))
    turn.ask()
    try:
        assert 0.05 <= turn.give_way(limit=0.05) < 30
    finally:
        turn.done()


# ── with the database ─────────────────────────────────────────────────────────────────────
def _hammer(url: str, started: Any, stop: Any) -> None:
    """The dispatcher's writer under sustained load: transactions back to back, each
    holding the write lock for 20 ms."""
    engine = make_engine(url)
    with engine.connect() as conn:
        conn.execution_options(**{GIVES_WAY: True})
        while not stop.is_set():
            with conn.begin():
                conn.execute(text("INSERT INTO hits (who) VALUES ('writer')"))
                started.set()
                time.sleep(0.02)
    engine.dispose()


def test_a_worker_writes_while_the_writer_is_saturated(tmp_path: Path) -> None:
    """Without the turn the worker's tries (every 100 ms after its first few) rarely meet
    the lock free between two batches, and a 1 s busy timeout runs out."""
    url = f"sqlite:///{tmp_path / 'busy.db'}"
    with sqlite3.connect(tmp_path / "busy.db") as setup:
        setup.execute("PRAGMA journal_mode=WAL")
        setup.execute("CREATE TABLE hits (id INTEGER PRIMARY KEY, who TEXT)")
    started, stop = SPAWN.Event(), SPAWN.Event()
    writer = SPAWN.Process(target=_hammer, args=(url, started, stop))
    writer.start()
    worker = make_engine(url, busy_timeout_ms=1000)
    try:
        assert started.wait(60)
        for _ in range(10):
            with worker.begin() as conn:  # raises "database is locked" if it never gets in
                conn.execute(text("INSERT INTO hits (who) VALUES ('worker')"))
            time.sleep(0.05)
    finally:
        stop.set()
        writer.join(60)
        worker.dispose()
    with sqlite3.connect(tmp_path / "busy.db") as check:
        counts = dict(check.execute("SELECT who, count(*) FROM hits GROUP BY who").fetchall())
    assert counts["worker"] == 10 and counts["writer"] > 10
    assert not turn_for(str(tmp_path / "busy.db")).asked()


def test_an_ask_ends_with_its_transaction_however_it_ends(tmp_path: Path) -> None:
    db = tmp_path / "ends.db"
    engine = make_engine(f"sqlite:///{db}", busy_timeout_ms=0)
    turn = turn_for(str(db))
    with engine.begin() as conn:
        conn.execute(text("CREATE TABLE t (x INTEGER)"))
        assert turn.asked()  # from BEGIN on
    assert not turn.asked()
    with pytest.raises(ZeroDivisionError), engine.begin() as conn:
        conn.execute(text("INSERT INTO t VALUES (1)"))
        _ = 1 / 0
    assert not turn.asked()
    holder = sqlite3.connect(db, isolation_level=None)
    holder.execute("BEGIN IMMEDIATE")
    try:
        with pytest.raises(OperationalError, match="locked"), engine.begin():
            pass
        assert not turn.asked()  # the BEGIN that failed asks no more
    finally:
        holder.execute("ROLLBACK")
        holder.close()
    with engine.connect() as conn:  # a transaction begun and never ended: back to the pool
        conn.execute(text("INSERT INTO t VALUES (2)"))
        assert turn.asked()
    assert not turn.asked()
    engine.dispose()


def test_the_dispatcher_gives_way_to_an_asker(tmp_path: Path, sqlite_template: Path) -> None:
    db = tmp_path / "dispatch.db"
    shutil.copy(sqlite_template, db)
    engine = make_engine(f"sqlite:///{db}")
    tenant_id, _ = new_tenant(engine)
    turn = turn_for(str(db))
    turn.ask()
    done: list[Any] = []
    item = Inbound(tenant_id=tenant_id, source="api", type="order.paid", data={}, member_id=999)
    t = threading.Thread(target=lambda: done.append(apply_batch(engine, [item], _now())))
    t.start()
    t.join(0.3)
    try:
        assert t.is_alive(), "the batch went ahead of an asker"
    finally:
        turn.done()
    t.join(30)
    assert [r.status for r in done[0]] == [404]  # no member 999: answered, after the asker
    engine.dispose()


def _now() -> datetime:
    return datetime.now(UTC)
