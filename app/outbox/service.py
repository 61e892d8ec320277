"""Writing actions to the outbox (the dispatcher), and the admin view of deliveries."""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime
from typing import Any

from sqlalchemy import Connection, Table, insert

from app.engine.state import PlannedAction
from app.funnels.pending import Pending
from app.outbox.models import ActionEndpoint, DeliveryAttempt, Outbox
from app.prepared import Prepared

outbox_t: Table = Outbox.__table__  # type: ignore[attr-defined]
attempt_t: Table = DeliveryAttempt.__table__  # type: ignore[attr-defined]
endpoint_t: Table = ActionEndpoint.__table__  # type: ignore[attr-defined]

PENDING, DELIVERING, DELIVERED, DEAD, SUPPRESSED = (
    "pending",
    "delivering",
    "delivered",
    "dead",
    "suppressed",
)


# One INSERT per action (an event queues one or two): a Prepared statement costs less
# than SQLAlchemy's multi-row RETURNING for a single row.
_ENQUEUE = Prepared(insert(outbox_t).returning(outbox_t.c.id))


def delivery_id(outbox_id: int) -> str:
    """The outbound `webhook-id`: stable across retries, so receivers can dedupe."""
    return f"act_{outbox_id}"


def enqueue(
    conn: Connection,
    *,
    tenant_id: int,
    member_id: int | None,
    member_external_id: str | None,
    funnel_id: int | None,
    funnel_key: str | None,
    version: int | None,
    event_id: int | None,
    event_type: str,
    actions: Sequence[PlannedAction],
    now: datetime,
    pending: Pending | None = None,
) -> list[int]:
    """One outbox row per action, in order; returns their ids. Suppressed actions are kept
    for the record (the send policy said no) and never delivered. With `pending` (the
    dispatcher's batch), the rows are written at the batch's end, their ids given now."""
    if not actions:
        return []
    rows: list[dict[str, Any]] = []
    for a in actions:
        rows.append(
            {
                "tenant_id": tenant_id,
                "member_id": member_id,
                "event_id": event_id,
                "funnel_id": funnel_id,
                "source": a.source,
                "type": a.type,
                "payload": {
                    "type": a.type,
                    "params": dict(a.params),
                    "member": {"id": member_external_id} if member_external_id else None,
                    "funnel": {"key": funnel_key, "version": version} if funnel_key else None,
                    "source": a.source,
                    "cause": {"event_id": event_id, "type": event_type},
                    "disposition": a.disposition,
                    "deliver_at": a.deliver_at.isoformat(),
                },
                "status": SUPPRESSED if a.disposition == "suppressed" else PENDING,
                "order_at": a.deliver_at,
                "next_attempt_at": a.deliver_at,
                "attempts": 0,
                "created_at": now,
            }
        )
    if pending is not None:
        return [pending.enqueue(conn, row) for row in rows]
    return [int(_ENQUEUE.scalar(conn, row)) for row in rows]
