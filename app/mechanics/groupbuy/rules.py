"""Group-buy rules, pure: no I/O, no clock. The service asks, then writes what they say.

Sizes: a plain team succeeds the moment it is full (`team_size` confirmed seats). A tiered
team (阶梯团) keeps taking members up to `max_size`, succeeds at once only when that is
reached, and otherwise is settled at its deadline at the price of the largest tier its size
reached. A team short at its deadline fails, or, with `on_short: auto_complete`, succeeds
with virtual seats (虚拟成团) when it lacks at most `auto_complete_max_missing` members.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime

from app.engine.definition import GroupBuy
from app.engine.schedule import parse_duration

# Why a join or an opening is refused (the problem's `code`, always with a 409).
CAMPAIGN_NOT_STARTED = "campaign_not_started"
CAMPAIGN_ENDED = "campaign_ended"
TEAM_FULL = "team_full"
TEAM_CLOSED = "team_closed"
TEAM_EXPIRED = "team_expired"
ALREADY_JOINED = "already_joined"
IN_ANOTHER_TEAM = "in_another_team"
LEAD_LIMIT = "lead_limit_reached"
JOIN_LIMIT = "join_limit_reached"
SOLD_OUT = "sold_out"
TOO_MANY_OPEN = "too_many_open_teams"
NEW_CUSTOMERS_ONLY = "new_customers_only"
NOT_IN_TEAM = "not_in_team"


def capacity(cfg: GroupBuy) -> int:
    return cfg.max_size if cfg.tiers and cfg.max_size else cfg.team_size


def team_deadline(cfg: GroupBuy, opened_at: datetime) -> datetime:
    """The team's time to live from its opening, never past the campaign's end."""
    due = opened_at + parse_duration(cfg.team_ttl)
    return min(due, cfg.ends_at) if cfg.ends_at else due


def hold_until(cfg: GroupBuy, now: datetime, deadline: datetime) -> datetime:
    """How long a pay-to-join seat waits for its payment (never past the team's deadline)."""
    return min(now + parse_duration(cfg.payment_window), deadline)


def window_refusal(cfg: GroupBuy, now: datetime) -> str | None:
    if cfg.starts_at and now < cfg.starts_at:
        return CAMPAIGN_NOT_STARTED
    if cfg.ends_at and now >= cfg.ends_at:
        return CAMPAIGN_ENDED
    return None


def seat_price(cfg: GroupBuy, role: str) -> int | None:
    """What a seat costs when it is taken. A tiered team may end cheaper: a paid seat is
    refunded the difference when the team settles."""
    if role == "leader" and cfg.leader_price_fen is not None:
        return cfg.leader_price_fen
    return cfg.price_fen


def tier_price(cfg: GroupBuy, members: int) -> int | None:
    """The price for a team of `members`: the largest tier reached, else the base price."""
    price = cfg.price_fen
    for tier in cfg.tiers:
        if members >= tier.min_size:
            price = tier.price_fen
    return price


@dataclass(frozen=True)
class Settlement:
    succeeded: bool
    virtual_seats: int = 0
    price_fen: int | None = None
    reason: str = ""


def settle_when_full(cfg: GroupBuy, confirmed: int) -> Settlement | None:
    """On each confirmed seat: does the team succeed now?"""
    if confirmed >= capacity(cfg):
        return Settlement(True, price_fen=tier_price(cfg, confirmed), reason="full")
    return None


def settle_at_deadline(cfg: GroupBuy, confirmed: int) -> Settlement:
    """The deadline passed with the team still open."""
    if confirmed >= cfg.team_size:
        return Settlement(True, price_fen=tier_price(cfg, confirmed), reason="deadline_tier")
    missing = cfg.team_size - confirmed
    k = cfg.auto_complete_max_missing or 0
    if cfg.on_short == "auto_complete" and confirmed >= 1 and missing <= k:
        return Settlement(
            True,
            virtual_seats=missing,
            price_fen=tier_price(cfg, cfg.team_size),
            reason="auto_completed",
        )
    return Settlement(False, reason="deadline_short")
