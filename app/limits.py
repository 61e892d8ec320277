"""Request limits: the body's size (Starlette sets none, so without this a client could stream
gigabytes) and its media type, and the per-tenant rate limit."""

from __future__ import annotations

import math
import time
from collections.abc import Callable

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from app.errors import BodyTooLarge, DomainError, TooManyRequests, UnsupportedMediaType
from app.problems import problem_of, send_raw

# API bodies are JSON. Webhooks are read raw (their signature covers the bytes, whatever
# the sender calls them) and the console posts forms.
_JSON_TYPES = (b"application/json", b"application/problem+json")
_RAW_BODIES = ("/v1/webhooks/",)


class BodyLimitMiddleware:
    """The limits on what a request may carry, before any route reads it: a body larger
    than `max_bytes` is a 413 (whether declared or streamed), and a body sent to the API as
    anything but JSON is a 415, instead of a validation error about missing fields."""

    def __init__(self, app: ASGIApp, max_bytes: int) -> None:
        self.app, self.max_bytes = app, max_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = dict(scope.get("headers", []))
        declared = headers.get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.max_bytes:
            await self._refuse(scope, send, self._too_large())
            return
        kind = headers.get(b"content-type")
        if kind is not None and not _is_json(kind) and _json_api(scope):
            await self._refuse(scope, send, _unsupported(kind))
            return
        seen = 0

        async def limited() -> Message:
            nonlocal seen
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > self.max_bytes:
                    raise _TooLarge
            return message

        try:
            await self.app(scope, limited, send)
        except _TooLarge:
            await self._refuse(scope, send, self._too_large())

    def _too_large(self) -> BodyTooLarge:
        return BodyTooLarge(f"request bodies are limited to {self.max_bytes} bytes")

    @staticmethod
    async def _refuse(scope: Scope, send: Send, problem: DomainError) -> None:
        await send_raw(send, *problem_of(problem, scope.get("path", "")))


def _is_json(kind: bytes) -> bool:
    media = kind.split(b";", 1)[0].strip().lower()
    return media in _JSON_TYPES or media.endswith(b"+json")


def _json_api(scope: Scope) -> bool:
    path: str = scope.get("path", "")
    return (
        scope.get("method") in ("POST", "PUT", "PATCH")
        and path.startswith("/v1/")
        and not path.startswith(_RAW_BODIES)
    )


def _unsupported(kind: bytes) -> UnsupportedMediaType:
    shown = kind.decode("latin-1")[:100]
    return UnsupportedMediaType(
        f"the API reads JSON bodies; send Content-Type: application/json (got {shown})"
    )


class _TooLarge(Exception):
    pass


class RateLimiter:
    """A token bucket per tenant, in this process's memory: `rate` requests a second on
    average, bursts up to `burst`. With several instances each has its own buckets (the
    README says so); quotas that matter (joins, rewards) are database invariants instead."""

    def __init__(
        self, rate: float, burst: int, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self.rate, self.burst, self.clock = rate, burst, clock
        self._buckets: dict[int, tuple[float, float]] = {}  # tenant -> (tokens, at)

    def check(self, tenant_id: int) -> None:
        """Take one token, or raise TooManyRequests with the seconds until one is back."""
        if self.rate <= 0:
            return
        now = self.clock()
        tokens, at = self._buckets.get(tenant_id, (float(self.burst), now))
        tokens = min(float(self.burst), tokens + (now - at) * self.rate)
        if tokens < 1:
            self._buckets[tenant_id] = (tokens, now)
            wait = math.ceil((1 - tokens) / self.rate)
            raise TooManyRequests(
                f"this tenant sends more than {self.rate:g} events a second; retry in {wait} s",
                retry_after=max(1, wait),
            )
        self._buckets[tenant_id] = (tokens - 1, now)
