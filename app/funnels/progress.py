"""Move one member through one stored funnel: load, `step`, persist state and stage history.

Event ingestion's dispatcher calls this inside its transaction; it flushes and never commits.
"""

from __future__ import annotations

from datetime import datetime

from sqlmodel import Session, select

from app.engine import Event, MemberState, Outcome, step
from app.funnels.history import record_stage_changes
from app.funnels.models import Funnel, FunnelInstance, FunnelVersion
from app.funnels.service import compiled, latest_version
from app.members.models import Member


def advance(
    session: Session, funnel: Funnel, member: Member, event: Event, now: datetime
) -> Outcome | None:
    """Apply `event` to `member` in `funnel`. None when the funnel has no version open for entries
    and the member is not in it."""
    instance = session.exec(
        select(FunnelInstance)
        .where(
            FunnelInstance.funnel_id == funnel.id,
            FunnelInstance.member_id == member.id,
        )
        .with_for_update()
    ).first()
    version: FunnelVersion | None
    if instance is not None and instance.status == "active":
        version = session.exec(
            select(FunnelVersion).where(
                FunnelVersion.funnel_id == funnel.id, FunnelVersion.version == instance.version
            )
        ).one()
    else:
        version = latest_version(session, funnel, open_only=True)
        if version is None:
            return None
    state = (
        MemberState.from_json(instance.data, member.profile())
        if instance
        else MemberState(profile=member.profile())
    )
    outcome = step(compiled(version), state, event, now)
    if not outcome.matched:
        return outcome
    if instance is None:
        assert funnel.id is not None and member.id is not None
        instance = FunnelInstance(
            tenant_id=funnel.tenant_id,
            funnel_id=funnel.id,
            member_id=member.id,
            version=version.version,
            status="new",
            updated_at=now,
        )
        session.add(instance)
        session.flush()
    new = outcome.state
    instance.version = version.version
    instance.status, instance.state, instance.stage = new.status, new.state, new.stage
    instance.data, instance.updated_at = new.to_json(), now
    session.add(instance)
    record_stage_changes(
        session,
        instance,
        outcome.stage_changes,
        event.type,
        event.id or None,
        version=version.version,
    )
    return outcome
