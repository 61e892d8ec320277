"""Chat groups for the merchant (tenant key): register a group, its sensitive words and its
members' roles; the join-request queue, moderation decisions and appeals; health; and
broadcasts to many groups (群联盟).

Group settings are plain admin writes (one transaction each). Decisions that send actions to
the bot (approve, deny, reverse, broadcast) go through the write path, so they are
idempotent with an `Idempotency-Key` and land in the outbox with the change.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Annotated, Any, Literal

from fastapi import APIRouter, Path, Query, Request, Response
from pydantic import Field
from sqlalchemy import Connection, delete, func, select, update

from app.api.deps import Input, NowDep, RowId, SessionDep, TenantIdDep
from app.api.submit import IdempotencyKey, command, read_only, submit
from app.errors import NotFound
from app.mechanics.community import service
from app.mechanics.community.service import (
    decision_json,
    decision_t,
    group_member_t,
    group_t,
    member_t,
    request_json,
    request_t,
    word_t,
)
from app.mechanics.community.settings import ADVISED_CAPACITY, GroupIn, Role, WordsIn
from app.problems import responses

router = APIRouter(prefix="/v1/groups", tags=["groups"], responses=responses(401))
broadcasts = APIRouter(prefix="/v1/broadcasts", tags=["groups"], responses=responses(401))
GroupId = Annotated[str, Field(min_length=1, max_length=128)]


def _group_json(row: Any, members: int) -> dict[str, Any]:
    warnings = []
    if row.capacity > ADVISED_CAPACITY:
        warnings.append(
            {
                "path": "capacity",
                "message": f"groups above {ADVISED_CAPACITY} members are much harder to keep "
                "active (seed 000); consider several smaller groups",
            }
        )
    return {
        "group_id": row.group_id,
        "name": row.name,
        "kind": row.kind,
        "purpose": row.purpose,
        "rules": row.rules,
        "welcome": row.welcome,
        "capacity": row.capacity,
        "members": members,
        "settings": service.settings_of(row).model_dump(mode="json"),
        "words_version": row.words_version,
        "created_at": row.created_at.isoformat(),
        "updated_at": row.updated_at.isoformat(),
        "warnings": warnings,
    }


def _required(conn: Connection, tenant_id: int, group_id: str) -> Any:
    return service.required_group(conn, tenant_id, group_id)


def _newest(
    conn: Connection,
    tenant_id: int,
    group_id: str,
    table: Any,
    to_json: Callable[[Any], dict[str, Any]],
    status: str | None,
) -> list[dict[str, Any]]:
    """A group's join requests or moderation decisions, newest first (500 at most)."""
    _required(conn, tenant_id, group_id)
    q = select(table).where(table.c.tenant_id == tenant_id, table.c.group_id == group_id)
    if status:
        q = q.where(table.c.status == status)
    return [to_json(r) for r in conn.execute(q.order_by(table.c.id.desc()).limit(500))]


@router.put(
    "/{group_id}",
    responses={201: {"description": "The group, registered now (the same body as 200)"}},
)
def put_group(
    group_id: Annotated[str, Path(min_length=1, max_length=128)],
    body: GroupIn,
    tenant_id: TenantIdDep,
    session: SessionDep,
    now: NowDep,
    response: Response,
) -> dict[str, Any]:
    """Register the bot's group (or replace its settings): name, kind, purpose, rules, the
    welcome pushed at each join, capacity (100 advised; WeChat's cap is 500), thresholds,
    moderation, roles and health. 201 when new."""
    conn = session.connection()
    values = {
        **body.model_dump(exclude={"settings"}),
        "settings": body.settings.model_dump(mode="json", exclude_defaults=True),
        "updated_at": now,
    }
    found = service.group(conn, tenant_id, group_id)
    where = (group_t.c.tenant_id == tenant_id, group_t.c.group_id == group_id)
    if found is None:
        conn.execute(
            group_t.insert().values(
                tenant_id=tenant_id, group_id=group_id, created_at=now, **values
            )
        )
        response.status_code = 201
    else:
        conn.execute(update(group_t).where(*where).values(**values))
    return _group_json(
        service.group(conn, tenant_id, group_id), service.member_count(conn, tenant_id, group_id)
    )


@router.get("")
async def list_groups(request: Request, tenant_id: TenantIdDep) -> list[dict[str, Any]]:
    def read(conn: Connection) -> list[dict[str, Any]]:
        counts: dict[str, int] = dict(
            conn.execute(
                select(group_member_t.c.group_id, func.count())
                .where(group_member_t.c.tenant_id == tenant_id)
                .group_by(group_member_t.c.group_id)
            ).all()
        )
        rows = conn.execute(
            select(group_t).where(group_t.c.tenant_id == tenant_id).order_by(group_t.c.group_id)
        ).all()
        return [_group_json(r, counts.get(r.group_id, 0)) for r in rows]

    return await read_only(request, read)


@router.get("/{group_id}", responses=responses(404))
async def get_group(group_id: str, request: Request, tenant_id: TenantIdDep) -> dict[str, Any]:
    def read(conn: Connection) -> dict[str, Any]:
        row = _required(conn, tenant_id, group_id)
        return _group_json(row, service.member_count(conn, tenant_id, group_id))

    return await read_only(request, read)


@router.put("/{group_id}/words", responses=responses(404, 422))
def put_words(
    group_id: str, body: WordsIn, tenant_id: TenantIdDep, session: SessionDep, now: NowDep
) -> dict[str, Any]:
    """Replace the group's sensitive words (matched in one pass, after normalising case,
    full-width forms and separators) and patterns (regular expressions)."""
    conn = session.connection()
    row = _required(conn, tenant_id, group_id)
    conn.execute(
        delete(word_t).where(word_t.c.tenant_id == tenant_id, word_t.c.group_id == group_id)
    )
    rows = [
        {"tenant_id": tenant_id, "group_id": group_id, "word": w, "pattern": p}
        for p, items in ((False, body.words), (True, body.patterns))
        for w in dict.fromkeys(items)
    ]
    if rows:
        conn.execute(word_t.insert(), rows)
    conn.execute(
        update(group_t)
        .where(group_t.c.tenant_id == tenant_id, group_t.c.group_id == group_id)
        .values(words_version=row.words_version + 1, updated_at=now)
    )
    return {
        "words": len(dict.fromkeys(body.words)),
        "patterns": len(dict.fromkeys(body.patterns)),
        "words_version": row.words_version + 1,
    }


@router.get("/{group_id}/words", responses=responses(404))
async def get_words(group_id: str, request: Request, tenant_id: TenantIdDep) -> dict[str, Any]:
    def read(conn: Connection) -> dict[str, Any]:
        _required(conn, tenant_id, group_id)
        rows = conn.execute(
            select(word_t.c.word, word_t.c.pattern)
            .where(word_t.c.tenant_id == tenant_id, word_t.c.group_id == group_id)
            .order_by(word_t.c.word)
        ).all()
        return {
            "words": [w for w, p in rows if not p],
            "patterns": [w for w, p in rows if p],
        }

    return await read_only(request, read)


@router.get("/{group_id}/members", responses=responses(404))
async def group_members(
    group_id: str, request: Request, tenant_id: TenantIdDep, now: NowDep
) -> list[dict[str, Any]]:
    """Members with their role, their persona read from activity (opinion leader, sharer,
    seeker, onlooker; the rules are the group's `settings.roles`), counts and whether
    pruning spares them."""

    def read(conn: Connection) -> list[dict[str, Any]]:
        return service.members_view(conn, tenant_id, _required(conn, tenant_id, group_id), now)

    return await read_only(request, read)


class RoleIn(Input):
    role: Role = Field(description="owner, admin and opinion_leader are never pruned")


@router.put("/{group_id}/members/{member}/role", responses=responses(404, 422))
def set_role(
    group_id: str, member: str, body: RoleIn, tenant_id: TenantIdDep, session: SessionDep
) -> dict[str, Any]:
    """Name a member's role in the group (by the integration's member id)."""
    conn = session.connection()
    _required(conn, tenant_id, group_id)
    member_id = conn.execute(
        select(member_t.c.id).where(
            member_t.c.tenant_id == tenant_id, member_t.c.external_id == member
        )
    ).scalar()
    moved = 0
    if member_id is not None:
        moved = conn.execute(
            update(group_member_t)
            .where(
                group_member_t.c.tenant_id == tenant_id,
                group_member_t.c.group_id == group_id,
                group_member_t.c.member_id == member_id,
            )
            .values(role=body.role)
        ).rowcount
    if not moved:
        raise NotFound(f'member "{member}" is not in group "{group_id}"')
    return {"group_id": group_id, "member": member, "role": body.role}


@router.get("/{group_id}/health", responses=responses(404))
async def group_health(
    group_id: str, request: Request, tenant_id: TenantIdDep, now: NowDep
) -> dict[str, Any]:
    """The share of highly active members against the floor (the 20/80 rule), and how many
    members each persona has."""

    def read(conn: Connection) -> dict[str, Any]:
        return service.health(conn, tenant_id, _required(conn, tenant_id, group_id), now)

    return await read_only(request, read)


@router.get("/{group_id}/join-requests", responses=responses(404))
async def join_requests(
    group_id: str,
    request: Request,
    tenant_id: TenantIdDep,
    status: Literal["pending", "approved", "refused", "denied"] | None = Query(default=None),
) -> list[dict[str, Any]]:
    """Join requests, newest first; `status=pending` is the owner's queue."""

    return await read_only(
        request, lambda conn: _newest(conn, tenant_id, group_id, request_t, request_json, status)
    )


class Decision(Input):
    note: str | None = Field(default=None, max_length=500, description="told to the member on deny")


def _decide(decision: str) -> Any:
    async def route(
        request_id: RowId,
        request: Request,
        tenant_id: TenantIdDep,
        body: Decision | None = None,
        idempotency_key: IdempotencyKey = None,
    ) -> Response:
        data = {"request_id": request_id, "decision": decision, "note": body.note if body else None}
        return await submit(
            request, command(tenant_id, "group.decide", data, source="admin", key=idempotency_key)
        )

    return route


for _name, _summary in (
    ("approve", "Approve a pending join request (the bot gets approve_join)"),
    ("deny", "Deny a pending join request (the bot gets refuse_join with the note)"),
):
    router.add_api_route(
        "/join-requests/{request_id}/" + _name,
        _decide(_name),
        methods=["POST"],
        summary=_summary,
        responses=responses(404, 409),
    )


@router.get("/{group_id}/moderation", responses=responses(404))
async def moderation(
    group_id: str,
    request: Request,
    tenant_id: TenantIdDep,
    status: Literal["active", "reversed"] | None = Query(default=None),
) -> list[dict[str, Any]]:
    """Warnings and removals, newest first, each with the message that caused it."""

    return await read_only(
        request, lambda conn: _newest(conn, tenant_id, group_id, decision_t, decision_json, status)
    )


@router.post("/moderation/{decision_id}/reverse", responses=responses(404, 409))
async def reverse(
    decision_id: RowId,
    request: Request,
    tenant_id: TenantIdDep,
    body: Decision | None = None,
    idempotency_key: IdempotencyKey = None,
) -> Response:
    """Uphold an appeal: the decision stops counting as a strike, and a removed member is
    invited back (`readmit_member`)."""
    data = {"decision_id": decision_id, "note": body.note if body else None}
    return await submit(
        request, command(tenant_id, "moderation.reverse", data, source="admin", key=idempotency_key)
    )


class BroadcastIn(Input):
    groups: Annotated[list[GroupId], Field(min_length=1, max_length=500)]
    text: Annotated[str, Field(min_length=1, max_length=2000)]


@broadcasts.post("", responses=responses(404, 422))
async def broadcast(
    body: BroadcastIn,
    request: Request,
    tenant_id: TenantIdDep,
    idempotency_key: IdempotencyKey = None,
) -> Response:
    """One message to many groups (群联盟): a `send_message` to each group. Send an
    Idempotency-Key so a retry does not post twice."""
    data = {"groups": list(dict.fromkeys(body.groups)), "text": body.text}
    return await submit(
        request,
        command(tenant_id, "community.broadcast", data, source="admin", key=idempotency_key),
    )
