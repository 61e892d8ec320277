"""CSV exports: UTF-8 with a byte-order mark, so spreadsheet programs read Chinese names."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

from sqlalchemy import Connection, select

from app.csvfile import BOM, line
from app.funnels.store import instance_t
from app.members.models import Member

member_t = Member.__table__  # type: ignore[attr-defined]
MEMBER_COLUMNS = (
    "external_id",
    "nickname",
    "stage",
    "state",
    "status",
    "version",
    "acquired_channel",
    "acquired_group",
    "invited_by",
    "updated_at",
)


def report_rows(report: dict[str, Any]) -> bytes:
    """The funnel report: one line per stage, then the daily series under its own header."""
    stages = report["stages"]
    cols = (
        "stage",
        "entered",
        "next_stage",
        "converted",
        "dropped",
        "conversion",
        "median_seconds",
        "p90_seconds",
        "reached_from_first",
        "conversion_from_first",
    )
    out = BOM + line(cols) + "".join(line(s.get(c) for c in cols) for s in stages)
    names = [s["stage"] for s in stages]
    out += "\r\n" + line(["date", *names])
    out += "".join(line([d["date"], *(d[n] for n in names)]) for d in report["daily"])
    return out.encode()


def members(
    conn: Connection, funnel_id: int, stage: str | None, chunk: int = 5000
) -> Iterator[bytes]:
    """Every member's current place in the funnel (optionally in one stage), streamed in
    keyset pages: a million members never sit in memory at once."""
    yield (BOM + line(MEMBER_COLUMNS)).encode()
    i, m = instance_t.c, member_t.c
    after = 0
    while True:
        q = (
            select(
                i.id,
                m.external_id,
                m.nickname,
                i.stage,
                i.state,
                i.status,
                i.version,
                m.acquired_channel,
                m.acquired_group,
                m.invited_by,
                i.updated_at,
            )
            .join(member_t, m.id == i.member_id)
            .where(i.funnel_id == funnel_id, i.id > after)
            .order_by(i.id)
            .limit(chunk)
        )
        if stage is not None:
            q = q.where(i.stage == stage)
        rows = conn.execute(q).all()
        if not rows:
            return
        after = rows[-1].id
        yield "".join(line([*r[1:-1], r.updated_at.isoformat()]) for r in rows).encode()
