"""v_predictions shows stated_confidence beside the published confidence

Revision ID: 0007
Revises: 0006
Create Date: 2026-11-30

Users comparing what the model wrote with what the confidence map published (rewards/calibration.py)
could only reach `stated_confidence` through the predictions table; the view now carries it.
"""
from alembic import op

from store.views import replace_view_sql

revision = '0007'
down_revision = '0006'
branch_labels = None
depends_on = None


def upgrade() -> None:
    for stmt in replace_view_sql("v_predictions", "0007"):
        op.execute(stmt)


def downgrade() -> None:
    for stmt in replace_view_sql("v_predictions", "0006"):
        op.execute(stmt)
