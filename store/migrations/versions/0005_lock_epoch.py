"""daemon_lock.epoch and lock_epochs: a fencing token for the daemon lock

Revision ID: 0005
Revises: 0004
Create Date: 2026-11-30

The lock was a wall-clock lease only: a holder paused (SIGSTOP, a swapped-out VM) or whose clock
jumped past the lease could be taken over and then go on writing. Each acquisition or take-over
now increments lock_epochs.epoch (a row that outlives the lock row, so a number never repeats)
and stamps it on daemon_lock; a fenced process checks its epoch in the same transaction as each
write (store.db.session_scope), so the stale holder's writes are refused.
"""
import sqlalchemy as sa
from alembic import op

revision = '0005'
down_revision = '0004'
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table('lock_epochs',
    sa.Column('name', sa.String(length=32), nullable=False),
    sa.Column('epoch', sa.Integer(), nullable=False),
    sa.PrimaryKeyConstraint('name')
    )
    op.add_column('daemon_lock', sa.Column('epoch', sa.Integer(), server_default='0', nullable=False))


def downgrade() -> None:
    # Native DROP COLUMN (PostgreSQL; SQLite >= 3.35): a batch table copy would trip over the views.
    op.execute('ALTER TABLE daemon_lock DROP COLUMN epoch')
    op.drop_table('lock_epochs')
