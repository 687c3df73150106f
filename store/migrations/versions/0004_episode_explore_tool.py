"""episodes.explore_tool: the research an exploration episode was given instead of the plan

Revision ID: 0004
Revises: 0003
Create Date: 2026-11-30

NULL for ordinary episodes (they run agent.research_plan). Set on a train-block episode chosen
for tool exploration (agent.explore_tool_rate): its research plan was this one tool, or `none`
(no planned call: the model chose), so scored data shows which research earns reward.
"""
import sqlalchemy as sa
from alembic import op

revision = '0004'
down_revision = '0003'
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.add_column('episodes', sa.Column('explore_tool', sa.String(length=32), nullable=True))


def downgrade() -> None:
    # Native DROP COLUMN (PostgreSQL; SQLite >= 3.35): a batch table copy would trip over the views.
    op.execute('ALTER TABLE episodes DROP COLUMN explore_tool')
