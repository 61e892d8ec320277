"""Delivering outbox rows to each tenant's action endpoint as signed Standard Webhooks.

Three steps, so no transaction is open while a request is in flight:
1. `claim`: rows due now (and whose earlier rows for the same member are done) are leased
   to this worker: status `delivering`, `lease_until`, attempts + 1. `FOR UPDATE SKIP
   LOCKED` keeps workers apart; a lease that expires (the worker died) makes the row
   claimable again.
2. `send`: one POST each, with a timeout and no redirects; never from inside the write path,
   so a slow or dead endpoint never blocks ingestion.
3. `record`: what `decide` says (a pure function of the attempt and the answer) is written,
   guarded by the attempt number, so a late answer after a lost lease changes nothing.
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import socket
import time
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import datetime, timedelta
from email.utils import parsedate_to_datetime
from typing import Any, Literal
from urllib.parse import urlsplit

import httpcore
import httpx
import orjson
from sqlalchemy import Engine, and_, exists, insert, or_, select, update
from sqlalchemy.orm import aliased

from app.db import read_connection
from app.events.ingest import signed_headers
from app.observability import Metrics
from app.outbox.service import (
    DEAD,
    DELIVERED,
    DELIVERING,
    PENDING,
    attempt_t,
    delivery_id,
    endpoint_t,
    outbox_t,
)

log = logging.getLogger("flywheel.outbox")

# Seconds to wait before attempt n+1 after attempt n failed: immediately, then 5 s, 5 min,
# 30 min, 2 h, 5 h, 10 h, 10 h — eight attempts over about 27.5 hours, then dead letter.
BACKOFF = (5, 300, 1800, 7200, 18000, 36000, 36000)
MAX_ATTEMPTS = len(BACKOFF) + 1
MAX_RETRY_AFTER = timedelta(hours=12)


@dataclass(frozen=True)
class Decision:
    kind: Literal["delivered", "retry", "dead", "disable"]
    at: datetime | None = None  # when to try again (retry)
    reason: str = ""


def decide(
    attempt: int,
    status: int | None,
    error: str | None,
    now: datetime,
    retry_after: timedelta | None = None,
) -> Decision:
    """What to do after attempt number `attempt` (1-based) got `status` or `error`."""
    if status is not None and 200 <= status < 300:
        return Decision("delivered")
    if status == 410:
        return Decision("disable", reason="the endpoint answered 410 Gone")
    reason = f"HTTP {status}" if status is not None else (error or "no answer")
    if attempt >= MAX_ATTEMPTS:
        return Decision("dead", reason=f"{reason} after {attempt} attempts")
    wait = timedelta(seconds=BACKOFF[attempt - 1])
    if status == 429 and retry_after is not None:
        wait = max(wait, min(retry_after, MAX_RETRY_AFTER))
    return Decision("retry", at=now + wait, reason=reason)


def parse_retry_after(value: str | None, now: datetime) -> timedelta | None:
    if not value:
        return None
    if value.strip().isdigit():
        return timedelta(seconds=int(value.strip()))
    try:
        return max(timedelta(0), parsedate_to_datetime(value) - now)
    except (TypeError, ValueError):
        return None


# ── SSRF guard ────────────────────────────────────────────────────────────────────────────
def private_address(url: str) -> str | None:
    """Why `url` points inside the network (loopback, private, link-local…), or None: the
    early answer when a tenant saves the URL. Deliveries are checked again on the address
    they dial (PublicOnlyNetwork)."""
    host = urlsplit(url).hostname or ""
    try:
        infos = socket.getaddrinfo(host, None)
    except (socket.gaierror, UnicodeError):
        return f'the host "{host}" does not resolve'
    return _non_public(host, [info[4][0] for info in infos])


def _non_public(host: str, addresses: list[Any]) -> str | None:
    for address in addresses:
        ip = ipaddress.ip_address(address)
        if not ip.is_global:
            return f'"{host}" resolves to {ip}, a non-public address'
    return None


class PublicOnlyNetwork(httpcore.AsyncNetworkBackend):
    """httpcore's network, dialling only public addresses, and checking the address it
    dials: the name is resolved once, here, and the connection goes to that address. A check
    before sending followed by the connection's own lookup could be answered differently by
    a tenant's DNS the second time (DNS rebinding). TLS still verifies the host name (httpcore
    passes the URL's host as the server name), and the Host header is the URL's."""

    def __init__(self) -> None:
        self._net = httpcore.AnyIOBackend()

    async def connect_tcp(
        self,
        host: str,
        port: int,
        timeout: float | None = None,
        local_address: str | None = None,
        socket_options: Iterable[Any] | None = None,
    ) -> httpcore.AsyncNetworkStream:
        loop = asyncio.get_running_loop()
        try:
            infos = await loop.getaddrinfo(host, port, type=socket.SOCK_STREAM)
        except (socket.gaierror, UnicodeError) as exc:
            raise httpcore.ConnectError(f'refused: the host "{host}" does not resolve') from exc
        addresses = [str(info[4][0]) for info in infos]
        why = _non_public(host, addresses)
        if why:
            raise httpcore.ConnectError(f"refused: {why}")
        return await self._net.connect_tcp(
            addresses[0], port, timeout, local_address, socket_options
        )

    async def connect_unix_socket(
        self, path: str, timeout: float | None = None, socket_options: Iterable[Any] | None = None
    ) -> httpcore.AsyncNetworkStream:
        raise httpcore.ConnectError("refused: not a public address")

    async def sleep(self, seconds: float) -> None:
        await self._net.sleep(seconds)


# ── claim, send, record ───────────────────────────────────────────────────────────────────
@dataclass(frozen=True)
class Claimed:
    id: int
    tenant_id: int
    attempt: int
    payload: dict[str, Any]
    created_at: datetime
    url: str
    secrets: tuple[str, ...]


@dataclass(frozen=True)
class Result:
    claimed: Claimed
    started_at: datetime
    duration_ms: int
    status: int | None
    error: str | None
    retry_after: str | None


_RECEIVING = select(endpoint_t.c.tenant_id).where(endpoint_t.c.disabled_at.is_(None))


def claim(engine: Engine, now: datetime, limit: int, lease: timedelta) -> list[Claimed]:
    # Only tenants with an enabled endpoint can receive. Asked first, in a read transaction:
    # when none can (or a tenant has not set one up yet and its rows wait), the round takes
    # no write lock (on SQLite that would stall the write path) and the scan never walks
    # rows nobody can deliver.
    with read_connection(engine) as conn:
        tenants = list(conn.execute(_RECEIVING).scalars())
    if not tenants:
        return []
    o, p = outbox_t, aliased(outbox_t)
    earlier_open = exists().where(
        p.c.tenant_id == o.c.tenant_id,
        p.c.member_id == o.c.member_id,
        p.c.status.in_([PENDING, DELIVERING]),
        or_(p.c.order_at < o.c.order_at, and_(p.c.order_at == o.c.order_at, p.c.id < o.c.id)),
    )
    due = or_(
        and_(o.c.status == PENDING, o.c.next_attempt_at <= now),
        and_(o.c.status == DELIVERING, o.c.lease_until < now),
    )
    with engine.connect() as conn, conn.begin():
        rows = conn.execute(
            select(
                o.c.id,
                o.c.tenant_id,
                o.c.attempts,
                o.c.payload,
                o.c.created_at,
                endpoint_t.c.url,
                endpoint_t.c.secret,
                endpoint_t.c.previous_secret,
                endpoint_t.c.previous_expires_at,
            )
            .join(endpoint_t, endpoint_t.c.tenant_id == o.c.tenant_id)
            .where(
                o.c.tenant_id.in_(tenants),
                due,
                endpoint_t.c.disabled_at.is_(None),
                ~earlier_open,
            )
            .order_by(o.c.next_attempt_at, o.c.id)
            .limit(limit)
            .with_for_update(of=o, skip_locked=True)
        ).all()
        if not rows:
            return []
        conn.execute(
            update(o)
            .where(o.c.id.in_([r.id for r in rows]))
            .values(status=DELIVERING, lease_until=now + lease, attempts=o.c.attempts + 1)
        )
    out = []
    for r in rows:
        secrets = [r.secret]
        if r.previous_secret and r.previous_expires_at and now < r.previous_expires_at:
            secrets.append(r.previous_secret)
        out.append(
            Claimed(
                r.id, r.tenant_id, r.attempts + 1, r.payload, r.created_at, r.url, tuple(secrets)
            )
        )
    return out


def body_of(c: Claimed) -> bytes:
    return orjson.dumps(
        {"id": delivery_id(c.id), "created_at": c.created_at.isoformat(), **c.payload}
    )


async def send(client: httpx.AsyncClient, c: Claimed, now: datetime) -> Result:
    body = body_of(c)
    headers = signed_headers(c.secrets, delivery_id(c.id), now, body)
    started = time.perf_counter()
    status = error = retry_after = None
    try:
        response = await client.post(c.url, content=body, headers=headers)
        status, retry_after = response.status_code, response.headers.get("retry-after")
    except httpx.HTTPError as exc:
        error = f"{type(exc).__name__}: {exc}"[:500] or type(exc).__name__
    return Result(c, now, int((time.perf_counter() - started) * 1000), status, error, retry_after)


def record(engine: Engine, results: list[Result], now: datetime, metrics: Metrics | None) -> None:
    with engine.connect() as conn, conn.begin():
        for res in results:
            c = res.claimed
            d = decide(
                c.attempt, res.status, res.error, now, parse_retry_after(res.retry_after, now)
            )
            mine = and_(
                outbox_t.c.id == c.id,
                outbox_t.c.status == DELIVERING,
                outbox_t.c.attempts == c.attempt,
            )
            common = {"lease_until": None, "last_status": res.status, "last_error": res.error}
            if d.kind == "delivered":
                values = {**common, "status": DELIVERED, "delivered_at": now, "last_error": None}
            elif d.kind == "retry":
                values = {**common, "status": PENDING, "next_attempt_at": d.at}
            elif d.kind == "dead":
                values = {**common, "status": DEAD, "last_error": d.reason[:500]}
            else:  # 410: stop sending to this endpoint; the row waits, this try not counted
                values = {**common, "status": PENDING, "attempts": c.attempt - 1}
                conn.execute(
                    update(endpoint_t)
                    .where(endpoint_t.c.tenant_id == c.tenant_id)
                    .values(disabled_at=now, disabled_reason=d.reason)
                )
            if conn.execute(update(outbox_t).where(mine).values(**values)).rowcount:
                conn.execute(
                    insert(attempt_t).values(
                        outbox_id=c.id,
                        attempt=c.attempt,
                        started_at=res.started_at,
                        duration_ms=res.duration_ms,
                        status_code=res.status,
                        error=res.error,
                    )
                )
            if metrics is not None:
                metrics.deliveries.labels(d.kind).inc()


async def deliver_due(
    engine: Engine,
    client: httpx.AsyncClient,
    now: datetime,
    *,
    limit: int = 50,
    lease: timedelta = timedelta(minutes=2),
    metrics: Metrics | None = None,
) -> int:
    """One round: claim, send concurrently, record. Returns how many were attempted."""
    claimed = await asyncio.to_thread(claim, engine, now, limit, lease)
    if not claimed:
        return 0
    results = await asyncio.gather(*(send(client, c, now) for c in claimed))
    await asyncio.to_thread(record, engine, list(results), now, metrics)
    return len(claimed)


def new_client(timeout: float, concurrency: int, *, public_only: bool) -> httpx.AsyncClient:
    """The delivery client: no redirects followed; with `public_only` (outside development)
    every connection goes through PublicOnlyNetwork, and no proxy from the environment is
    used, since a proxy would dial the address instead of us."""
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    transport = httpx.AsyncHTTPTransport(limits=limits, trust_env=not public_only)
    if public_only:
        # httpx has no parameter for httpcore's network backend: the same pool, with it.
        transport._pool = httpcore.AsyncConnectionPool(
            ssl_context=httpx.create_ssl_context(trust_env=False),
            max_connections=limits.max_connections,
            max_keepalive_connections=limits.max_keepalive_connections,
            keepalive_expiry=limits.keepalive_expiry,
            network_backend=PublicOnlyNetwork(),
        )
    return httpx.AsyncClient(
        transport=transport,
        timeout=httpx.Timeout(timeout),
        follow_redirects=False,
        headers={"user-agent": "Flywheel-Webhooks/0.1"},
    )
