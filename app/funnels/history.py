"""Stage history rows: one per stay in an AARRR stage, closed when the member leaves it."""

from __future__ import annotations

from collections.abc import Iterable

from sqlmodel import Session, col, select

from app.engine.state import StageChange
from app.funnels.models import FunnelInstance, StageHistory


def record_stage_changes(
    session: Session,
    instance: FunnelInstance,
    changes: Iterable[StageChange],
    event_type: str,
    event_id: str | None,
    *,
    version: int,
) -> None:
    for change in changes:
        if change.left is not None and instance.id is not None:
            open_row = session.exec(
                select(StageHistory)
                .where(
                    StageHistory.instance_id == instance.id,
                    col(StageHistory.left_at).is_(None),
                )
                .order_by(col(StageHistory.id).desc())
            ).first()
            if open_row is not None:
                open_row.left_at, open_row.left_by = change.at, event_type
                session.add(open_row)
        if change.entered is not None:
            assert instance.id is not None and change.to_state is not None
            session.add(
                StageHistory(
                    tenant_id=instance.tenant_id,
                    funnel_id=instance.funnel_id,
                    member_id=instance.member_id,
                    instance_id=instance.id,
                    version=version,
                    stage=change.entered,
                    state=change.to_state,
                    entered_at=change.at,
                    entered_by=event_type,
                    entered_event_id=event_id,
                )
            )
    session.flush()
