"""The events integrations send, one pydantic model each, and what ingestion answers.

Every inbound event is an envelope: `type`, the `member` it happened to, an optional
`occurred_at`, and a `data` object whose fields depend on the type. Guards see the data
fields directly (`event.amount_fen`), next to `event.type` and `event.id`.

Money is integer fen (`amount_fen`), never floats, as in funnel definitions. Data objects
accept fields beyond the documented ones (integrations add their own, guards may read them);
the documented fields are type-checked.
"""

from __future__ import annotations

from datetime import datetime
from typing import Any, Literal

from pydantic import AwareDatetime, BaseModel, ConfigDict, Field

from app.engine.catalogue import BUILTIN_EVENTS

# A payment's upper bound: ten billion yuan, far past any order and inside every integer the
# JSON encoder and both databases hold.
MAX_FEN = 10**12

Id = Field(min_length=1, max_length=128)


class _Data(BaseModel):
    model_config = ConfigDict(extra="allow")


class MemberRef(BaseModel):
    """Who the event happened to, in the integration's own ids. Unknown members are created;
    `nickname`, `unionid` and `attributes` (merged) update the member's profile."""

    model_config = ConfigDict(extra="forbid")

    id: str = Field(min_length=1, max_length=128, description="openid or the integration's id")
    nickname: str | None = Field(default=None, max_length=100)
    unionid: str | None = Field(default=None, max_length=128)
    attributes: dict[str, Any] | None = Field(
        default=None, description="merged into the member's attributes, which guards read"
    )


class MemberJoinedData(_Data):
    group_id: str | None = Field(default=None, max_length=128)
    channel: str | None = Field(default=None, max_length=64, description="poster, qr, invite…")
    inviter_id: str | None = Field(default=None, max_length=128)


class MemberLeftData(_Data):
    group_id: str | None = Field(default=None, max_length=128)
    reason: Literal["left", "removed"] = "left"


class JoinRequestedData(_Data):
    group_id: str = Id
    invite_code: str | None = Field(default=None, max_length=64)
    note: str | None = Field(default=None, max_length=500, description="the member's message")


class MemberScannedData(_Data):
    channel: str = Field(min_length=1, max_length=64)
    poster_id: str | None = Field(default=None, max_length=128)


class MessagePostedData(_Data):
    group_id: str = Id
    message_id: str = Id
    kind: Literal["text", "image", "video", "voice", "link", "mini_program", "other"] = "text"
    length: int = Field(default=0, ge=0, le=1_000_000, description="characters in a text message")
    text: str | None = Field(default=None, max_length=10_000, description="never logged")
    mentions: list[str] = Field(default_factory=list, max_length=100)
    url: str | None = Field(default=None, max_length=2000, description="a link message's URL")
    has_qr: bool = Field(default=False, description="the bot found a QR code in the image")


class CheckedInData(_Data):
    streak: int | None = Field(
        default=None, ge=0, le=100_000, description="consecutive days, if known"
    )
    location: str | None = Field(default=None, max_length=128)


class ReviewPostedData(_Data):
    review_id: str = Id
    order_id: str | None = Field(default=None, max_length=128, description="the order reviewed")
    rating: int = Field(ge=1, le=5)
    photos: int = Field(default=0, ge=0, le=50)
    length: int = Field(default=0, ge=0, le=1_000_000)


class OrderItem(BaseModel):
    model_config = ConfigDict(extra="allow")
    sku: str = Id
    quantity: int = Field(default=1, ge=1, le=10_000)


class OrderPlacedData(_Data):
    order_id: str = Id
    amount_fen: int = Field(ge=0, le=MAX_FEN, description="money in integer fen (1/100 yuan)")
    currency: str = Field(default="CNY", min_length=3, max_length=3)
    items: list[OrderItem] = Field(default_factory=list, max_length=500)
    channel: str | None = Field(default=None, max_length=64)


class OrderPaidData(OrderPlacedData):
    team_id: str | None = Field(default=None, max_length=128, description="group-buy team")


class OrderRefundedData(_Data):
    order_id: str = Id
    amount_fen: int = Field(ge=0, le=MAX_FEN, description="money in integer fen (1/100 yuan)")
    reason: str | None = Field(default=None, max_length=200)


class InviteAcceptedData(_Data):
    code: str = Field(min_length=1, max_length=64)
    inviter_id: str | None = Field(default=None, max_length=128)


class CardCollectedData(_Data):
    card: str = Field(min_length=1, max_length=64)
    via: str | None = Field(default=None, max_length=64, description="drop, review, check-in…")


class CustomData(_Data):
    """Any object: the funnel that declares the custom event says what its guards read."""


INBOUND_DATA: dict[str, type[_Data]] = {
    "member.joined": MemberJoinedData,
    "member.left": MemberLeftData,
    "member.join_requested": JoinRequestedData,
    "member.scanned": MemberScannedData,
    "message.posted": MessagePostedData,
    "member.checked_in": CheckedInData,
    "review.posted": ReviewPostedData,
    "order.placed": OrderPlacedData,
    "order.paid": OrderPaidData,
    "order.refunded": OrderRefundedData,
    "invite.accepted": InviteAcceptedData,
    "card.collected": CardCollectedData,
}


class Profile(BaseModel):
    """How the member appears to their team (nickname, avatar URL), as the mini-program
    supplies it; stored on the member."""

    model_config = ConfigDict(extra="forbid")
    nickname: str | None = Field(default=None, max_length=100)
    avatar: str | None = Field(default=None, max_length=1000, description="avatar image URL")


class GroupBuyOpenData(_Data):
    funnel: str = Field(min_length=1, max_length=64, description="the funnel's key")
    campaign: str = Field(min_length=1, max_length=64, description="mechanics.groupbuy name")
    profile: Profile | None = None


class GroupBuyTeamData(_Data):
    team: str = Field(min_length=1, max_length=40, description="the team's id (share token)")
    profile: Profile | None = None


# Commands: operations on a mechanic, applied by its handler (which emits the events funnels
# see). A merchant's backend may send them as webhooks; the member API sends the same ones.
INBOUND_COMMANDS: dict[str, type[_Data]] = {
    "groupbuy.open": GroupBuyOpenData,
    "groupbuy.join": GroupBuyTeamData,
    "groupbuy.leave": GroupBuyTeamData,
}
COMMAND_DOCS = {
    "groupbuy.open": "open a group-buy team with the member as its leader",
    "groupbuy.join": "the member joins a team (pay-to-join: holds a seat until paid)",
    "groupbuy.leave": "the member leaves an open team",
}

# Built-in types Flywheel emits itself (group-buy, vouchers, points…): not accepted inbound.
INTERNAL_EVENTS = frozenset(BUILTIN_EVENTS) - frozenset(INBOUND_DATA)
# What a member may report about themselves through the member API (never payments).
MEMBER_REPORTABLE = frozenset({"member.checked_in", "member.scanned", "invite.accepted"})


class InboundEvent(BaseModel):
    """The envelope every webhook body has."""

    model_config = ConfigDict(extra="forbid")

    type: str = Field(min_length=1, max_length=100, pattern=r"^[a-z][a-z0-9_]*(\.[a-z0-9_]+)+$")
    member: MemberRef
    occurred_at: AwareDatetime | None = Field(
        default=None, description="when it happened; defaults to when Flywheel received it"
    )
    data: dict[str, Any] = Field(default_factory=dict)


def envelope_model(event_type: str, data: type[_Data]) -> type[BaseModel]:
    """A per-type envelope, for the OpenAPI document."""
    from pydantic import create_model

    name = "".join(p.title() for p in event_type.replace("_", ".").split(".")) + "Event"
    fields: dict[str, Any] = {
        "type": (Literal[event_type], ...),
        "member": (MemberRef, ...),
        "occurred_at": (AwareDatetime | None, None),
        "data": (data, Field(default_factory=data)),
    }
    return create_model(
        name,
        __config__=ConfigDict(extra="forbid"),
        __doc__=BUILTIN_EVENTS.get(event_type) or COMMAND_DOCS.get(event_type, ""),
        **fields,
    )


INBOUND_MODELS: dict[str, type[BaseModel]] = {
    t: envelope_model(t, data) for t, data in (INBOUND_DATA | INBOUND_COMMANDS).items()
}


class CustomEvent(InboundEvent):
    """An event type a funnel declares in `custom_events`; `data` is any object."""


INBOUND_SCHEMA_NAMES = [*sorted(m.__name__ for m in INBOUND_MODELS.values()), "CustomEvent"]


def openapi_components() -> dict[str, Any]:
    """The inbound event schemas (and what they refer to), for the OpenAPI document."""
    out: dict[str, Any] = {}
    models: list[type[BaseModel]] = [*INBOUND_MODELS.values(), CustomEvent]
    for model in models:
        schema = model.model_json_schema(ref_template="#/components/schemas/{model}")
        out.update(schema.pop("$defs", {}))
        out[model.__name__] = schema
    return out


# ── responses ─────────────────────────────────────────────────────────────────────────────
class ActionOut(BaseModel):
    id: str = Field(description="delivery id (the outbound webhook-id), stable across retries")
    type: str
    params: dict[str, Any]
    disposition: Literal["send", "deferred", "suppressed"]
    deliver_at: datetime
    source: str


class FunnelOutcome(BaseModel):
    funnel: str
    version: int
    matched: bool
    reason: str
    from_state: str | None
    state: str | None
    stage: str | None
    status: str
    actions: list[ActionOut]
    timers: list[dict[str, Any]] = Field(description="timers armed: key and due_at")
    guard_errors: list[str] = Field(default_factory=list)


class EventAccepted(BaseModel):
    """What ingestion answers once the event is durable (and, replayed, to every repeat)."""

    event_id: int
    idempotency_key: str | None
    type: str
    member: dict[str, Any] = Field(description="id (Flywheel's) and external_id")
    funnels: list[FunnelOutcome]
