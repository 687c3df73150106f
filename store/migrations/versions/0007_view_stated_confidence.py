"""v_predictions shows stated_confidence beside the published confidence

Revision ID: 0007
Revises: 0006
Create Date: 2026-11-30

Users comparing what the model wrote with what the confidence map published (rewards/calibration.py)
could only reach `stated_confidence` through the predictions table; the view now carries it.
"""
from alembic import op

from store.views import views_at

revision = '0007'
down_revision = '0006'
branch_labels = None
depends_on = None


def _replace_view(revision_sql: str) -> None:
    op.execute("DROP VIEW IF EXISTS v_predictions")  # no other view reads v_predictions
    op.execute(f"CREATE VIEW v_predictions AS {revision_sql}")


def upgrade() -> None:
    _replace_view(views_at("0007")["v_predictions"])


def downgrade() -> None:
    _replace_view(views_at("0006")["v_predictions"])
