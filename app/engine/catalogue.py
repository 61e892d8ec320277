"""The built-in event types funnels react to. Funnels may declare more as `custom_events`.

Event ingestion validates each type's payload; here the names are what matters, so a
transition on `order.payed` is caught with a suggestion.
"""

from __future__ import annotations

BUILTIN_EVENTS: dict[str, str] = {
    "member.joined": "a member joined a group or added the merchant (carries the channel)",
    "member.left": "a member left or was removed from a group",
    "member.join_requested": "a member asked to join a group (checked against its thresholds)",
    "member.warned": "moderation warned a member (first hit: a sensitive word, an ad link…)",
    "member.removed": "moderation or pruning removed a member from a group",
    "member.scanned": "a member scanned a channel QR code or poster",
    "message.posted": "a member posted a message in a group",
    "member.checked_in": "a member checked in (签到/打卡)",
    "review.posted": "a member posted a review, with or without photos",
    "order.placed": "an order was placed (solitaire line, mini-program order)",
    "order.paid": "an order was paid",
    "order.refunded": "an order was refunded",
    "invite.accepted": "an invitee accepted a member's or a channel's invite code",
    "groupbuy.team_opened": "a member opened a group-buy team as its leader",
    "groupbuy.joined": "a member joined a group-buy team",
    "groupbuy.succeeded": "a group-buy team filled: every member gets the offer",
    "groupbuy.failed": "a group-buy team was short at its deadline",
    "groupbuy.cancelled": "a group-buy team was cancelled (by the merchant, or a lone leader left)",
    "groupbuy.left": "a member left an open group-buy team",
    "groupbuy.seat_released": "a pay-to-join seat was released: its payment window passed unpaid",
    "solitaire.opened": "a solitaire list opened",
    "solitaire.closed": "a solitaire list closed with the member's lines on it (carries sequence)",
    "solitaire.cancelled": "a solitaire list the member was on was cancelled",
    "voucher.issued": "a voucher was issued to a member",
    "voucher.redeemed": "a voucher was redeemed at checkout",
    "voucher.expired": "a voucher passed its expiry unredeemed",
    "voucher.voided": "the merchant voided a voucher",
    "card.collected": "a member collected a card (card drop, review for card)",
    "points.changed": "a member's points balance changed",
    "lottery.won": "a member's lottery draw won a prize",
    "referral.qualified": "an invitee qualified, so their inviter's reward is due",
}
