"""WeChat `code2Session`: a mini-program's `wx.login()` code, exchanged for the member's
openid (and unionid when the app is bound to an open platform account).

`GET {base}/sns/jscode2session?appid=…&secret=…&js_code=…&grant_type=authorization_code`
answers `{openid, session_key, unionid?}` or `{errcode, errmsg}`. The session_key is never
stored or returned: Flywheel issues its own member token instead.
"""

from __future__ import annotations

from dataclasses import dataclass

import httpx

from app.errors import DomainError, FieldProblem, TooManyRequests, Unauthorized

DEFAULT_BASE = "https://api.weixin.qq.com"
INVALID_CODE = {40029, 40163, 40226}  # invalid, already used, blocked user


class UpstreamError(DomainError):
    status, code, title = 502, "identity_provider_error", "Login provider failed"


@dataclass(frozen=True)
class Identity:
    openid: str
    unionid: str | None = None


async def code2session(
    client: httpx.AsyncClient, base: str, app_id: str, app_secret: str, code: str
) -> Identity:
    try:
        r = await client.get(
            f"{base.rstrip('/')}/sns/jscode2session",
            params={
                "appid": app_id,
                "secret": app_secret,
                "js_code": code,
                "grant_type": "authorization_code",
            },
        )
        data = r.json()
    except (httpx.HTTPError, ValueError) as exc:
        raise UpstreamError(
            f"WeChat did not answer the login exchange ({type(exc).__name__})"
        ) from None
    if not isinstance(data, dict):
        raise UpstreamError("WeChat answered the login exchange with something unexpected")
    errcode = int(data.get("errcode") or 0)
    if errcode in INVALID_CODE:
        raise Unauthorized(
            "the login code is invalid, expired or already used; call wx.login() again",
            errors=[FieldProblem("code", f"WeChat errcode {errcode}")],
        )
    if errcode == 45011:
        raise TooManyRequests("WeChat limits login exchanges for this member; retry shortly", 1)
    if errcode or not data.get("openid"):
        raise UpstreamError(f"WeChat refused the login exchange (errcode {errcode or 'none'})")
    return Identity(str(data["openid"]), data.get("unionid") or None)
