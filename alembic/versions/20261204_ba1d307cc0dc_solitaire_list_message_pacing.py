"""solitaire list message pacing

While a list is open its group message is queued at most once per second: `announced_at`
is when it last was, `announce_due` when a change paced since then is to be announced (the
sweep finds it by this index). Existing lists start with neither: their next change is
announced at once.

Revision ID: ba1d307cc0dc
Revises: 67ee9d02fab1
Create Date: 2026-12-04 18:55:11.017384
"""
from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

import app.db_types

revision: str = 'ba1d307cc0dc'
down_revision: str | None = '67ee9d02fab1'
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    with op.batch_alter_table('solitaire_list', schema=None) as batch_op:
        batch_op.add_column(sa.Column('announced_at', app.db_types.UTCDateTime(), nullable=True))
        batch_op.add_column(sa.Column('announce_due', app.db_types.UTCDateTime(), nullable=True))
        batch_op.create_index('ix_solitaire_list_announce_due', ['announce_due'], unique=False)


def downgrade() -> None:
    with op.batch_alter_table('solitaire_list', schema=None) as batch_op:
        batch_op.drop_index('ix_solitaire_list_announce_due')
        batch_op.drop_column('announce_due')
        batch_op.drop_column('announced_at')
