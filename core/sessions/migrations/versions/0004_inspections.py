"""Compare and Inspect results: side-by-side generations, attention captures, token counts, weight diffs.

One table for every kind (``kind``: compare-text, compare-image, attention,
vision-attention, cross-attention, tokens, weights): the models compared, the
settings, the results as JSON, and the files written beside the database
(generated images, attention maps as .npz, plots).

Revision ID: 0004
Revises: 0003
Create Date: 2026-12-01
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0004"
down_revision = "0003"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "inspections",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("session_id", sa.Integer(), nullable=False),
        sa.Column("created_at", sa.DateTime(), nullable=False),
        sa.Column("kind", sa.Text(), nullable=False),
        sa.Column("models", sa.Text(), nullable=False),
        sa.Column("settings", sa.Text(), nullable=False),
        sa.Column("results", sa.Text(), nullable=False),
        sa.Column("files", sa.Text(), nullable=False),
        sa.Column("status", sa.Text(), nullable=False),
        sa.Column("label", sa.Text(), nullable=True),
        sa.PrimaryKeyConstraint("id", name="pk_inspections"),
        sa.ForeignKeyConstraint(
            ["session_id"], ["sessions.id"], name="fk_inspections_session_id_sessions", ondelete="CASCADE"
        ),
    )
    op.create_index("ix_inspections_session_id", "inspections", ["session_id"])


def downgrade() -> None:
    op.drop_index("ix_inspections_session_id", table_name="inspections")
    op.drop_table("inspections")
