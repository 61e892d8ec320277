"""Voucher commands in the write path: redeem at a till, void, expire (the sweep)."""

from __future__ import annotations

from app.mechanics.commands import Context, Effects, Emit
from app.mechanics.vouchers import service


def redeem(ctx: Context) -> Effects:
    """`voucher.redeem`: exactly once, however many tills try at the same moment."""
    code = service.normalize(str(ctx.data["code"]))
    till = str(ctx.data.get("till") or ctx.source)
    row = service.redeem(ctx.conn, ctx.tenant_id, code, ctx.now, by=till)
    data = {**service.event_data(row), "till": till, "order_id": ctx.data.get("order_id")}
    return Effects(
        row.member_id,
        {"outcome": "redeemed", "voucher": service.to_json(row, ctx.now)},
        [Emit(row.member_id, "voucher.redeemed", data)],
    )


def void(ctx: Context) -> Effects:
    code = service.normalize(str(ctx.data["code"]))
    row = service.void(ctx.conn, ctx.tenant_id, code, ctx.now)
    return Effects(
        row.member_id,
        {"outcome": "voided", "voucher": service.to_json(row, ctx.now)},
        [Emit(row.member_id, "voucher.voided", service.event_data(row))],
    )


def expire(ctx: Context) -> Effects:
    """The sweep found a voucher past its expiry (redeeming checks expiry itself, so a late
    sweep never lets an expired voucher through)."""
    row = service.expire(ctx.conn, int(ctx.data["voucher_id"]), ctx.now)
    if row is None:
        return Effects(None, {"outcome": "nothing_due"})
    return Effects(
        row.member_id,
        {"outcome": "expired", "voucher": service.to_json(row, ctx.now)},
        [Emit(row.member_id, "voucher.expired", service.event_data(row))],
    )
