"""Fixtures: a real SQLite file and a real PostgreSQL database, both built by `alembic upgrade`.

Database tests take the `engine` fixture, parametrized over both backends. PostgreSQL tests
skip with a reason when no server is reachable, except under CI=true, where they fail.
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx
import pytest
from hypothesis import HealthCheck, settings
from sqlalchemy import Engine, func, select, text
from sqlalchemy.engine import make_url

from app.clock import FrozenClock
from app.config import Settings
from app.db import make_engine, metadata, session_scope
from app.events.dispatch import Inbound, Reply, apply_batch
from app.events.ingest import signed_headers
from app.funnels.service import publish
from app.main import create_app
from app.migrations import upgrade
from app.tenancy.service import create_tenant
from tests.servers import FakeWeChat

settings.register_profile(
    "default", max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow]
)
settings.register_profile(
    "ci", max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow]
)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "default"))

IN_CI = os.environ.get("CI", "").lower() in ("1", "true", "yes")
T0 = datetime(2026, 12, 1, 1, 0, tzinfo=UTC)  # 09:00 in Shanghai


def _server_url() -> str:
    explicit = os.environ.get("FLYWHEEL_TEST_POSTGRES_URL")
    if explicit:
        return explicit
    configured = os.environ.get("FLYWHEEL_DATABASE_URL", "")
    if configured.startswith("postgresql"):
        return configured
    return "postgresql+psycopg://postgres@127.0.0.1:5432/postgres"


def _admin(url: str):  # type: ignore[no-untyped-def]
    import psycopg

    u = make_url(url).set(drivername="postgresql", database="postgres")
    return psycopg.connect(
        u.render_as_string(hide_password=False), autocommit=True, connect_timeout=3
    )


@pytest.fixture(scope="session")
def postgres_url() -> Iterator[str]:
    server = _server_url()
    try:
        admin = _admin(server)
    except Exception as exc:
        if IN_CI:
            pytest.fail(f"CI=true but PostgreSQL at {server} is unreachable: {exc}")
        pytest.skip(f"PostgreSQL not reachable at {server} ({exc}); set CI=true to require it")
    name = f"flywheel_test_{uuid.uuid4().hex[:10]}"
    admin.execute(f'CREATE DATABASE "{name}"')
    url = make_url(server).set(database=name).render_as_string(hide_password=False)
    try:
        upgrade(url)
        yield url
    finally:
        admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        admin.close()


@pytest.fixture(scope="session")
def sqlite_template(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("template") / "flywheel.db"
    upgrade(f"sqlite:///{path}")
    return path


def _truncate(engine: Engine) -> None:
    tables = ", ".join(f'"{t.name}"' for t in metadata.sorted_tables)
    with engine.begin() as conn:
        conn.execute(text(f"TRUNCATE {tables} RESTART IDENTITY CASCADE"))


@pytest.fixture(params=["sqlite", pytest.param("postgresql", marks=pytest.mark.postgres)])
def engine(
    request: pytest.FixtureRequest, tmp_path: Path, sqlite_template: Path
) -> Iterator[Engine]:
    if request.param == "sqlite":
        path = tmp_path / "flywheel.db"
        shutil.copy(sqlite_template, path)
        eng = make_engine(f"sqlite:///{path}")
        yield eng
        eng.dispose()
    else:
        eng = make_engine(request.getfixturevalue("postgres_url"), pool_size=5)
        try:
            yield eng
        finally:
            _truncate(eng)
            eng.dispose()


@pytest.fixture
def clock() -> FrozenClock:
    return FrozenClock(T0)


def settings_for(url: str) -> Settings:
    return Settings(env="test", database_url=url, secret_key="t" * 40)


class Client:
    """A synchronous face on httpx.AsyncClient + ASGITransport: real requests through the app."""

    def __init__(self, app: object) -> None:
        self.app = app

    def request(self, method: str, url: str, **kwargs: object) -> httpx.Response:
        async def go() -> httpx.Response:
            transport = httpx.ASGITransport(app=self.app, raise_app_exceptions=False)  # type: ignore[arg-type]
            async with httpx.AsyncClient(transport=transport, base_url="http://testserver") as c:
                return await c.request(method, url, **kwargs)  # type: ignore[arg-type]

        return asyncio.run(go())

    def get(self, url: str, **kw: object) -> httpx.Response:
        return self.request("GET", url, **kw)

    def post(self, url: str, **kw: object) -> httpx.Response:
        return self.request("POST", url, **kw)

    def put(self, url: str, **kw: object) -> httpx.Response:
        return self.request("PUT", url, **kw)

    def patch(self, url: str, **kw: object) -> httpx.Response:
        return self.request("PATCH", url, **kw)

    def delete(self, url: str, **kw: object) -> httpx.Response:
        return self.request("DELETE", url, **kw)


def app_for(engine: Engine, clock: FrozenClock) -> object:
    url = engine.url.render_as_string(hide_password=False)
    return create_app(settings_for(url), engine=engine, clock=clock)


@pytest.fixture
def client(engine: Engine, clock: FrozenClock) -> Client:
    return Client(app_for(engine, clock))


def count(engine: Engine, model: Any, *where: Any) -> int:
    """Rows of `model` (a model or table) matching `where`."""
    with engine.connect() as conn:
        return int(conn.execute(select(func.count()).select_from(model).where(*where)).scalar_one())


def ok(r: httpx.Response) -> Any:
    """The JSON of a 200 or 201 answer (anything else fails with the answer's text)."""
    assert r.status_code in (200, 201), r.text
    return r.json()


def deliver(app: Any) -> int:
    """One round of the delivery worker, with the client its settings call for."""

    async def go() -> int:
        async with app.state.workers.new_client() as client:
            return await app.state.workers.deliver(client)  # type: ignore[no-any-return]

    return asyncio.run(go())


def new_tenant(engine: Engine, name: str = "acme") -> tuple[int, dict[str, str]]:
    """A tenant and the headers that authenticate as it."""
    with session_scope(engine) as session:
        tenant, _key, plaintext = create_tenant(session, name, T0)
        assert tenant.id is not None
        return tenant.id, {"Authorization": f"Bearer {plaintext}"}


def tenant_with_funnel(
    engine: Engine, key: str, doc: dict[str, Any] | None, now: datetime, name: str = "lunch"
) -> int:
    """A tenant (named `name`) with `doc` published as funnel `key`, straight through the
    service (state machines and races set up many of these)."""
    tenant_id, _ = new_tenant(engine, name)
    if doc is not None:
        with session_scope(engine) as session:
            publish(session, tenant_id, key, doc, now)
    return tenant_id


def command(tenant_id: int, kind: str, member: str | None = None, **data: Any) -> Inbound:
    """An item for the write path, about the member with this external id (if any)."""
    return Inbound(tenant_id, "test", kind, data=data, member={"id": member} if member else None)


def apply_command(
    engine: Engine, tenant_id: int, now: datetime, kind: str, member: str | None = None, **data: Any
) -> Reply:
    """Apply one command in its own transaction; a 500 is never an acceptable answer."""
    [reply] = apply_batch(engine, [command(tenant_id, kind, member, **data)], now)
    assert reply.status != 500, reply.error
    return reply


def sqlite_copy(template: Path, workdir: Path, name: str) -> Engine:
    """A fresh SQLite file copied from the migrated template (one per state-machine example)."""
    path = workdir / name
    shutil.copy(template, path)
    return make_engine(f"sqlite:///{path}")


FUNNELS = Path(__file__).resolve().parent.parent / "funnels"
EXAMPLE_FUNNELS = sorted(p for p in FUNNELS.glob("*.json") if p.name != "funnel.schema.json")


class Source:
    """A webhook source created through the API, and a signer for events sent to it."""

    def __init__(
        self, client: Client, headers: dict[str, str], clock: FrozenClock, name: str = "group-bot"
    ) -> None:
        r = client.post("/v1/webhook-sources", json={"name": name}, headers=headers)
        assert r.status_code == 201, r.text
        created = r.json()
        self.client, self.clock, self.name, self.headers = client, clock, name, headers
        self.path, self.secret = "/v1/webhooks/" + created["id"], created["secret"]

    def send(
        self,
        event: dict[str, object] | None = None,
        *,
        msg_id: str | None = None,
        at: datetime | None = None,
        secrets: list[str] | None = None,
        body: bytes | None = None,
        drop: tuple[str, ...] = (),
    ) -> httpx.Response:
        body = body if body is not None else json.dumps(event).encode()
        headers = signed_headers(
            secrets or [self.secret],
            msg_id or f"msg_{uuid.uuid4().hex}",
            at or self.clock.now(),
            body,
        )
        for name in drop:
            headers.pop(name)
        return self.client.post(self.path, content=body, headers=headers)


def event(type_: str, member: str = "m-1", **data: object) -> dict[str, object]:
    return {"type": type_, "member": {"id": member}, "data": data}


@pytest.fixture
def wechat() -> Iterator[FakeWeChat]:
    fake = FakeWeChat()
    fake.server.start()
    yield fake
    fake.server.stop()
