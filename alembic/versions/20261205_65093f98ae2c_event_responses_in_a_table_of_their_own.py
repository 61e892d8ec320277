"""event responses in a table of their own

A keyed event's stored response was a column of its row, written by an UPDATE once the
event was applied; on PostgreSQL that made a second version of every such row, with an entry
in each of the event table's indexes. It is a row of `event_response` now (see
app/events/models.py), and existing responses move there.

The column is dropped with ALTER TABLE … DROP COLUMN (SQLite 3.35+), not by copying the
table as Alembic's batch mode does: the copy would lose the event table's AUTOINCREMENT
(SQLAlchemy does not reflect it), and with it the promise that an id is never reused.

Revision ID: 65093f98ae2c
Revises: 02d088a72112
Create Date: 2026-12-05 04:02:42.790116
"""
import sqlite3
from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = '65093f98ae2c'
down_revision: str | None = '02d088a72112'
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    if op.get_bind().dialect.name == "sqlite" and sqlite3.sqlite_version_info < (3, 35):
        raise RuntimeError(
            f"SQLite {sqlite3.sqlite_version} cannot drop a column in place; 3.35 or newer "
            "is needed (Python's sqlite3 module is linked against the system's library)"
        )
    op.create_table(
        'event_response',
        sa.Column(
            'event_id',
            sa.BigInteger().with_variant(sa.Integer(), 'sqlite'),
            autoincrement=False,
            nullable=False,
        ),
        sa.Column('response', sa.Text(), nullable=False),
        sa.PrimaryKeyConstraint('event_id', name=op.f('pk_event_response')),
    )
    op.execute(
        "INSERT INTO event_response (event_id, response) "
        "SELECT id, response FROM event WHERE response IS NOT NULL"
    )
    op.drop_column('event', 'response')


def downgrade() -> None:
    op.add_column('event', sa.Column('response', sa.Text(), nullable=True))
    op.execute(
        "UPDATE event SET response = (SELECT response FROM event_response r "
        "WHERE r.event_id = event.id)"
    )
    op.drop_table('event_response')
