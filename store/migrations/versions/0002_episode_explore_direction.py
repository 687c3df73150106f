"""episodes.explore_direction: the direction an exploration episode was told to take

Revision ID: 0002
Revises: 0001
Create Date: 2026-11-23

NULL for ordinary episodes. Set on a train-block episode chosen for direction exploration
(agent.explore_rate): its prediction's direction was constrained to this value while the model
wrote the rest, so the offline set holds both directions even when the model always says `up`.
"""
import sqlalchemy as sa
from alembic import op

revision = '0002'
down_revision = '0001'
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.add_column('episodes', sa.Column('explore_direction', sa.String(length=8), nullable=True))


def downgrade() -> None:
    # Native DROP COLUMN (PostgreSQL; SQLite >= 3.35): a batch table copy would trip over the views.
    op.execute('ALTER TABLE episodes DROP COLUMN explore_direction')
