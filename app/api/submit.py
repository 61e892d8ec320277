"""Handing an item to the write path from a route, and answering with what it did."""

from __future__ import annotations

import hashlib
from collections.abc import Awaitable, Callable
from typing import Annotated, Any, TypeVar

import orjson
from fastapi import Header, Request, Response
from fastapi.concurrency import run_in_threadpool
from sqlalchemy import Connection, Engine
from sqlalchemy.exc import OperationalError
from starlette.types import Receive, Send

from app.db import read_connection
from app.errors import DomainError
from app.events.dispatch import Dispatcher, Inbound, Reply
from app.observability import Metrics
from app.problems import database_unavailable, problem_of, send_raw
from app.security import MemberClaims

T = TypeVar("T")

# An Idempotency-Key is kept as the event's dedupe key (200 characters), prefixed on the member
# API with the member's id (up to 19 digits and a colon): 128 leaves room for that. (Longer
# keys passed SQLite, which does not enforce lengths, and failed PostgreSQL's varchar.)
IDEMPOTENCY_KEY_MAX = 128
IdempotencyKey = Annotated[
    str | None,
    Header(
        max_length=IDEMPOTENCY_KEY_MAX,
        description="makes a retry safe: the same key and request answer the first answer",
    ),
]


def respond(reply: Reply) -> Response:
    if reply.error is not None:
        raise reply.error
    headers = {"Idempotent-Replayed": "true"} if reply.replayed else None
    return Response(
        reply.content(),
        status_code=reply.status,
        media_type="application/json",
        headers=headers,
    )


async def submit(request: Request, item: Inbound) -> Response:
    """Apply `item` through the dispatcher (group commit) and answer once it is durable:
    the stored response, byte for byte, or the problem that refused it."""
    return respond(await dispatch(request.app.state, item))


async def send_reply(send: Send, instance: str, reply: Awaitable[Reply]) -> None:
    """For the fast paths that answer without FastAPI (webhooks, the member API's busiest
    commands): send what `reply` comes to as the route would, byte for byte — the stored
    response, or the problem that refused it (raised or answered), or a 503."""
    try:
        answered = await reply
        if answered.error is not None:
            raise answered.error
    except DomainError as exc:
        await send_raw(send, *problem_of(exc, instance))
        return
    except OperationalError as exc:
        await send_raw(send, *database_unavailable(exc, instance))
        return
    extra = [(b"idempotent-replayed", b"true")] if answered.replayed else []
    await send_raw(send, answered.status, b"application/json", answered.content(), extra)


async def read_body(receive: Receive) -> bytes:
    chunks = []
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            break
        chunks.append(message.get("body", b""))
        if not message.get("more_body", False):
            break
    return b"".join(chunks)


async def dispatch(state: Any, item: Inbound) -> Reply:
    """Hand `item` to the app's dispatcher and count the outcome."""
    dispatcher: Dispatcher = state.dispatcher
    metrics: Metrics = state.metrics
    reply = await dispatcher.submit(item)
    if reply.error is not None:
        metrics.refused(reply.error.code)
    else:
        metrics.events.labels("replayed" if reply.replayed else "accepted", "").inc()
    return reply


def digest(kind: str, data: dict[str, Any]) -> str:
    """What an Idempotency-Key is bound to for a command sent without a raw body of its own:
    the same key with other parameters is a 409, as for webhooks."""
    return hashlib.sha256(
        kind.encode() + orjson.dumps(data, option=orjson.OPT_SORT_KEYS)
    ).hexdigest()


def command(
    tenant_id: int,
    kind: str,
    data: dict[str, Any],
    *,
    source: str,
    key: str | None = None,
    member_id: int | None = None,
) -> Inbound:
    """A command for the write path. An `Idempotency-Key` is bound to the command and its
    parameters, and, from the member API, scoped to the member."""
    return Inbound(
        tenant_id=tenant_id,
        source=source,
        type=kind,
        data=data,
        key=f"{member_id}:{key}" if key and member_id is not None else key,
        digest=digest(kind, data) if key else None,
        member_id=member_id,
    )


def member_command(
    claims: MemberClaims, kind: str, data: dict[str, Any], key: str | None
) -> Inbound:
    """A command a member sends about themselves (their token names them)."""
    return command(
        claims.tenant_id, kind, data, source="member", key=key, member_id=claims.member_id
    )


async def read_only(request: Request, read: Callable[[Connection], T]) -> T:
    """Run `read` on a read-only connection (no write lock on SQLite) in a worker thread."""
    engine: Engine = request.app.state.engine

    def run() -> T:
        with read_connection(engine) as conn:
            return read(conn)

    return await run_in_threadpool(run)
