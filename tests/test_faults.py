"""Faults, with real processes — SQLite and PostgreSQL where they apply. Marked `fault`:
`make test` and CI run them; `pytest -m "not fault"` leaves them out while iterating.

- The server is killed with SIGKILL in the middle of a burst of signed webhooks, then
  started again and sent everything again (as a Standard Webhooks sender retries): every
  acknowledged event was stored, every stored event was applied whole, and each applies
  exactly once in the end.
- PostgreSQL drops every connection and refuses new ones for a while (what a restart looks
  like from the service): /healthz says unhealthy, requests get 503s (never a 500), and the
  same server process recovers by itself; nothing acknowledged is lost.
- A timer worker is killed while it holds claimed timers (inside its transaction, one
  already applied): the claims end with it, and the next worker fires each timer once.
"""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import textwrap
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path

import httpx
import pytest
from sqlalchemy import Engine, select

from app.db import make_engine, session_scope
from app.events.ingest import signed_headers
from app.events.models import EventLog
from app.events.sources import create_source
from app.funnels.models import FunnelInstance
from app.funnels.service import publish
from app.members.models import Member
from app.outbox.models import Outbox
from app.timers.models import Timer
from app.timers.worker import fire_due
from bench.run import HOST, start
from tests.conftest import T0, _admin, _truncate, apply_command, count, new_tenant
from tests.factories import welcome

pytestmark = pytest.mark.fault
SECRET_KEY = "f" * 40


# ── a real server and a sender ────────────────────────────────────────────────────────────
@dataclass
class Tenant:
    url: str
    engine: Engine
    tenant_id: int
    path: str  # the webhook source's path
    secret: str


def tenant(engine: Engine) -> Tenant:
    tenant_id, _ = new_tenant(engine, "faults")
    now = datetime.now(UTC)
    with session_scope(engine) as session:
        publish(session, tenant_id, "welcome", welcome(), now)
        source = create_source(session, tenant_id, "group-bot", now)
        path, secret = f"/v1/webhooks/{source.public_id}", source.secret
    url = engine.url.render_as_string(hide_password=False)
    return Tenant(url, engine, tenant_id, path, secret)


def serve(t: Tenant) -> tuple[subprocess.Popen[bytes], int]:
    """uvicorn as users run it, over the tenant's database, with no background workers (the
    rows counted below change only through the webhooks)."""
    env = {
        "FLYWHEEL_DATABASE_URL": t.url,
        "FLYWHEEL_SECRET_KEY": SECRET_KEY,
        "FLYWHEEL_ENV": "test",
        "FLYWHEEL_WORKERS": "off",
        "FLYWHEEL_RATE_LIMIT_PER_SECOND": "0",
        "FLYWHEEL_LOG_LEVEL": "ERROR",
    }
    return start("app.main:create_app", env, factory=True)


def joined(i: int) -> tuple[str, bytes]:
    body = {"type": "member.joined", "member": {"id": f"m{i:05d}", "nickname": f"N{i}"}}
    return f"msg-{i:05d}", json.dumps(body).encode()


@dataclass
class Burst:
    """Sends `items` over `connections` concurrent connections until they run out, the
    server goes away, or `stop` is set; remembers what each answer was."""

    port: int
    t: Tenant
    items: list[tuple[str, bytes]]
    connections: int = 16
    retry_refused: bool = False  # keep going through 503s and dropped connections
    acked: list[str] = field(default_factory=list)
    statuses: dict[int, int] = field(default_factory=dict)
    failures: int = 0
    stop: threading.Event = field(default_factory=threading.Event)

    async def _worker(self, client: httpx.AsyncClient, queue: list[tuple[str, bytes]]) -> None:
        while queue and not self.stop.is_set():
            msg_id, body = queue.pop()
            headers = signed_headers([self.t.secret], msg_id, datetime.now(UTC), body)
            try:
                r = await client.post(self.t.path, content=body, headers=headers)
            except httpx.TransportError:
                self.failures += 1
                if not self.retry_refused:
                    return  # the server is gone
                await asyncio.sleep(0.05)
                continue
            self.statuses[r.status_code] = self.statuses.get(r.status_code, 0) + 1
            if r.status_code == 200:
                self.acked.append(msg_id)

    async def _run(self) -> None:
        queue = list(reversed(self.items))
        limits = httpx.Limits(max_connections=self.connections)
        base = f"http://{HOST}:{self.port}"
        async with httpx.AsyncClient(base_url=base, limits=limits, timeout=30) as client:
            await asyncio.gather(*(self._worker(client, queue) for _ in range(self.connections)))

    def run(self) -> None:
        asyncio.run(self._run())

    def in_background(self) -> threading.Thread:
        thread = threading.Thread(target=self.run, daemon=True)
        thread.start()
        return thread


def children(pid: int) -> list[int]:
    return [
        int(child)
        for task in os.listdir(f"/proc/{pid}/task")
        for child in Path(f"/proc/{pid}/task/{task}/children").read_text().split()
    ]


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except FileNotFoundError:
        return False
    return state != "Z"  # a zombie has exited, and waits for its new parent to reap it


def gone(pids: list[int], within: float) -> bool:
    """Whether every one of these processes exits within `within` seconds."""
    deadline = time.monotonic() + within
    while any(_alive(p) for p in pids):
        if time.monotonic() > deadline:
            return False
        time.sleep(0.05)
    return True


def stored(t: Tenant) -> set[str]:
    with t.engine.connect() as conn:
        rows = conn.execute(
            select(EventLog.dedupe_key).where(EventLog.tenant_id == t.tenant_id)  # type: ignore[arg-type]
        ).all()
    return {r[0].rsplit(":", 1)[-1] for r in rows if r[0]}


def effects(t: Tenant) -> dict[str, int]:
    """What one member.joined of the welcome funnel writes: an event row, a member, a funnel
    instance, a welcome message in the outbox and the one-hour nudge timer."""
    return {
        "events": count(t.engine, EventLog, EventLog.tenant_id == t.tenant_id),
        "members": count(t.engine, Member, Member.tenant_id == t.tenant_id),
        "instances": count(t.engine, FunnelInstance, FunnelInstance.tenant_id == t.tenant_id),
        "welcomes": count(t.engine, Outbox, Outbox.type == "send_message"),
        "timers": count(t.engine, Timer),
    }


# ── kill -9 mid-burst, restart, resend ────────────────────────────────────────────────────
def test_kill_9_mid_burst_loses_nothing_acknowledged_and_applies_each_event_once(engine):
    t = tenant(engine)
    items = [joined(i) for i in range(1_500)]
    proc, port = serve(t)
    burst = Burst(port, t, items)
    try:
        thread = burst.in_background()
        deadline = time.monotonic() + 60
        while len(burst.acked) < 300 and time.monotonic() < deadline:
            time.sleep(0.005)
        writers = children(proc.pid)  # the writer process (and multiprocessing's tracker)
        proc.kill()  # SIGKILL: no shutdown hooks, no last commit
        proc.wait()
        thread.join(60)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert writers, "the service wrote in its own process, not in a writer process"
    assert gone(writers, within=30), "a writer process outlived the service"
    acked = set(burst.acked)
    assert 300 <= len(acked) < len(items), "the kill did not land mid-burst"
    assert burst.statuses.keys() == {200}, burst.statuses
    # after the crash: every acknowledged event stored, and each stored event applied whole
    kept = stored(t)
    assert acked <= kept, f"{len(acked - kept)} acknowledged events lost"
    n = len(kept)
    assert effects(t) == dict.fromkeys(effects(t), n), effects(t)

    proc, port = serve(t)  # restarted over the same database
    try:
        again = Burst(port, t, items)
        again.run()
    finally:
        proc.kill()
        proc.wait()
    print(
        f"kill -9 ({engine.dialect.name}): {len(acked)} acknowledged, {n} stored whole; "
        f"after the restart {len(items)} applied once each"
    )
    assert again.statuses == {200: len(items)}, again.statuses
    assert effects(t) == dict.fromkeys(effects(t), len(items)), effects(t)


# ── PostgreSQL goes away and comes back ───────────────────────────────────────────────────
@pytest.fixture
def pg_engine(postgres_url: str) -> Iterator[Engine]:
    eng = make_engine(postgres_url, pool_size=5)
    try:
        yield eng
    finally:
        _truncate(eng)
        eng.dispose()


def allow_connections(engine: Engine, allowed: bool) -> None:
    """From outside the service: let no one connect to its database and drop every open
    connection (what a PostgreSQL restart looks like to the service), or allow them again.
    Only this test's database is touched; the server keeps serving the rest of the suite."""
    database = engine.url.database
    with _admin(engine.url.render_as_string(hide_password=False)) as admin:
        admin.execute(f'ALTER DATABASE "{database}" ALLOW_CONNECTIONS {str(allowed).lower()}')
        if not allowed:
            admin.execute(
                "SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                "WHERE datname = %s AND pid <> pg_backend_pid()",
                (database,),
            )


def health(port: int) -> int:
    try:
        return httpx.get(f"http://{HOST}:{port}/healthz", timeout=5).status_code
    except httpx.TransportError:
        return 0


@pytest.mark.postgres
def test_postgresql_going_away_is_unhealthy_then_recovers_without_a_restart(pg_engine):
    t = tenant(pg_engine)
    proc, port = serve(t)
    burst = Burst(port, t, [joined(i) for i in range(200_000)], retry_refused=True)
    outage: list[int] = []
    try:
        thread = burst.in_background()
        while len(burst.acked) < 200:
            time.sleep(0.01)
        allow_connections(pg_engine, False)
        try:
            until = time.monotonic() + 3
            while time.monotonic() < until:
                outage.append(health(port))
                time.sleep(0.1)
            before = len(burst.acked)
        finally:
            allow_connections(pg_engine, True)
        recovered_in = time.monotonic()
        deadline = recovered_in + 30
        while health(port) != 200 and time.monotonic() < deadline:
            time.sleep(0.1)
        recovered_in = time.monotonic() - recovered_in
        while len(burst.acked) < before + 200 and time.monotonic() < deadline:
            time.sleep(0.01)
        burst.stop.set()
        thread.join(60)
        assert proc.poll() is None, "the server exited"  # the same process throughout
    finally:
        proc.kill()
        proc.wait()
    assert 503 in outage and 200 not in outage, outage  # unhealthy while it lasted
    assert recovered_in < 30, "the service did not recover on its own"
    assert len(burst.acked) >= before + 200, "no events accepted after the recovery"
    assert 500 not in burst.statuses, burst.statuses  # refused as unavailable, never a 500
    assert set(burst.statuses) <= {200, 503}, burst.statuses
    acked = set(burst.acked)
    kept = stored(t)
    print(
        f"PostgreSQL outage: health {outage}, recovered in {recovered_in:.1f} s, "
        f"answers {burst.statuses}, {len(acked)} acknowledged, {len(kept)} stored"
    )
    assert acked <= kept, f"{len(acked - kept)} acknowledged events lost"
    assert effects(t) == dict.fromkeys(effects(t), len(kept)), effects(t)


# ── a timer worker killed while holding its claims ────────────────────────────────────────
HOLDING_WORKER = textwrap.dedent(
    """
    import sys, time
    from datetime import datetime
    import app.timers.worker as worker
    from app.db import make_engine

    real = worker.apply_one

    def apply_then_hang(*args, **kwargs):
        reply = real(*args, **kwargs)  # applied inside the claiming transaction, uncommitted
        print("holding", flush=True)
        time.sleep(3600)

    worker.apply_one = apply_then_hang
    worker.fire_due(make_engine(sys.argv[1]), datetime.fromisoformat(sys.argv[2]), 500)
    """
)


def test_a_timer_worker_killed_holding_claims_leaves_each_timer_to_fire_once(engine):
    tenant_id, _ = new_tenant(engine, "timers")
    with session_scope(engine) as session:
        publish(session, tenant_id, "welcome", welcome(), T0)
    members = 40
    for i in range(members):
        apply_command(engine, tenant_id, T0, "member.joined", f"m{i}")
    assert count(engine, Timer) == members
    due = T0 + timedelta(hours=2)
    url = engine.url.render_as_string(hide_password=False)
    with subprocess.Popen(
        [sys.executable, "-c", HOLDING_WORKER, url, due.isoformat()],
        stdout=subprocess.PIPE,
        text=True,
    ) as worker:
        try:
            assert worker.stdout is not None and worker.stdout.readline().strip() == "holding"
            if engine.dialect.name == "postgresql":  # a second worker skips the claimed rows
                assert fire_due(engine, due, 500) == []
        finally:
            worker.kill()  # SIGKILL, holding its claims and an uncommitted timer
    assert count(engine, Timer) == members  # the killed claim changed nothing
    fired = fire_due(engine, due, 500)
    assert len(fired) == members and all(r.status == 200 for r in fired)
    assert fire_due(engine, due, 500) == []
    assert count(engine, Timer) == 0
    assert count(engine, EventLog, EventLog.type == "timer.fired") == members
    nudges = [p for p in outbox_texts(engine) if p == "Say hello!"]
    assert len(nudges) == members  # each member nudged once


def outbox_texts(engine: Engine) -> list[str]:
    with engine.connect() as conn:
        rows = conn.execute(select(Outbox.payload)).all()  # type: ignore[call-overload]
    return [r[0]["params"].get("text") for r in rows]
