"""`flywheel`: validate, simulate and replay funnels, migrate, bootstrap tenants, load funnels,
serve."""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from datetime import UTC, date, datetime
from pathlib import Path

from sqlalchemy import Engine

from app.errors import DomainError, InvalidDefinition


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="flywheel", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("validate", help="check funnel definitions (schema and semantics)")
    p.add_argument("files", nargs="+", type=Path)
    p.set_defaults(run=cmd_validate)

    p = sub.add_parser(
        "simulate", help="dry-run a timeline of events (JSON lines) through a funnel"
    )
    p.add_argument("funnel", type=Path)
    p.add_argument(
        "events", type=Path, help='JSON lines: {"at", "member", "type", "data", "profile"}'
    )
    p.add_argument("--json", action="store_true", help="one JSON object per step")
    p.set_defaults(run=cmd_simulate)

    p = sub.add_parser(
        "replay",
        help="what-if: replay a tenant's recorded events through a draft funnel, writing "
        "nothing, and print the stage counts it would have produced next to the real ones",
    )
    p.add_argument(
        "funnel_version",
        metavar="FUNNEL_VERSION",
        help="a draft definition file (draft.json), or a stored version as KEY:NUMBER",
    )
    p.add_argument("--tenant", required=True, help="tenant name or id")
    p.add_argument("--from", dest="start", required=True, type=date.fromisoformat)
    p.add_argument("--to", dest="end", required=True, type=date.fromisoformat)
    p.add_argument("--json", action="store_true", help="print the result as JSON")
    p.set_defaults(run=cmd_replay)

    p = sub.add_parser("schema", help="print the funnel JSON Schema")
    p.set_defaults(run=cmd_schema)

    p = sub.add_parser("migrate", help="upgrade the database to the latest migration")
    p.set_defaults(run=cmd_migrate)

    p = sub.add_parser("create-tenant", help="create a tenant and its first API key (shown once)")
    p.add_argument("name")
    p.set_defaults(run=cmd_create_tenant)

    p = sub.add_parser("create-key", help="create another API key for a tenant (shown once)")
    p.add_argument("tenant", help="tenant name or id")
    p.add_argument("--name", default="cli")
    p.set_defaults(run=cmd_create_key)

    p = sub.add_parser(
        "load-funnels", help="publish funnel files for a tenant (created if missing)"
    )
    p.add_argument("--tenant", required=True)
    p.add_argument("files", nargs="+", type=Path)
    p.set_defaults(run=cmd_load_funnels)

    p = sub.add_parser(
        "worker",
        help="fire timers, deliver actions and prune keys, without serving HTTP "
        "(run the service with FLYWHEEL_WORKERS=off then)",
    )
    p.add_argument(
        "--until-idle",
        action="store_true",
        help="exit once no timer is due and no delivery is waiting; print the totals as JSON",
    )
    p.set_defaults(run=cmd_worker)

    p = sub.add_parser("serve", help="run the HTTP service")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8000)
    p.set_defaults(run=cmd_serve)

    args = parser.parse_args(argv)
    return int(args.run(args) or 0)


def _out(text: str = "") -> None:
    sys.stdout.write(text + "\n")


def _err(text: str) -> None:
    sys.stderr.write(text + "\n")


def cmd_validate(args: argparse.Namespace) -> int:
    from app.engine import load_and_compile
    from app.engine.lint import platform_warnings

    failed = 0
    for path in args.files:
        try:
            funnel = load_and_compile(path.read_bytes())
        except InvalidDefinition as exc:
            failed += 1
            _out(f"{path}: {len(exc.problems)} problem(s)")
            for problem in exc.problems:
                _out(f"  {problem}")
        except OSError as exc:
            failed += 1
            _out(f"{path}: cannot read: {exc.strerror}")
        else:
            d = funnel.definition
            _out(f"{path}: ok ({d.key}: {len(d.states)} states, {len(d.transitions)} transitions)")
            for warning in platform_warnings(d):
                _out(f"  warning: {warning}")
    return 1 if failed else 0


def cmd_simulate(args: argparse.Namespace) -> int:
    from app.engine import load_and_compile
    from app.engine.simulate import Simulator, TimelineEntry, parse_timeline_line

    try:
        funnel = load_and_compile(args.funnel.read_bytes(), version=1)
    except InvalidDefinition as exc:
        _err(f"{args.funnel}: invalid funnel:")
        for problem in exc.problems:
            _err(f"  {problem}")
        return 1
    entries: list[TimelineEntry] = []
    for n, line in enumerate(args.events.read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        try:
            entries.append(
                parse_timeline_line(json.loads(line), entries[-1].at if entries else None)
            )
        except (ValueError, TypeError) as exc:
            _err(f"{args.events}:{n}: {exc}")
            return 1
    sim = Simulator(funnel)
    for record in sim.feed(entries):
        o = record.outcome
        if args.json:
            _out(
                json.dumps(
                    {
                        "at": record.at.isoformat(),
                        "member": record.member,
                        "event": record.event.type,
                        "timer": record.event.timer,
                        "matched": o.matched,
                        "reason": o.reason,
                        "state": o.state.state,
                        "stage": o.state.stage,
                        "status": o.state.status,
                        "actions": [
                            {"type": a.type, "disposition": a.disposition, **a.params}
                            for a in o.actions
                        ],
                        "guard_errors": list(o.guard_errors),
                    },
                    ensure_ascii=False,
                )
            )
            continue
        local = record.at.astimezone(funnel.zone).strftime("%m-%d %a %H:%M")
        what = f"timer {record.event.timer}" if record.event.timer else record.event.type
        where = f"{o.state.state or '-'} [{o.state.stage or '-'}]" + (
            f" ({o.state.status})" if o.state.status != "active" else ""
        )
        mark = "→" if o.matched else "·"
        _out(f"{local}  {record.member:<8} {what:<22} {mark} {where:<28} {o.reason}")
        for a in o.actions:
            detail = a.params.get("text") or json.dumps(
                {k: v for k, v in a.params.items() if k != "template"}, ensure_ascii=False
            )
            held = (
                ""
                if a.disposition == "send"
                else f" [{a.disposition}"
                + (
                    f" until {a.deliver_at.astimezone(funnel.zone):%H:%M}]"
                    if a.disposition == "deferred"
                    else "]"
                )
            )
            _out(f"{'':>20}    {a.type}{held}: {detail}")
        for error in o.guard_errors:
            _out(f"{'':>20}    guard error: {error}")
    return 0


def cmd_schema(args: argparse.Namespace) -> int:
    from app.engine.definition import json_schema

    _out(json.dumps(json_schema(), indent=2, ensure_ascii=False))
    return 0


def cmd_migrate(args: argparse.Namespace) -> int:
    from app.config import get_settings
    from app.migrations import upgrade

    upgrade(get_settings().database_url)
    _out("database is at the latest migration")
    return 0


def _engine() -> Engine:
    """The engine the service would open: its pool size, SQLite busy timeout and all."""
    from app.config import get_settings
    from app.db import engine_for

    return engine_for(get_settings())


def _now() -> datetime:
    return datetime.now(UTC)


def _bar(done: int, total: int) -> None:
    """A progress bar on stderr: `[██████░░░░]  61%  610,000/1,000,000 events`."""
    width, share = 30, done / total if total else 1.0
    filled = int(width * share)
    bar = "█" * filled + "░" * (width - filled)
    sys.stderr.write(f"\r[{bar}] {share:4.0%}  {done:,}/{total:,} events")
    sys.stderr.flush()


def cmd_replay(args: argparse.Namespace) -> int:
    engine = _engine()
    try:
        return _replay(args, engine)
    finally:
        engine.dispose()


def _replay(args: argparse.Namespace, engine: Engine) -> int:
    from sqlalchemy import select

    from app.analytics.replay import replay, replay_range
    from app.db import read_connection, session_scope
    from app.engine import load_and_compile
    from app.funnels.store import funnel_t, version_t

    with session_scope(engine) as session:
        tenant = _find_tenant(session, args.tenant)
        if tenant is None:
            _err(f'no tenant "{args.tenant}"')
            return 1
        tenant_id = tenant.id
    with read_connection(engine) as conn:
        try:
            if ":" in args.funnel_version and not Path(args.funnel_version).exists():
                key, _, number = args.funnel_version.partition(":")
                document = conn.execute(
                    select(version_t.c.definition)
                    .join(funnel_t, funnel_t.c.id == version_t.c.funnel_id)
                    .where(
                        funnel_t.c.tenant_id == tenant_id,
                        funnel_t.c.key == key,
                        version_t.c.version == int(number),
                    )
                ).scalar()
                if document is None:
                    _err(f'funnel "{key}" has no version {number}')
                    return 1
                draft = load_and_compile(json.dumps(document).encode(), version=int(number))
            else:
                draft = load_and_compile(Path(args.funnel_version).read_bytes(), version=0)
        except InvalidDefinition as exc:
            _err(f"{args.funnel_version}: invalid funnel:")
            for problem in exc.problems:
                _err(f"  {problem}")
            return 1
        except (OSError, ValueError) as exc:
            _err(f"{args.funnel_version}: {exc}")
            return 1
        try:
            scope, period = replay_range(
                conn, tenant_id, draft.definition.key, args.start, args.end
            )
            result = replay(conn, scope, draft, period, progress=None if args.json else _bar)
        except DomainError as exc:
            _err(exc.detail)
            return 1
    if args.json:
        _out(json.dumps(result))
        return 0
    sys.stderr.write("\n")
    _out(f"{draft.definition.key}: {result['events']:,} events, {result['members']:,} members")
    _out(f"{'stage':<10} {'real':>10} {'would':>10} {'change':>10}")
    for s in result["stages"]:
        real, would = s["real"], s["would"]
        change = "" if real is None or would is None else f"{would - real:+,}"
        _out(f"{s['stage']:<10} {_num(real):>10} {_num(would):>10} {change:>10}")
    return 0


def _num(n: int | None) -> str:
    return "–" if n is None else f"{n:,}"


def cmd_create_tenant(args: argparse.Namespace) -> int:
    from app.db import session_scope
    from app.tenancy.service import create_tenant

    with session_scope(_engine()) as session:
        tenant, _key, plaintext = create_tenant(session, args.name, _now())
    _out(f"tenant {tenant.id} ({args.name}) created")
    _out(f"API key (shown once, keep it secret): {plaintext}")
    return 0


def _find_tenant(session, ref: str):  # type: ignore[no-untyped-def]
    from app.tenancy.models import Tenant
    from app.tenancy.service import find_tenant_by_name

    return session.get(Tenant, int(ref)) if ref.isdigit() else find_tenant_by_name(session, ref)


def cmd_create_key(args: argparse.Namespace) -> int:
    from app.db import session_scope
    from app.tenancy.service import create_api_key

    with session_scope(_engine()) as session:
        tenant = _find_tenant(session, args.tenant)
        if tenant is None:
            _err(f'no tenant "{args.tenant}"; create one with: flywheel create-tenant NAME')
            return 1
        _key, plaintext = create_api_key(session, tenant, args.name, _now())
    _out(f"API key for tenant {tenant.id} ({tenant.name}), shown once: {plaintext}")
    return 0


def cmd_load_funnels(args: argparse.Namespace) -> int:
    from app.db import session_scope
    from app.engine.paths import JsonSyntaxError, loads_checked
    from app.funnels.service import publish
    from app.tenancy.models import Tenant

    failed = 0
    with session_scope(_engine()) as session:
        tenant = _find_tenant(session, args.tenant)
        if tenant is None:
            tenant = Tenant(name=args.tenant, created_at=_now())
            session.add(tenant)
            session.flush()
            _out(f"created tenant {tenant.id} ({tenant.name})")
        for path in args.files:
            try:
                document, duplicates = loads_checked(path.read_bytes())
                key = document.get("key") if isinstance(document, dict) else None
                version, created = publish(
                    session, tenant.id, str(key or path.stem), document, _now(), duplicates
                )
            except (InvalidDefinition, JsonSyntaxError) as exc:
                failed += 1
                _err(f"{path}: not loaded: {exc}")
                continue
            _out(f"{path}: {'published' if created else 'unchanged,'} version {version.version}")
    _out(f'Get an API key for tenant "{tenant.name}": .venv/bin/flywheel create-key {tenant.name}')
    return 1 if failed else 0


def cmd_worker(args: argparse.Namespace) -> int:
    import asyncio
    import dataclasses
    import json
    import signal

    from app.clock import SystemClock
    from app.config import get_settings
    from app.observability import Metrics, configure_logging
    from app.workers import Workers

    settings = get_settings()
    configure_logging(settings.log_format, settings.log_level)
    workers = Workers(_engine(), settings, SystemClock(), Metrics())
    if args.until_idle:
        totals = asyncio.run(workers.until_idle())
        _out(json.dumps(dataclasses.asdict(totals)))
        return 0

    async def forever() -> None:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, stop.set)
        await workers.run(stop)

    asyncio.run(forever())
    return 0


def cmd_serve(args: argparse.Namespace) -> int:
    import uvicorn

    uvicorn.run("app.main:create_app", factory=True, host=args.host, port=args.port)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
