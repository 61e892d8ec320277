"""/console: sign in with a tenant key (or a five-minute sign-in link), then one
server-rendered page per funnel: the funnel chart and table, the daily series, the
mechanics' reports, live group-buy teams, open solitaire lists, and failed deliveries with
a replay button.

The session is an HttpOnly, SameSite=Strict cookie holding a signed 8-hour console token
(never the API key); each form carries a CSRF token derived from it.
"""

from __future__ import annotations

import hashlib
import hmac
from collections.abc import Callable, Coroutine
from datetime import date, datetime
from pathlib import Path
from typing import Annotated, Any
from urllib.parse import parse_qs, urlencode

from fastapi import APIRouter, Query, Request, Response
from fastapi.responses import FileResponse, HTMLResponse, RedirectResponse
from fastapi.routing import APIRoute
from jinja2 import Environment, PackageLoader, select_autoescape
from pydantic import BaseModel
from sqlalchemy import Connection, select
from sqlmodel import Session

from app.analytics import mechanics
from app.analytics.funnel import report_with_daily
from app.api.admin.deliveries import replay
from app.api.admin.reports import ReportQuery
from app.api.deps import TenantIdDep
from app.api.submit import read_only
from app.db import read_connection, session_scope
from app.errors import DomainError, NotFound
from app.funnels.store import funnel_t
from app.mechanics.groupbuy.models import Team
from app.mechanics.solitaire.models import SolitaireList
from app.outbox.models import Outbox
from app.outbox.service import delivery_id
from app.problems import responses
from app.security import CONSOLE_LINK, CONSOLE_SESSION, issue_console_token, read_console_token
from app.tenancy.service import authenticate

# Every console response: scripts and styles only from the console itself (no inline code,
# so an injected tag runs nothing), never framed (clickjacking the replay button), no
# referrer (the sign-in link carries a token), nothing cached (pages hold tenant data).
SECURITY_HEADERS = {
    "Content-Security-Policy": "default-src 'none'; script-src 'self'; style-src 'self'; "
    "img-src 'self' data:; form-action 'self'; frame-ancestors 'none'; base-uri 'none'",
    "X-Frame-Options": "DENY",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "Cross-Origin-Opener-Policy": "same-origin",
    "Cache-Control": "no-store",
}


class _Hardened(APIRoute):
    """A console route whose every response carries SECURITY_HEADERS (on the router, not
    in a middleware, so the API's hot path does not pay for them)."""

    def get_route_handler(self) -> Callable[[Request], Coroutine[Any, Any, Response]]:
        handler = super().get_route_handler()

        async def hardened(request: Request) -> Response:
            response = await handler(request)
            response.headers.update(SECURITY_HEADERS)
            return response

        return hardened


router = APIRouter(prefix="/console", include_in_schema=False, route_class=_Hardened)
links = APIRouter(prefix="/v1/console", tags=["console"])
COOKIE = "fw_console"
SESSION_SECONDS = 8 * 3600
LINK_SECONDS = 300
STATIC = Path(__file__).parent / "static"
team_t = Team.__table__  # type: ignore[attr-defined]
list_t = SolitaireList.__table__  # type: ignore[attr-defined]
outbox_t = Outbox.__table__  # type: ignore[attr-defined]


def _pct(x: Any) -> str:
    return f"{round(x * 100, 1)}%" if isinstance(x, int | float) else "–"


def _duration(seconds: Any) -> str:
    if not isinstance(seconds, int | float):
        return "–"
    s = int(seconds)
    if s < 3600:
        return f"{s // 60}m {s % 60}s"
    if s < 86400:
        return f"{s // 3600}h {s % 3600 // 60}m"
    return f"{s // 86400}d {s % 86400 // 3600}h"


def _yuan(fen: int) -> str:
    return f"¥{fen / 100:,.2f}"


templates = Environment(
    loader=PackageLoader("app.console"), autoescape=select_autoescape(default=True)
)
templates.globals.update(pct=_pct, duration=_duration, yuan=_yuan)


def _page(name: str, status: int = 200, **context: Any) -> HTMLResponse:
    return HTMLResponse(templates.get_template(name).render(**context), status_code=status)


def _secret(request: Request) -> str:
    return str(request.app.state.settings.secret_key)


def _now(request: Request) -> datetime:
    now: datetime = request.app.state.clock.now()
    return now


def _csrf(request: Request, token: str) -> str:
    return hmac.new(_secret(request).encode(), token.encode(), hashlib.sha256).hexdigest()


def _signed_in(request: Request) -> tuple[int, str] | None:
    token = request.cookies.get(COOKIE)
    if not token:
        return None
    tenant_id = read_console_token(_secret(request), CONSOLE_SESSION, token, _now(request))
    return (tenant_id, token) if tenant_id is not None else None


def _start_session(request: Request, tenant_id: int) -> Response:
    token = issue_console_token(
        _secret(request), CONSOLE_SESSION, tenant_id, _now(request), SESSION_SECONDS
    )
    response = RedirectResponse("/console", status_code=303)
    response.set_cookie(
        COOKIE,
        token,
        max_age=SESSION_SECONDS,
        path="/console",
        httponly=True,
        samesite="strict",
        secure=request.app.state.settings.env == "production",
    )
    return response


async def _form(request: Request) -> dict[str, str]:
    body = (await request.body()).decode("utf-8", "replace")
    return {k: v[0] for k, v in parse_qs(body, max_num_fields=20).items()}


# ── signing in ──────────────────────────────────────────────────────────────────────────────
@router.post("/login")
async def login(request: Request) -> Response:
    key = (await _form(request)).get("key", "").strip()
    engine = request.app.state.engine
    with read_connection(engine) as conn, Session(bind=conn) as session:
        tenant = authenticate(session, key) if key else None
    if tenant is None or tenant.id is None:
        return _page("login.html", 401, error="That key is unknown or revoked.")
    return _start_session(request, tenant.id)


@router.get("/enter")
async def enter(request: Request, token: Annotated[str, Query(max_length=2000)]) -> Response:
    """A sign-in link from `POST /v1/console/links` (valid for five minutes)."""
    tenant_id = read_console_token(_secret(request), CONSOLE_LINK, token, _now(request))
    if tenant_id is None:
        return _page("login.html", 401, error="That sign-in link is invalid or has expired.")
    return _start_session(request, tenant_id)


@router.post("/logout")
async def logout() -> Response:
    response = RedirectResponse("/console", status_code=303)
    response.delete_cookie(COOKIE, path="/console")
    return response


class ConsoleLink(BaseModel):
    url: str
    expires_in: int


@links.post("/links", responses=responses(401))
async def console_link(request: Request, tenant_id: TenantIdDep) -> ConsoleLink:
    """A sign-in link into the console for this tenant, valid for five minutes."""
    token = issue_console_token(
        _secret(request), CONSOLE_LINK, tenant_id, _now(request), LINK_SECONDS
    )
    return ConsoleLink(url=f"/console/enter?token={token}", expires_in=LINK_SECONDS)


ASSETS = {"chart.js": "text/javascript", "console.css": "text/css"}


@router.get("/static/{name}")
async def asset(name: str) -> FileResponse:
    if name not in ASSETS:
        raise NotFound(f"no console asset {name!r}")
    return FileResponse(STATIC / name, media_type=ASSETS[name])


# ── the page ────────────────────────────────────────────────────────────────────────────────
@router.get("")
async def console(
    request: Request,
    funnel: Annotated[str | None, Query(max_length=64)] = None,
    start: Annotated[date | None, Query(alias="from")] = None,
    end: Annotated[date | None, Query(alias="to")] = None,
    window: Annotated[str, Query(max_length=20)] = "P30D",
    replayed: Annotated[str | None, Query(max_length=40)] = None,
) -> Response:
    who = _signed_in(request)
    if who is None:
        return _page("login.html")
    tenant_id, token = who
    now = _now(request)

    def read(conn: Connection) -> dict[str, Any]:
        keys = list(
            conn.execute(
                select(funnel_t.c.key)
                .where(funnel_t.c.tenant_id == tenant_id)
                .order_by(funnel_t.c.key)
            ).scalars()
        )
        key = funnel if funnel in keys else (keys[0] if keys else None)
        context: dict[str, Any] = {"funnels": keys, "funnel": key, **_live(conn, tenant_id)}
        if key is not None:
            params = ReportQuery(None, start, end, window)
            scope, period = params.resolve(conn, tenant_id, key, request)
            context["report"] = {
                **params.header(key, scope, period),
                **report_with_daily(conn, scope, period),
            }
            context["stage_names"] = list(scope.stages)
            context["mechanics"] = mechanics.every_report(conn, scope, period, now)
        return context

    try:
        context = await read_only(request, read)
    except DomainError as exc:  # a bad date range or window in the form: say so on the page
        return _page("login.html", exc.status, error=exc.detail)
    return _page("console.html", csrf=_csrf(request, token), replayed=replayed, **context)


def _live(conn: Connection, tenant_id: int) -> dict[str, Any]:
    def newest(table: Any, status: str, order: Any) -> list[Any]:
        return list(
            conn.execute(
                select(table)
                .where(table.c.tenant_id == tenant_id, table.c.status == status)
                .order_by(order)
                .limit(50)
            ).all()
        )

    teams = newest(team_t, "open", team_t.c.deadline)
    dead = newest(outbox_t, "dead", outbox_t.c.id.desc())
    lists = newest(list_t, "open", list_t.c.closes_at)
    return {
        "teams": teams,
        "lists": lists,
        "dead": [{**d._mapping, "id": delivery_id(d.id)} for d in dead],
    }


@router.post("/deliveries/{delivery}/replay")
async def replay_button(delivery: str, request: Request) -> Response:
    who = _signed_in(request)
    if who is None:
        return _page("login.html", 401, error="Sign in again to replay a delivery.")
    tenant_id, token = who
    form = await _form(request)
    if not hmac.compare_digest(form.get("csrf", ""), _csrf(request, token)):
        return _page("login.html", 403, error="That form has expired; reload the console.")
    try:
        with session_scope(request.app.state.engine) as session:
            replay(session, tenant_id, delivery, _now(request))
    except DomainError as exc:
        return _page("login.html", exc.status, error=exc.detail)
    query = {"replayed": delivery, **({"funnel": form["funnel"]} if form.get("funnel") else {})}
    return RedirectResponse(f"/console?{urlencode(query)}#deliveries", status_code=303)
