"""`make bench`: the write path's throughput and latency on SQLite and PostgreSQL, next to a
bare FastAPI baseline measured in the same run, and the funnel report over 1M members.

Each server runs as users run it (uvicorn, one worker process, the default, which starts
Flywheel's writer processes) in its own process; the load comes from another process over
127.0.0.1 (bench/load.py), bounded in time and count. What is sent and checked is in
bench/scenarios.py. Results go to bench/results.md and bench/results.json.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Iterator
from concurrent.futures import ProcessPoolExecutor
from contextlib import contextmanager
from datetime import UTC, datetime
from multiprocessing import get_context
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
TARGETS = ("baseline", "sqlite", "postgres", "words", "report")
PHASES = ("webhook", "join", "solitaire")  # what each Flywheel target runs, in this order
HOST = "127.0.0.1"
PG_SERVER = os.environ.get(
    "FLYWHEEL_BENCH_POSTGRES", "postgresql+psycopg://postgres@127.0.0.1:5432/postgres"
)


def free_port() -> int:
    with socket.socket() as s:
        s.bind((HOST, 0))
        return int(s.getsockname()[1])


def start(app: str, env: dict[str, str], factory: bool) -> tuple[subprocess.Popen[bytes], int]:
    port = free_port()
    cmd = [sys.executable, "-m", "uvicorn", app, "--host", HOST, "--port", str(port)]
    cmd += ["--no-access-log", "--log-level", "warning"] + (["--factory"] if factory else [])
    proc = subprocess.Popen(cmd, cwd=ROOT, env={**os.environ, **env})  # noqa: S603 - our command
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        try:
            socket.create_connection((HOST, port), timeout=0.2).close()
            return proc, port
        except OSError:
            if proc.poll() is not None:
                raise SystemExit(f"{app} exited with {proc.returncode}") from None
            time.sleep(0.1)
    proc.kill()
    raise SystemExit(f"{app} did not start")


def stop(proc: subprocess.Popen[bytes]) -> None:
    proc.terminate()
    try:
        proc.wait(10)
    except subprocess.TimeoutExpired:
        proc.kill()


def load(
    pool: ProcessPoolExecutor, port: int, requests: list[bytes], a: Any, seconds: float
) -> dict[str, Any]:
    """Send `requests` from the load generator's own process."""
    return pool.submit(_drive, port, requests, a.connections, seconds).result()


def _drive(*args: Any) -> dict[str, Any]:
    from bench.load import drive

    return drive(HOST, *args)


def setup_phase(name: str, what: str, result: dict[str, Any]) -> None:
    if result["errors"]:
        raise SystemExit(f"{name}: {result['errors']} errors while {what}: {result}")
    print(f"{name}: {what} ({result['rps']:,.0f}/s)", file=sys.stderr, flush=True)


def bench_flywheel(
    pool: ProcessPoolExecutor, name: str, url: str, a: Any
) -> dict[str, dict[str, Any]]:
    """Webhooks, then group-buy joins, then solitaire appends, against one server."""
    from bench import scenarios

    target = scenarios.prepare(url)
    env = {
        "FLYWHEEL_DATABASE_URL": url,
        "FLYWHEEL_SECRET_KEY": scenarios.SECRET_KEY,
        "FLYWHEEL_RATE_LIMIT_PER_SECOND": "0",
        "FLYWHEEL_LOG_LEVEL": "WARNING",
    }
    proc, port = start("app.main:create_app", env, factory=True)
    out: dict[str, dict[str, Any]] = {}
    try:
        make = scenarios.Requests(HOST, port, target)
        setup_phase(name, "members joined", load(pool, port, make.joined(a.members), a, 600))
        scenarios.analyze(target)
        if "webhook" in a.phases:
            out["webhook"] = load(
                pool, port, make.messages(a.members, int(a.seconds * 6000)), a, a.seconds
            )
        tokens = make.tokens(a.members)
        if "join" in a.phases:
            opens = make.opens(tokens)
            setup_phase(name, "leaders opened teams", load(pool, port, opens, a, 600))
            scenarios.analyze(target)
            joins = make.joins(tokens, scenarios.teams(target))
            out["join"] = load(pool, port, joins, a, a.seconds)
            out["join"]["check"] = scenarios.check_teams(target)
        if "solitaire" in a.phases:
            list_id = scenarios.open_list(target, HOST, port)
            out["solitaire"] = load(pool, port, make.appends(tokens, list_id), a, a.seconds)
            answered = out["solitaire"]["statuses"].get(200, 0)
            out["solitaire"]["check"] = scenarios.check_lines(target, answered)
    finally:
        stop(proc)
    return out


def durability(pool: ProcessPoolExecutor, name: str, url: str, a: Any) -> dict[str, Any]:
    """kill -9 the server in the middle of a webhook run: every event it acknowledged must
    be in the database afterwards."""
    from bench import scenarios

    target = scenarios.prepare(url)
    env = {"FLYWHEEL_DATABASE_URL": url, "FLYWHEEL_RATE_LIMIT_PER_SECOND": "0"}
    proc, port = start("app.main:create_app", {**env, "FLYWHEEL_LOG_LEVEL": "ERROR"}, True)
    try:
        make = scenarios.Requests(HOST, port, target)
        setup_phase(name, "members joined", load(pool, port, make.joined(a.members), a, 600))
        make.ids.clear()
        requests = make.messages(a.members, 60_000)
        running = pool.submit(_drive, port, requests, a.connections, 60.0)
        time.sleep(a.kill_after)
        proc.kill()  # SIGKILL: no shutdown hooks, no final commit
        proc.wait()
        sent = running.result()
    finally:
        if proc.poll() is None:
            proc.kill()
    acked = [make.ids[i] for i in sent["acked"]]
    found = scenarios.stored_keys(target, acked)
    result = {"acknowledged": len(acked), "stored": found, "lost": len(acked) - found}
    print(f"durability, {name}: {result}", file=sys.stderr)
    if found != len(acked):
        raise SystemExit(f"{name}: {len(acked) - found} acknowledged events lost after kill -9")
    return result


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--seconds", type=float, default=10.0, help="timed phase per target")
    p.add_argument("--connections", type=int, default=64)
    p.add_argument("--members", type=int, default=6000, help="members (a fifth lead teams)")
    p.add_argument("--targets", default=",".join(TARGETS))
    p.add_argument(
        "--phases", default=",".join(PHASES), help="of the Flywheel targets (webhook,join,…)"
    )
    p.add_argument("--report-members", type=int, default=1_000_000)
    p.add_argument(
        "--durability",
        action="store_true",
        help="instead: kill -9 the server mid-run and check every acknowledged event is stored",
    )
    p.add_argument("--kill-after", type=float, default=3.0, help="seconds into the run")
    a = p.parse_args()
    a.phases = a.phases.split(",")
    if a.durability:
        return run_durability(a)
    targets = a.targets.split(",")
    results: dict[str, dict[str, Any]] = {}
    pool = ProcessPoolExecutor(1, mp_context=get_context("spawn"))
    with tempfile.TemporaryDirectory() as tmp:
        if "baseline" in targets:
            proc, port = start("bench.baseline:app", {}, factory=False)
            try:
                from bench.scenarios import Requests, Target

                secret = "whsec_" + "QkVOQ0hNQVJLQkVOQ0hNQVJLQkVOQ0hNQVJLQkVOQ0g="
                fake = Target("", 0, "/v1/webhooks/src_b", secret, "")
                requests = Requests(HOST, port, fake).messages(a.members, int(a.seconds * 6000))
                results["baseline"] = {"webhook": load(pool, port, requests, a, a.seconds)}
            finally:
                stop(proc)
        if "sqlite" in targets:
            results["sqlite"] = bench_flywheel(pool, "sqlite", f"sqlite:///{tmp}/bench.db", a)
        if "postgres" in targets:
            results["postgres"] = bench_postgres(pool, a)
        reports = None
        if "report" in targets:
            from bench.report import measure as measure_report

            reports = measure_report(a.report_members, tmp, PG_SERVER)
    pool.shutdown()
    words = None
    if "words" in targets:
        from bench.words import measure as measure_words

        words = measure_words()
    # A partial run (some targets or phases) prints its table and keeps the results files.
    whole = set(targets) >= set(TARGETS) and set(a.phases) >= set(PHASES)
    report(results, a, words, reports, write=whole)
    return 0


def run_durability(a: Any) -> int:
    pool = ProcessPoolExecutor(1, mp_context=get_context("spawn"))
    targets = a.targets.split(",")
    with tempfile.TemporaryDirectory() as tmp:
        if "sqlite" in targets:
            durability(pool, "sqlite", f"sqlite:///{tmp}/durability.db", a)
        if "postgres" in targets:
            with postgres_database() as url:
                durability(pool, "postgres", url, a)
    pool.shutdown()
    return 0


@contextmanager
def postgres_database() -> Iterator[str]:
    """A fresh database on the bench's PostgreSQL server, dropped afterwards."""
    import psycopg
    from sqlalchemy.engine import make_url

    server = make_url(PG_SERVER)
    name = f"flywheel_bench_{uuid.uuid4().hex[:8]}"
    admin_url = server.set(drivername="postgresql", database="postgres")
    with psycopg.connect(admin_url.render_as_string(hide_password=False), autocommit=True) as c:
        c.execute(f'CREATE DATABASE "{name}"')
    try:
        yield server.set(database=name).render_as_string(hide_password=False)
    finally:
        with psycopg.connect(admin_url.render_as_string(hide_password=False), autocommit=True) as c:
            c.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


def bench_postgres(pool: ProcessPoolExecutor, a: Any) -> dict[str, Any]:
    with postgres_database() as url:
        return bench_flywheel(pool, "postgres", url, a)


def report(
    results: dict[str, dict[str, Any]],
    a: Any,
    words: dict[str, Any] | None,
    reports: dict[str, Any] | None = None,
    *,
    write: bool = True,
) -> None:
    base = results.get("baseline", {}).get("webhook", {}).get("rps") or 0
    machine = f"{platform.machine()}, {os.cpu_count()} cores, Python {platform.python_version()}"
    rows = [
        "| target | requests/s | p50 ms | p99 ms | errors | vs baseline | target |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    labels = {
        "webhook": ("signed `message.posted` webhook", 0.50),
        "join": ("mini-program group-buy join (hot teams)", 0.35),
        "solitaire": ("mini-program solitaire append (one list)", 0.35),
    }
    databases = {"baseline": "", "sqlite": ", SQLite", "postgres": ", PostgreSQL"}
    for db, by_kind in results.items():
        for kind, r in by_kind.items():
            label, goal = labels[kind]
            if db == "baseline":
                label, ratio, wanted = "bare FastAPI, parse + echo the same JSON", "—", "—"
            else:
                ratio = f"{r['rps'] / base:.0%}" if base else "—"
                wanted = f"≥ {goal:.0%}"
            cells = [
                label + databases[db],
                f"{r['rps']:,.0f}",
                r["p50_ms"],
                r["p99_ms"],
                r["errors"],
                ratio,
                wanted,
            ]
            rows.append("| " + " | ".join(str(c) for c in cells) + " |")
    table = "\n".join(rows)
    when = datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC")
    md = (
        f"# Benchmark results\n\n{when}; {machine}; {a.connections} connections; uvicorn, "
        f"one worker process (its default) with Flywheel's writer processes beside it (one "
        f"on SQLite, two on PostgreSQL), the load generator in another process on "
        f"127.0.0.1. Webhooks: {a.seconds:g} s of `message.posted` from {a.members:,} members "
        "(signed, Standard Webhooks; office-lunch funnel). Joins: a fifth of the members lead "
        "teams of five and the rest join them in team order (the connections in flight all "
        "hit the same few teams); every team is checked to hold exactly five afterwards. "
        "Appends: every member appends a line to one solitaire list; the lines are checked to "
        "be numbered without gaps.\n\n"
        f"{table}\n"
    )
    if words:
        md += (
            f"\n## Sensitive words\n\n{words['words']:,} words (2–4 hanzi), {words['messages']:,} "
            "Chinese messages of 10–120 characters, one in ten carrying a listed word; the "
            "automaton next to a loop over the words, in the same run.\n\n"
            "| matcher | µs per message | vs the loop |\n|---|---:|---:|\n"
            f"| Aho–Corasick (built in {words['build_ms']} ms) | {words['automaton_us']} | "
            f"{words['automaton_us'] / words['loop_us']:.1%} |\n"
            f"| loop over the words | {words['loop_us']} | — |\n"
        )
    if reports:
        from bench.report import markdown

        md += markdown(reports)
    print("\n" + md)
    if not write:
        return
    (ROOT / "bench" / "results.md").write_text(md)
    out: dict[str, Any] = {"machine": machine, "measured_at": when}
    if base:
        out["baseline_rps"] = base
    for db in ("sqlite", "postgres"):
        for kind, r in results.get(db, {}).items():
            out[f"{kind}_rps_{db}"] = r["rps"]
            out[f"{kind}_p50_ms_{db}"] = r["p50_ms"]
            out[f"{kind}_p99_ms_{db}"] = r["p99_ms"]
            out[f"{kind}_errors_{db}"] = r["errors"]
            if base:
                out[f"{kind}_ratio_{db}"] = round(r["rps"] / base, 3)
    if reports:
        for db, r in reports.items():
            out[f"report_1m_s_{db}"] = r["report_s"]
    if words:
        out["sensitive_words"] = words
    if reports:
        out["funnel_report"] = reports
    (ROOT / "bench" / "results.json").write_text(json.dumps(out, indent=2) + "\n")


if __name__ == "__main__":
    sys.exit(main())
