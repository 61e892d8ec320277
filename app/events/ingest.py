"""Before the write path: verify a webhook's signature, parse and validate its body.

Signatures follow Standard Webhooks. The HMAC itself comes from the `standardwebhooks`
package (`Webhook.sign`); the header parsing and the timestamp check are done here because
the package's `verify` reads the wall clock (Flywheel's services take their clock as a
dependency, so tests and replays can set it), raises on a malformed signature list instead
of reporting it, and does not say which header was at fault.
"""

from __future__ import annotations

import base64
import binascii
import functools
import hashlib
import hmac
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

import orjson
from pydantic import ValidationError
from standardwebhooks.webhooks import Webhook

from app.db_types import nul_at
from app.engine.catalogue import BUILTIN_EVENTS
from app.engine.paths import pydantic_loc_to_path, suggest
from app.errors import DomainError, FieldProblem, Unauthorized
from app.events.schemas import INBOUND_COMMANDS, INBOUND_DATA, INTERNAL_EVENTS, InboundEvent

SIGNATURE_HEADERS = ("webhook-id", "webhook-timestamp", "webhook-signature")
MAX_ID_LENGTH = 200


class InvalidEvent(DomainError):
    status, code, title = 422, "invalid_event", "Invalid event"


@dataclass(frozen=True)
class ParsedEvent:
    type: str
    member: dict[str, Any]  # MemberRef fields that were given
    occurred_at: datetime | None
    data: dict[str, Any]
    digest: str  # SHA-256 of the raw body: a repeated id must carry the same body


# ── signatures ────────────────────────────────────────────────────────────────────────────
def _unauthorized(header: str, message: str) -> Unauthorized:
    return Unauthorized(
        f"{header}: {message}; nothing was stored",
        errors=[FieldProblem(f"header:{header}", message)],
    )


def verify_signature(
    secrets: Sequence[str],
    headers: Mapping[str, str],
    body: bytes,
    now: datetime,
    tolerance: timedelta = timedelta(minutes=5),
) -> str:
    """Check a Standard Webhooks signature against any of `secrets` (more than one during a
    rotation); return the webhook-id. Every failure names the header at fault."""
    values = {h: headers.get(h, "").strip() for h in SIGNATURE_HEADERS}
    for header, value in values.items():
        if not value:
            raise _unauthorized(header, "missing")
    msg_id, raw_ts, raw_sigs = (
        values["webhook-id"],
        values["webhook-timestamp"],
        values["webhook-signature"],
    )
    if len(msg_id) > MAX_ID_LENGTH:
        raise _unauthorized("webhook-id", f"longer than {MAX_ID_LENGTH} characters")
    try:
        timestamp = datetime.fromtimestamp(int(raw_ts), tz=UTC)
    except (ValueError, OverflowError, OSError):
        raise _unauthorized("webhook-timestamp", "not an integer of Unix seconds") from None
    if timestamp < now - tolerance:
        raise _unauthorized("webhook-timestamp", f"older than {_secs(tolerance)} (replay window)")
    if timestamp > now + tolerance:
        raise _unauthorized("webhook-timestamp", f"more than {_secs(tolerance)} in the future")
    presented = []
    for item in raw_sigs.split():
        version, _, sig = item.partition(",")
        if version != "v1" or not sig:
            continue  # other schemes (v1a: asymmetric) are not used by Flywheel
        try:
            presented.append(base64.b64decode(sig, validate=True))
        except (binascii.Error, ValueError):
            continue
    if not presented:
        raise _unauthorized("webhook-signature", 'no "v1,<base64>" signature')
    try:
        text = body.decode()
    except UnicodeDecodeError:
        raise _unauthorized("webhook-signature", "the body is not UTF-8") from None
    for secret in secrets:
        expected = base64.b64decode(_signer(secret).sign(msg_id, timestamp, text)[3:])
        # compare_digest against every presented signature: no early exit on a match length
        if any(hmac.compare_digest(expected, sig) for sig in presented):
            return msg_id
    raise _unauthorized("webhook-signature", "no signature matches this source's secret")


@functools.lru_cache(maxsize=1024)
def _signer(secret: str) -> Webhook:
    """One signer per secret: building one decodes the secret, on every request otherwise."""
    return Webhook(secret)


def _secs(d: timedelta) -> str:
    return f"{int(d.total_seconds())} s"


def sign(secret: str, msg_id: str, timestamp: datetime, body: bytes) -> str:
    """The `webhook-signature` value for one secret (outbound deliveries, tests, the bench)."""
    return _signer(secret).sign(msg_id, timestamp, body.decode())


def signed_headers(
    secrets: Sequence[str], msg_id: str, now: datetime, body: bytes
) -> dict[str, str]:
    """Standard Webhooks headers, signed with every secret given (space-separated), so a
    receiver holding either the new or the old secret verifies during a rotation."""
    return {
        "webhook-id": msg_id,
        "webhook-timestamp": str(int(now.timestamp())),
        "webhook-signature": " ".join(sign(s, msg_id, now, body) for s in secrets),
        "content-type": "application/json",
    }


# ── bodies ────────────────────────────────────────────────────────────────────────────────
def loads(body: bytes) -> Any:
    """Parse JSON; a syntax error is a 422 that says where, and so is a NUL character (JSON
    can only carry it escaped, so the walk runs only for bodies holding the escape)."""
    try:
        document = orjson.loads(body)
    except orjson.JSONDecodeError as exc:
        raise InvalidEvent(
            f"the body is not valid JSON: {exc.msg} at line {exc.lineno} column {exc.colno}",
            errors=[FieldProblem("", f"{exc.msg} (line {exc.lineno}, column {exc.colno})")],
        ) from None
    if b"\\u0000" in body:
        where = nul_at(document)
        if where is not None:
            raise InvalidEvent(
                "text may not contain the NUL character (U+0000)",
                errors=[FieldProblem(where, "contains U+0000")],
            )
    return document


def parse_event(body: bytes) -> ParsedEvent:
    """Validate the envelope and, for built-in types, the data. Custom types are checked by
    the dispatcher, which knows which funnels declare them."""
    document = loads(body)
    try:
        envelope = InboundEvent.model_validate(document)
    except ValidationError as exc:
        raise InvalidEvent(_summary(exc), errors=_problems(exc)) from None
    data = envelope.data
    schema = INBOUND_DATA.get(envelope.type) or INBOUND_COMMANDS.get(envelope.type)
    if schema is not None:
        try:
            data = schema.model_validate(data).model_dump(mode="json")
        except ValidationError as exc:
            raise InvalidEvent(_summary(exc, "data"), errors=_problems(exc, "data")) from None
    elif envelope.type in INTERNAL_EVENTS:
        raise InvalidEvent(
            f"{envelope.type} is emitted by Flywheel itself and is not accepted from integrations",
            errors=[FieldProblem("type", "emitted by Flywheel, not accepted inbound")],
        )
    return ParsedEvent(
        type=envelope.type,
        member=envelope.member.model_dump(exclude_none=True),
        occurred_at=envelope.occurred_at,
        data=data,
        digest=hashlib.sha256(body).hexdigest(),
    )


def unknown_type(event_type: str, custom: set[str]) -> InvalidEvent:
    hint = suggest(event_type, set(INBOUND_DATA) | set(INBOUND_COMMANDS) | custom)
    return InvalidEvent(
        f'unknown event type "{event_type}"{hint or "."} Built-in types are listed in the '
        "API docs; others must be declared in a funnel's custom_events.",
        errors=[FieldProblem("type", f'unknown event type "{event_type}"{hint}')],
    )


def _problems(exc: ValidationError, prefix: str = "") -> list[FieldProblem]:
    out = []
    for err in exc.errors():
        loc = ((prefix,) if prefix else ()) + tuple(err["loc"])
        out.append(FieldProblem(pydantic_loc_to_path(loc), err["msg"]))
    return out


def _summary(exc: ValidationError, prefix: str = "") -> str:
    problems = _problems(exc, prefix)
    return f"the event has {len(problems)} invalid field(s): " + "; ".join(
        str(p) for p in problems[:3]
    )


assert set(INBOUND_DATA) <= set(BUILTIN_EVENTS)
