"""Member login: WeChat code2Session against a fake WeChat over real HTTP, and the
development provider — on SQLite and PostgreSQL."""

from __future__ import annotations

import pytest

from app.main import create_app
from tests.conftest import Client, new_tenant, settings_for
from tests.servers import APP_ID, APP_SECRET


@pytest.fixture
def login_client(engine, clock, wechat) -> Client:
    url = engine.url.render_as_string(hide_password=False)
    settings = settings_for(url).model_copy(update={"wechat_api_base": wechat.server.base_url})
    return Client(create_app(settings, engine=engine, clock=clock))


def _register(client: Client, engine) -> dict[str, str]:
    _, h = new_tenant(engine)
    r = client.put("/v1/wechat-app", json={"app_id": APP_ID, "app_secret": APP_SECRET}, headers=h)
    assert r.status_code == 200 and "app_secret" not in r.json()
    return h


def test_a_wechat_code_logs_a_member_in_and_the_token_works(login_client, engine, wechat):
    _register(login_client, engine)
    wechat.codes["c1"] = {"openid": "o-li", "unionid": "u-li"}
    r = login_client.post(
        "/v1/member/session", json={"provider": "wechat", "app_id": APP_ID, "code": "c1"}
    )
    assert r.status_code == 200, r.text
    session = r.json()
    assert session["created"] is True and session["member"]["external_id"] == "o-li"
    assert "session_key" not in r.text
    assert wechat.requests[0]["grant_type"] == ["authorization_code"]
    me = login_client.get("/v1/member/me", headers={"Authorization": f"Bearer {session['token']}"})
    assert me.status_code == 200 and me.json()["external_id"] == "o-li"

    wechat.codes["c2"] = {"openid": "o-li"}
    again = login_client.post(
        "/v1/member/session", json={"provider": "wechat", "app_id": APP_ID, "code": "c2"}
    ).json()
    assert again["created"] is False and again["member"]["id"] == session["member"]["id"]


@pytest.mark.parametrize(
    "code, status, path",
    [("nope", 401, "code"), ("busy", 502, None), ("too-fast", 429, None)],
)
def test_wechat_refusals_are_clear_problems(login_client, engine, wechat, code, status, path):
    _register(login_client, engine)
    r = login_client.post(
        "/v1/member/session", json={"provider": "wechat", "app_id": APP_ID, "code": code}
    )
    assert r.status_code == status and r.headers["content-type"] == "application/problem+json"
    if path:
        assert r.json()["errors"][0]["path"] == path
    if status == 429:
        assert r.headers["retry-after"] == "1"


def test_a_code_works_once(login_client, engine, wechat):
    _register(login_client, engine)
    wechat.codes["c1"] = {"openid": "o-li"}
    assert login_client.post(
        "/v1/member/session", json={"provider": "wechat", "app_id": APP_ID, "code": "c1"}
    ).is_success
    r = login_client.post(
        "/v1/member/session", json={"provider": "wechat", "app_id": APP_ID, "code": "c1"}
    )
    assert r.status_code == 401


def test_an_unknown_app_id_is_refused(login_client, engine, wechat):
    r = login_client.post(
        "/v1/member/session", json={"provider": "wechat", "app_id": "wxunknown00", "code": "c"}
    )
    assert r.status_code == 401 and r.json()["errors"][0]["path"] == "app_id"
    assert wechat.requests == []


def test_an_app_id_belongs_to_one_tenant(login_client, engine):
    _register(login_client, engine)
    _, other = new_tenant(engine, "other")
    r = login_client.put(
        "/v1/wechat-app", json={"app_id": APP_ID, "app_secret": "x" * 10}, headers=other
    )
    assert r.status_code == 409


def test_dev_login_only_where_enabled(engine, clock):
    url = engine.url.render_as_string(hide_password=False)
    new_tenant(engine, "demo")
    body = {"provider": "dev", "tenant": "demo", "openid": "o-dev", "nickname": "Dev"}
    off = Client(create_app(settings_for(url), engine=engine, clock=clock))  # env=test
    assert off.post("/v1/member/session", json=body).status_code == 403
    on_settings = settings_for(url).model_copy(update={"dev_login": True})
    on = Client(create_app(on_settings, engine=engine, clock=clock))
    r = on.post("/v1/member/session", json=body)
    assert r.status_code == 200 and r.json()["member"]["nickname"] == "Dev"
    r = on.post("/v1/member/session", json={**body, "tenant": "nobody"})
    assert r.status_code == 404 and r.json()["errors"][0]["path"] == "tenant"


def test_dev_login_is_refused_in_production():
    with pytest.raises(ValueError, match="DEV_LOGIN"):
        settings_for("sqlite://").model_validate(
            {"env": "production", "secret_key": "p" * 40, "dev_login": True}
        )
