"""Security basics over HTTP — SQLite and PostgreSQL: secrets are shown once and never logged,
CORS answers only the configured origins."""

from __future__ import annotations

import io
import logging
from collections.abc import Iterator

import pytest

from app.main import create_app
from app.observability import JsonFormatter, configure_logging
from tests.conftest import Client, Source, deliver, event, new_tenant, ok, settings_for
from tests.factories import welcome
from tests.servers import APP_ID, APP_SECRET, Receiver


@pytest.fixture
def every_log_line() -> Iterator[io.StringIO]:
    """Everything the service logs configured at its most verbose (FLYWHEEL_LOG_LEVEL=debug),
    formatted as production does (JSON with the structured fields)."""
    out = io.StringIO()
    handler = logging.StreamHandler(out)
    handler.setFormatter(JsonFormatter())
    root = logging.getLogger()
    level = root.level
    configure_logging("json", "debug")
    root.addHandler(handler)
    try:
        yield out
    finally:
        root.removeHandler(handler)
        root.setLevel(level)


def test_secrets_are_shown_once_and_never_logged(engine, clock, wechat, every_log_line):
    url = engine.url.render_as_string(hide_password=False)
    settings = settings_for(url).model_copy(update={"wechat_api_base": wechat.server.base_url})
    app = create_app(settings, engine=engine, clock=clock)
    client = Client(app)
    _, admin = new_tenant(engine)
    client.put("/v1/funnels/welcome", json=welcome(), headers=admin)
    secrets: list[str] = [admin["Authorization"].removeprefix("Bearer ")]

    secrets.append(ok(client.post("/v1/api-keys", json={"name": "till"}, headers=admin))["key"])
    source = Source(client, admin, clock)
    secrets.append(source.secret)
    rotated = ok(client.post("/v1/webhook-sources/group-bot/rotate-secret", headers=admin))
    secrets.append(rotated["secret"])
    source.secret = rotated["secret"]
    with Receiver() as receiver:
        made = ok(client.put("/v1/action-endpoint", json={"url": receiver.url}, headers=admin))
        secrets.append(made["secret"])
        again = ok(client.put("/v1/action-endpoint", json={"url": receiver.url}, headers=admin))
        assert again["secret"] is None  # shown by the PUT that made it, not by later ones
        turned = ok(client.post("/v1/action-endpoint/rotate-secret", headers=admin))
        secrets.append(turned["secret"])
        receiver.secrets = [turned["secret"], made["secret"]]
        member = ok(source.send(event("member.joined", "wx-1")))["member"]
        assert deliver(app) == 1 and receiver.calls[0]["valid"]  # a signed delivery went out
    body = {"app_id": APP_ID, "app_secret": APP_SECRET}
    ok(client.put("/v1/wechat-app", json=body, headers=admin))
    wechat.codes["code-1"] = {"openid": "o-wechat-1"}
    login = {"provider": "wechat", "app_id": APP_ID, "code": "code-1"}
    secrets += [APP_SECRET, "never-leaves-flywheel"]  # WeChat's session_key too
    secrets.append(ok(client.post("/v1/member/session", json=login))["token"])
    assert wechat.requests  # code2Session was called, with the app secret in its query
    secrets.append(ok(client.post(f"/v1/members/{member['id']}/tokens", headers=admin))["token"])
    link = ok(client.post("/v1/console/links", headers=admin))["url"]
    secrets.append(link.split("token=", 1)[1])
    # refused credentials are not logged either
    client.get("/v1/funnels", headers={"Authorization": "Bearer fw_0123456789ab_guessedsecret"})
    secrets.append("guessedsecret")
    client.get(link)  # the console sign-in link: its token travels in the query string

    readable = [
        client.get("/v1/api-keys", headers=admin),
        client.get("/v1/webhook-sources", headers=admin),
        client.get("/v1/webhook-sources/group-bot", headers=admin),
        client.get("/v1/action-endpoint", headers=admin),
        client.get("/v1/wechat-app", headers=admin),
        client.get(f"/v1/members/{member['id']}", headers=admin),
    ]
    assert all(r.status_code == 200 for r in readable), [r.text for r in readable]
    logged = every_log_line.getvalue()
    assert "GET /v1/funnels 401" in logged  # the log did capture the requests
    for secret in secrets:
        key_part = _secret_part(secret)
        assert len(key_part) >= 8, secret
        assert key_part not in logged, f"a secret was logged: {secret[:12]}…"
        for r in readable:
            assert key_part not in r.text, f"{r.request.url} returned a secret after creation"


def _secret_part(secret: str) -> str:
    """What must never be seen again: past an API key's `fw_<public prefix>_` or a webhook
    secret's `whsec_` (the secret itself is URL-safe base64, which has underscores too)."""
    if secret.startswith("fw_"):
        return secret.split("_", 2)[2]
    return secret.removeprefix("whsec_")


@pytest.mark.parametrize("configured", [[], ["https://shop.example"]])
def test_cors_answers_only_configured_origins(engine, clock, configured):
    url = engine.url.render_as_string(hide_password=False)
    settings = settings_for(url).model_copy(update={"cors_origins": configured})
    client = Client(create_app(settings, engine=engine, clock=clock))
    _, admin = new_tenant(engine)

    def preflight(origin: str):  # type: ignore[no-untyped-def]
        return client.request(
            "OPTIONS",
            "/v1/funnels",
            headers={
                "Origin": origin,
                "Access-Control-Request-Method": "GET",
                "Access-Control-Request-Headers": "authorization",
            },
        )

    evil = preflight("https://evil.example")
    assert "access-control-allow-origin" not in evil.headers
    r = client.get("/v1/funnels", headers={**admin, "Origin": "https://evil.example"})
    assert r.status_code == 200 and "access-control-allow-origin" not in r.headers
    allowed = preflight("https://shop.example")
    if configured:
        assert allowed.status_code == 200
        assert allowed.headers["access-control-allow-origin"] == "https://shop.example"
        r = client.get("/v1/funnels", headers={**admin, "Origin": "https://shop.example"})
        assert r.headers["access-control-allow-origin"] == "https://shop.example"
        assert r.headers.get("access-control-allow-credentials") != "true"  # keys, not cookies
    else:  # none configured (the default): no origin is answered
        assert "access-control-allow-origin" not in allowed.headers
