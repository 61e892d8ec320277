"""What `make bench` sends to Flywheel: the requests of each target, built before the clock
starts, and the checks that the state they left is right.

One tenant per database with a bench copy of the office-lunch funnel (its group-buy and
solitaire campaigns running now, with room for the run). Members join through the group
bot's signed webhooks first (not timed); then, timed:

- `message`: random members post in the group (signed `message.posted` webhooks);
- `join`: a fifth of the members lead a team of five (opened first, not timed) and the rest
  join them. The joins are sent in team order, so the 64 connections in flight all hit the
  same dozen or so teams: the hot-team case. Afterwards every team must hold exactly five;
- `append`: every member appends a line to one solitaire list (one row lock for all).
  Afterwards the lines must be numbered 1…n without gaps and the stock must add up.
"""

from __future__ import annotations

import copy
import json
import random
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import orjson
from sqlalchemy import Connection, func, select

from bench.load import build

ROOT = Path(__file__).resolve().parent.parent
SECRET_KEY = "bench-secret-key-" + "x" * 32  # member tokens of this run only
GROUP = "g1"
TEAM_SIZE = 5
SKU = "tomato-egg"
STOCK = 1_000_000


def funnel() -> dict[str, Any]:
    """office-lunch, with its campaigns running now and sized for the run."""
    doc: dict[str, Any] = json.loads((ROOT / "funnels" / "office-lunch.json").read_text())
    doc = copy.deepcopy(doc)
    now = datetime.now(UTC)
    team = doc["mechanics"]["groupbuy"]["lunch-team"]
    team.update(
        team_size=TEAM_SIZE,
        starts_at=(now - timedelta(days=1)).isoformat(),
        ends_at=(now + timedelta(days=30)).isoformat(),
    )
    lunch = doc["mechanics"]["solitaire"]["lunch"]
    for item in lunch["items"]:
        item["stock"] = STOCK
    lunch["groups"] = [GROUP]
    lunch["open_for"], lunch["join_until"] = "PT6H", "PT5H"
    return doc


@dataclass
class Target:
    """A prepared database: the tenant, its webhook source and admin key."""

    url: str
    tenant_id: int
    path: str  # the webhook source's URL path
    secret: str
    admin_key: str

    @contextmanager
    def connect(self) -> Iterator[Connection]:
        """A connection to the target's database, with its own engine (the bench process
        holds none between phases)."""
        from app.db import make_engine

        engine = make_engine(self.url)
        try:
            with engine.connect() as conn:
                yield conn
        finally:
            engine.dispose()


def prepare(url: str) -> Target:
    from app.db import session_scope
    from app.events.sources import create_source
    from app.tenancy.models import Tenant
    from app.tenancy.service import create_api_key
    from bench.report import tenant_with

    engine, tenant_id = tenant_with(url, funnel())
    now = datetime.now(UTC)
    with session_scope(engine) as session:
        source = create_source(session, tenant_id, "bench", now)
        tenant = session.get(Tenant, tenant_id)
        assert tenant is not None
        _, key = create_api_key(session, tenant, "bench", now)
        target = Target(url, tenant_id, f"/v1/webhooks/{source.public_id}", source.secret, key)
    engine.dispose()
    return target


class Requests:
    """Request bytes for one server."""

    def __init__(self, host: str, port: int, target: Target) -> None:
        self.host, self.port, self.t = host, port, target
        self.now = datetime.now(UTC)
        self.ids: list[str] = []  # webhook-id of each webhook built, in order

    def _webhook(self, event: dict[str, Any]) -> bytes:
        from app.events.ingest import signed_headers

        body = orjson.dumps(event)
        self.ids.append(f"msg_{uuid.uuid4().hex}")
        headers = signed_headers([self.t.secret], self.ids[-1], self.now, body)
        return build(self.host, self.port, self.t.path, body, headers)

    def _post(self, path: str, body: dict[str, Any], auth: str) -> bytes:
        headers = {"authorization": f"Bearer {auth}", "content-type": "application/json"}
        return build(self.host, self.port, path, orjson.dumps(body), headers)

    def joined(self, members: int) -> list[bytes]:
        return [
            self._webhook(
                {
                    "type": "member.joined",
                    "member": {"id": f"bench-{i}"},
                    "data": {"group_id": GROUP},
                }
            )
            for i in range(members)
        ]

    def messages(self, members: int, count: int) -> list[bytes]:
        rng = random.Random(7)  # noqa: S311 - which member posts, not a secret
        return [
            self._webhook(
                {
                    "type": "message.posted",
                    "member": {"id": f"bench-{rng.randrange(members)}"},
                    "data": {"group_id": GROUP, "message_id": uuid.uuid4().hex, "length": 24},
                }
            )
            for _ in range(count)
        ]

    def tokens(self, members: int) -> list[str]:
        """Member tokens for bench-0 … bench-(n-1), in that order."""
        from app.members.models import Member
        from app.security import issue_member_token

        with self.t.connect() as conn:
            ids = dict(
                conn.execute(
                    select(Member.external_id, Member.id).where(  # type: ignore[call-overload]
                        Member.tenant_id == self.t.tenant_id
                    )
                ).all()
            )
        return [
            issue_member_token(SECRET_KEY, self.t.tenant_id, ids[f"bench-{i}"], self.now, 7200)[0]
            for i in range(members)
        ]

    def opens(self, tokens: list[str]) -> list[bytes]:
        """The leaders (every fifth member) open a team each."""
        path = "/v1/member/groupbuy/office-lunch/lunch-team/teams"
        return [self._post(path, {}, tokens[i]) for i in range(0, len(tokens), TEAM_SIZE)]

    def joins(self, tokens: list[str], teams: dict[int, str]) -> list[bytes]:
        """Everyone else joins their leader's team, in team order: `teams` maps a leader's
        index to the team's share id."""
        out = []
        for i in range(len(tokens)):
            leader = i - i % TEAM_SIZE
            if i != leader and leader in teams:
                out.append(self._post(f"/v1/member/teams/{teams[leader]}/join", {}, tokens[i]))
        return out

    def appends(self, tokens: list[str], list_id: str) -> list[bytes]:
        line = {"items": [{"sku": SKU, "qty": 1}], "pickup": "A座大堂"}
        path = f"/v1/member/solitaire/{list_id}/lines"
        return [self._post(path, line, token) for token in tokens]


def teams(target: Target) -> dict[int, str]:
    """Leader index (bench-<i>) -> team share id, from the database."""
    from app.mechanics.groupbuy.models import Team
    from app.members.models import Member

    with target.connect() as conn:
        rows = conn.execute(
            select(Member.external_id, Team.public_id).join(  # type: ignore[call-overload]
                Member, Member.id == Team.leader_member_id
            )
        ).all()
    return {int(ext.removeprefix("bench-")): public_id for ext, public_id in rows}


def analyze(target: Target) -> None:
    """Refresh PostgreSQL's planner statistics after a setup phase loaded rows, as its
    autovacuum does within a minute on a production server. The bench machines run it with
    autovacuum off, so the planner would still believe the tables empty (it then read the
    member lookup's whole index, 3-7 ms a batch, instead of the rows asked for)."""
    if not target.url.startswith("postgresql"):
        return
    from sqlalchemy import text

    with target.connect() as conn:
        conn.execution_options(isolation_level="AUTOCOMMIT").execute(text("ANALYZE"))


def check_teams(target: Target) -> dict[str, int]:
    """Every team the joins filled holds exactly TEAM_SIZE seats and succeeded."""
    from app.mechanics.groupbuy.models import Team

    with target.connect() as conn:
        rows = conn.execute(select(Team.status, Team.seats_taken, Team.capacity)).all()  # type: ignore[call-overload]
    over = [r for r in rows if r.seats_taken > r.capacity]
    if over:
        raise SystemExit(f"{len(over)} teams hold more seats than their size: {over[:3]}")
    full = [r for r in rows if r.seats_taken == TEAM_SIZE]
    if any(r.status != "succeeded" for r in full):
        raise SystemExit("a full team did not succeed")
    return {"teams": len(rows), "full": len(full)}


def open_list(target: Target, host: str, port: int) -> str:
    import httpx

    r = httpx.post(
        f"http://{host}:{port}/v1/solitaire/lists",
        json={"group": GROUP, "funnel": "office-lunch", "campaign": "lunch"},
        headers={"Authorization": f"Bearer {target.admin_key}"},
        timeout=30,
    )
    if r.status_code != 200:
        raise SystemExit(f"could not open the solitaire list: {r.status_code} {r.text}")
    return str(r.json()["result"]["list"]["id"])


def check_lines(target: Target, expected: int) -> dict[str, int]:
    """Lines numbered 1…n, no gaps, no repeats; the stock taken equals the lines."""
    from app.mechanics.solitaire.models import SolitaireLine

    with target.connect() as conn:
        seqs = sorted(conn.execute(select(SolitaireLine.seq)).scalars())  # type: ignore[call-overload]
        n = conn.execute(select(func.count()).select_from(SolitaireLine)).scalar_one()  # type: ignore[arg-type]
    if seqs != list(range(1, len(seqs) + 1)):
        raise SystemExit("solitaire line numbers have gaps or repeats")
    if n != expected:
        raise SystemExit(f"{expected} appends were answered 200 but {n} lines are stored")
    return {"lines": n}


def stored_keys(target: Target, keys: list[str]) -> int:
    """How many of these webhook-ids the event log holds."""
    from app.events.models import EventLog

    found = 0
    with target.connect() as conn:
        for i in range(0, len(keys), 500):
            found += conn.execute(
                select(func.count()).where(EventLog.dedupe_key.in_(keys[i : i + 500]))  # type: ignore[union-attr]
            ).scalar_one()
    return found
