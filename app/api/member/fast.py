"""The member API's busiest commands straight from the ASGI server to the write path.

Joining a team, opening one and appending a solitaire line are the requests a viral
group-buy or a lunch rush multiplies. Through FastAPI each spent more of the service's CPU
on routing (a linear match over ~100 routes), resolving its dependencies and the exception
middleware than on checking the token and the body (an append: 577 µs of the service's CPU
per request, which bounded appends at ~1,700/s while the writer had room).

`MemberFastPath` answers only a request it can take whole: a `POST` to one of `ROUTES`, a
valid member token, a body (or none, where the route allows none) that its route's model
accepts, an `Idempotency-Key` within its limit. (A body sent as anything but JSON was
refused outside it, by `app.limits.BodyLimitMiddleware`.) Anything else, with the body it read,
goes on to FastAPI, whose route answers it as it always has (401, 422 at the JSON path…), so
there is one account of what is wrong with a request. What is answered here is what the
route answers: the same command built by the same functions, the same bytes, the same
problems for refusals (`app.api.submit.send_reply`).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from pydantic import BaseModel, ValidationError
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from app.api.member.groupbuy import TeamAction, team_data
from app.api.solitaire import LineIn, line_data
from app.api.submit import IDEMPOTENCY_KEY_MAX, dispatch, member_command, read_body, send_reply
from app.events.dispatch import Inbound, Reply
from app.security import read_member_token
from app.tenancy.service import KEY_PREFIX


@dataclass(frozen=True)
class Route:
    """`POST` to `path` (segments; None is a path parameter) is the command `kind`, its data
    built by `data(parameters, body)` as the FastAPI route builds it."""

    path: tuple[str | None, ...]
    kind: str
    body: type[BaseModel]
    body_required: bool
    data: Callable[[list[str], Any], dict[str, Any]]

    def parameters(self, segments: list[str]) -> list[str] | None:
        if len(segments) != len(self.path):
            return None
        found = []
        for want, got in zip(self.path, segments, strict=True):
            if want is None:
                if not got:
                    return None
                found.append(got)
            elif want != got:
                return None
        return found


ROUTES = (
    Route(
        ("v1", "member", "solitaire", None, "lines"),
        "solitaire.append",
        LineIn,
        True,
        lambda p, body: line_data(p[0], body),
    ),
    Route(
        ("v1", "member", "teams", None, "join"),
        "groupbuy.join",
        TeamAction,
        False,
        lambda p, body: team_data({"team": p[0]}, body),
    ),
    Route(
        ("v1", "member", "groupbuy", None, None, "teams"),
        "groupbuy.open",
        TeamAction,
        False,
        lambda p, body: team_data({"funnel": p[0], "campaign": p[1]}, body),
    ),
)
_PREFIX = "/v1/member/"


class MemberFastPath:
    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        path: str = scope.get("path", "")
        if scope["type"] != "http" or scope["method"] != "POST" or not path.startswith(_PREFIX):
            await self.app(scope, receive, send)
            return
        segments = path[1:].split("/")
        for route in ROUTES:
            parameters = route.parameters(segments)
            if parameters is not None:
                break
        else:
            await self.app(scope, receive, send)
            return
        body = await read_body(receive)
        item = _command(scope, route, parameters, body)
        if item is None:  # FastAPI's route answers it, with the body already read
            await self.app(scope, _replay(body, receive), send)
            return
        await send_reply(send, path, _submit(scope["app"].state, item))


async def _submit(state: Any, item: Inbound) -> Reply:
    state.rate_limiter.check(item.tenant_id)  # as the route does, once the request is valid
    return await dispatch(state, item)


def _command(scope: Scope, route: Route, parameters: list[str], body: bytes) -> Inbound | None:
    """The route's command, or None when FastAPI should answer the request."""
    headers: dict[bytes, bytes] = {}
    for name, value in scope["headers"]:
        headers.setdefault(name, value)
    scheme, _, token = headers.get(b"authorization", b"").decode("latin-1").partition(" ")
    token = token.strip()
    if scheme.lower() != "bearer" or not token or token.startswith(f"{KEY_PREFIX}_"):
        return None
    key = headers.get(b"idempotency-key")
    if key is not None and len(key.decode("latin-1")) > IDEMPOTENCY_KEY_MAX:
        return None
    if body:
        try:
            model: Any = route.body.model_validate_json(body)
        except ValidationError:
            return None
    elif route.body_required:
        return None
    else:
        model = None
    state = scope["app"].state
    claims = read_member_token(state.settings.secret_key, token, state.clock.now())
    if claims is None:
        return None
    data = route.data(parameters, model)
    return member_command(claims, route.kind, data, key.decode("latin-1") if key else None)


def _replay(body: bytes, receive: Receive) -> Receive:
    """`receive`, with the body this middleware read handed over first."""
    pending = True

    async def replayed() -> Message:
        nonlocal pending
        if pending:
            pending = False
            return {"type": "http.request", "body": body, "more_body": False}
        return await receive()

    return replayed
