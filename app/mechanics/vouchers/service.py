"""Vouchers inside the write path: issue (idempotent by origin), redeem exactly once, void,
expire. Core statements on the caller's connection; nothing here commits."""

from __future__ import annotations

import secrets
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import Connection, Table, bindparam, select, update

from app.db import insert_or_skip, insert_rows, one_of
from app.errors import NotFound, Refused
from app.mechanics.vouchers.models import Voucher
from app.prepared import Prepared, as_one

voucher_t: Table = Voucher.__table__  # type: ignore[attr-defined]

ISSUED, REDEEMED, EXPIRED, VOIDED = "issued", "redeemed", "expired", "voided"
# Crockford's base32 without the letters a cashier confuses (I, L, O, U).
ALPHABET = "0123456789ABCDEFGHJKMNPQRSTVWXYZ"
CODE_LENGTH = 12  # 60 bits: unguessable, still short enough to type at a till
QR_PREFIX = "flywheel:voucher:"


def new_code() -> str:
    """CODE_LENGTH characters from one read of the system's random source (a choice per
    character read it twelve times); 32 symbols take exactly five bits of a byte, so every
    symbol stays equally likely."""
    return "".join(ALPHABET[b & 31] for b in secrets.token_bytes(CODE_LENGTH))


def normalize(code: str) -> str:
    """What a cashier types or a scanner reads: case, dashes, spaces and the QR prefix
    do not matter."""
    code = code.strip()
    if code.lower().startswith(QR_PREFIX):
        code = code[len(QR_PREFIX) :]
    return code.replace("-", "").replace(" ", "").upper()


_COLUMNS = (
    "tenant_id",
    "member_id",
    "code",
    "name",
    "value_fen",
    "discount_percent",
    "status",
    "origin",
    "mechanic",
    "funnel_id",
    "team_id",
    "issued_at",
    "expires_at",
)
# The new voucher comes back from its INSERT; one already issued for the origin is read.
_INSERTS = Prepared(
    {
        name: stmt.returning(*voucher_t.c)
        for name, stmt in insert_or_skip(voucher_t, ["tenant_id", "origin"]).items()
    }
)
_BY_ORIGIN = Prepared(
    select(voucher_t).where(
        voucher_t.c.tenant_id == bindparam("b_tenant"), voucher_t.c.origin == bindparam("b_origin")
    )
)


def new_voucher(
    *,
    tenant_id: int,
    member_id: int,
    name: str,
    valid_for: timedelta,
    origin: str,
    now: datetime,
    value_fen: int | None = None,
    discount_percent: int | None = None,
    mechanic: str | None = None,
    funnel_id: int | None = None,
    team_id: int | None = None,
) -> dict[str, Any]:
    """The row of a voucher to issue (`issue`, `issue_many`)."""
    return {
        "tenant_id": tenant_id,
        "member_id": member_id,
        "code": new_code(),
        "name": name,
        "value_fen": value_fen,
        "discount_percent": discount_percent,
        "status": ISSUED,
        "origin": origin,
        "mechanic": mechanic,
        "funnel_id": funnel_id,
        "team_id": team_id,
        "issued_at": now,
        "expires_at": now + valid_for,
    }


def issue(conn: Connection, row: dict[str, Any]) -> tuple[Any, bool]:
    """Issue one voucher (`new_voucher`'s row) for its origin, or return the one the origin
    already issued. Returns (row, created)."""
    return _issued(conn, row, _INSERTS.record(conn, row))


def _issued(conn: Connection, row: dict[str, Any], made: Any | None) -> tuple[Any, bool]:
    if made is not None:
        return made, True
    found = _BY_ORIGIN.record(conn, {"b_tenant": row["tenant_id"], "b_origin": row["origin"]})
    assert found is not None, row["origin"]
    return found, False


_INSERT_MANY = Prepared(
    insert_rows(voucher_t, _COLUMNS)
    .on_conflict_do_nothing(index_elements=["tenant_id", "origin"])
    .returning(*voucher_t.c)
)


# SQLite: the rows inserted by one executemany (no RETURNING) and read back by origin.
_INSERT_EACH = Prepared(insert_or_skip(voucher_t, ["tenant_id", "origin"]))
_BY_ORIGINS = Prepared(
    {
        dialect: select(voucher_t).where(voucher_t.c.tenant_id == bindparam("b_tenant"), origins)
        for dialect, origins in one_of(voucher_t.c.origin, "b_origins").items()
    }
)


def issue_many(conn: Connection, rows: list[dict[str, Any]]) -> list[Any]:
    """`issue` for several vouchers (`new_voucher`'s rows) of one tenant, in their order (a
    team's success issues one to each member): on PostgreSQL one statement; on SQLite an
    executemany and one read of the rows by origin, made or issued before (an INSERT …
    RETURNING each cost 47 µs a voucher there, these ~26)."""
    if len(rows) < 2:
        return [issue(conn, r)[0] for r in rows]
    if conn.dialect.name == "postgresql":
        made = {m.origin: m for m in _INSERT_MANY.records(conn, as_one(rows))}
        return [_issued(conn, r, made.get(r["origin"]))[0] for r in rows]
    (tenant_id,) = {r["tenant_id"] for r in rows}
    _INSERT_EACH.run_many(conn, rows)
    params = {"b_tenant": tenant_id, "b_origins": [r["origin"] for r in rows]}
    found = {v.origin: v for v in _BY_ORIGINS.records(conn, params)}
    return [found[r["origin"]] for r in rows]


def by_code(conn: Connection, tenant_id: int, code: str) -> Any:
    row = conn.execute(
        select(voucher_t).where(voucher_t.c.tenant_id == tenant_id, voucher_t.c.code == code)
    ).first()
    if row is None:
        raise NotFound(f'no voucher with code "{code}"')
    return row


def _refusal(row: Any, now: datetime) -> Refused:
    if row.status == REDEEMED:
        when = row.redeemed_at.isoformat() if row.redeemed_at else "earlier"
        return Refused(
            "voucher_already_redeemed", f"voucher {row.code} was already redeemed at {when}"
        )
    if row.status == VOIDED:
        return Refused("voucher_voided", f"voucher {row.code} was voided")
    if row.status == EXPIRED or row.expires_at <= now:
        return Refused(
            "voucher_expired", f"voucher {row.code} expired at {row.expires_at.isoformat()}"
        )
    raise AssertionError(f"voucher {row.code} is {row.status}")


def redeem(conn: Connection, tenant_id: int, code: str, now: datetime, by: str) -> Any:
    """Redeem exactly once: a conditional UPDATE on `issued` and not yet expired, so of two
    tills at the same moment one wins and the other is told why it lost."""
    won = conn.execute(
        update(voucher_t)
        .where(
            voucher_t.c.tenant_id == tenant_id,
            voucher_t.c.code == code,
            voucher_t.c.status == ISSUED,
            voucher_t.c.expires_at > now,
        )
        .values(status=REDEEMED, redeemed_at=now, redeemed_by=by[:100])
        .returning(voucher_t.c.id)
    ).first()
    row = by_code(conn, tenant_id, code)
    if won is None:
        raise _refusal(row, now)
    return row


def void(conn: Connection, tenant_id: int, code: str, now: datetime) -> Any:
    won = conn.execute(
        update(voucher_t)
        .where(
            voucher_t.c.tenant_id == tenant_id,
            voucher_t.c.code == code,
            voucher_t.c.status == ISSUED,
        )
        .values(status=VOIDED, voided_at=now)
        .returning(voucher_t.c.id)
    ).first()
    row = by_code(conn, tenant_id, code)
    if won is None:
        raise _refusal(row, now)
    return row


def expire(conn: Connection, voucher_id: int, now: datetime) -> Any | None:
    """Mark a voucher past its expiry as expired; None if it was redeemed or voided first."""
    won = conn.execute(
        update(voucher_t)
        .where(
            voucher_t.c.id == voucher_id,
            voucher_t.c.status == ISSUED,
            voucher_t.c.expires_at <= now,
        )
        .values(status=EXPIRED)
        .returning(voucher_t.c.id)
    ).first()
    if won is None:
        return None
    return conn.execute(select(voucher_t).where(voucher_t.c.id == voucher_id)).one()


def to_json(row: Any, now: datetime | None = None) -> dict[str, Any]:
    status = row.status
    if status == ISSUED and now is not None and row.expires_at <= now:
        status = EXPIRED  # the expiry sweep may not have run yet; the till must not accept it
    return {
        "code": row.code,
        "qr": QR_PREFIX + row.code,
        "name": row.name,
        "value_fen": row.value_fen,
        "discount_percent": row.discount_percent,
        "status": status,
        "mechanic": row.mechanic,
        "issued_at": row.issued_at.isoformat(),
        "expires_at": row.expires_at.isoformat(),
        "redeemed_at": row.redeemed_at.isoformat() if row.redeemed_at else None,
    }


def event_data(row: Any, source: str | None = None) -> dict[str, Any]:
    """What `voucher.*` events carry (guards read `event.voucher`, `event.value_fen`…)."""
    return {
        "voucher": row.code,
        "name": row.name,
        "value_fen": row.value_fen,
        "discount_percent": row.discount_percent,
        "mechanic": source or row.mechanic,
        "expires_at": row.expires_at.isoformat(),
    }
