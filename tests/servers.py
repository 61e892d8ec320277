"""Real local HTTP servers for tests: uvicorn on 127.0.0.1, a free port, in a thread."""

from __future__ import annotations

import hmac
import json
import threading
import time
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any
from urllib.parse import parse_qs

import orjson
import uvicorn
from standardwebhooks.webhooks import Webhook


class LocalServer:
    def __init__(self, app: Any) -> None:
        config = uvicorn.Config(app, host="127.0.0.1", port=0, log_level="warning", lifespan="off")
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, daemon=True)

    @property
    def base_url(self) -> str:
        port = self.server.servers[0].sockets[0].getsockname()[1]
        return f"http://127.0.0.1:{port}"

    def start(self) -> None:
        self.thread.start()
        deadline = time.monotonic() + 10
        while not self.server.started:
            assert time.monotonic() < deadline, "the local server did not start"
            time.sleep(0.01)

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(5)


async def read_body(receive: Any) -> bytes:
    body = b""
    while True:
        message = await receive()
        body += message.get("body", b"")
        if not message.get("more_body"):
            return body


class Receiver:
    """A second uvicorn server on 127.0.0.1 that verifies signatures and answers with
    `script` statuses first (then 200)."""

    def __init__(
        self, script: list[int] | None = None, refuse: Callable[[Any], bool] | None = None
    ) -> None:
        self.script = list(script or [])
        self.refuse = refuse  # answer 500 to every action this says yes to
        self.calls: list[dict[str, Any]] = []
        self.secrets: list[str] = []

        async def app(scope: Any, receive: Any, send: Any) -> None:
            if scope["type"] != "http":
                return
            body = await read_body(receive)
            headers = {k.decode(): v.decode() for k, v in scope["headers"]}
            status = self.script.pop(0) if self.script else 200
            if self.refuse is not None and self.refuse(json.loads(body)):
                status = 500
            self.calls.append(
                {
                    "headers": headers,
                    "raw": body,
                    "body": json.loads(body),
                    "valid": self.verify(headers, body),
                }
            )
            await send({"type": "http.response.start", "status": status, "headers": []})
            await send({"type": "http.response.body", "body": b""})

        self.server = LocalServer(app)

    def verify(self, headers: dict[str, str], body: bytes) -> bool:
        """Standard Webhooks verification with the secrets this receiver holds (the
        timestamp's freshness is the receiver's policy; tests move the service clock)."""
        ts = datetime.fromtimestamp(int(headers["webhook-timestamp"]), UTC)
        presented = [s.split(",", 1)[1] for s in headers["webhook-signature"].split()]
        for secret in self.secrets:
            expected = Webhook(secret).sign(headers["webhook-id"], ts, body.decode()).split(",")[1]
            if any(hmac.compare_digest(expected, p) for p in presented):
                return True
        return False

    @property
    def url(self) -> str:
        return f"{self.server.base_url}/actions"

    def __enter__(self) -> Receiver:
        self.server.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.stop()


APP_ID, APP_SECRET = "wx1234567890abcdef", "s3cret-app-secret"


class FakeWeChat:
    """`/sns/jscode2session` as WeChat answers it: codes map to openids; anything else is
    errcode 40029; a code is good once (then 40163)."""

    def __init__(self) -> None:
        self.codes: dict[str, dict[str, Any]] = {}
        self.used: set[str] = set()
        self.requests: list[dict[str, list[str]]] = []

        async def app(scope: Any, receive: Any, send: Any) -> None:
            if scope["type"] != "http":
                return
            query = parse_qs(scope["query_string"].decode())
            self.requests.append(query)
            code = query.get("js_code", [""])[0]
            good = query.get("appid") == [APP_ID] and query.get("secret") == [APP_SECRET]
            if code == "busy":
                answer: dict[str, Any] = {"errcode": -1, "errmsg": "system error"}
            elif code == "too-fast":
                answer = {"errcode": 45011, "errmsg": "api minute-quota reach limit"}
            elif not good or code not in self.codes:
                answer = {"errcode": 40029, "errmsg": "invalid code"}
            elif code in self.used:
                answer = {"errcode": 40163, "errmsg": "code been used"}
            else:
                self.used.add(code)
                answer = {**self.codes[code], "session_key": "never-leaves-flywheel"}
            body = orjson.dumps(answer)
            await send(
                {
                    "type": "http.response.start",
                    "status": 200,
                    "headers": [(b"content-type", b"text/plain")],  # as WeChat sends it
                }
            )
            await send({"type": "http.response.body", "body": body})

        self.server = LocalServer(app)
