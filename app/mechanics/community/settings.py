"""What a merchant sets on a group: who may join, how it is moderated, how members' roles
are read from their activity, and the health floor. Every field has a default from the
seeds, so a group needs only a name."""

from __future__ import annotations

from typing import Annotated, Literal
from zoneinfo import ZoneInfo

from pydantic import AfterValidator, Field

from app.engine.definition import Duration, Strict, _zone
from app.mechanics.community.matcher import valid_pattern

GroupKind = Literal["product", "learning", "interest", "friends", "flash"]
ADVISED_CAPACITY = 100  # seed 000: 100-person groups are far easier to keep active than 500
MAX_CAPACITY = 500  # WeChat's own cap on a group
PROTECTED_ROLES = frozenset({"owner", "admin", "opinion_leader"})
Role = Literal["owner", "admin", "opinion_leader", "member"]


class EntryRules(Strict):
    """入群门槛: every threshold set must pass; then `approval` decides."""

    approval: Literal["auto", "owner"] = Field(
        default="auto", description="owner: each request that passes waits for the owner"
    )
    paid_sku: Annotated[str, Field(min_length=1, max_length=128)] | None = Field(
        default=None, description="paid entry: a paid, unrefunded order with this SKU"
    )
    invite_codes: Annotated[
        list[Annotated[str, Field(min_length=1, max_length=64)]], Field(max_length=1000)
    ] = Field(default=[], description="the request's invite_code must be one of these (any case)")
    min_level: Annotated[int, Field(ge=1, le=1000)] | None = Field(
        default=None, description="member.attributes.level at least this"
    )
    min_spend_fen: Annotated[int, Field(ge=1)] | None = Field(
        default=None, description="paid minus refunded, over the member's orders"
    )


class ModerationRules(Strict):
    """护群: the first hit warns, a second within `strike_window` removes."""

    enabled: bool = True
    strike_window: Duration = "P30D"
    links: Literal["off", "flag"] = Field(default="flag", description="links to other sites")
    allowed_domains: Annotated[
        tuple[Annotated[str, Field(min_length=1, max_length=253)], ...], Field(max_length=200)
    ] = ()
    qr_codes: Literal["off", "flag"] = Field(
        default="flag", description="images the bot reports as carrying a QR code (has_qr)"
    )
    mini_programs: Literal["off", "flag"] = Field(
        default="off", description="mini-program cards (another shop's ads)"
    )
    exempt_roles: tuple[Role, ...] = ("owner", "admin")
    warning: Annotated[str, Field(min_length=1, max_length=500)] = (
        "请遵守群规：你的消息违反了群规（{{ rule }}）。再次违反将被移出群聊。"
    )


class RoleRules(Strict):
    """How members are classified from their activity over `window` (first rule that holds):
    opinion leader (≥ opinion_leader_messages messages), sharer (≥ sharer_shares links or
    mini-program cards), seeker (≥ seeker_questions questions), else onlooker. A member with
    ≥ active_messages messages counts as highly active for the group's health."""

    window: Duration = "P30D"
    opinion_leader_messages: Annotated[int, Field(ge=1)] = 60
    sharer_shares: Annotated[int, Field(ge=1)] = 5
    seeker_questions: Annotated[int, Field(ge=1)] = 3
    active_messages: Annotated[int, Field(ge=1)] = 10


class HealthRules(Strict):
    """Seed 000's 20/80 rule: a healthy group keeps at least 20% highly active members."""

    active_floor_percent: Annotated[int, Field(ge=0, le=100)] = 20
    min_members: Annotated[int, Field(ge=1)] = Field(
        default=10, description="smaller groups are not judged"
    )


class GroupSettings(Strict):
    timezone: Annotated[str, AfterValidator(_zone)] = "Asia/Shanghai"
    entry: EntryRules = EntryRules()
    moderation: ModerationRules = ModerationRules()
    roles: RoleRules = RoleRules()
    health: HealthRules = HealthRules()

    @property
    def zone(self) -> ZoneInfo:
        return ZoneInfo(self.timezone)


class GroupIn(Strict):
    name: Annotated[str, Field(min_length=1, max_length=100)]
    kind: GroupKind = "product"
    purpose: Annotated[str, Field(max_length=500)] | None = None
    rules: Annotated[str, Field(max_length=2000)] | None = None
    welcome: Annotated[str, Field(min_length=1, max_length=2000)] | None = Field(
        default=None,
        description="pushed to each member who joins; {{ member.nickname }}, {{ group.name }}, "
        "{{ group.purpose }} and {{ group.rules }} are filled in",
    )
    capacity: Annotated[int, Field(ge=2, le=MAX_CAPACITY)] = ADVISED_CAPACITY
    settings: GroupSettings = GroupSettings()


def _pattern(value: str) -> str:
    why = valid_pattern(value)
    if why:
        raise ValueError(why)
    return value


class WordsIn(Strict):
    words: Annotated[
        tuple[Annotated[str, Field(min_length=1, max_length=200)], ...], Field(max_length=50_000)
    ] = ()
    patterns: Annotated[
        tuple[Annotated[str, Field(min_length=1, max_length=200), AfterValidator(_pattern)], ...],
        Field(max_length=200),
    ] = ()
