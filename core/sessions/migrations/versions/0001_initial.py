"""Sessions, the models they used, recipe versions and merge runs.

Revision ID: 0001
Revises:
Create Date: 2025-12-01
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0001"
down_revision = None
branch_labels = None
depends_on = None

STATUS_CHECK = "status IN ('running', 'succeeded', 'failed', 'cancelled', 'interrupted')"


def _session_fk(table: str) -> sa.ForeignKeyConstraint:
    return sa.ForeignKeyConstraint(
        ["session_id"], ["sessions.id"], name=f"fk_{table}_session_id_sessions", ondelete="CASCADE"
    )


def upgrade() -> None:
    op.create_table(
        "sessions",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("name", sa.Text(), nullable=False),
        sa.Column("created_at", sa.DateTime(), nullable=False),
        sa.Column("updated_at", sa.DateTime(), nullable=False),
        sa.PrimaryKeyConstraint("id", name="pk_sessions"),
    )
    op.create_index("ix_sessions_updated_at", "sessions", ["updated_at"])

    op.create_table(
        "session_models",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("session_id", sa.Integer(), nullable=False),
        sa.Column("path", sa.Text(), nullable=False),
        sa.Column("name", sa.Text(), nullable=False),
        sa.Column("architecture", sa.Text(), nullable=True),
        sa.Column("header_hash", sa.Text(), nullable=True),
        sa.Column("added_at", sa.DateTime(), nullable=False),
        sa.Column("updated_at", sa.DateTime(), nullable=False),
        sa.PrimaryKeyConstraint("id", name="pk_session_models"),
        _session_fk("session_models"),
        sa.UniqueConstraint("session_id", "path", name="uq_session_models_session_id"),
    )
    op.create_index("ix_session_models_session_id", "session_models", ["session_id"])

    op.create_table(
        "recipe_versions",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("session_id", sa.Integer(), nullable=False),
        sa.Column("number", sa.Integer(), nullable=False),
        sa.Column("yaml_text", sa.Text(), nullable=False),
        sa.Column("method", sa.Text(), nullable=True),
        sa.Column("label", sa.Text(), nullable=True),
        sa.Column("created_at", sa.DateTime(), nullable=False),
        sa.PrimaryKeyConstraint("id", name="pk_recipe_versions"),
        _session_fk("recipe_versions"),
        sa.UniqueConstraint("session_id", "number", name="uq_recipe_versions_session_id"),
    )
    op.create_index("ix_recipe_versions_session_id", "recipe_versions", ["session_id"])

    op.create_table(
        "merge_runs",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("session_id", sa.Integer(), nullable=False),
        sa.Column("recipe_version_id", sa.Integer(), nullable=True),
        sa.Column("recipe_yaml", sa.Text(), nullable=False),
        sa.Column("method", sa.Text(), nullable=True),
        sa.Column("status", sa.Text(), nullable=False),
        sa.Column("started_at", sa.DateTime(), nullable=False),
        sa.Column("finished_at", sa.DateTime(), nullable=True),
        sa.Column("seconds", sa.Float(), nullable=True),
        sa.Column("output_path", sa.Text(), nullable=False),
        sa.Column("error", sa.Text(), nullable=True),
        sa.Column("settings", sa.Text(), nullable=False),
        sa.PrimaryKeyConstraint("id", name="pk_merge_runs"),
        _session_fk("merge_runs"),
        sa.ForeignKeyConstraint(
            ["recipe_version_id"],
            ["recipe_versions.id"],
            name="fk_merge_runs_recipe_version_id_recipe_versions",
            ondelete="SET NULL",
        ),
        sa.CheckConstraint(STATUS_CHECK, name="ck_merge_runs_status"),
    )
    op.create_index("ix_merge_runs_session_id", "merge_runs", ["session_id"])
    op.create_index("ix_merge_runs_recipe_version_id", "merge_runs", ["recipe_version_id"])
    op.create_index("ix_merge_runs_status", "merge_runs", ["status"])


def downgrade() -> None:
    op.drop_table("merge_runs")
    op.drop_table("recipe_versions")
    op.drop_table("session_models")
    op.drop_table("sessions")
