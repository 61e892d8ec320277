"""What runs once a day (see `app.mechanics.community.schedule`): pruning inactive
members, birthday and holiday red packets, the monthly top 3."""

from __future__ import annotations

from datetime import date, timedelta
from typing import Any

from sqlalchemy import select, update

from app.engine.guards import render_template
from app.engine.schedule import parse_duration
from app.errors import NotFound
from app.funnels import store
from app.mechanics.commands import Context, DirectAction, Effects, Emit
from app.mechanics.community.service import (
    activity,
    group,
    group_member_t,
    group_reward,
    left,
    member_t,
    once,
    persona,
    settings_of,
    zone_of,
)
from app.mechanics.community.settings import PROTECTED_ROLES
from app.mechanics.rewards.grant import grant_campaign_reward


def run_daily(ctx: Context) -> Effects:
    """Run one policy or campaign for today (the command `due_runs` makes)."""
    versions = {v.key: v for v in ctx.versions()}
    ref = versions.get(ctx.data["funnel"])
    if ref is None:
        raise NotFound(f'no open funnel "{ctx.data["funnel"]}"')
    mechanics = store.compiled_version(ctx.conn, ref).definition.mechanics
    kind, name = ctx.data["kind"], ctx.data["name"]
    cfg: Any = (mechanics.pruning if kind == "pruning" else mechanics.rewards).get(name)
    if cfg is None:
        raise NotFound(f'funnel "{ref.key}" has no {kind} "{name}"')
    effects = Effects(None, {})
    if kind == "pruning":
        effects.result = prune(ctx, cfg, f"pruning.{name}", effects)
    elif cfg.kind == "monthly_top":
        effects.result = monthly_top(ctx, ref.funnel_id, name, cfg, effects)
    elif cfg.on == "birthday":
        effects.result = birthdays(ctx, ref.funnel_id, name, cfg, effects)
    else:
        effects.result = holidays(ctx, ref.funnel_id, name, cfg, effects)
    return effects


# ── pruning ───────────────────────────────────────────────────────────────────────────────
def prune(ctx: Context, policy: Any, source: str, effects: Effects) -> dict[str, Any]:
    """Warn each inactive, unprotected member; remove those warned `warn_grace` ago who are
    still inactive (a message since the warning clears it)."""
    conn, tenant_id, now = ctx.conn, ctx.tenant_id, ctx.now
    no_message_for = parse_duration(policy.no_message_for) if policy.no_message_for else None
    within = parse_duration(policy.within)
    grace = parse_duration(policy.warn_grace)
    report = {"warned": 0, "removed": 0, "spared": 0}
    for group_id in policy.groups:
        row = group(conn, tenant_id, group_id)
        if row is None:
            continue
        settings = settings_of(row)
        zone = settings.zone
        window_start = (now - within).astimezone(zone).date()
        recent = activity(conn, tenant_id, group_id, window_start)
        roles_since = (now - parse_duration(settings.roles.window)).astimezone(zone).date()
        roles = (
            activity(conn, tenant_id, group_id, roles_since)
            if roles_since != window_start
            else recent
        )
        members = conn.execute(
            select(group_member_t, member_t.c.nickname)
            .join(member_t, member_t.c.id == group_member_t.c.member_id)
            .where(group_member_t.c.tenant_id == tenant_id, group_member_t.c.group_id == group_id)
            .order_by(group_member_t.c.member_id)
            .with_for_update(of=group_member_t)
        ).all()
        for gm in members:
            inactive = False
            if no_message_for is not None:
                inactive = (gm.last_seen_at or gm.joined_at) <= now - no_message_for
            if policy.min_messages is not None and gm.joined_at <= now - within:
                messages = recent.get(gm.member_id, (0, 0, 0))[0]
                inactive = inactive or messages < policy.min_messages
            if not inactive:
                continue
            protected = gm.role in PROTECTED_ROLES or (
                persona(settings, roles.get(gm.member_id, (0, 0, 0))) == "opinion_leader"
            )
            if protected:
                report["spared"] += 1
                continue
            where = (
                group_member_t.c.tenant_id == tenant_id,
                group_member_t.c.group_id == group_id,
                group_member_t.c.member_id == gm.member_id,
            )
            if gm.warned_at is None:
                conn.execute(update(group_member_t).where(*where).values(warned_at=now))
                text = render_template(policy.warning, {"member": {"nickname": gm.nickname or ""}})
                effects.actions.append(
                    DirectAction(
                        gm.member_id, "send_message", {"text": text, "group_id": group_id}, source
                    )
                )
                report["warned"] += 1
            elif gm.warned_at <= now - grace:
                left(conn, tenant_id, group_id, gm.member_id)
                effects.actions.append(
                    DirectAction(
                        gm.member_id,
                        "remove_member",
                        {"group_id": group_id, "reason": policy.reason},
                        source,
                    )
                )
                effects.emits.append(
                    Emit(gm.member_id, "member.removed", {"group_id": group_id, "rule": "pruning"})
                )
                report["removed"] += 1
    return report


# ── milestones and the monthly top ────────────────────────────────────────────────────────
def _groups_members(ctx: Context, groups: list[str]) -> list[Any]:
    return list(
        ctx.conn.execute(
            select(group_member_t.c.group_id, member_t.c.id, member_t.c.attributes)
            .join(member_t, member_t.c.id == group_member_t.c.member_id)
            .where(
                group_member_t.c.tenant_id == ctx.tenant_id, group_member_t.c.group_id.in_(groups)
            )
            .order_by(member_t.c.id)
        ).all()
    )


def _local_days(ctx: Context, groups: list[str]) -> dict[str, date]:
    """Today in each registered group's zone (one lookup per group)."""
    rows = (group(ctx.conn, ctx.tenant_id, g) for g in groups)
    return {r.group_id: ctx.now.astimezone(zone_of(r)).date() for r in rows if r is not None}


def birthdays(
    ctx: Context, funnel_id: int, name: str, cfg: Any, effects: Effects
) -> dict[str, Any]:
    """A member of the campaign's groups whose `birthday` attribute (MM-DD or YYYY-MM-DD) is
    today gets the reward, once a year."""
    paid = 0
    seen: set[int] = set()
    days = _local_days(ctx, cfg.groups)
    unregistered = ctx.now.astimezone(zone_of(None)).date()  # membership known, no settings
    for group_id, member_id, attributes in _groups_members(ctx, cfg.groups):
        if member_id in seen:
            continue
        today = days.get(group_id, unregistered)
        birthday = str((attributes or {}).get("birthday") or "")
        if not birthday.endswith(today.strftime("-%m-%d")) and birthday != today.strftime("%m-%d"):
            continue
        seen.add(member_id)
        origin = f"milestone:{funnel_id}:{name}:birthday:{member_id}:{today.year}"
        if once(ctx.conn, ctx.tenant_id, origin, ctx.now):
            grant_campaign_reward(
                ctx.conn,
                ctx.tenant_id,
                member_id,
                funnel_id,
                name,
                cfg.reward,
                origin,
                ctx.now,
                effects,
            )
            paid += 1
    return {"rewarded": paid}


def holidays(ctx: Context, funnel_id: int, name: str, cfg: Any, effects: Effects) -> dict[str, Any]:
    """On a listed date (MM-DD every year, or YYYY-MM-DD), each group gets the reward once."""
    paid = 0
    for group_id, today in _local_days(ctx, cfg.groups).items():
        if today.strftime("%m-%d") not in cfg.dates and today.isoformat() not in cfg.dates:
            continue
        key = f"milestone:{funnel_id}:{name}:{group_id}:{today.isoformat()}"
        if once(ctx.conn, ctx.tenant_id, key, ctx.now):
            effects.actions.extend(
                group_reward(
                    group_id,
                    cfg.reward.model_dump(mode="json"),
                    f"rewards.{name}",
                    holiday=str(today),
                )
            )
            paid += 1
    return {"rewarded": paid}


def monthly_top(
    ctx: Context, funnel_id: int, name: str, cfg: Any, effects: Effects
) -> dict[str, Any]:
    """On the 1st (local), the `top` members with the most messages last month in each group
    (owners and admins aside; a tie goes to the member known longest) get the reward, once
    per month."""
    out: dict[str, list[int]] = {}
    for group_id, today in _local_days(ctx, cfg.groups).items():
        if today.day != 1:
            continue
        last = today - timedelta(days=1)
        first = last.replace(day=1)
        key = f"top:{funnel_id}:{name}:{group_id}:{first:%Y-%m}"
        if not once(ctx.conn, ctx.tenant_id, key, ctx.now):
            continue
        counts = activity(ctx.conn, ctx.tenant_id, group_id, first, last)
        staff = set(
            ctx.conn.execute(
                select(group_member_t.c.member_id).where(
                    group_member_t.c.tenant_id == ctx.tenant_id,
                    group_member_t.c.group_id == group_id,
                    group_member_t.c.role.in_(("owner", "admin")),
                )
            ).scalars()
        )
        ranked = sorted(
            (
                (c[0], member_id)
                for member_id, c in counts.items()
                if member_id not in staff and c[0] > 0
            ),
            key=lambda x: (-x[0], x[1]),
        )[: cfg.top]
        out[group_id] = [member_id for _, member_id in ranked]
        for rank, (messages, member_id) in enumerate(ranked, 1):
            origin = f"{key}:{member_id}"
            grant_campaign_reward(
                ctx.conn,
                ctx.tenant_id,
                member_id,
                funnel_id,
                name,
                cfg.reward,
                origin,
                ctx.now,
                effects,
                reason=f"top {rank} in {group_id}, {first:%Y-%m} ({messages} messages)",
            )
    return {"top": out}
