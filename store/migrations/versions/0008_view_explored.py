"""v_predictions marks explored predictions (explored_direction, explored_tool)

Revision ID: 0008
Revises: 0007
Create Date: 2026-12-01

Train blocks explore by default (agent.explore_rate = 0.3): about three in ten of their directions are
drawn, not the model's. A user reading accuracy off v_predictions needs to tell them apart without a
join to episodes; the view now carries what was explored (NULL = the model's own choice).
"""
from alembic import op

from store.views import replace_view_sql

revision = '0008'
down_revision = '0007'
branch_labels = None
depends_on = None


def upgrade() -> None:
    for stmt in replace_view_sql("v_predictions", "0008"):
        op.execute(stmt)


def downgrade() -> None:
    for stmt in replace_view_sql("v_predictions", "0007"):
        op.execute(stmt)
