"""Chat groups in the write path: membership, welcome, activity, moderation, join requests.

The bot's events arrive as plain events; `observe` (a watcher of the dispatcher) keeps
membership and per-day activity, pushes the welcome, moderates messages, and pays the
member-joined and group-size milestones. Join requests, the owner's decisions, appeals and
broadcasts are commands. Nothing here commits: the dispatcher's transaction does.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from datetime import date, datetime
from typing import Any
from zoneinfo import ZoneInfo

from sqlalchemy import Connection, Table, bindparam, delete, func, select, update
from sqlalchemy.dialects import postgresql, sqlite

from app.db import (
    add_rows,
    insert_or_add,
    insert_or_skip,
    insert_rows,
    once_per_transaction,
    one_of,
    row_json,
)
from app.engine.guards import render_template
from app.engine.schedule import parse_duration
from app.errors import FieldProblem, NotFound, Refused
from app.events.models import EventLog
from app.funnels import store
from app.mechanics.commands import Context, DirectAction, Effects, Emit, Peers, batch_run
from app.mechanics.community.matcher import MATCHERS, Hit, Matcher, first_link
from app.mechanics.community.models import (
    ChatGroup,
    GroupDay,
    GroupMember,
    JoinRequest,
    ModerationDecision,
    Once,
    SensitiveWord,
)
from app.mechanics.community.settings import PROTECTED_ROLES, GroupSettings, ModerationRules
from app.mechanics.rewards.campaigns import running
from app.mechanics.rewards.grant import grant_campaign_reward
from app.members.models import Member
from app.prepared import Prepared, as_one

group_t: Table = ChatGroup.__table__  # type: ignore[attr-defined]
group_member_t: Table = GroupMember.__table__  # type: ignore[attr-defined]
day_t: Table = GroupDay.__table__  # type: ignore[attr-defined]
word_t: Table = SensitiveWord.__table__  # type: ignore[attr-defined]
decision_t: Table = ModerationDecision.__table__  # type: ignore[attr-defined]
request_t: Table = JoinRequest.__table__  # type: ignore[attr-defined]
once_t: Table = Once.__table__  # type: ignore[attr-defined]
member_t: Table = Member.__table__  # type: ignore[attr-defined]
event_t: Table = EventLog.__table__  # type: ignore[attr-defined]

_JOIN = Prepared(
    insert_or_skip(
        group_member_t, ["tenant_id", "group_id", "member_id"], group_member_t.c.member_id
    )
)
_ONCE = insert_or_skip(once_t, ["tenant_id", "key"], once_t.c.key)
_QUESTION = re.compile(r"[?？]|请问|怎么|如何|为什么|吗[\s。!！~]*$")
DEFAULT_ZONE = ZoneInfo("Asia/Shanghai")


# ── groups and membership ─────────────────────────────────────────────────────────────────
_GROUP = Prepared(
    select(group_t).where(
        group_t.c.tenant_id == bindparam("b_tenant"), group_t.c.group_id == bindparam("b_group")
    )
)


def group(conn: Connection, tenant_id: int, group_id: str) -> Any | None:
    return _GROUP.record(conn, {"b_tenant": tenant_id, "b_group": group_id})


def _group_and_settings(
    conn: Connection, tenant_id: int, group_id: str
) -> tuple[Any | None, GroupSettings | None]:
    row = group(conn, tenant_id, group_id)
    return row, settings_of(row) if row is not None else None


def settings_of(row: Any) -> GroupSettings:
    return GroupSettings.model_validate(row.settings or {})


def required_group(conn: Connection, tenant_id: int, group_id: str) -> Any:
    row = group(conn, tenant_id, group_id)
    if row is None:
        raise NotFound(f'no group "{group_id}"; register it with PUT /v1/groups/{group_id}')
    return row


def once(conn: Connection, tenant_id: int, key: str, now: datetime) -> bool:
    """True the first time `key` is seen for the tenant (in this transaction's view)."""
    made = conn.execute(
        _ONCE[conn.dialect.name], {"tenant_id": tenant_id, "key": key[:200], "created_at": now}
    ).scalar()
    return made is not None


def joined(conn: Connection, tenant_id: int, group_id: str, member_id: int, now: datetime) -> bool:
    """Record membership; True if the member was not in the group before."""
    _settled(conn)
    made = _JOIN.scalar(
        conn,
        {"tenant_id": tenant_id, "group_id": group_id, "member_id": member_id, "joined_at": now},
    )
    return made is not None


def left(conn: Connection, tenant_id: int, group_id: str, member_id: int) -> None:
    _settled(conn)
    conn.execute(
        delete(group_member_t).where(
            group_member_t.c.tenant_id == tenant_id,
            group_member_t.c.group_id == group_id,
            group_member_t.c.member_id == member_id,
        )
    )


_MEMBERSHIP = Prepared(
    select(group_member_t).where(
        group_member_t.c.tenant_id == bindparam("b_tenant"),
        group_member_t.c.group_id == bindparam("b_group"),
        group_member_t.c.member_id == bindparam("b_member"),
    )
)


def membership(conn: Connection, tenant_id: int, group_id: str, member_id: int) -> Any | None:
    _settled(conn)
    params = {"b_tenant": tenant_id, "b_group": group_id, "b_member": member_id}
    return _MEMBERSHIP.record(conn, params)


_MEMBERS_IN = Prepared(
    {
        d: select(group_member_t.c.member_id).where(
            group_member_t.c.tenant_id == bindparam("b_tenant"),
            group_member_t.c.group_id == bindparam("b_group"),
            listed,
        )
        for d, listed in one_of(group_member_t.c.member_id, "b_members").items()
    }
)


def members_in(
    conn: Connection, tenant_id: int, group_id: str, member_ids: Sequence[int]
) -> set[int]:
    """Which of `member_ids` are in the group, in one statement."""
    _settled(conn)
    params = {"b_tenant": tenant_id, "b_group": group_id, "b_members": sorted(member_ids)}
    return {m for (m,) in _MEMBERS_IN.rows(conn, params)}


def is_member(conn: Connection, tenant_id: int, group_id: str, member_id: int) -> bool:
    return membership(conn, tenant_id, group_id, member_id) is not None


def member_count(conn: Connection, tenant_id: int, group_id: str) -> int:
    _settled(conn)
    return int(
        conn.execute(
            select(func.count()).where(
                group_member_t.c.tenant_id == tenant_id, group_member_t.c.group_id == group_id
            )
        ).scalar_one()
    )


def zone_of(row: Any | None) -> ZoneInfo:
    return settings_of(row).zone if row is not None else DEFAULT_ZONE


def group_action(group_id: str, kind: str, source: str, **params: Any) -> DirectAction:
    """An action about a group, not one member (a welcome red packet, an alert to the owner)."""
    return DirectAction(None, kind, {"group_id": group_id, **params}, source)


# ── what the bot's events say ─────────────────────────────────────────────────────────────
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
    group_id = data.get("group_id")
    if not group_id or event_type not in ("member.joined", "member.left", "message.posted"):
        return None
    group_id = str(group_id)
    if event_type == "member.left":
        left(conn, tenant_id, group_id, m.id)
        return None
    row, settings = _group_once(conn, tenant_id, group_id)
    effects = Effects(m.id, {})
    if event_type == "member.joined":
        if joined(conn, tenant_id, group_id, m.id, now):
            _welcome(conn, tenant_id, group_id, row, m, now, versions, effects)
    else:
        _message(conn, tenant_id, group_id, row, settings, m, data, event_id, now, effects)
    return effects if effects.emits or effects.actions else None


def _group_once(
    conn: Connection, tenant_id: int, group_id: str
) -> tuple[Any | None, GroupSettings | None]:
    """Groups change only through the admin API, in transactions of their own: one read per
    transaction, with the settings validated once."""
    return once_per_transaction(
        conn, ("group", tenant_id, group_id), lambda: _group_and_settings(conn, tenant_id, group_id)
    )


def preload(conn: Connection, items: Sequence[Any]) -> None:
    """The chat groups a batch's bot events name, read before its first event (the
    dispatcher's PRELOADS): one statement each, as `observe` would read them."""
    wanted = {
        (i.tenant_id, str(i.data["group_id"]))
        for i in items
        if i.type in ("member.joined", "message.posted") and i.data.get("group_id")
    }
    for tenant_id, group_id in sorted(wanted):
        _group_once(conn, tenant_id, group_id)


def _welcome(
    conn: Connection,
    tenant_id: int,
    group_id: str,
    row: Any | None,
    m: Any,
    now: datetime,
    versions: list[store.VersionRef],
    effects: Effects,
) -> None:
    if row is not None:
        source = f"community.{row.group_id}"
        if row.welcome:
            context = {
                "member": {**(m.attributes or {}), "nickname": m.nickname or ""},
                "group": {"name": row.name, "purpose": row.purpose, "rules": row.rules},
            }
            effects.actions.append(
                DirectAction(
                    m.id,
                    "send_message",
                    {"text": render_template(row.welcome, context), "group_id": row.group_id},
                    source,
                )
            )
        count = member_count(conn, tenant_id, row.group_id)
        day = now.astimezone(zone_of(row)).date()
        if count >= row.capacity and once(conn, tenant_id, f"full:{row.group_id}:{day}", now):
            effects.actions.append(
                group_action(
                    row.group_id, "group_full", source, members=count, capacity=row.capacity
                )
            )
    _join_milestones(conn, tenant_id, group_id, m, now, versions, effects)


def _join_milestones(
    conn: Connection,
    tenant_id: int,
    group_id: str,
    m: Any,
    now: datetime,
    versions: list[store.VersionRef],
    effects: Effects,
) -> None:
    """Red packets when a member joins and when the group passes a size (100, 1,000)."""
    count: int | None = None
    for ref, _funnel, name, cfg in running(conn, versions, "milestone", now):
        if group_id not in cfg.groups or not cfg.reward:
            continue
        if cfg.on == "member_joined":
            origin = f"milestone:{ref.funnel_id}:{name}:{group_id}:{m.id}"
            if once(conn, tenant_id, origin, now):
                grant_campaign_reward(
                    conn, tenant_id, m.id, ref.funnel_id, name, cfg.reward, origin, now, effects
                )
        elif cfg.on == "group_size":
            count = member_count(conn, tenant_id, group_id) if count is None else count
            for size in cfg.sizes:
                key = f"milestone:{ref.funnel_id}:{name}:{group_id}:size:{size}"
                if count >= size and once(conn, tenant_id, key, now):
                    effects.actions.extend(
                        group_reward(
                            group_id,
                            cfg.reward.model_dump(mode="json"),
                            f"rewards.{name}",
                            members=count,
                            milestone=size,
                        )
                    )


def group_reward(
    group_id: str, reward: dict[str, Any], source: str, **params: Any
) -> list[DirectAction]:
    """A reward for a whole group (a red packet into the chat): its actions, about the group."""
    return [
        group_action(
            group_id, a["type"], source, **{k: v for k, v in a.items() if k != "type"}, **params
        )
        for a in reward.get("actions") or []
    ]


# ── activity ──────────────────────────────────────────────────────────────────────────────
_MEMBER_ROWS, _DAY_PARAM = "members", "days"  # a run's rows, bound as one parameter each
_TOUCHED = ("tenant_id", "group_id", "member_id", "joined_at", "messages", "last_seen_at")


def _touch(dialect: Any, rows: str | None = None) -> Any:
    """Messages' write of the member's counters in the group (joining them if the bot never
    said they joined): `messages` of them, the last seen at `last_seen_at`. `rows`: of many
    members at once, bound as that parameter (PostgreSQL, `app.db.insert_rows`)."""
    ins: Any = (
        insert_rows(group_member_t, _TOUCHED, rows) if rows else dialect.insert(group_member_t)
    )
    return ins.on_conflict_do_update(
        index_elements=["tenant_id", "group_id", "member_id"],
        set_={
            "messages": group_member_t.c.messages + ins.excluded.messages,
            "last_seen_at": ins.excluded.last_seen_at,
            "warned_at": None,
        },
    )


# The member's day row: its counters add up.
_DAY_KEY = ["tenant_id", "group_id", "member_id", "day"]
_DAY_COUNTS = ["messages", "shares", "questions"]


def _activity_in_one() -> Any:
    """Both of a message's writes as one PostgreSQL statement (the member's row in a
    data-modifying WITH): one round trip instead of two, about 40 µs of the writer's CPU
    per message. sqlite3 takes one statement at a time, and SQLite has no WITH for writes."""
    key: dict[str, Any] = {c: bindparam(c) for c in ("tenant_id", "group_id", "member_id")}
    now: Any = bindparam("now")
    touch = _touch(postgresql).values(**key, joined_at=now, messages=1, last_seen_at=now)
    day: Any = insert_or_add(day_t, _DAY_KEY, _DAY_COUNTS)["postgresql"]
    day = day.values(
        **key,
        day=bindparam("day"),
        messages=1,
        shares=bindparam("shares"),
        questions=bindparam("questions"),
    )
    return day.add_cte(touch.cte("touch"))


def _activity_rows() -> Any:
    """A run's two writes as one PostgreSQL statement, the members' rows (`members`) in a
    data-modifying WITH before the days' (`days`): one round trip a batch instead of two.
    The two tables' rows are locked in no set order between them, which cannot deadlock:
    a member's events all go to one writer's lane."""
    touch = _touch(postgresql, rows=_MEMBER_ROWS)
    return add_rows(day_t, _DAY_KEY, _DAY_COUNTS, _DAY_PARAM).add_cte(touch.cte("touch"))


# A message outside a batch's run: SQLite, the two writes one after the other; PostgreSQL,
# one statement. A run's flush: one statement for each table.
_TOUCH = Prepared(_touch(sqlite))
_BUMP_DAY = Prepared(insert_or_add(day_t, _DAY_KEY, _DAY_COUNTS)["sqlite"])
_ACTIVITY = Prepared(_activity_in_one())
_TOUCH_ROWS = Prepared(_touch(sqlite))  # SQLite: an executemany for each table
_DAY_ROWS = Prepared(insert_or_add(day_t, _DAY_KEY, _DAY_COUNTS)["sqlite"])
_ACTIVITY_ROWS = Prepared(_activity_rows())  # PostgreSQL: one statement for both
_ACTIVITY_RUN = "community.activity"
DEFAULT_ROLE = "member"  # the role of a row a message or a join makes


class _Activity:
    """A batch's messages: the counters they add to, written once (`app.mechanics.commands.Run`).

    Each message adds to the member's row in its group (a message more, last seen now, the
    pruning warning cleared; the row made if the bot never said they joined) and to their
    row of the day (messages, shares, questions). Written per message that was one statement
    on PostgreSQL, and with it the round trip of the message's savepoint: about two fifths of
    the database server's time in the webhook bench, for rows nothing else in the batch
    reads. The run adds them up per member and per day and writes them at `flush` in key
    order (one lock order for concurrent batches): one statement for both tables on
    PostgreSQL (`_activity_rows`), an executemany per table on SQLite.

    Open across `message.posted` events only: the dispatcher flushes it before any other
    event. Within a message's event, whatever reads or writes these rows (`membership`,
    `left` when moderation removes the member…) flushes it first (`_settled`); `mark` keeps
    everything the run holds, so that `undo` brings back what a rollback to the event's
    savepoint took out of the database with such a flush."""

    kinds = frozenset({"message.posted"})

    def __init__(self) -> None:
        # (tenant, group, member) -> (messages, last seen at);
        # (tenant, group, member, day) -> (messages, shares, questions)
        self.members: dict[tuple[int, str, int], tuple[int, datetime]] = {}
        self.days: dict[tuple[int, str, int, date], tuple[int, int, int]] = {}
        self._mark: tuple[dict[Any, Any], dict[Any, Any]] = ({}, {})

    @classmethod
    def load(cls, _peers: Peers) -> _Activity:
        return cls()  # adding needs no reading: the rows are upserted at `flush`

    def add(
        self, key: tuple[int, str, int], day: date, now: datetime, shares: int, questions: int
    ) -> None:
        n = self.members.get(key, (0, now))[0]
        self.members[key] = (n + 1, now)
        by_day = (*key, day)
        messages, s, q = self.days.get(by_day, (0, 0, 0))
        self.days[by_day] = (messages + 1, s + shares, q + questions)

    def mark(self) -> None:
        self._mark = (dict(self.members), dict(self.days))

    def undo(self) -> None:
        self.members, self.days = dict(self._mark[0]), dict(self._mark[1])

    def flush(self, conn: Connection) -> None:
        members = [
            {
                "tenant_id": t,
                "group_id": g,
                "member_id": m,
                "joined_at": seen,
                "messages": n,
                "last_seen_at": seen,
            }
            for (t, g, m), (n, seen) in sorted(self.members.items())
        ]
        days = [
            {
                "tenant_id": t,
                "group_id": g,
                "member_id": m,
                "day": d,
                "messages": n,
                "shares": sh,
                "questions": q,
            }
            for (t, g, m, d), (n, sh, q) in sorted(self.days.items())
        ]
        self.members, self.days = {}, {}
        if not members:  # every message adds to both
            return
        if conn.dialect.name == "postgresql":
            _ACTIVITY_ROWS.run(conn, {**as_one(members, _MEMBER_ROWS), **as_one(days, _DAY_PARAM)})
        else:
            _TOUCH_ROWS.run_many(conn, members)
            _DAY_ROWS.run_many(conn, days)


def _settled(conn: Connection) -> None:
    """Write the messages' counters the batch holds back (`_Activity`) before reading or
    writing the rows they add to."""
    run = batch_run(conn, _ACTIVITY_RUN)
    if run is not None:
        run.flush(conn)


def is_share(data: dict[str, Any]) -> bool:
    return data.get("kind") in ("link", "mini_program") or bool(
        first_link(str(data.get("text") or ""))
    )


def _message(
    conn: Connection,
    tenant_id: int,
    group_id: str,
    row: Any | None,
    settings: GroupSettings | None,
    m: Any,
    data: dict[str, Any],
    event_id: int,
    now: datetime,
    effects: Effects,
) -> None:
    text = str(data.get("text") or "")
    day = now.astimezone(settings.zone if settings else DEFAULT_ZONE).date()
    shares, questions = int(is_share(data)), int(bool(_QUESTION.search(text)))
    # a message also shows they are in the group
    run = batch_run(conn, _ACTIVITY_RUN, _Activity.load)
    if isinstance(run, _Activity):
        run.add((tenant_id, group_id, m.id), day, now, shares, questions)
    else:
        key = {"tenant_id": tenant_id, "group_id": group_id, "member_id": m.id}
        counts = {"day": day, "shares": shares, "questions": questions}
        if conn.dialect.name == "postgresql":
            _ACTIVITY.run(conn, {**key, **counts, "now": now})
        else:
            _TOUCH.run(conn, {**key, "joined_at": now, "messages": 1, "last_seen_at": now})
            _BUMP_DAY.run(conn, {**key, **counts, "messages": 1})
    if settings is not None:
        moderate(conn, tenant_id, row, settings.moderation, m, data, event_id, now, effects)


# ── moderation ────────────────────────────────────────────────────────────────────────────
def matcher_for(conn: Connection, tenant_id: int, row: Any) -> Matcher:
    def build() -> Matcher:
        words = conn.execute(
            select(word_t.c.word, word_t.c.pattern).where(
                word_t.c.tenant_id == tenant_id, word_t.c.group_id == row.group_id
            )
        ).all()
        return Matcher([w for w, p in words if not p], [w for w, p in words if p])

    return MATCHERS.get((tenant_id, row.group_id, row.words_version), build)


def first_hit(
    conn: Connection, tenant_id: int, row: Any, rules: ModerationRules, data: dict[str, Any]
) -> Hit | None:
    text = str(data.get("text") or "")
    if text and row.words_version:
        hit = matcher_for(conn, tenant_id, row).first(text)
        if hit:
            return hit
    if rules.links == "flag":
        link = first_link(f"{text} {data.get('url') or ''}", rules.allowed_domains)
        if link:
            return Hit("link", link)
    if rules.qr_codes == "flag" and data.get("has_qr"):
        return Hit("qr_code", "QR code")
    if rules.mini_programs == "flag" and data.get("kind") == "mini_program":
        return Hit("mini_program", str(data.get("title") or "mini-program card")[:200])
    return None


RULE_NAMES = {
    "word": "敏感词",
    "pattern": "敏感词",
    "link": "广告链接",
    "qr_code": "二维码广告",
    "mini_program": "小程序广告",
}


def moderate(
    conn: Connection,
    tenant_id: int,
    row: Any,
    rules: ModerationRules,
    m: Any,
    data: dict[str, Any],
    event_id: int,
    now: datetime,
    effects: Effects,
) -> None:
    """First hit within the strike window: a warning; a second: removal. Both recorded with
    the message that caused them, and appealable."""
    if not rules.enabled:
        return
    # The row as the message left it, without flushing the batch's counters: a message
    # changes no role, and the row it makes has the default one.
    me = _MEMBERSHIP.record(
        conn, {"b_tenant": tenant_id, "b_group": row.group_id, "b_member": m.id}
    )
    if (me.role if me is not None else DEFAULT_ROLE) in rules.exempt_roles:
        return
    hit = first_hit(conn, tenant_id, row, rules, data)
    if hit is None:
        return
    since = now - parse_duration(rules.strike_window)
    strikes = conn.execute(
        select(func.count()).where(
            decision_t.c.tenant_id == tenant_id,
            decision_t.c.group_id == row.group_id,
            decision_t.c.member_id == m.id,
            decision_t.c.status == "active",
            decision_t.c.created_at > since,
        )
    ).scalar_one()
    action = "remove" if strikes else "warn"
    decision_id = conn.execute(
        decision_t.insert().returning(decision_t.c.id),
        {
            "tenant_id": tenant_id,
            "group_id": row.group_id,
            "member_id": m.id,
            "event_id": event_id,
            "message_id": data.get("message_id"),
            "excerpt": str(data.get("text") or data.get("url") or data.get("kind") or "")[:500],
            "rule": hit.rule,
            "matched": hit.matched[:200],
            "action": action,
            "created_at": now,
        },
    ).scalar_one()
    source = f"community.{row.group_id}"
    params = {
        "group_id": row.group_id,
        "decision_id": decision_id,
        "message_id": data.get("message_id"),  # for the bot to recall it
        "rule": hit.rule,
    }
    if action == "warn":
        text = render_template(
            rules.warning,
            {"rule": RULE_NAMES[hit.rule], "member": {"nickname": m.nickname or ""}},
        )
        effects.actions.append(
            DirectAction(m.id, "warn_member", {**params, "reason": text}, source)
        )
    else:
        left(conn, tenant_id, row.group_id, m.id)
        effects.actions.append(
            DirectAction(
                m.id,
                "remove_member",
                {**params, "reason": f"second violation ({RULE_NAMES[hit.rule]})"},
                source,
            )
        )
    effects.emits.append(
        Emit(
            m.id,
            "member.warned" if action == "warn" else "member.removed",
            {"group_id": row.group_id, "rule": hit.rule, "decision_id": decision_id},
        )
    )


def decision_json(r: Any) -> dict[str, Any]:
    return row_json(r, ("tenant_id", "event_id"))


def reverse_decision(ctx: Context) -> Effects:
    """An appeal upheld: the decision no longer counts as a strike; a removed member is
    invited back (`readmit_member`)."""
    conn = ctx.conn
    r = conn.execute(
        select(decision_t)
        .where(decision_t.c.tenant_id == ctx.tenant_id, decision_t.c.id == ctx.data["decision_id"])
        .with_for_update()
    ).first()
    if r is None:
        raise NotFound(f"no moderation decision {ctx.data['decision_id']}")
    if r.status == "reversed":
        raise Refused("already_reversed", f"decision {r.id} was reversed already")
    conn.execute(
        update(decision_t)
        .where(decision_t.c.id == r.id)
        .values(status="reversed", reversed_at=ctx.now, note=ctx.data.get("note"))
    )
    effects = Effects(r.member_id, {})
    if r.action == "remove":
        effects.actions.append(
            DirectAction(
                r.member_id,
                "readmit_member",
                {"group_id": r.group_id, "decision_id": r.id},
                f"community.{r.group_id}",
            )
        )
    effects.result = decision_json(
        conn.execute(select(decision_t).where(decision_t.c.id == r.id)).one()
    )
    return effects


# ── join requests ─────────────────────────────────────────────────────────────────────────
def _orders(conn: Connection, tenant_id: int, member_id: int) -> tuple[int, set[str]]:
    """The member's spend (paid minus refunded, in fen) and the SKUs of paid, unrefunded
    orders, from the event log."""
    rows = conn.execute(
        select(event_t.c.type, event_t.c.data).where(
            event_t.c.tenant_id == tenant_id,
            event_t.c.member_id == member_id,
            event_t.c.type.in_(("order.paid", "order.refunded")),
        )
    ).all()
    spend = 0
    paid: dict[str, set[str]] = {}
    refunded: set[str] = set()
    for kind, data in rows:
        amount = int(data.get("amount_fen") or 0)
        if kind == "order.paid":
            spend += amount
            paid[str(data.get("order_id"))] = {str(i.get("sku")) for i in data.get("items") or []}
        else:
            spend -= amount
            refunded.add(str(data.get("order_id")))
    skus = {s for order, found in paid.items() if order not in refunded for s in found}
    return spend, skus


def entry_problems(
    conn: Connection, tenant_id: int, row: Any, m: Any, data: dict[str, Any]
) -> list[dict[str, str]]:
    """Each threshold the member fails, with a reason code and a sentence for the member."""
    rules = settings_of(row).entry
    out: list[dict[str, str]] = []
    count = member_count(conn, tenant_id, row.group_id)
    if count >= row.capacity:
        out.append({"code": "group_full", "detail": f"the group is full ({row.capacity} members)"})
    if rules.invite_codes:
        given = str(data.get("invite_code") or "").strip().casefold()
        if given not in {c.casefold() for c in rules.invite_codes}:
            out.append(
                {
                    "code": "invite_code",
                    "detail": "a valid invitation code is needed"
                    if not given
                    else "the invitation code is not valid for this group",
                }
            )
    if rules.min_level is not None:
        try:
            level = int((m.attributes or {}).get("level") or 0)
        except (TypeError, ValueError):
            level = 0
        if level < rules.min_level:
            out.append(
                {
                    "code": "membership_level",
                    "detail": f"membership level {rules.min_level} is needed (yours: {level})",
                }
            )
    if rules.paid_sku is not None or rules.min_spend_fen is not None:
        spend, skus = _orders(conn, tenant_id, m.id)
        if rules.paid_sku is not None and rules.paid_sku not in skus:
            out.append(
                {"code": "paid_entry", "detail": f'the entry product "{rules.paid_sku}" is unpaid'}
            )
        if rules.min_spend_fen is not None and spend < rules.min_spend_fen:
            out.append(
                {
                    "code": "min_spend",
                    "detail": f"purchases of ¥{rules.min_spend_fen / 100:.2f} are needed "
                    f"(yours: ¥{max(spend, 0) / 100:.2f})",
                }
            )
    return out


def request_json(r: Any) -> dict[str, Any]:
    return row_json(r)


def request_join(ctx: Context) -> Effects:
    """`member.join_requested` from the bot: refused with the reasons, approved, or queued
    for the owner; the bot gets `approve_join` or `refuse_join` (or the owner
    `join_request_pending`)."""
    conn, tenant_id = ctx.conn, ctx.tenant_id
    group_id = str(ctx.data["group_id"])
    row = required_group(conn, tenant_id, group_id)
    m = ctx.member()
    effects = Effects(m.id, {})
    source = f"community.{group_id}"
    if is_member(conn, tenant_id, group_id, m.id):
        effects.result = {"decision": "already_member", "group_id": group_id}
        return effects
    pending = conn.execute(
        select(request_t).where(
            request_t.c.tenant_id == tenant_id,
            request_t.c.group_id == group_id,
            request_t.c.member_id == m.id,
            request_t.c.status == "pending",
        )
    ).first()
    if pending is not None:
        effects.result = {"decision": "pending", "request": request_json(pending)}
        return effects
    reasons = entry_problems(conn, tenant_id, row, m, ctx.data)
    approval = settings_of(row).entry.approval
    status = "refused" if reasons else ("pending" if approval == "owner" else "approved")
    request_id = conn.execute(
        request_t.insert().returning(request_t.c.id),
        {
            "tenant_id": tenant_id,
            "group_id": group_id,
            "member_id": m.id,
            "status": status,
            "reasons": reasons,
            "note": (str(ctx.data.get("note") or "")[:500] or None),
            "created_at": ctx.now,
            "decided_at": None if status == "pending" else ctx.now,
        },
    ).scalar_one()
    if status == "refused":
        effects.actions.append(
            DirectAction(
                m.id,
                "refuse_join",
                {
                    "group_id": group_id,
                    "request_id": request_id,
                    "reasons": [r["detail"] for r in reasons],
                },
                source,
            )
        )
    elif status == "approved":
        effects.actions.append(
            DirectAction(
                m.id, "approve_join", {"group_id": group_id, "request_id": request_id}, source
            )
        )
    else:
        effects.actions.append(
            group_action(
                group_id,
                "join_request_pending",
                source,
                request_id=request_id,
                member=m.external_id,
                nickname=m.nickname,
            )
        )
    effects.result = {
        "decision": status,
        "request": request_json(
            conn.execute(select(request_t).where(request_t.c.id == request_id)).one()
        ),
    }
    return effects


def decide_join(ctx: Context) -> Effects:
    """The owner approves or denies a pending request; the bot is told."""
    conn = ctx.conn
    r = conn.execute(
        select(request_t)
        .where(request_t.c.tenant_id == ctx.tenant_id, request_t.c.id == ctx.data["request_id"])
        .with_for_update()
    ).first()
    if r is None:
        raise NotFound(f"no join request {ctx.data['request_id']}")
    if r.status != "pending":
        raise Refused("already_decided", f"join request {r.id} is {r.status} already")
    approve = ctx.data["decision"] == "approve"
    status = "approved" if approve else "denied"
    conn.execute(
        update(request_t)
        .where(request_t.c.id == r.id)
        .values(status=status, decided_at=ctx.now, note=ctx.data.get("note") or r.note)
    )
    params: dict[str, Any] = {"group_id": r.group_id, "request_id": r.id}
    if not approve:
        params["reasons"] = [ctx.data.get("note") or "the group owner declined the request"]
    effects = Effects(r.member_id, {})
    effects.actions.append(
        DirectAction(
            r.member_id,
            "approve_join" if approve else "refuse_join",
            params,
            f"community.{r.group_id}",
        )
    )
    effects.result = request_json(
        conn.execute(select(request_t).where(request_t.c.id == r.id)).one()
    )
    return effects


# ── broadcasts (群联盟) ─────────────────────────────────────────────────────────────────────
def broadcast(ctx: Context) -> Effects:
    """One message to many groups: a `send_message` to each, about the group."""
    groups: Sequence[str] = ctx.data["groups"]
    known = set(
        ctx.conn.execute(
            select(group_t.c.group_id).where(
                group_t.c.tenant_id == ctx.tenant_id, group_t.c.group_id.in_(groups)
            )
        ).scalars()
    )
    unknown = [i for i, g in enumerate(groups) if g not in known]
    if unknown:
        raise NotFound(
            f"{len(unknown)} of the groups are not registered: "
            + ", ".join(groups[i] for i in unknown[:5]),
            errors=[FieldProblem(f"groups[{i}]", "no such group") for i in unknown],
        )
    effects = Effects(None, {"groups": len(groups)})
    for g in groups:
        effects.actions.append(
            group_action(
                g, "send_message", "community.broadcast", to="group", text=ctx.data["text"]
            )
        )
    return effects


# ── roles and health ──────────────────────────────────────────────────────────────────────
def activity(
    conn: Connection, tenant_id: int, group_id: str, since: date, until: date | None = None
) -> dict[int, tuple[int, int, int]]:
    """(messages, shares, questions) per member from local day `since` on."""
    q = select(
        day_t.c.member_id,
        func.sum(day_t.c.messages),
        func.sum(day_t.c.shares),
        func.sum(day_t.c.questions),
    ).where(day_t.c.tenant_id == tenant_id, day_t.c.group_id == group_id, day_t.c.day >= since)
    if until is not None:
        q = q.where(day_t.c.day <= until)
    rows = conn.execute(q.group_by(day_t.c.member_id)).all()
    return {r[0]: (int(r[1]), int(r[2]), int(r[3])) for r in rows}


def persona(settings: GroupSettings, counts: tuple[int, int, int]) -> str:
    rules = settings.roles
    messages, shares, questions = counts
    if messages >= rules.opinion_leader_messages:
        return "opinion_leader"
    if shares >= rules.sharer_shares:
        return "sharer"
    if questions >= rules.seeker_questions:
        return "seeker"
    return "onlooker"


def members_view(conn: Connection, tenant_id: int, row: Any, now: datetime) -> list[dict[str, Any]]:
    settings = settings_of(row)
    since = (now - parse_duration(settings.roles.window)).astimezone(settings.zone).date()
    counts = activity(conn, tenant_id, row.group_id, since)
    rows = conn.execute(
        select(group_member_t, member_t.c.external_id, member_t.c.nickname)
        .join(member_t, member_t.c.id == group_member_t.c.member_id)
        .where(group_member_t.c.tenant_id == tenant_id, group_member_t.c.group_id == row.group_id)
        .order_by(group_member_t.c.joined_at, group_member_t.c.member_id)
    ).all()
    out = []
    for r in rows:
        c = counts.get(r.member_id, (0, 0, 0))
        kind = persona(settings, c)
        out.append(
            {
                "member_id": r.member_id,
                "external_id": r.external_id,
                "nickname": r.nickname,
                "role": r.role,
                "persona": kind,
                "active": c[0] >= settings.roles.active_messages,
                "messages_in_window": c[0],
                "shares_in_window": c[1],
                "questions_in_window": c[2],
                "messages": r.messages,
                "joined_at": r.joined_at.isoformat(),
                "last_seen_at": r.last_seen_at.isoformat() if r.last_seen_at else None,
                "prune_warned_at": r.warned_at.isoformat() if r.warned_at else None,
                "protected": r.role in PROTECTED_ROLES or kind == "opinion_leader",
            }
        )
    return out


def health(conn: Connection, tenant_id: int, row: Any, now: datetime) -> dict[str, Any]:
    """The share of highly active members against the floor (seed 000's 20/80 rule)."""
    settings = settings_of(row)
    members = members_view(conn, tenant_id, row, now)
    n = len(members)
    active = sum(1 for m in members if m["active"])
    percent = round(100 * active / n, 1) if n else 0.0
    by_persona: dict[str, int] = {p: 0 for p in ("opinion_leader", "sharer", "seeker", "onlooker")}
    for m in members:
        by_persona[m["persona"]] += 1
    judged = n >= settings.health.min_members
    return {
        "group_id": row.group_id,
        "members": n,
        "capacity": row.capacity,
        "active": active,
        "active_percent": percent,
        "floor_percent": settings.health.active_floor_percent,
        "healthy": (percent >= settings.health.active_floor_percent) if judged else None,
        "personas": by_persona,
        "window": settings.roles.window,
    }


def check_health(ctx: Context) -> Effects:
    """The daily health check of one group: an alert to the owner below the floor."""
    row = required_group(ctx.conn, ctx.tenant_id, str(ctx.data["group_id"]))
    report = health(ctx.conn, ctx.tenant_id, row, ctx.now)
    effects = Effects(None, report)
    day = ctx.now.astimezone(zone_of(row)).date()
    if report["healthy"] is False and once(
        ctx.conn, ctx.tenant_id, f"health:{row.group_id}:{day}", ctx.now
    ):
        effects.actions.append(
            group_action(
                row.group_id,
                "group_health_alert",
                f"community.{row.group_id}",
                active_percent=report["active_percent"],
                floor_percent=report["floor_percent"],
                members=report["members"],
            )
        )
    return effects
