"""partial index for held group-buy seats

The payment sweep's index held every seat, on (status, hold_until); SQLite, without
statistics, chose it to read one team's active seats (all the active seats of every team,
each time a team succeeded). Now it holds only the seats waiting for their payment.

Revision ID: 02d088a72112
Revises: ba1d307cc0dc
Create Date: 2026-12-05 03:57:54.644599
"""
from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = '02d088a72112'
down_revision: str | None = 'ba1d307cc0dc'
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

HELD = sa.text("status = 'held'")


def upgrade() -> None:
    with op.batch_alter_table('groupbuy_seat', schema=None) as batch_op:
        batch_op.drop_index('ix_groupbuy_seat_hold')
        batch_op.create_index(
            'ix_groupbuy_seat_hold', ['hold_until'], sqlite_where=HELD, postgresql_where=HELD
        )


def downgrade() -> None:
    with op.batch_alter_table('groupbuy_seat', schema=None) as batch_op:
        batch_op.drop_index('ix_groupbuy_seat_hold', sqlite_where=HELD, postgresql_where=HELD)
        batch_op.create_index('ix_groupbuy_seat_hold', ['status', 'hold_until'])
