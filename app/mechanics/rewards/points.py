"""The points ledger, in the write path. Nothing here commits."""

from __future__ import annotations

from datetime import datetime
from typing import Any

from sqlalchemy import Connection, Table, select, update

from app.db import insert_or_skip
from app.errors import Conflict
from app.mechanics.rewards.models import PointsBalance, PointsEntry

balance_t: Table = PointsBalance.__table__  # type: ignore[attr-defined]
entry_t: Table = PointsEntry.__table__  # type: ignore[attr-defined]


class NotEnoughPoints(Conflict):
    code = "not_enough_points"


_NEW_BALANCE = insert_or_skip(balance_t, ["tenant_id", "member_id"])
_NEW_ENTRY = insert_or_skip(entry_t, ["tenant_id", "origin"], entry_t.c.id)


def post(
    conn: Connection,
    tenant_id: int,
    member_id: int,
    points: int,
    origin: str,
    now: datetime,
    reason: str | None = None,
    reverses: int | None = None,
) -> int | None:
    """Credit (points > 0) or debit (< 0) once per `origin`; returns the entry id, or None if
    this origin was posted already. A debit past the balance is refused (409)."""
    if points == 0:
        return None
    entry_id = conn.execute(
        _NEW_ENTRY[conn.dialect.name],
        {
            "tenant_id": tenant_id,
            "member_id": member_id,
            "kind": "reversal" if reverses else ("credit" if points > 0 else "debit"),
            "points": points,
            "reason": (reason or "")[:200] or None,
            "origin": origin[:200],
            "reverses": reverses,
            "created_at": now,
        },
    ).scalar()
    if entry_id is None:
        return None
    conn.execute(_NEW_BALANCE[conn.dialect.name], {"tenant_id": tenant_id, "member_id": member_id})
    moved = conn.execute(
        update(balance_t)
        .where(
            balance_t.c.tenant_id == tenant_id,
            balance_t.c.member_id == member_id,
            balance_t.c.balance + points >= 0,
        )
        .values(balance=balance_t.c.balance + points)
    ).rowcount
    if not moved:
        have = balance(conn, tenant_id, member_id)
        raise NotEnoughPoints(f"{-points} points needed, {have} available")
    return int(entry_id)


def reverse(
    conn: Connection, tenant_id: int, origin: str, now: datetime, reason: str
) -> int | None:
    """Take back the credit posted for `origin` with a reversal entry (once). A member who
    spent the points meanwhile keeps a zero balance: the reversal takes what is left."""
    credit = conn.execute(
        select(entry_t).where(entry_t.c.tenant_id == tenant_id, entry_t.c.origin == origin)
    ).first()
    if credit is None or credit.points <= 0:
        return None
    take = min(credit.points, balance(conn, tenant_id, credit.member_id))
    if take <= 0:
        return None
    return post(
        conn,
        tenant_id,
        credit.member_id,
        -take,
        f"reversal:{origin}",
        now,
        reason,
        reverses=credit.id,
    )


def balance(conn: Connection, tenant_id: int, member_id: int) -> int:
    found = conn.execute(
        select(balance_t.c.balance).where(
            balance_t.c.tenant_id == tenant_id, balance_t.c.member_id == member_id
        )
    ).scalar()
    return int(found or 0)


def entries(
    conn: Connection, tenant_id: int, member_id: int, limit: int = 50
) -> list[dict[str, Any]]:
    rows = conn.execute(
        select(entry_t)
        .where(entry_t.c.tenant_id == tenant_id, entry_t.c.member_id == member_id)
        .order_by(entry_t.c.id.desc())
        .limit(limit)
    ).all()
    return [
        {"kind": r.kind, "points": r.points, "reason": r.reason, "at": r.created_at.isoformat()}
        for r in rows
    ]
