"""The funnel definition language, as pydantic models.

`funnels/funnel.schema.json` is generated from `FunnelDefinition` (`flywheel schema`) and a
test keeps it in sync. Unknown keys are refused everywhere (`extra="forbid"`), so a typo in a key is
reported with its path instead of being ignored. Structural rules live here; rules that
need the whole document (references, reachability, guards) live in `compiler.py`.
"""

from __future__ import annotations

from datetime import datetime
from typing import Annotated, Any, Literal
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, model_validator

from app.engine.schedule import cron_is_valid, parse_duration, parse_local_time

STAGES: tuple[str, ...] = ("acquire", "activate", "retain", "revenue", "refer")
Stage = Literal["acquire", "activate", "retain", "revenue", "refer"]

MAX_STATES = 200
MAX_TRANSITIONS = 1000
MAX_ACTIONS = 20
MAX_EXPRESSION_CHARS = 1000
MAX_TEMPLATE_CHARS = 2000


def _duration(value: str) -> str:
    parse_duration(value)
    return value


def _local_time(value: str) -> str:
    parse_local_time(value)
    return value


def _cron(value: str) -> str:
    if not cron_is_valid(value):
        raise ValueError(f'"{value}" is not a five-field cron expression such as "30 10 * * 1-5"')
    return value


def _zone(value: str) -> str:
    try:
        ZoneInfo(value)
    except (ZoneInfoNotFoundError, ValueError) as exc:
        raise ValueError(f'"{value}" is not an IANA time zone such as Asia/Shanghai') from exc
    return value


Duration = Annotated[
    str,
    AfterValidator(_duration),
    Field(
        description="ISO 8601 duration in weeks, days, hours, minutes, seconds: P3D, PT15M",
        examples=["P3D", "PT15M"],
    ),
]
LocalTime = Annotated[
    str,
    AfterValidator(_local_time),
    Field(description="24-hour local time, HH:MM", examples=["10:30"]),
]
Cron = Annotated[
    str,
    AfterValidator(_cron),
    Field(
        description="Five-field cron expression, read in the funnel's time zone",
        examples=["30 10 * * 1-5"],
    ),
]
Name = Annotated[str, Field(pattern=r"^[a-z][a-z0-9_]{0,63}$", description="lower_snake_case name")]
Slug = Annotated[
    str, Field(pattern=r"^[a-z0-9][a-z0-9-]{0,62}$", description="lower-kebab-case key")
]
EventName = Annotated[
    str,
    Field(
        pattern=r"^[a-z][a-z0-9_]*(\.[a-z][a-z0-9_]*)+$",
        max_length=100,
        description="domain.past_tense event type, e.g. order.paid",
    ),
]
Expression = Annotated[
    str,
    Field(
        min_length=1,
        max_length=MAX_EXPRESSION_CHARS,
        description="CEL expression over event, member, funnel, state and now",
    ),
]
Template = Annotated[
    str,
    Field(
        min_length=1,
        max_length=MAX_TEMPLATE_CHARS,
        description="Message text; {{ member.nickname }} inserts a value",
    ),
]
Fen = Annotated[int, Field(ge=0, le=100_000_000, description="Money in integer fen (1/100 yuan)")]
Percent = Annotated[
    int, Field(ge=1, le=99, description="Percent of the full price paid: 75 = 7.5折")
]
MechanicRef = Annotated[
    str,
    Field(
        pattern=r"^(groupbuy|solitaire|referral|rewards)\.[a-z0-9][a-z0-9_-]{0,62}$",
        description="<kind>.<name> of a campaign in this funnel's mechanics section",
    ),
]


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, populate_by_name=True)


# ── actions ────────────────────────────────────────────────────────────────────────────────
class SendMessage(Strict):
    type: Literal["send_message"]
    template: Template
    to: Literal["member", "group"] = "member"


class Tag(Strict):
    type: Literal["tag", "untag"]
    tag: Annotated[str, Field(min_length=1, max_length=64)]


class GrantPoints(Strict):
    type: Literal["grant_points"]
    points: Annotated[int, Field(ge=-1_000_000, le=1_000_000)]
    reason: str | None = None


class IssueVoucher(Strict):
    type: Literal["issue_voucher"]
    voucher: Annotated[str, Field(min_length=1, max_length=100, description="voucher name")]
    value_fen: Fen | None = None
    discount_percent: Percent | None = None
    valid_for: Duration = "P7D"
    mechanic: MechanicRef | None = None


class CallMechanic(Strict):
    type: Literal["call_mechanic"]
    mechanic: MechanicRef
    operation: Annotated[str, Field(pattern=r"^[a-z][a-z0-9_]{0,63}$")]
    params: dict[str, Any] = {}


class ModerateMember(Strict):
    type: Literal["warn_member", "remove_member"]
    reason: Annotated[str, Field(min_length=1, max_length=500)]


class PayRedPacket(Strict):
    type: Literal["pay_red_packet"]
    amount_fen: Annotated[
        int, Field(ge=1, le=20_000, description="WeChat caps a red packet at 200 yuan")
    ]
    note: str | None = None


class CustomAction(Strict):
    type: Literal["custom"]
    name: Name
    payload: dict[str, Any] = {}


Action = Annotated[
    SendMessage
    | Tag
    | GrantPoints
    | IssueVoucher
    | CallMechanic
    | ModerateMember
    | PayRedPacket
    | CustomAction,
    Field(discriminator="type"),
]
Actions = Annotated[list[Action], Field(max_length=MAX_ACTIONS)]


# ── states and transitions ─────────────────────────────────────────────────────────────────
class State(Strict):
    stage: Stage
    final: bool = False
    description: str | None = None
    on_enter: Actions = []


class LocalWait(Strict):
    """Wait until a local time on allowed days: "10:30 on the next weekday"."""

    time: LocalTime
    days: (
        Literal["every_day", "weekdays", "weekends"]
        | Annotated[list[Annotated[int, Field(ge=1, le=7)]], Field(min_length=1, max_length=7)]
    ) = "every_day"


class Transition(Strict):
    """Fired by exactly one trigger: an event, a delay in the state, cron, or a local time."""

    from_: Annotated[
        Name | Annotated[list[Name], Field(min_length=1)],
        Field(alias="from", description="state (or states) the transition leaves"),
    ]
    to: Name
    event: EventName | None = None
    after: Duration | None = Field(
        default=None, description="fires this long after entering `from`"
    )
    cron: Cron | None = None
    at: LocalWait | None = None
    guard: Expression | None = None
    actions: Actions = []
    description: str | None = None

    @model_validator(mode="after")
    def _one_trigger(self) -> Transition:
        given = [k for k in ("event", "after", "cron", "at") if getattr(self, k) is not None]
        if len(given) != 1:
            raise ValueError(
                "needs exactly one trigger of event, after, cron or at"
                + (f" (has {', '.join(given)})" if given else "")
            )
        return self

    @property
    def sources(self) -> list[str]:
        return [self.from_] if isinstance(self.from_, str) else list(self.from_)

    @property
    def trigger(self) -> str:
        return "event" if self.event else "after" if self.after else "cron" if self.cron else "at"


class Reentry(Strict):
    mode: Literal["once", "once_per_campaign", "after_cooldown"] = "once"
    cooldown: Duration | None = Field(
        default=None, description="with after_cooldown: wait after exit"
    )
    max_entries: Annotated[int, Field(ge=1)] | None = None

    @model_validator(mode="after")
    def _cooldown(self) -> Reentry:
        if self.mode == "after_cooldown" and self.cooldown is None:
            raise ValueError("mode after_cooldown needs a cooldown such as P30D")
        if self.mode != "after_cooldown" and self.cooldown is not None:
            raise ValueError(f"cooldown only applies to mode after_cooldown, not {self.mode}")
        return self


class Entry(Strict):
    events: Annotated[list[EventName], Field(min_length=1)]
    guard: Expression | None = None
    reentry: Reentry = Reentry()


class Exit(Strict):
    event: EventName
    guard: Expression | None = None
    actions: Actions = []


class QuietHours(Strict):
    start: LocalTime
    end: LocalTime


class SendPolicy(Strict):
    quiet_hours: QuietHours | None = Field(
        default=None, description="message actions due in this window are held until it ends"
    )
    max_messages_per_day: Annotated[int, Field(ge=1, le=100)] | None = Field(
        default=None, description="per member per local day; messages beyond it are suppressed"
    )


class Migration(Strict):
    from_version: Annotated[int, Field(ge=1)]
    states: Annotated[dict[Name, Name], Field(min_length=1, description="old state → new state")]


class CustomEvent(Strict):
    name: EventName
    description: str | None = None


# ── mechanics (configuration only; behaviour arrives with each mechanic) ───────────────────
class Reward(Strict):
    points: Annotated[int, Field(ge=1, le=1_000_000)] | None = None
    voucher: IssueVoucher | None = None
    actions: Actions = []

    @model_validator(mode="after")
    def _something(self) -> Reward:
        if self.points is None and self.voucher is None and not self.actions:
            raise ValueError("a reward needs points, a voucher or actions")
        return self


class PriceTier(Strict):
    min_size: Annotated[int, Field(ge=2, le=200)]
    price_fen: Fen


class GroupBuy(Strict):
    product: Annotated[str, Field(min_length=1, max_length=200)]
    team_size: Annotated[int, Field(ge=2, le=50)]
    price_fen: Fen | None = None
    discount_percent: Percent | None = None
    leader_price_fen: Fen | None = None
    starts_at: datetime | None = None
    ends_at: datetime | None = None
    team_ttl: Duration = "PT24H"
    join_mode: Literal["free", "pay"] = "free"
    payment_window: Duration = "PT15M"
    on_late_payment: Literal["refund", "new_team"] = Field(
        "refund",
        description="a payment for a seat that is gone (released, team full or closed): "
        "refund it, or open a new team with the payer as leader",
    )
    max_teams_led_per_member: Annotated[int, Field(ge=1)] | None = None
    max_teams_joined_per_member: Annotated[int, Field(ge=1)] | None = None
    stock_teams: Annotated[int, Field(ge=1)] | None = None
    stock_seats: Annotated[int, Field(ge=1)] | None = None
    max_open_teams: Annotated[int, Field(ge=1)] | None = None
    on_short: Literal["fail", "auto_complete"] = "fail"
    auto_complete_max_missing: Annotated[int, Field(ge=1)] | None = None
    new_customers_only: bool = False
    tiers: list[PriceTier] = []
    max_size: Annotated[int, Field(ge=2, le=200)] | None = None
    voucher: IssueVoucher | None = None

    @model_validator(mode="after")
    def _consistent(self) -> GroupBuy:
        if (self.price_fen is None) == (self.discount_percent is None):
            raise ValueError("set exactly one of price_fen or discount_percent")
        if self.starts_at and self.ends_at and self.ends_at <= self.starts_at:
            raise ValueError("ends_at must be after starts_at")
        if self.on_short == "auto_complete":
            k = self.auto_complete_max_missing
            if k is None or k >= self.team_size:
                raise ValueError("auto_complete needs auto_complete_max_missing below team_size")
        sizes = [t.min_size for t in self.tiers]
        if sizes != sorted(set(sizes)):
            raise ValueError("tiers must have strictly increasing min_size")
        if self.tiers:
            if self.max_size is None or self.max_size < sizes[-1]:
                raise ValueError("tiered teams need max_size at least the last tier's min_size")
            prices = [t.price_fen for t in self.tiers]
            if prices != sorted(prices, reverse=True):
                raise ValueError("tier prices must not rise as the team grows")
        return self


class SolitaireItem(Strict):
    sku: Annotated[str, Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9_-]{0,63}$")]
    name: Annotated[str, Field(min_length=1, max_length=100)]
    price_fen: Fen
    stock: Annotated[int, Field(ge=0)] | None = None
    max_per_member: Annotated[int, Field(ge=1)] | None = None
    min_to_make: Annotated[int, Field(ge=1)] | None = None


class Solitaire(Strict):
    title: Annotated[str, Field(min_length=1, max_length=200)]
    note: str | None = None
    roster: bool = False
    items: list[SolitaireItem] = []
    opens: Cron | None = Field(default=None, description="schedule that opens a new list")
    groups: list[Annotated[str, Field(min_length=1, max_length=128)]] = Field(
        default=[], description="the chat groups (opengid) a scheduled list opens in, one each"
    )
    open_for: Duration = "PT30M"
    join_until: Duration | None = Field(
        default=None, description="new lines stop this long after opening"
    )
    max_lines_per_member: Annotated[int, Field(ge=1)] | None = None
    min_total_fen: Fen | None = None
    pickup_points: list[str] = []
    ask_address: bool = False
    early_orders: Annotated[int, Field(ge=1)] | None = Field(
        default=None, description="the first N orders earn early_reward"
    )
    early_reward: Reward | None = None

    @model_validator(mode="after")
    def _consistent(self) -> Solitaire:
        if self.roster and self.items:
            raise ValueError("a roster list has no items")
        if not self.roster and not self.items:
            raise ValueError("an ordering list needs items (or roster: true)")
        skus = [i.sku for i in self.items]
        if len(skus) != len(set(skus)):
            raise ValueError("item skus must be unique")
        if self.join_until and parse_duration(self.join_until) > parse_duration(self.open_for):
            raise ValueError("join_until must not be later than open_for")
        if (self.early_orders is None) != (self.early_reward is None):
            raise ValueError("early_orders and early_reward go together")
        if self.opens and not self.groups:
            raise ValueError("a scheduled list (opens) needs the groups it opens in")
        return self


class ReferralTier(Strict):
    invites: Annotated[int, Field(ge=1)]
    reward: Reward


class Referral(Strict):
    qualify_event: EventName = "member.joined"
    min_order_fen: Fen | None = None
    qualify_within: Duration = "P30D"
    attribution: Literal["first_touch", "last_touch"] = "first_touch"
    attribution_window: Duration = "P7D"
    first_time_customers_only: bool = False
    inviter_reward: Reward | None = None
    invitee_reward: Reward | None = None
    tiers: list[ReferralTier] = []
    max_rewards_per_inviter_per_day: Annotated[int, Field(ge=1)] | None = None
    max_rewards_per_inviter: Annotated[int, Field(ge=1)] | None = None
    hold: Duration = Field(
        "P7D",
        description="rewards stay pending this long (the refund window), then are paid",
    )
    burst_per_hour: Annotated[int, Field(ge=1)] | None = Field(
        20, description="more acceptances of one code within an hour flag its rewards"
    )
    review_auto_approve_after: Duration | None = Field(
        None,
        description="a flagged reward nobody reviewed is approved this long after its hold "
        "(unset: it waits for a review)",
    )
    depth: Annotated[
        int,
        Field(
            ge=1,
            le=2,
            description=(
                "levels rewarded up the chain; above 2 is refused: 3+ levels with 30+ people "
                "is pyramid selling under Chinese law"
            ),
        ),
    ] = 1


class Prize(Strict):
    name: Annotated[str, Field(pattern=r"^[a-z0-9][a-z0-9_-]{0,62}$")]
    odds_ppm: Annotated[
        int,
        Field(ge=1, le=1_000_000, description="chance per draw in parts per million: 50000 = 5%"),
    ]
    stock: Annotated[int, Field(ge=0)] | None = Field(
        default=None, description="prizes in all; a prize out of stock is not won (None: no cap)"
    )
    reward: Reward


class RewardCampaign(Strict):
    kind: Literal[
        "check_in",
        "card_drop",
        "review_for_card",
        "points_exchange",
        "lottery",
        "milestone",
        "monthly_top",
    ]
    title: Annotated[str, Field(min_length=1, max_length=200)]
    starts_at: datetime | None = None
    ends_at: datetime | None = None
    daily_limit: Annotated[int, Field(ge=1)] | None = Field(
        default=None, description="claims per day across all members (card drops, lottery)"
    )
    per_member_daily_limit: Annotated[int, Field(ge=1)] | None = None
    drop_at: LocalTime | None = Field(
        default=None, description="card drops: the local time each day's supply opens"
    )
    drop_for: Duration = Field(default="PT2H", description="card drops: how long a drop lasts")
    card: str | None = None
    cards_for_reward: Annotated[int, Field(ge=1)] | None = None
    min_photos: Annotated[int, Field(ge=0, le=50)] = Field(
        default=0, description="review_for_card: photos a review needs"
    )
    streak_days: Annotated[int, Field(ge=1)] | None = None
    points_cost: Annotated[int, Field(ge=1)] | None = None
    prizes: Annotated[list[Prize], Field(max_length=50)] = []
    on: Literal["member_joined", "group_size", "birthday", "holiday"] | None = Field(
        default=None, description="milestone: what it celebrates"
    )
    sizes: Annotated[list[Annotated[int, Field(ge=2)]], Field(max_length=20)] = Field(
        default=[], description="milestone on group_size: member counts (100, 1000)"
    )
    dates: Annotated[
        list[Annotated[str, Field(pattern=r"^(\d{4}-)?\d{2}-\d{2}$")]], Field(max_length=100)
    ] = Field(default=[], description="milestone on holiday: MM-DD every year, or YYYY-MM-DD")
    groups: Annotated[
        list[Annotated[str, Field(min_length=1, max_length=128)]], Field(max_length=500)
    ] = Field(default=[], description="milestone, monthly_top: the chat groups it runs in")
    top: Annotated[int, Field(ge=1, le=100)] = Field(
        default=3, description="monthly_top: how many of the most active members are rewarded"
    )
    at: LocalTime = Field(
        default="09:00", description="milestone (birthday, holiday), monthly_top: when it runs"
    )
    reward: Reward | None = None

    @model_validator(mode="after")
    def _consistent(self) -> RewardCampaign:
        if self.starts_at and self.ends_at and self.ends_at <= self.starts_at:
            raise ValueError("ends_at must be after starts_at")
        if self.kind in ("card_drop", "review_for_card") and not self.card:
            raise ValueError(f"{self.kind} needs the card it hands out")
        if self.kind == "card_drop" and not self.drop_at:
            raise ValueError("card_drop needs drop_at, the local time each day's drop opens")
        if self.kind == "points_exchange" and (self.points_cost is None or not self.reward):
            raise ValueError("points_exchange needs points_cost and the reward it buys")
        if self.kind == "lottery":
            if not self.prizes:
                raise ValueError("lottery needs prizes")
            if sum(p.odds_ppm for p in self.prizes) > 1_000_000:
                raise ValueError("the prizes' odds_ppm add up to more than 1,000,000 (100%)")
            if len({p.name for p in self.prizes}) != len(self.prizes):
                raise ValueError("two prizes share a name")
        if self.kind in ("milestone", "monthly_top") and (not self.reward or not self.groups):
            raise ValueError(f"{self.kind} needs groups and a reward")
        if self.kind == "milestone":
            if self.on is None:
                raise ValueError(
                    "milestone needs on: member_joined, group_size, birthday or holiday"
                )
            if self.on == "group_size" and not self.sizes:
                raise ValueError("a group_size milestone needs sizes")
            if self.on == "holiday" and not self.dates:
                raise ValueError("a holiday milestone needs dates")
            group_wide = self.on in ("group_size", "holiday")
            if group_wide and self.reward and (self.reward.points or self.reward.voucher):
                raise ValueError(
                    f"a {self.on} milestone rewards the whole group: its reward takes actions "
                    "(a pay_red_packet into the chat), not points or a voucher"
                )
        return self


class Pruning(Strict):
    """Clear inactive members (清理僵尸粉): warn first, remove after the grace if still
    inactive. Owners, admins and opinion leaders are never pruned."""

    groups: Annotated[
        list[Annotated[str, Field(min_length=1, max_length=128)]],
        Field(min_length=1, max_length=500),
    ]
    no_message_for: Duration | None = Field(
        default=None, description='"P7D": no message for a week (counted from joining)'
    )
    min_messages: Annotated[int, Field(ge=1, le=10_000)] | None = Field(
        default=None, description="fewer than this many messages `within` the window"
    )
    within: Duration = "P30D"
    warn_grace: Duration = Field(default="P2D", description="from the warning to the removal")
    at: LocalTime = Field(default="21:00", description="when the daily check runs")
    warning: Template = "你在群里很久没有发言了，如继续不活跃将被移出群聊。"
    reason: Annotated[str, Field(min_length=1, max_length=500)] = "inactive"

    @model_validator(mode="after")
    def _a_rule(self) -> Pruning:
        if self.no_message_for is None and self.min_messages is None:
            raise ValueError("a pruning policy needs no_message_for or min_messages")
        return self


CampaignName = Annotated[str, Field(pattern=r"^[a-z0-9][a-z0-9_-]{0,62}$")]


class Mechanics(Strict):
    groupbuy: dict[CampaignName, GroupBuy] = {}
    solitaire: dict[CampaignName, Solitaire] = {}
    referral: dict[CampaignName, Referral] = {}
    rewards: dict[CampaignName, RewardCampaign] = {}
    pruning: dict[CampaignName, Pruning] = {}

    def names(self) -> set[str]:
        return {
            f"{kind}.{name}"
            for kind in ("groupbuy", "solitaire", "referral", "rewards")
            for name in getattr(self, kind)
        }


# ── the document ───────────────────────────────────────────────────────────────────────────
class FunnelDefinition(Strict):
    """A funnel: states grouped by AARRR stage, transitions, timers, guards, actions, mechanics."""

    model_config = ConfigDict(
        extra="forbid",
        frozen=True,
        populate_by_name=True,
        json_schema_extra={"$id": "https://flywheel.example/funnel.schema.json"},
        title="Flywheel funnel",
    )

    schema_: str | None = Field(default=None, alias="$schema")
    key: Slug
    name: Annotated[str, Field(min_length=1, max_length=200)]
    description: str | None = None
    timezone: Annotated[str, AfterValidator(_zone)] = "Asia/Shanghai"
    campaign: Annotated[str, Field(min_length=1, max_length=100)] | None = Field(
        default=None, description="a new campaign id lets once_per_campaign members enter again"
    )
    custom_events: list[CustomEvent] = []
    entry: Entry
    exit: list[Exit] = []
    initial: Name
    states: Annotated[dict[Name, State], Field(min_length=1, max_length=MAX_STATES)]
    transitions: Annotated[list[Transition], Field(max_length=MAX_TRANSITIONS)] = []
    policy: SendPolicy = SendPolicy()
    mechanics: Mechanics = Mechanics()
    migrations: list[Migration] = []


def json_schema() -> dict[str, Any]:
    schema = FunnelDefinition.model_json_schema(by_alias=True, mode="validation")
    schema["$schema"] = "https://json-schema.org/draft/2020-12/schema"
    return schema
