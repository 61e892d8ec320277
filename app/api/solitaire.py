"""Solitaire lists (群接龙): the organiser's endpoints (tenant key) and the members' (token).

Every change goes through the write path; reads use a read-only connection. The group text
and the kitchen summary are rendered from the list as it stands (live lines, withdrawn
numbers shown as withdrawn)."""

from __future__ import annotations

from typing import Annotated, Any, Literal

import orjson
from fastapi import APIRouter, Body, Request, Response
from pydantic import AwareDatetime, BaseModel, Field
from sqlalchemy import Connection, select

from app.api.deps import Input, IntId, MemberClaimsDep, TenantIdDep
from app.api.submit import IdempotencyKey, command, member_command, read_only, submit
from app.errors import NotFound
from app.mechanics.solitaire import rules
from app.mechanics.solitaire.service import lines_of, list_json, list_t
from app.problems import responses

admin = APIRouter(prefix="/v1/solitaire", tags=["solitaire"], responses=responses(401))
member = APIRouter(prefix="/v1/member/solitaire", tags=["member (mini-program)"])


class OpenList(Input):
    group: str = Field(min_length=1, max_length=128, description="the chat group's id (opengid)")
    funnel: str | None = Field(default=None, description="with campaign: the menu and rules")
    campaign: str | None = None
    definition: dict[str, Any] | None = Field(
        default=None, description="a solitaire definition, as in a funnel's mechanics section"
    )
    title: str | None = Field(default=None, max_length=200)
    opens_at: AwareDatetime | None = Field(default=None, description="default: now")
    closes_at: AwareDatetime | None = Field(default=None, description="default: opens + open_for")


class OrderedItem(Input):
    sku: str = Field(min_length=1, max_length=64)
    qty: int = Field(default=1, ge=1, le=rules.MAX_QTY)


class LineIn(Input):
    items: list[OrderedItem] = Field(default_factory=list, max_length=50)
    note: str | None = Field(default=None, max_length=500)
    pickup: str | None = Field(default=None, max_length=100)
    address: str | None = Field(default=None, max_length=500)
    on_behalf_of: str | None = Field(
        default=None, max_length=100, description="a line added for someone else (marked so)"
    )


class LineChange(Input):
    items: list[OrderedItem] | None = Field(default=None, max_length=50)
    note: str | None = Field(default=None, max_length=500)
    pickup: str | None = Field(default=None, max_length=100)
    address: str | None = Field(default=None, max_length=500)


class Finish(Input):
    reason: str | None = Field(default=None, max_length=64)


def _json(body: BaseModel) -> dict[str, Any]:
    return body.model_dump(mode="json", exclude_none=True)


def line_data(list_id: str, body: LineIn) -> dict[str, Any]:
    """An append's data: the list the path names, and the line."""
    return {"list": list_id, **_json(body)}


async def _read(request: Request, tenant_id: int, public_id: str, render: Any) -> Any:
    """`render(conn, list_row)` for one of the tenant's lists, or a 404."""

    def read(conn: Connection) -> Any:
        sl = conn.execute(
            select(list_t).where(list_t.c.public_id == public_id, list_t.c.tenant_id == tenant_id)
        ).first()
        if sl is None:
            raise NotFound(f'no solitaire list "{public_id}"')
        return render(conn, sl)

    return await read_only(request, read)


# ── organiser ─────────────────────────────────────────────────────────────────────────────
@admin.post("/lists", responses=responses(404, 409, 422))
async def open_list(
    body: OpenList, request: Request, tenant_id: TenantIdDep, idempotency_key: IdempotencyKey = None
) -> Response:
    """Open a list for a group now, or schedule it (`opens_at` later): from a funnel's
    solitaire campaign (`funnel` + `campaign`) or a `definition` sent here."""
    return await submit(
        request,
        command(tenant_id, "solitaire.open", _json(body), source="admin", key=idempotency_key),
    )


@admin.get("/lists")
async def find_lists(
    request: Request,
    tenant_id: TenantIdDep,
    group: str | None = None,
    status: Literal["scheduled", "open", "closed", "fulfilled", "cancelled"] | None = None,
    limit: Annotated[int, Field(ge=1, le=200)] = 50,
) -> dict[str, Any]:

    def read(conn: Connection) -> dict[str, Any]:
        q = select(list_t).where(list_t.c.tenant_id == tenant_id)
        if group is not None:
            q = q.where(list_t.c.group_id == group)
        if status is not None:
            q = q.where(list_t.c.status == status)
        rows = conn.execute(q.order_by(list_t.c.id.desc()).limit(limit)).all()
        return {"lists": [list_json(conn, r, with_lines=False) for r in rows]}

    return await read_only(request, read)


@admin.get("/lists/{list_id}", responses=responses(404))
async def read_list(list_id: str, request: Request, tenant_id: TenantIdDep) -> dict[str, Any]:
    return await _read(request, tenant_id, list_id, list_json)  # type: ignore[no-any-return]


@admin.get("/lists/{list_id}/text", responses=responses(404))
async def group_text(
    list_id: str, request: Request, tenant_id: TenantIdDep, lang: Literal["zh", "en"] = "zh"
) -> Response:
    """The list as the plain text a bot posts (and updates) in the group."""
    text = await _read(
        request,
        tenant_id,
        list_id,
        lambda conn, sl: rules.render_text(sl._mapping, lines_of(conn, sl.id), lang),
    )
    return Response(text, media_type="text/plain; charset=utf-8")


@admin.get("/lists/{list_id}/summary", responses=responses(404))
async def kitchen_summary(
    list_id: str, request: Request, tenant_id: TenantIdDep, format: Literal["json", "csv"] = "json"
) -> Response:
    """Totals per item, per pickup point and per member; `format=csv` is UTF-8 with a BOM."""
    summary = await _read(
        request,
        tenant_id,
        list_id,
        lambda conn, sl: {
            "list": sl.public_id,
            "status": sl.status,
            **rules.kitchen(sl.items, lines_of(conn, sl.id), sl.options.get("unmade") or ()),
        },
    )
    if format == "csv":
        return Response(
            rules.kitchen_csv(summary),
            media_type="text/csv; charset=utf-8",
            headers={"Content-Disposition": f'attachment; filename="{list_id}.csv"'},
        )
    return Response(orjson.dumps(summary), media_type="application/json")


def _finish_route(kind: str, to: str | None) -> Any:
    async def route(
        list_id: str,
        request: Request,
        tenant_id: TenantIdDep,
        idempotency_key: IdempotencyKey = None,
        body: Annotated[Finish | None, Body()] = None,
    ) -> Response:
        data: dict[str, Any] = {"list": list_id, "reason": body.reason if body else None}
        if to is not None:
            data["to"] = to
        return await submit(
            request, command(tenant_id, kind, data, source="admin", key=idempotency_key)
        )

    return route


admin.add_api_route(
    "/lists/{list_id}/close",
    _finish_route("solitaire.close", None),
    methods=["POST"],
    summary="Close the list now (members with lines get solitaire.closed and order.placed)",
    responses=responses(404, 409),
)
admin.add_api_route(
    "/lists/{list_id}/fulfil",
    _finish_route("solitaire.finish", "fulfilled"),
    methods=["POST"],
    summary="Mark a closed list as served",
    responses=responses(404, 409),
)
admin.add_api_route(
    "/lists/{list_id}/cancel",
    _finish_route("solitaire.finish", "cancelled"),
    methods=["POST"],
    summary="Cancel a list (members with lines get solitaire.cancelled)",
    responses=responses(404, 409),
)


# ── members ───────────────────────────────────────────────────────────────────────────────
@member.get("/{list_id}", responses=responses(401, 404))
async def member_read(list_id: str, request: Request, claims: MemberClaimsDep) -> dict[str, Any]:
    """The list with its numbered lines (nicknames, not member ids); `mine` marks yours."""

    def render(conn: Any, sl: Any) -> dict[str, Any]:
        out = list_json(conn, sl, with_lines=False)
        lines = lines_of(conn, sl.id)
        out["lines"] = [
            {
                **{k: v for k, v in x.items() if k != "member_id"},
                "mine": x["member_id"] == claims.member_id,
            }
            for x in lines
        ]
        return out

    return await _read(request, claims.tenant_id, list_id, render)  # type: ignore[no-any-return]


@member.post("/{list_id}/lines", responses=responses(401, 404, 409, 422, 429))
async def append_line(
    list_id: str,
    body: LineIn,
    request: Request,
    claims: MemberClaimsDep,
    idempotency_key: IdempotencyKey = None,
) -> Response:
    """Append a line; its number is the next one. 409 codes: `sold_out` (with what is still
    available), `joining_closed`, `list_not_open`, `line_limit_reached`, `item_limit_reached`."""
    request.app.state.rate_limiter.check(claims.tenant_id)
    return await submit(
        request,
        member_command(claims, "solitaire.append", line_data(list_id, body), idempotency_key),
    )


@member.patch("/{list_id}/lines/{line}", responses=responses(401, 404, 409, 422, 429))
async def change_line(
    list_id: str,
    line: IntId,
    body: LineChange,
    request: Request,
    claims: MemberClaimsDep,
    idempotency_key: IdempotencyKey = None,
) -> Response:
    """Change your own line until the edit deadline (`editing_closed` after it)."""
    request.app.state.rate_limiter.check(claims.tenant_id)
    data = {"list": list_id, "line": line, **body.model_dump(mode="json", exclude_unset=True)}
    return await submit(
        request,
        member_command(claims, "solitaire.change", data, idempotency_key),
    )


@member.post("/{list_id}/lines/{line}/withdraw", responses=responses(401, 404, 409, 429))
async def withdraw_line(
    list_id: str,
    line: IntId,
    request: Request,
    claims: MemberClaimsDep,
    idempotency_key: IdempotencyKey = None,
) -> Response:
    """Withdraw your own line: its number stays, shown as withdrawn; its stock returns."""
    request.app.state.rate_limiter.check(claims.tenant_id)
    data = {"list": list_id, "line": line}
    return await submit(
        request,
        member_command(claims, "solitaire.withdraw", data, idempotency_key),
    )
