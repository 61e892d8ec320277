"""Every table module, imported once, so Alembic and the mappers see one metadata."""

from app.db import metadata
from app.events.models import EventLog, WebhookSource
from app.funnels.models import Funnel, FunnelInstance, FunnelVersion, StageHistory
from app.identity.models import WeChatApp
from app.mechanics.community.models import GroupMember
from app.mechanics.groupbuy.models import CampaignCounter, Seat, Team
from app.mechanics.referral.models import ReferralCode, ReferralLink, ReferralReward, RewardLedger
from app.mechanics.rewards.models import CheckIn, PointsBalance, PointsEntry
from app.mechanics.solitaire.models import SolitaireLine, SolitaireList, SolitaireStock
from app.mechanics.vouchers.models import Voucher
from app.members.models import Member
from app.outbox.models import ActionEndpoint, DeliveryAttempt, Outbox
from app.tenancy.models import ApiKey, Tenant
from app.timers.models import Timer

__all__ = [
    "ActionEndpoint",
    "ApiKey",
    "CampaignCounter",
    "CheckIn",
    "DeliveryAttempt",
    "EventLog",
    "Funnel",
    "FunnelInstance",
    "FunnelVersion",
    "GroupMember",
    "Member",
    "Outbox",
    "PointsBalance",
    "PointsEntry",
    "ReferralCode",
    "ReferralLink",
    "ReferralReward",
    "RewardLedger",
    "Seat",
    "SolitaireLine",
    "SolitaireList",
    "SolitaireStock",
    "StageHistory",
    "Team",
    "Tenant",
    "Timer",
    "Voucher",
    "WeChatApp",
    "WebhookSource",
    "metadata",
]
