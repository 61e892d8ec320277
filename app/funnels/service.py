"""Publishing, listing, archiving and migrating funnel versions. Flushes; never commits."""

from __future__ import annotations

import hashlib
import json
from collections import Counter
from datetime import datetime
from typing import Any

from sqlalchemy import func
from sqlmodel import Session, col, select

from app.engine import CompiledFunnel, compile_document
from app.engine.definition import FunnelDefinition
from app.engine.step import relocate
from app.errors import Conflict, FieldProblem, InvalidDefinition, NotFound
from app.funnels import store
from app.funnels.models import Funnel, FunnelInstance, FunnelVersion
from app.funnels.store import VersionRef, compiled_version


def canonical_digest(document: Any) -> str:
    text = json.dumps(document, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    return hashlib.sha256(text.encode()).hexdigest()


def compiled(session: Session, version: FunnelVersion) -> CompiledFunnel:
    """The compiled form of a stored version, compiled once per process."""
    assert version.id is not None
    ref = VersionRef(version.funnel_id, "", version.id, version.version, version.digest)
    return compiled_version(session.connection(), ref, version.definition)


def get_funnel(session: Session, tenant_id: int, key: str) -> Funnel:
    funnel = session.exec(
        select(Funnel).where(Funnel.tenant_id == tenant_id, Funnel.key == key)
    ).first()
    if funnel is None:
        raise NotFound(f'no funnel "{key}"')
    return funnel


def list_funnels(session: Session, tenant_id: int) -> list[tuple[Funnel, FunnelVersion | None]]:
    funnels = session.exec(
        select(Funnel).where(Funnel.tenant_id == tenant_id).order_by(Funnel.key)
    ).all()
    return [(f, latest_version(session, f)) for f in funnels]


def list_versions(session: Session, funnel: Funnel) -> list[FunnelVersion]:
    return list(
        session.exec(
            select(FunnelVersion)
            .where(FunnelVersion.funnel_id == funnel.id)
            .order_by(col(FunnelVersion.version))
        )
    )


def get_version(session: Session, funnel: Funnel, version: int) -> FunnelVersion:
    row = session.exec(
        select(FunnelVersion).where(
            FunnelVersion.funnel_id == funnel.id, FunnelVersion.version == version
        )
    ).first()
    if row is None:
        raise NotFound(f'funnel "{funnel.key}" has no version {version}')
    return row


def latest_version(
    session: Session, funnel: Funnel, *, open_only: bool = False
) -> FunnelVersion | None:
    query = select(FunnelVersion).where(FunnelVersion.funnel_id == funnel.id)
    if open_only:
        query = query.where(col(FunnelVersion.archived_at).is_(None))
    return session.exec(query.order_by(col(FunnelVersion.version).desc())).first()


def publish(
    session: Session,
    tenant_id: int,
    key: str,
    document: Any,
    now: datetime,
    extra_problems: list[FieldProblem] | None = None,
) -> tuple[FunnelVersion, bool]:
    """Validate and store a new version. Publishing the same document as the latest version
    again returns that version (created=False) instead of a copy."""
    problems = list(extra_problems or [])
    if isinstance(document, dict) and document.get("key") not in (None, key):
        problems.append(
            FieldProblem(
                "key", f'"{document.get("key")}" does not match the URL\'s funnel key "{key}"'
            )
        )
    funnel_def = compile_document(document, extra_problems=problems).definition

    funnel = session.exec(
        select(Funnel).where(Funnel.tenant_id == tenant_id, Funnel.key == key).with_for_update()
    ).first()
    if funnel is None:
        funnel = Funnel(tenant_id=tenant_id, key=key, name=funnel_def.name, created_at=now)
        session.add(funnel)
        session.flush()
    digest = canonical_digest(document)
    latest = latest_version(session, funnel)
    if latest is not None and latest.digest == digest:
        return latest, False
    _check_migrations(session, funnel, funnel_def)
    number = (latest.version if latest else 0) + 1
    assert funnel.id is not None
    version = FunnelVersion(
        tenant_id=tenant_id,
        funnel_id=funnel.id,
        version=number,
        definition=document,
        digest=digest,
        created_at=now,
    )
    funnel.name = funnel_def.name
    session.add_all([funnel, version])
    session.flush()
    return version, True


def _check_migrations(session: Session, funnel: Funnel, definition: FunnelDefinition) -> None:
    problems = []
    for i, m in enumerate(definition.migrations):
        old = session.exec(
            select(FunnelVersion).where(
                FunnelVersion.funnel_id == funnel.id, FunnelVersion.version == m.from_version
            )
        ).first()
        if old is None:
            problems.append(
                FieldProblem(
                    f"migrations[{i}].from_version",
                    f'funnel "{funnel.key}" has no version {m.from_version}',
                )
            )
            continue
        old_states = set(old.definition.get("states", {}))
        for state in m.states:
            if state not in old_states:
                problems.append(
                    FieldProblem(
                        f"migrations[{i}].states.{state}",
                        f'version {m.from_version} has no state "{state}"',
                    )
                )
    if problems:
        raise InvalidDefinition(problems)


def archive_version(session: Session, funnel: Funnel, number: int, now: datetime) -> FunnelVersion:
    version = get_version(session, funnel, number)
    if version.archived_at is None:
        version.archived_at = now
        session.add(version)
        session.flush()
    return version


def migrate(session: Session, funnel: Funnel, number: int, now: datetime) -> dict[str, Any]:
    """Apply the migration maps declared by version `number` to members on older versions."""
    target = get_version(session, funnel, number)
    if target.archived_at is not None:
        raise Conflict(f"version {number} is archived; migrate to an open version")
    compiled_target = compiled(session, target)
    conn = session.connection()
    assert funnel.id is not None
    moved: Counter[str] = Counter()
    for m in compiled_target.definition.migrations:
        for row in store.instances_in_states(conn, funnel.id, m.from_version, m.states):
            state = row.member_state()
            assert state.state is not None
            outcome = relocate(compiled_target, state, m.states[state.state], now)
            store.save_outcome(
                conn,
                tenant_id=funnel.tenant_id,
                funnel_id=funnel.id,
                member_id=row.member_id,
                instance=row,
                version=number,
                outcome=outcome,
                event_type="funnel.migrated",
                event_ref=None,
                now=now,
            )
            moved[f"{m.from_version}:{state.state}->{m.states[state.state]}"] += 1
    remaining = session.exec(
        select(func.count())
        .select_from(FunnelInstance)
        .where(
            FunnelInstance.funnel_id == funnel.id,
            FunnelInstance.version < number,
            FunnelInstance.status == "active",
        )
    ).one()
    return {
        "version": number,
        "migrated": sum(moved.values()),
        "by_move": dict(moved),
        "active_on_older_versions": remaining,
    }
