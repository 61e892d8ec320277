"""Which handler runs which command (see `app.mechanics.commands`)."""

from __future__ import annotations

from typing import Any

from app.mechanics.commands import Handler
from app.mechanics.community import daily
from app.mechanics.community import service as community
from app.mechanics.groupbuy import service as groupbuy
from app.mechanics.referral import service as referral
from app.mechanics.rewards import cards, exchange, lottery
from app.mechanics.solitaire import parse as solitaire_parse
from app.mechanics.solitaire import service as solitaire
from app.mechanics.vouchers import commands as vouchers

COMMANDS: dict[str, Handler] = {
    "groupbuy.open": groupbuy.open_team,
    "groupbuy.join": groupbuy.join,
    "groupbuy.leave": groupbuy.leave,
    "groupbuy.cancel": groupbuy.cancel,
    "groupbuy.deadline": groupbuy.deadline,
    "groupbuy.hold_expired": groupbuy.hold_expired,
    "solitaire.open": solitaire.announced(solitaire.open_list),
    "solitaire.open_due": solitaire.announced(solitaire.open_due),
    "solitaire.append": solitaire.announced(solitaire.append),
    "solitaire.change": solitaire.announced(solitaire.change),
    "solitaire.withdraw": solitaire.announced(solitaire.withdraw),
    "solitaire.close": solitaire.announced(solitaire.close),
    "solitaire.close_due": solitaire.announced(solitaire.close_due),
    "solitaire.finish": solitaire.announced(solitaire.finish),
    "solitaire.announce": solitaire.announce_due,
    "referral.mine": referral.my_referral,
    "referral.channel": referral.channel_code,
    "referral.review": referral.review,
    "referral.pay_due": referral.pay_due,
    "group.request": community.request_join,
    "group.decide": community.decide_join,
    "group.health": community.check_health,
    "moderation.reverse": community.reverse_decision,
    "community.broadcast": community.broadcast,
    "community.daily": daily.run_daily,
    "card.claim": cards.claim,
    "card.redeem": cards.redeem,
    "lottery.draw": lottery.draw,
    "points.exchange": exchange.exchange,
    "voucher.redeem": vouchers.redeem,
    "voucher.void": vouchers.void,
    "voucher.expire": vouchers.expire,
}


SOLITAIRE_REPLY = solitaire.announced(solitaire.reply)

# The row a command's writes queue on, named by a key of its data: every join of a team
# updates the team's row, every line of a list its sequence. The dispatcher sends the
# commands on one such row to the same writer, whose batch applies them one after another
# without waiting; spread over writers, each waited for the other's commit to release the
# row (solitaire appends on PostgreSQL spent a third of the run idle that way).
CONTENDED: dict[str, str] = {
    **dict.fromkeys(("groupbuy.join", "groupbuy.leave", "groupbuy.cancel"), "team"),
    **dict.fromkeys(
        (
            "solitaire.append",
            "solitaire.change",
            "solitaire.withdraw",
            "solitaire.close",
            "solitaire.finish",
        ),
        "list",
    ),
}


# Commands that apply in memory within a batch (`app.mechanics.commands.Run`, flushed before
# any event of another kind) and step no funnel: the batch reads no funnel instances for
# members who only send these.
RUN_COMMANDS = frozenset({"solitaire.append"})


def contended(event_type: str, data: dict[str, Any]) -> str | None:
    """The row `event_type` writes that others also queue on (see CONTENDED), or None."""
    key = CONTENDED.get(event_type)
    value = data.get(key) if key is not None else None
    return f"{key}:{value}" if value is not None else None


def command_for(event_type: str, data: dict[str, Any]) -> Handler | None:
    """The handler for a command, or for an event a mechanic takes over: an `order.paid`
    that carries a group-buy team confirms (or refunds) that team's seat; a group message
    that looks like a solitaire reply is appended to the group's open list; a join request
    is checked against the group's thresholds."""
    if event_type == "order.paid" and data.get("team_id"):
        return groupbuy.pay
    if event_type == "invite.accepted" and data.get("code"):
        return referral.accept
    if event_type == "member.join_requested":
        return community.request_join
    if event_type == "message.posted" and solitaire_parse.is_reply(str(data.get("text") or "")):
        return SOLITAIRE_REPLY
    return COMMANDS.get(event_type)
