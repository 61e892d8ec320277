"""Reports for the marketer (tenant key): the AARRR funnel report with its breakdowns and
daily series, the mechanics' reports, weekly cohorts, and CSV exports. Read-only
connections; nothing here writes."""

from __future__ import annotations

from collections.abc import Iterator
from datetime import date
from typing import Annotated, Any, Literal

import orjson
from fastapi import APIRouter, Depends, Query, Request, Response
from fastapi.responses import StreamingResponse
from pydantic import Field
from sqlalchemy import Connection

from app import csvfile
from app.analytics import export, mechanics
from app.analytics.funnel import (
    DIMENSIONS,
    Period,
    Scope,
    breakdown,
    period_for,
    period_json,
    report_with_daily,
    scope_for,
)
from app.analytics.replay import MAX_REPLAY_EVENTS, count_events, replay, replay_range
from app.api.deps import MAX_INT, Input, TenantIdDep
from app.api.submit import read_only
from app.db import read_connection
from app.engine import load_and_compile
from app.engine.definition import STAGES
from app.errors import FieldProblem, InvalidDefinition, InvalidQuery
from app.problems import responses

router = APIRouter(prefix="/v1/reports", tags=["reports"], responses=responses(401, 404, 422))
Format = Literal["json", "csv"]


class ReportQuery:
    """The parameters every funnel report takes."""

    def __init__(
        self,
        version: Annotated[
            int | None, Query(ge=1, le=MAX_INT, description="one version; default: all")
        ] = None,
        start: Annotated[
            date | None,
            Query(alias="from", description="first local day (default: 29 days before `to`)"),
        ] = None,
        end: Annotated[
            date | None, Query(alias="to", description="last local day, inclusive (default: today)")
        ] = None,
        window: Annotated[
            str,
            Query(max_length=20, description="conversion window, ISO 8601 (P7D, PT12H)"),
        ] = "P30D",
    ) -> None:
        self.version, self.start, self.end, self.window = version, start, end, window

    def resolve(
        self, conn: Connection, tenant_id: int, key: str, request: Request
    ) -> tuple[Scope, Period]:
        scope, zone = scope_for(conn, tenant_id, key, self.version)
        today = request.app.state.clock.now().astimezone(zone).date()
        return scope, period_for(zone, today, self.start, self.end, self.window)

    def header(self, key: str, scope: Scope, period: Period) -> dict[str, Any]:
        return {
            "funnel": key,
            "version": scope.version,
            **period_json(period),
            "window": self.window,
        }


Params = Annotated[ReportQuery, Depends()]


def _csv(body: bytes, name: str) -> Response:
    return Response(
        body,
        media_type="text/csv; charset=utf-8",
        headers={"Content-Disposition": f'attachment; filename="{name}.csv"'},
    )


@router.get("/funnels/{key}")
async def funnel_report(
    key: str, request: Request, tenant_id: TenantIdDep, params: Params, format: Format = "json"
) -> Response:
    """Members entering each AARRR stage in the range, conversion to the next stage and from
    the first within the window, drop-off, median and p90 time to convert, and the daily
    series of entries. `format=csv` downloads it."""

    def read(conn: Connection) -> dict[str, Any]:
        scope, period = params.resolve(conn, tenant_id, key, request)
        return {**params.header(key, scope, period), **report_with_daily(conn, scope, period)}

    body = await read_only(request, read)
    if format == "csv":
        return _csv(export.report_rows(body), f"{key}-report")
    return Response(orjson.dumps(body), media_type="application/json")


@router.get("/funnels/{key}/breakdown")
async def funnel_breakdown(
    key: str,
    request: Request,
    tenant_id: TenantIdDep,
    params: Params,
    by: Annotated[
        Literal["channel", "group", "inviter", "campaign"],
        Query(description="acquisition channel, first group, inviter, or funnel campaign"),
    ],
    limit: Annotated[int, Query(ge=1, le=500)] = 20,
    format: Format = "json",
) -> Response:
    """The report per value of one dimension (the `limit` values with most first-stage
    entries): each stage's entries and conversion from the first stage."""
    assert by in DIMENSIONS

    def read(conn: Connection) -> dict[str, Any]:
        scope, period = params.resolve(conn, tenant_id, key, request)
        rows = breakdown(conn, scope, period, by, limit)
        return {**params.header(key, scope, period), "by": by, "values": rows}

    body = await read_only(request, read)
    if format == "csv":
        stages = [s["stage"] for s in body["values"][0]["stages"]] if body["values"] else []
        header = [by, *(f"{s}_entered" for s in stages), *(f"{s}_reached" for s in stages)]
        rows = (
            [
                v["value"],
                *(s["entered"] for s in v["stages"]),
                *(s["reached_from_first"] for s in v["stages"]),
            ]
            for v in body["values"]
        )
        return _csv(csvfile.table(header, rows), f"{key}-by-{by}")
    return Response(orjson.dumps(body), media_type="application/json")


@router.get("/funnels/{key}/mechanics")
async def mechanics_report(
    key: str, request: Request, tenant_id: TenantIdDep, params: Params
) -> dict[str, Any]:
    """Group-buy (teams, success rate, time to fill, vouchers), solitaire (orders, units,
    revenue per list), referral (k-factor, top inviters), community (active share against
    the 20/80 floor, warnings, removals, check-in streaks) and weekly cohort retention."""
    now = request.app.state.clock.now()

    def read(conn: Connection) -> dict[str, Any]:
        scope, period = params.resolve(conn, tenant_id, key, request)
        return {
            **params.header(key, scope, period),
            **mechanics.every_report(conn, scope, period, now),
        }

    return await read_only(request, read)


@router.get("/funnels/{key}/members")
async def members_by_stage(
    key: str,
    request: Request,
    tenant_id: TenantIdDep,
    stage: Annotated[str | None, Query(description="only members now in this stage")] = None,
) -> StreamingResponse:
    """CSV of every member's current stage, state and attribution, streamed."""
    if stage is not None and stage not in STAGES:
        raise InvalidQuery(
            f'unknown stage "{stage}"',
            errors=[FieldProblem("query:stage", f"one of {', '.join(STAGES)}")],
        )
    scope = await read_only(request, lambda conn: scope_for(conn, tenant_id, key, None)[0])
    engine = request.app.state.engine

    def rows() -> Iterator[bytes]:
        with read_connection(engine) as conn:
            yield from export.members(conn, scope.funnel_id, stage)

    return StreamingResponse(
        rows(),
        media_type="text/csv; charset=utf-8",
        headers={"Content-Disposition": f'attachment; filename="{key}-members.csv"'},
    )


class ReplayIn(Input):
    definition: dict[str, Any] = Field(description="the draft funnel (same key as the live one)")
    start: date = Field(alias="from", description="first local day")
    end: date = Field(alias="to", description="last local day, inclusive")


@router.post("/funnels/{key}/replay")
async def what_if(key: str, body: ReplayIn, request: Request, tenant_id: TenantIdDep) -> Any:
    """Replay the range's recorded events through a draft definition, writing nothing:
    the members who would have entered each stage next to those who did. Long replays
    belong to `flywheel replay`, which shows a progress bar; this answers up to
    MAX_REPLAY_EVENTS events."""
    try:
        draft = load_and_compile(orjson.dumps(body.definition), version=0)
    except InvalidDefinition as exc:
        raise InvalidDefinition(
            [FieldProblem(f"definition.{p.path}".rstrip("."), p.message) for p in exc.problems]
        ) from exc
    if draft.definition.key != key:
        raise InvalidQuery(
            f'the draft is funnel "{draft.definition.key}", not "{key}"',
            errors=[FieldProblem("definition.key", f'must be "{key}"')],
        )

    def run(conn: Connection) -> dict[str, Any]:
        scope, period = replay_range(conn, tenant_id, key, body.start, body.end)
        n = count_events(conn, scope, period)
        if n > MAX_REPLAY_EVENTS:
            raise InvalidQuery(
                f"the range holds {n:,} events; the API replays at most "
                f"{MAX_REPLAY_EVENTS:,}: use `flywheel replay` or a shorter range",
                errors=[FieldProblem("to", "too many events in the range")],
            )
        return {"funnel": key, **period_json(period), **replay(conn, scope, draft, period)}

    return await read_only(request, run)
