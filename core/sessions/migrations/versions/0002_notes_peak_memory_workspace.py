"""Notes per session, the peak memory of a run, the workspace state of a session.

Revision ID: 0002
Revises: 0001
Create Date: 2025-12-01
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "notes",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("session_id", sa.Integer(), nullable=False),
        sa.Column("text", sa.Text(), nullable=False),
        sa.Column("created_at", sa.DateTime(), nullable=False),
        sa.Column("updated_at", sa.DateTime(), nullable=False),
        sa.PrimaryKeyConstraint("id", name="pk_notes"),
        sa.ForeignKeyConstraint(
            ["session_id"], ["sessions.id"], name="fk_notes_session_id_sessions", ondelete="CASCADE"
        ),
    )
    op.create_index("ix_notes_session_id", "notes", ["session_id"])
    # Plain ALTER TABLE ADD COLUMN: no table rebuild (see the migrations package's docstring).
    op.add_column("merge_runs", sa.Column("peak_memory_bytes", sa.BigInteger(), nullable=True))
    op.add_column("sessions", sa.Column("workspace", sa.Text(), nullable=True))


def downgrade() -> None:
    # SQLite's own DROP COLUMN (3.35+): a batch rebuild of `sessions` would cascade-delete its children.
    op.execute("ALTER TABLE sessions DROP COLUMN workspace")
    op.execute("ALTER TABLE merge_runs DROP COLUMN peak_memory_bytes")
    op.drop_index("ix_notes_session_id", table_name="notes")
    op.drop_table("notes")
