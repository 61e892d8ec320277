"""Event ingestion: signed webhooks from integrations, and events members report themselves.

Both hand the event to the dispatcher (the one write path) and answer once it is committed,
with what it did: the funnels' new states and the actions queued.
"""

from __future__ import annotations

from datetime import timedelta
from typing import Annotated, Any

import orjson
from fastapi import APIRouter, Header, Request, Response
from fastapi.concurrency import run_in_threadpool

from app import observability as log_context
from app.api.deps import MemberClaimsDep
from app.api.submit import submit
from app.errors import DomainError, FieldProblem, NotFound
from app.events.dispatch import Inbound
from app.events.ingest import InvalidEvent, loads, parse_event, verify_signature
from app.events.schemas import INBOUND_SCHEMA_NAMES, MEMBER_REPORTABLE, EventAccepted
from app.observability import Metrics
from app.problems import responses

router = APIRouter(tags=["webhooks"])

INBOUND_BODY: dict[str, Any] = {
    "requestBody": {
        "required": True,
        "content": {
            "application/json": {
                "schema": {
                    "oneOf": [
                        {"$ref": f"#/components/schemas/{name}"} for name in INBOUND_SCHEMA_NAMES
                    ]
                }
            }
        },
    }
}


@router.post(
    "/v1/webhooks/{source_id}",
    name="receive_webhook",
    openapi_extra=INBOUND_BODY,
    response_model=EventAccepted,
    responses=responses(401, 404, 409, 413, 422, 429, 500, 503),
)
async def receive_webhook(source_id: str, request: Request) -> Response:
    """A signed event from an integration (Standard Webhooks: `webhook-id`,
    `webhook-timestamp`, `webhook-signature`). A repeated `webhook-id` with the same body
    returns the first response and changes nothing; with another body it is a 409."""
    state = request.app.state
    metrics: Metrics = state.metrics
    try:
        source = state.sources.cached(source_id) or await run_in_threadpool(
            state.sources.get, source_id
        )
        if source is None:
            raise NotFound(f'no webhook source "{source_id}"')
        log_context.tenant_id.set(source.tenant_id)
        log_context.event_id.set(request.headers.get("webhook-id"))
        body = await request.body()
        now = state.clock.now()
        msg_id = verify_signature(
            source.secrets(now),
            request.headers,
            body,
            now,
            timedelta(seconds=state.settings.webhook_tolerance_seconds),
        )
        state.rate_limiter.check(source.tenant_id)
        event = parse_event(body)
    except DomainError as exc:
        metrics.refused(exc.code)
        raise
    item = Inbound(
        tenant_id=source.tenant_id,
        source=source.name,
        type=event.type,
        data=event.data,
        key=msg_id,
        digest=event.digest,
        occurred_at=event.occurred_at,
        member=event.member,
    )
    return await submit(request, item)


@router.post(
    "/v1/member/events",
    tags=["member (mini-program)"],
    response_model=EventAccepted,
    responses=responses(401, 409, 413, 422, 429),
)
async def member_event(
    request: Request,
    member: MemberClaimsDep,
    idempotency_key: Annotated[str | None, Header(max_length=200)] = None,
) -> Response:
    """An event a member reports about themselves from the mini-program: a check-in, a
    poster scan, an invite code. Payments and orders come only from the shop's signed
    webhooks. Send an `Idempotency-Key` to make retries safe."""
    state = request.app.state
    body = await request.body()
    try:
        state.rate_limiter.check(member.tenant_id)
        event = parse_event(
            orjson.dumps({**_loads_object(body), "member": {"id": str(member.member_id)}})
        )
        if event.type not in MEMBER_REPORTABLE:
            raise InvalidEvent(
                f"members may not report {event.type}; they may report "
                + ", ".join(sorted(MEMBER_REPORTABLE)),
                errors=[FieldProblem("type", "not reportable by a member")],
            )
    except DomainError as exc:
        state.metrics.refused(exc.code)
        raise
    item = Inbound(
        tenant_id=member.tenant_id,
        source="member",
        type=event.type,
        data=event.data,
        key=f"{member.member_id}:{idempotency_key}" if idempotency_key else None,
        digest=event.digest,
        occurred_at=event.occurred_at,
        member_id=member.member_id,
    )
    return await submit(request, item)


def _loads_object(body: bytes) -> dict[str, Any]:
    document = loads(body)
    if not isinstance(document, dict):
        raise InvalidEvent(
            "the body must be a JSON object", errors=[FieldProblem("", "not an object")]
        )
    document.pop("member", None)  # a member reports only about themselves
    return document
