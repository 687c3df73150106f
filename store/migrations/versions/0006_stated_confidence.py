"""predictions.stated_confidence: the confidence the model wrote, beside the one published

Revision ID: 0006
Revises: 0005
Create Date: 2026-11-30

`predictions.confidence` is what the system publishes and what rewards score: the stated
confidence passed through the serving adapter's confidence map (rewards/calibration.py, fitted on
its gate items), or the stated one itself when the adapter has no map. `stated_confidence` keeps
what the model actually wrote; NULL on rows written before this column existed (they published
the stated value) and on parse failures.
"""
import sqlalchemy as sa
from alembic import op

revision = '0006'
down_revision = '0005'
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.add_column('predictions', sa.Column('stated_confidence', sa.Float(), nullable=True))


def downgrade() -> None:
    # Native DROP COLUMN (PostgreSQL; SQLite >= 3.35): a batch table copy would trip over the views.
    op.execute('ALTER TABLE predictions DROP COLUMN stated_confidence')
