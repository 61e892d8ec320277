"""Every table module, imported once, so Alembic and the mappers see one metadata."""

from app.db import metadata
from app.funnels.models import Funnel, FunnelInstance, FunnelVersion, StageHistory
from app.members.models import Member
from app.tenancy.models import ApiKey, Tenant

__all__ = [
    "ApiKey",
    "Funnel",
    "FunnelInstance",
    "FunnelVersion",
    "Member",
    "StageHistory",
    "Tenant",
    "metadata",
]
