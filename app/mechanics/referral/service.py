"""Referral (裂变) in the write path: invite codes, attribution, qualification, rewards.

- Attribution: `invite.accepted` links the invitee to the code's owner, once per campaign
  (a unique key), never to themselves, never to a descendant (the inviter's ancestors are
  walked with both members' rows locked, so two members accepting each other's codes at once
  cannot both succeed), and only within `attribution_window` of the invitee's first sight.
- Qualification: the campaign's `qualify_event` (joining the group, a first paid order of at
  least `min_order_fen`…) within `qualify_within` of the acceptance qualifies the invitee once.
- Rewards: the invitee's own, the inviter's at level 1 (and level 2 when `depth: 2`; the
  definition refuses more), and tier rewards when an inviter's qualified invitees reach a
  tier. Each has a unique `reward_key`, so it is granted once whatever path gets there; caps
  per inviter per day and per campaign are counted under the inviter's row lock.
- Lifecycle: pending for the `hold` (the refund window), then paid by the sweep (a voucher
  issued, points granted, actions queued, a ledger entry); a refund of the qualifying order
  voids pending rewards, and reverses paid ones with a negative ledger entry.
"""

from __future__ import annotations

import secrets
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import Connection, Table, bindparam, func, select, update

from app.db import insert_or_skip
from app.engine.definition import Referral
from app.engine.schedule import parse_duration
from app.errors import FieldProblem, NotFound, Refused
from app.events.ingest import InvalidEvent
from app.events.models import EventLog
from app.funnels import store
from app.mechanics.commands import Context, DirectAction, Effects, Emit, campaign_config
from app.mechanics.referral.models import ReferralCode, ReferralLink, ReferralReward, RewardLedger
from app.mechanics.rewards import points as ledger
from app.mechanics.rewards.grant import grant_reward
from app.mechanics.vouchers import service as vouchers
from app.members.models import Member
from app.prepared import Prepared

code_t: Table = ReferralCode.__table__  # type: ignore[attr-defined]
link_t: Table = ReferralLink.__table__  # type: ignore[attr-defined]
reward_t: Table = ReferralReward.__table__  # type: ignore[attr-defined]
ledger_t: Table = RewardLedger.__table__  # type: ignore[attr-defined]
member_t: Table = Member.__table__  # type: ignore[attr-defined]
event_t: Table = EventLog.__table__  # type: ignore[attr-defined]

PENDING, FLAGGED, APPROVED, PAID, VOIDED = "pending", "flagged", "approved", "paid", "voided"
FINGERPRINTS = ("device_id", "payer_id")  # member attributes or event data, when present
CODE_LENGTH = 8
MAX_DEPTH = 2  # the definition refuses more; this is the second lock on the same door
SHARE_PATH = "/pages/invite?code="


_NEW_CODE = insert_or_skip(code_t, ["tenant_id", "funnel_id", "campaign", "owner_member_id"])
_NEW_LINK = insert_or_skip(
    link_t, ["tenant_id", "funnel_id", "campaign", "invitee_member_id"], link_t.c.id
)
_NEW_REWARD = insert_or_skip(reward_t, ["tenant_id", "reward_key"])


def campaigns(
    ctx_versions: list[store.VersionRef], conn: Connection
) -> list[tuple[store.VersionRef, str, Referral]]:
    out = []
    for ref in ctx_versions:
        for name, cfg in store.compiled_version(conn, ref).definition.mechanics.referral.items():
            out.append((ref, name, cfg))
    return out


# ── codes ─────────────────────────────────────────────────────────────────────────────────
def code_for(
    conn: Connection, tenant_id: int, funnel_id: int, campaign: str, member_id: int, now: datetime
) -> Any:
    """The member's code for the campaign: made on first ask, the same ever after."""
    conn.execute(
        _NEW_CODE[conn.dialect.name],
        {
            "tenant_id": tenant_id,
            "funnel_id": funnel_id,
            "campaign": campaign,
            "code": "".join(secrets.choice(vouchers.ALPHABET) for _ in range(CODE_LENGTH)),
            "owner_member_id": member_id,
            "created_at": now,
        },
    )
    return conn.execute(
        select(code_t).where(
            code_t.c.tenant_id == tenant_id,
            code_t.c.funnel_id == funnel_id,
            code_t.c.campaign == campaign,
            code_t.c.owner_member_id == member_id,
        )
    ).one()


_NEW_CHANNEL = insert_or_skip(code_t, ["tenant_id", "funnel_id", "campaign", "channel"])


def channel_code(ctx: Context) -> Effects:
    """`referral.channel`: a code for a poster, a lobby or a staff member — attribution
    without a member as inviter (so no inviter reward), for "which QR code brought whom"."""
    name, channel = str(ctx.data["campaign"]), str(ctx.data["channel"])
    ref, _ = campaign_config(ctx, str(ctx.data["funnel"]), "referral", name)
    ctx.conn.execute(
        _NEW_CHANNEL[ctx.conn.dialect.name],
        {
            "tenant_id": ctx.tenant_id,
            "funnel_id": ref.funnel_id,
            "campaign": name,
            "code": "".join(secrets.choice(vouchers.ALPHABET) for _ in range(CODE_LENGTH)),
            "channel": channel,
            "created_at": ctx.now,
        },
    )
    code = ctx.conn.execute(
        select(code_t).where(
            code_t.c.tenant_id == ctx.tenant_id,
            code_t.c.funnel_id == ref.funnel_id,
            code_t.c.campaign == name,
            code_t.c.channel == channel,
        )
    ).one()
    return Effects(
        None,
        {
            "outcome": "ok",
            "code": code.code,
            "channel": channel,
            "share_path": SHARE_PATH + code.code,
        },
    )


def my_referral(ctx: Context) -> Effects:
    """`referral.mine`: the member's code, share path, invitees and rewards."""
    ref, _ = campaign_config(ctx, str(ctx.data["funnel"]), "referral", str(ctx.data["campaign"]))
    m = ctx.member()
    code = code_for(
        ctx.conn, ctx.tenant_id, ref.funnel_id, str(ctx.data["campaign"]), m.id, ctx.now
    )
    return Effects(m.id, {"outcome": "ok", **summary(ctx.conn, code, m.id)})


def summary(conn: Connection, code: Any, member_id: int) -> dict[str, Any]:
    invitees = conn.execute(
        select(member_t.c.nickname, link_t.c.accepted_at, link_t.c.qualified_at)
        .join(member_t, member_t.c.id == link_t.c.invitee_member_id)
        .where(
            link_t.c.tenant_id == code.tenant_id,
            link_t.c.funnel_id == code.funnel_id,
            link_t.c.campaign == code.campaign,
            link_t.c.inviter_member_id == member_id,
        )
        .order_by(link_t.c.accepted_at, link_t.c.id)
    ).all()
    rewards = conn.execute(
        select(reward_t)
        .where(
            reward_t.c.tenant_id == code.tenant_id,
            reward_t.c.funnel_id == code.funnel_id,
            reward_t.c.campaign == code.campaign,
            reward_t.c.beneficiary_member_id == member_id,
        )
        .order_by(reward_t.c.id)
    ).all()
    return {
        "code": code.code,
        "share_path": SHARE_PATH + code.code,
        "invitees": [
            {
                "nickname": i.nickname or "",
                "accepted_at": i.accepted_at.isoformat(),
                "qualified": i.qualified_at is not None,
            }
            for i in invitees
        ],
        "rewards": [reward_json(r) for r in rewards],
    }


def reward_json(r: Any) -> dict[str, Any]:
    return {
        "id": r.id,
        "flags": r.flags or [],
        "kind": r.kind,
        "level": r.level,
        "status": r.status,
        "reward": r.reward,
        "hold_until": r.hold_until.isoformat(),
        "voucher": r.voucher_code,
        "void_reason": r.void_reason,
    }


# ── attribution ───────────────────────────────────────────────────────────────────────────
def accept(ctx: Context) -> Effects:
    """`invite.accepted` with a code: attribute the member to the code's owner (or channel).
    An acceptance that cannot attribute (own code, already attributed, too late, a cycle)
    still reaches the funnels; the answer says why nothing was linked."""
    raw = vouchers.normalize(str(ctx.data.get("code") or ""))
    code = ctx.conn.execute(
        select(code_t).where(code_t.c.tenant_id == ctx.tenant_id, code_t.c.code == raw)
    ).first()
    if code is None:
        raise InvalidEvent(
            f'unknown invite code "{raw}"', errors=[FieldProblem("data.code", "unknown code")]
        )
    invitee = ctx.member()
    data = {**ctx.data, "code": raw, "campaign": code.campaign}
    effects = Effects(invitee.id, {"outcome": "attributed"})
    outcome = _attribute(ctx, code, invitee)
    effects.result["outcome"] = outcome
    if outcome == "attributed" and code.owner_member_id is not None:
        data["inviter_id"] = _external_id(ctx.conn, code.owner_member_id)
    if outcome == "attributed" and code.channel is not None:
        data["channel"] = code.channel  # a poster's or a staff member's code
    effects.emits.append(Emit(invitee.id, "invite.accepted", data))
    return effects


def _external_id(conn: Connection, member_id: int) -> str:
    return str(
        conn.execute(select(member_t.c.external_id).where(member_t.c.id == member_id)).scalar_one()
    )


def _config(ctx: Context, funnel_id: int, campaign: str) -> Referral | None:
    for ref in ctx.versions():
        if ref.funnel_id == funnel_id:
            return store.compiled_version(ctx.conn, ref).definition.mechanics.referral.get(campaign)
    return None


def _attribute(ctx: Context, code: Any, invitee: Any) -> str:
    cfg = _config(ctx, code.funnel_id, code.campaign)
    if cfg is None:
        return "campaign_closed"
    inviter = code.owner_member_id
    if inviter == invitee.id:
        return "own_code"
    if ctx.now > invitee.created_at + parse_duration(cfg.attribution_window):
        return "not_a_new_member"
    if inviter is not None:  # both rows locked: a reverse acceptance waits for this one
        ctx.conn.execute(select(member_t.c.id).where(member_t.c.id == inviter).with_for_update())
        if invitee.id in ancestors(
            ctx.conn, code.tenant_id, code.funnel_id, code.campaign, inviter
        ):
            return "would_form_a_cycle"
    key = {
        "tenant_id": ctx.tenant_id,
        "funnel_id": code.funnel_id,
        "campaign": code.campaign,
        "invitee_member_id": invitee.id,
    }
    inserted = ctx.conn.execute(
        _NEW_LINK[ctx.conn.dialect.name],
        {**key, "inviter_member_id": inviter, "code_id": code.id, "accepted_at": ctx.now},
    ).first()
    if inserted is not None:
        return "attributed"
    if cfg.attribution == "last_touch":  # a later touch wins, until the invitee qualifies
        moved = ctx.conn.execute(
            update(link_t)
            .where(*(link_t.c[k] == v for k, v in key.items()), link_t.c.qualified_at.is_(None))
            .values(inviter_member_id=inviter, code_id=code.id, accepted_at=ctx.now)
        ).rowcount
        if moved:
            return "attributed"
    return "already_attributed"


def ancestors(
    conn: Connection,
    tenant_id: int,
    funnel_id: int,
    campaign: str,
    member_id: int,
    limit: int = 100,
) -> list[int]:
    """The member's inviters, nearest first."""
    out: list[int] = []
    current: int | None = member_id
    while current is not None and len(out) < limit:
        current = conn.execute(
            select(link_t.c.inviter_member_id).where(
                link_t.c.tenant_id == tenant_id,
                link_t.c.funnel_id == funnel_id,
                link_t.c.campaign == campaign,
                link_t.c.invitee_member_id == current,
            )
        ).scalar()
        if current is not None:
            out.append(current)
    return out


# ── qualification (an observer of plain and emitted events) ───────────────────────────────
def observe(
    conn: Connection,
    tenant_id: int,
    m: Any,
    event_type: str,
    data: dict[str, Any],
    event_id: int,
    now: datetime,
    versions: list[store.VersionRef],
) -> Effects | None:
    effects = Effects(m.id, {})
    if event_type == "order.refunded" and data.get("order_id"):
        _refunded(conn, tenant_id, str(data["order_id"]), now, effects)
    for ref, name, cfg in campaigns(versions, conn):
        if cfg.qualify_event == event_type:
            _qualify(conn, tenant_id, ref, name, cfg, m, data, event_id, now, effects)
    return effects if effects.emits or effects.actions else None


# Every event of a campaign's qualifying kind (member.joined, for a colleague brought into
# the group) looks for the member's link: Prepared, as the write path's statements are (the
# Core select built for each event cost ~300 µs of a member.joined's ~1.4 ms).
_UNQUALIFIED_LINK = Prepared(
    select(link_t).where(
        link_t.c.tenant_id == bindparam("b_tenant"),
        link_t.c.funnel_id == bindparam("b_funnel"),
        link_t.c.campaign == bindparam("b_campaign"),
        link_t.c.invitee_member_id == bindparam("b_member"),
        link_t.c.qualified_at.is_(None),
    )
)


def _qualify(
    conn: Connection,
    tenant_id: int,
    ref: store.VersionRef,
    name: str,
    cfg: Referral,
    m: Any,
    data: dict[str, Any],
    event_id: int,
    now: datetime,
    effects: Effects,
) -> None:
    params = {
        "b_tenant": tenant_id,
        "b_funnel": ref.funnel_id,
        "b_campaign": name,
        "b_member": m.id,
    }
    link = _UNQUALIFIED_LINK.record(conn, params)
    if link is None or now > link.accepted_at + parse_duration(cfg.qualify_within):
        return
    if cfg.min_order_fen is not None and int(data.get("amount_fen") or 0) < cfg.min_order_fen:
        return
    if cfg.first_time_customers_only and event_id_count(conn, m.id, "order.paid", event_id):
        return
    order_id = str(data["order_id"]) if data.get("order_id") else None
    done = conn.execute(
        update(link_t)
        .where(link_t.c.id == link.id, link_t.c.qualified_at.is_(None))
        .values(qualified_at=now, qualified_by=order_id)
    ).rowcount
    if not done:
        return
    hold_until = now + parse_duration(cfg.hold)
    prefix = f"{ref.funnel_id}:{name}"
    flags = fraud_flags(conn, link, m, data, cfg, now)
    if flags and cfg.review_auto_approve_after:
        hold_until += parse_duration(cfg.review_auto_approve_after)
    base = {
        "tenant_id": tenant_id,
        "funnel_id": ref.funnel_id,
        "campaign": name,
        "invitee_member_id": m.id,
        # flagged: waits for a review, or, with review_auto_approve_after, is paid that much
        # later than its hold unless a review voids it first
        "status": FLAGGED if flags and not cfg.review_auto_approve_after else PENDING,
        "flags": flags,
        "cause_order_id": order_id,
        "hold_until": hold_until,
        "created_at": now,
    }
    if cfg.invitee_reward is not None:
        _grant(
            conn,
            {
                **base,
                "reward_key": f"{prefix}:invitee:{m.id}",
                "kind": "invitee",
                "beneficiary_member_id": m.id,
                "reward": cfg.invitee_reward.model_dump(mode="json"),
            },
        )
    chain = (
        [
            link.inviter_member_id,
            *ancestors(conn, tenant_id, ref.funnel_id, name, link.inviter_member_id),
        ]
        if link.inviter_member_id
        else []
    )
    for level, inviter in enumerate(chain[: min(cfg.depth, MAX_DEPTH)], start=1):
        conn.execute(select(member_t.c.id).where(member_t.c.id == inviter).with_for_update())
        if cfg.inviter_reward is not None and _under_caps(
            conn, tenant_id, ref.funnel_id, name, cfg, inviter, now
        ):
            _grant(
                conn,
                {
                    **base,
                    "reward_key": f"{prefix}:inviter:{level}:{m.id}",
                    "kind": "inviter",
                    "level": level,
                    "beneficiary_member_id": inviter,
                    "reward": cfg.inviter_reward.model_dump(mode="json"),
                },
            )
        if level == 1:
            qualified = conn.execute(
                select(func.count())
                .select_from(link_t)
                .where(
                    link_t.c.tenant_id == tenant_id,
                    link_t.c.funnel_id == ref.funnel_id,
                    link_t.c.campaign == name,
                    link_t.c.inviter_member_id == inviter,
                    link_t.c.qualified_at.is_not(None),
                )
            ).scalar_one()
            for i, tier in enumerate(cfg.tiers):
                if qualified == tier.invites:
                    _grant(
                        conn,
                        {
                            **base,
                            "reward_key": f"{prefix}:tier:{inviter}:{i}",
                            "kind": "tier",
                            "level": 1,
                            "beneficiary_member_id": inviter,
                            "invitee_member_id": None,
                            "reward": tier.reward.model_dump(mode="json"),
                        },
                    )
            effects.emits.append(
                Emit(
                    inviter,
                    "referral.qualified",
                    {
                        "campaign": name,
                        "invitee": m.external_id,
                        "qualified_invitees": qualified,
                        "order_id": order_id,
                    },
                )
            )


def fraud_flags(
    conn: Connection, link: Any, m: Any, data: dict[str, Any], cfg: Referral, now: datetime
) -> list[str]:
    """Why this qualification looks wrong, if it does: the invitee shares a device or payer
    with the inviter (when events or profiles carry one), or the code had a burst of
    acceptances. Flagged rewards wait for review (or for `review_auto_approve_after`)."""
    flags: list[str] = []
    if link.inviter_member_id is not None:
        inviter = (
            conn.execute(
                select(member_t.c.attributes).where(member_t.c.id == link.inviter_member_id)
            ).scalar_one()
            or {}
        )
        mine = {**(m.attributes or {}), **{k: data[k] for k in FINGERPRINTS if data.get(k)}}
        for key in FINGERPRINTS:
            if mine.get(key) and mine.get(key) == inviter.get(key):
                flags.append(f"same_{key.removesuffix('_id')}")
    if cfg.burst_per_hour is not None:
        around = conn.execute(
            select(func.count())
            .select_from(link_t)
            .where(
                link_t.c.code_id == link.code_id,
                link_t.c.accepted_at > link.accepted_at - timedelta(hours=1),
                link_t.c.accepted_at <= link.accepted_at,
            )
        ).scalar_one()
        if around > cfg.burst_per_hour:
            flags.append("burst_of_acceptances")
    return flags


def event_id_count(conn: Connection, member_id: int, event_type: str, but: int) -> int:
    return int(
        conn.execute(
            select(func.count())
            .select_from(event_t)
            .where(
                event_t.c.member_id == member_id, event_t.c.type == event_type, event_t.c.id != but
            )
        ).scalar_one()
    )


def _under_caps(
    conn: Connection,
    tenant_id: int,
    funnel_id: int,
    name: str,
    cfg: Referral,
    inviter: int,
    now: datetime,
) -> bool:
    """Counted under the inviter's row lock (taken by the caller), so concurrent
    qualifications of one inviter's invitees cannot both slip under a cap."""

    def count(since: datetime | None) -> int:
        q = (
            select(func.count())
            .select_from(reward_t)
            .where(
                reward_t.c.tenant_id == tenant_id,
                reward_t.c.funnel_id == funnel_id,
                reward_t.c.campaign == name,
                reward_t.c.beneficiary_member_id == inviter,
                reward_t.c.kind == "inviter",
                reward_t.c.status != VOIDED,
            )
        )
        if since is not None:
            q = q.where(reward_t.c.created_at >= since)
        return int(conn.execute(q).scalar_one())

    if cfg.max_rewards_per_inviter is not None and count(None) >= cfg.max_rewards_per_inviter:
        return False
    daily = cfg.max_rewards_per_inviter_per_day
    return daily is None or count(now - timedelta(days=1)) < daily


def _grant(conn: Connection, row: dict[str, Any]) -> None:
    row.setdefault("level", 0)
    conn.execute(_NEW_REWARD[conn.dialect.name], row)


# ── paying and taking back ────────────────────────────────────────────────────────────────
def pay_due(ctx: Context) -> Effects:
    """The sweep: a reward whose hold ended is approved and paid."""
    r = ctx.conn.execute(
        select(reward_t).where(reward_t.c.id == int(ctx.data["reward_id"])).with_for_update()
    ).first()
    if r is None or r.status != PENDING or r.hold_until > ctx.now:
        return Effects(None, {"outcome": "nothing_due"})
    effects = Effects(r.beneficiary_member_id, {"outcome": "paid"})
    source = f"referral.{r.campaign}"
    reward = r.reward or {}
    voucher = grant_reward(
        ctx.conn,
        r.tenant_id,
        r.beneficiary_member_id,
        reward,
        f"referral:{r.id}",
        source,
        r.funnel_id,
        ctx.now,
        effects,
        reason=f"referral {r.kind}",
    )
    voucher_code = voucher.code if voucher is not None else None
    value = int(voucher.value_fen or 0) if voucher is not None else 0
    points = int(reward.get("points") or 0)
    ctx.conn.execute(
        update(reward_t)
        .where(reward_t.c.id == r.id)
        .values(status=PAID, approved_at=ctx.now, paid_at=ctx.now, voucher_code=voucher_code)
    )
    ctx.conn.execute(
        ledger_t.insert().values(
            tenant_id=r.tenant_id,
            member_id=r.beneficiary_member_id,
            reward_id=r.id,
            entry="payment",
            points=points,
            value_fen=value,
            created_at=ctx.now,
        )
    )
    effects.result["reward"] = reward_json(_reward(ctx.conn, r.id))
    return effects


def review(ctx: Context) -> Effects:
    """`referral.review` (an admin): release a flagged reward (paid at once if its hold has
    passed, else when it does) or void it."""
    r = ctx.conn.execute(
        select(reward_t)
        .where(reward_t.c.id == int(ctx.data["reward_id"]), reward_t.c.tenant_id == ctx.tenant_id)
        .with_for_update()
    ).first()
    if r is None:
        raise NotFound(f"no referral reward {ctx.data['reward_id']}")
    if r.status not in (PENDING, FLAGGED):
        raise Refused("reward_settled", f"the reward is {r.status} already")
    if ctx.data.get("decision") == "void":
        ctx.conn.execute(
            update(reward_t)
            .where(reward_t.c.id == r.id)
            .values(status=VOIDED, voided_at=ctx.now, void_reason="voided_in_review")
        )
        return Effects(
            r.beneficiary_member_id,
            {"outcome": "voided", "reward": reward_json(_reward(ctx.conn, r.id))},
        )
    ctx.conn.execute(update(reward_t).where(reward_t.c.id == r.id).values(status=PENDING))
    effects = Effects(r.beneficiary_member_id, {"outcome": "released"})
    if r.hold_until <= ctx.now:
        paid = pay_due(ctx)
        effects.emits, effects.actions = paid.emits, paid.actions
    effects.result["reward"] = reward_json(_reward(ctx.conn, r.id))
    return effects


def _reward(conn: Connection, reward_id: int) -> Any:
    return conn.execute(select(reward_t).where(reward_t.c.id == reward_id)).one()


def _refunded(
    conn: Connection, tenant_id: int, order_id: str, now: datetime, effects: Effects
) -> None:
    """A refund of the order that qualified an invitee voids the rewards it caused; paid ones
    are reversed with a negative ledger entry (and their unredeemed voucher voided)."""
    rows = conn.execute(
        select(reward_t)
        .where(
            reward_t.c.tenant_id == tenant_id,
            reward_t.c.cause_order_id == order_id,
            reward_t.c.status.in_([PENDING, FLAGGED, APPROVED, PAID]),
        )
        .with_for_update()
    ).all()
    for r in rows:
        conn.execute(
            update(reward_t)
            .where(reward_t.c.id == r.id)
            .values(status=VOIDED, voided_at=now, void_reason="order_refunded")
        )
        if r.status != PAID:
            continue
        paid = conn.execute(
            select(ledger_t).where(ledger_t.c.reward_id == r.id, ledger_t.c.entry == "payment")
        ).one()
        conn.execute(
            ledger_t.insert().values(
                tenant_id=tenant_id,
                member_id=r.beneficiary_member_id,
                reward_id=r.id,
                entry="reversal",
                points=-paid.points,
                value_fen=-paid.value_fen,
                created_at=now,
            )
        )
        if paid.points:
            ledger.reverse(conn, tenant_id, f"referral:{r.id}", now, "referral reward reversed")
            effects.actions.append(
                DirectAction(
                    r.beneficiary_member_id,
                    "grant_points",
                    {
                        "points": -paid.points,
                        "reason": "referral reward reversed (refund)",
                        "idempotency_key": f"referral:{r.id}:reversal",
                    },
                    f"referral.{r.campaign}",
                )
            )
        if r.voucher_code:
            conn.execute(
                update(vouchers.voucher_t)
                .where(
                    vouchers.voucher_t.c.tenant_id == tenant_id,
                    vouchers.voucher_t.c.code == r.voucher_code,
                    vouchers.voucher_t.c.status == vouchers.ISSUED,
                )
                .values(status=vouchers.VOIDED, voided_at=now)
            )
