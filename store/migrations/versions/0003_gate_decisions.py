"""gate_decisions: each promotion gate's paired comparison, decision, statistic and items

Revision ID: 0003
Revises: 0002
Create Date: 2026-11-30

One row per gate run on a candidate adapter: the serving side and the candidate ran on the same
(ticker, as_of) items drawn from the gate region of the timeline (market.split); the row keeps
those items, the paired reward differences' statistic (mean difference, bootstrap interval,
sign-test counts and p-value), the rule and level it was judged by, and the decision.
"""
import sqlalchemy as sa
from alembic import op

import store.models

revision = '0003'
down_revision = '0002'
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table('gate_decisions',
    sa.Column('id', sa.Integer(), nullable=False),
    sa.Column('candidate_version', sa.Integer(), nullable=False),
    sa.Column('serving_version', sa.Integer(), nullable=True),
    sa.Column('candidate_block_id', sa.Integer(), nullable=True),
    sa.Column('serving_block_id', sa.Integer(), nullable=True),
    sa.Column('decision', sa.String(length=16), nullable=False),
    sa.Column('passed', sa.Boolean(), nullable=False),
    sa.Column('rule', sa.String(length=64), nullable=False),
    sa.Column('level', sa.Float(), nullable=False),
    sa.Column('margin', sa.Float(), nullable=False),
    sa.Column('n_pairs', sa.Integer(), nullable=False),
    sa.Column('mean_diff', sa.Float(), nullable=True),
    sa.Column('ci_low', sa.Float(), nullable=True),
    sa.Column('ci_high', sa.Float(), nullable=True),
    sa.Column('p_value', sa.Float(), nullable=True),
    sa.Column('statistic', sa.JSON(), nullable=False),
    sa.Column('items', sa.JSON(), nullable=False),
    sa.Column('region', sa.JSON(), nullable=False),
    sa.Column('created_at', store.models.UTCDateTime(timezone=True), nullable=False),
    sa.ForeignKeyConstraint(['candidate_block_id'], ['blocks.id'], ondelete='SET NULL'),
    sa.ForeignKeyConstraint(['serving_block_id'], ['blocks.id'], ondelete='SET NULL'),
    sa.PrimaryKeyConstraint('id')
    )
    op.create_index('ix_gate_decisions_candidate', 'gate_decisions', ['candidate_version'], unique=False)


def downgrade() -> None:
    op.drop_index('ix_gate_decisions_candidate', table_name='gate_decisions')
    op.drop_table('gate_decisions')
