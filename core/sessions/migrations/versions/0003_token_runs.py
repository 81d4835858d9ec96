"""Token-merging runs of the Tokens panel: model, method, options, figures, images of the views.

Revision ID: 0003
Revises: 0002
Create Date: 2025-12-01
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "token_runs",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("session_id", sa.Integer(), nullable=False),
        sa.Column("created_at", sa.DateTime(), nullable=False),
        sa.Column("model_path", sa.Text(), nullable=False),
        sa.Column("model_name", sa.Text(), nullable=False),
        sa.Column("method", sa.Text(), nullable=False),
        sa.Column("options", sa.Text(), nullable=False),
        sa.Column("figures", sa.Text(), nullable=False),
        sa.Column("images", sa.Text(), nullable=False),
        sa.Column("label", sa.Text(), nullable=True),
        sa.PrimaryKeyConstraint("id", name="pk_token_runs"),
        sa.ForeignKeyConstraint(
            ["session_id"], ["sessions.id"], name="fk_token_runs_session_id_sessions", ondelete="CASCADE"
        ),
    )
    op.create_index("ix_token_runs_session_id", "token_runs", ["session_id"])


def downgrade() -> None:
    op.drop_index("ix_token_runs_session_id", table_name="token_runs")
    op.drop_table("token_runs")
