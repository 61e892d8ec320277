"""Schemathesis against the service's own OpenAPI: every operation, authenticated as a real
tenant (API key) or member (member token), with generated parameters and bodies. Whatever
is sent: no 500, every error is an RFC 9457 problem document, and every response matches
the status codes, content types and schemas the OpenAPI promises.

Run on SQLite and on PostgreSQL. Bounded like the other property tests: a few examples per
operation by default, more under the `ci` profile (HYPOTHESIS_PROFILE=ci, which CI sets)."""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import schemathesis
from hypothesis import HealthCheck, settings
from schemathesis.checks import (
    content_type_conformance,
    not_a_server_error,
    response_schema_conformance,
    status_code_conformance,
)
from sqlalchemy import Engine

from app.clock import FrozenClock
from app.db import make_engine, session_scope
from app.funnels.service import publish
from app.main import create_app
from app.migrations import upgrade
from tests.conftest import T0, Client, _truncate, new_tenant, ok, settings_for
from tests.factories import office_lunch

EXAMPLES = 25 if os.environ.get("HYPOTHESIS_PROFILE") == "ci" else 4
PROBLEM = "application/problem+json"


# Schemathesis reads the OpenAPI at import to parametrize the test, so an app is built then
# (that touches no database); the `api` fixture builds the app each backend is fuzzed through,
# migrated and seeded.
APP: Any = create_app(
    settings_for("sqlite://").model_copy(update={"workers": "off"}), clock=FrozenClock(T0)
)
schema = schemathesis.openapi.from_dict(APP.openapi())
schema.app = APP


def _seeded(engine: Engine) -> dict[str, Any]:
    """A tenant with the example funnel published, and a member with a token, created
    through the API of an app over `engine`."""
    url = engine.url.render_as_string(hide_password=False)
    app = create_app(
        settings_for(url).model_copy(update={"workers": "off"}),
        engine=engine,
        clock=FrozenClock(T0),
    )
    tenant_id, tenant = new_tenant(engine, "fuzz")
    with session_scope(engine) as session:
        publish(session, tenant_id, "office-lunch", office_lunch(), T0)
    client = Client(app)
    r = client.post("/v1/members", json={"external_id": "fuzzer"}, headers=tenant)
    assert r.status_code == 201, r.text
    token = ok(client.post(f"/v1/members/{r.json()['id']}/tokens", headers=tenant))["token"]
    member = {"Authorization": f"Bearer {token}"}
    return {"app": app, "tenant": tenant, "member": member}


@pytest.fixture(
    scope="module", params=["sqlite", pytest.param("postgresql", marks=pytest.mark.postgres)]
)
def api(request: pytest.FixtureRequest) -> Iterator[dict[str, Any]]:
    if request.param == "sqlite":
        folder = Path(tempfile.mkdtemp(prefix="flywheel-schema-"))
        url = f"sqlite:///{folder / 'flywheel.db'}"
        upgrade(url)
        engine = make_engine(url)
        try:
            yield _seeded(engine)
        finally:
            engine.dispose()
            shutil.rmtree(folder, ignore_errors=True)
    else:
        engine = make_engine(request.getfixturevalue("postgres_url"), pool_size=5)
        try:
            yield _seeded(engine)
        finally:
            _truncate(engine)
            engine.dispose()


def problem_documents(ctx: Any, response: Any, case: Any) -> bool:
    """Every 4xx/5xx is problem+json with its type, title, status (matching the response)
    and detail."""
    if response.status_code < 400:
        return True
    kind = response.headers.get("content-type", [""])
    kind = kind[0] if isinstance(kind, list) else kind
    assert kind.startswith(PROBLEM), f"{response.status_code} answered as {kind!r}"
    doc = response.json()
    for field in ("type", "title", "status", "detail"):
        assert field in doc, f"problem document without {field}: {doc}"
    assert doc["status"] == response.status_code, doc
    return True


@schema.parametrize()
@settings(
    max_examples=EXAMPLES,
    deadline=None,
    suppress_health_check=list(HealthCheck),
)
def test_every_operation_answers_as_documented(case: Any, api: dict[str, Any]) -> None:
    path = case.operation.path
    who = api["member"] if path.startswith("/v1/member/") else api["tenant"]
    generated = {k: v for k, v in (case.headers or {}).items() if k.lower() != "authorization"}
    case.headers = {**generated, **who}
    # Sent through the same in-process httpx transport as the rest of the suite (schemathesis'
    # own ASGI client would run the app's lifespan around each call).
    kwargs = case.as_transport_kwargs(base_url="http://testserver")
    kwargs.pop("cookies", None)  # none of the operations reads a cookie
    if isinstance(kwargs.get("data"), bytes | str):
        kwargs["content"] = kwargs.pop("data")  # raw bodies, as httpx spells them
    response = Client(api["app"]).request(kwargs.pop("method"), kwargs.pop("url"), **kwargs)
    case.validate_response(
        response,
        checks=[
            not_a_server_error,
            status_code_conformance,
            content_type_conformance,
            response_schema_conformance,
            problem_documents,
        ],
    )
