"""Handing an item to the write path from a route, and answering with what it did."""

from __future__ import annotations

import hashlib
from typing import Any

import orjson
from fastapi import Request, Response

from app.events.dispatch import Dispatcher, Inbound, Reply
from app.observability import Metrics


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
    dispatcher: Dispatcher = request.app.state.dispatcher
    metrics: Metrics = request.app.state.metrics
    reply = await dispatcher.submit(item)
    if reply.error is not None:
        metrics.refused(reply.error.code)
    else:
        metrics.events.labels("replayed" if reply.replayed else "accepted", "").inc()
    return respond(reply)


def digest(kind: str, data: dict[str, Any]) -> str:
    """What an Idempotency-Key is bound to for a command sent without a raw body of its own:
    the same key with other parameters is a 409, as for webhooks."""
    return hashlib.sha256(
        kind.encode() + orjson.dumps(data, option=orjson.OPT_SORT_KEYS)
    ).hexdigest()
