"""Event ingestion: signed webhooks from integrations, and events members report themselves.

Both hand the event to the dispatcher (the one write path) and answer once it is committed,
with what it did: the funnels' new states and the actions queued.
"""

from __future__ import annotations

from collections.abc import Mapping
from datetime import timedelta
from typing import Any

import orjson
from fastapi import APIRouter, Request, Response
from fastapi.concurrency import run_in_threadpool
from starlette.types import ASGIApp, Receive, Scope, Send

from app import observability as log_context
from app.api.deps import MemberClaimsDep
from app.api.submit import IdempotencyKey, dispatch, read_body, respond, send_reply, submit
from app.errors import DomainError, FieldProblem, NotFound
from app.events.dispatch import Inbound, Reply
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
    returns the first response and changes nothing; with another body it is a 409.

    Served by `WebhookFastPath` in front of the router (see below); this route documents it
    and serves it if the fast path is not installed."""
    reply = await ingest_webhook(
        request.app.state, source_id, request.headers, await request.body()
    )
    return respond(reply)


async def ingest_webhook(
    state: Any, source_id: str, headers: Mapping[str, str], body: bytes
) -> Reply:
    """Verify, parse and apply one webhook; the dispatcher's reply, or a DomainError for a
    request refused before the write path (unknown source, bad signature, bad body)."""
    metrics: Metrics = state.metrics
    try:
        source = state.sources.cached(source_id) or await run_in_threadpool(
            state.sources.get, source_id
        )
        if source is None:
            raise NotFound(f'no webhook source "{source_id}"')
        log_context.tenant_id.set(source.tenant_id)
        log_context.event_id.set(headers.get("webhook-id"))
        now = state.clock.now()
        msg_id = verify_signature(
            source.secrets(now),
            headers,
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
    return await dispatch(state, item)


class WebhookFastPath:
    """`POST /v1/webhooks/{source}` straight from the ASGI server to `ingest_webhook`,
    before FastAPI's router. Webhooks are the traffic that grows when a group-buy goes
    viral; routing through ~100 routes, the dependency machinery and the exception
    middleware cost more CPU than verifying and applying the event (measured: a webhook
    that did nothing else reached 48% of a bare FastAPI echo). Every other request, and
    anything but a POST to that exact shape, goes on to FastAPI. The answer is the same
    bytes the route gives: the stored reply, or the same problem+json."""

    PREFIX = "/v1/webhooks/"

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        path: str = scope.get("path", "")
        if (
            scope["type"] != "http"
            or scope["method"] != "POST"
            or not path.startswith(self.PREFIX)
            or "/" in path[len(self.PREFIX) :]
            or len(path) == len(self.PREFIX)
        ):
            await self.app(scope, receive, send)
            return
        body = await read_body(receive)
        headers = {k.decode("latin-1"): v.decode("latin-1") for k, v in scope["headers"]}
        source = path[len(self.PREFIX) :]
        await send_reply(send, path, ingest_webhook(scope["app"].state, source, headers, body))


@router.post(
    "/v1/member/events",
    tags=["member (mini-program)"],
    response_model=EventAccepted,
    responses=responses(401, 409, 413, 422, 429),
)
async def member_event(
    request: Request,
    member: MemberClaimsDep,
    idempotency_key: IdempotencyKey = None,
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
    if "member" in document:  # a member reports only about themselves, never as another
        raise InvalidEvent(
            "a member reports events only about themselves: leave out `member`, the token "
            "says who you are",
            errors=[FieldProblem("member", "not accepted from a member")],
        )
    return document
