"""The sessions database as SQLAlchemy 2 typed ORM classes.

Imported lazily (by ``SessionStore.open`` and the migrations), never by
``import core.sessions``. The tables are created and changed only by the Alembic
revisions in ``core/sessions/migrations/versions``; ``tests/core/test_sessions.py``
checks that upgrading to ``HEAD`` gives exactly these tables. A schema change is
a new revision plus the matching change here (and ``HEAD``/``REVISIONS``).

Times are stored as naive UTC in SQLite and come back timezone-aware (UTC).
JSON fields (run settings, workspace state, token-run options, figures and
image paths) are stored as text; the store
encodes and decodes them itself so a bad value fails with a clear sentence.
"""

from __future__ import annotations

from datetime import datetime, timezone
from typing import Any, Optional

from sqlalchemy import BigInteger, CheckConstraint, DateTime, Float, ForeignKey, Integer, MetaData, Text
from sqlalchemy import UniqueConstraint
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column
from sqlalchemy.types import TypeDecorator

#: Every Alembic revision this code knows, oldest first; the last one is the head.
REVISIONS = ("0001", "0002", "0003", "0004")
HEAD = REVISIONS[-1]

NAMING = {
    "ix": "ix_%(table_name)s_%(column_0_name)s",
    "uq": "uq_%(table_name)s_%(column_0_name)s",
    "ck": "ck_%(table_name)s_%(constraint_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}

STATUS_CHECK = "status IN ('running', 'succeeded', 'failed', 'cancelled', 'interrupted')"


class UTCDateTime(TypeDecorator):
    """A timezone-aware UTC datetime, stored naive (SQLite has no time zones)."""

    impl = DateTime
    cache_ok = True

    def process_bind_param(self, value: Optional[datetime], dialect: Any) -> Optional[datetime]:
        if value is None:
            return None
        if value.tzinfo is None:
            raise ValueError("naive datetimes are not stored; give a timezone-aware one")
        return value.astimezone(timezone.utc).replace(tzinfo=None)

    def process_result_value(self, value: Optional[datetime], dialect: Any) -> Optional[datetime]:
        return None if value is None else value.replace(tzinfo=timezone.utc)


class Base(DeclarativeBase):
    metadata = MetaData(naming_convention=NAMING)


class SessionRow(Base):
    __tablename__ = "sessions"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    name: Mapped[str] = mapped_column(Text)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime)
    updated_at: Mapped[datetime] = mapped_column(UTCDateTime, index=True)
    # 0002; loaded only when asked for (it can be the largest field)
    workspace: Mapped[Optional[str]] = mapped_column(Text, deferred=True)


class ModelRow(Base):
    __tablename__ = "session_models"
    __table_args__ = (UniqueConstraint("session_id", "path"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    session_id: Mapped[int] = mapped_column(ForeignKey("sessions.id", ondelete="CASCADE"), index=True)
    path: Mapped[str] = mapped_column(Text)
    name: Mapped[str] = mapped_column(Text)
    architecture: Mapped[Optional[str]] = mapped_column(Text)
    header_hash: Mapped[Optional[str]] = mapped_column(Text)
    added_at: Mapped[datetime] = mapped_column(UTCDateTime)
    updated_at: Mapped[datetime] = mapped_column(UTCDateTime)


class RecipeVersionRow(Base):
    __tablename__ = "recipe_versions"
    __table_args__ = (UniqueConstraint("session_id", "number"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    session_id: Mapped[int] = mapped_column(ForeignKey("sessions.id", ondelete="CASCADE"), index=True)
    number: Mapped[int] = mapped_column(Integer)
    yaml_text: Mapped[str] = mapped_column(Text)
    method: Mapped[Optional[str]] = mapped_column(Text)
    label: Mapped[Optional[str]] = mapped_column(Text)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime)


class RunRow(Base):
    __tablename__ = "merge_runs"
    __table_args__ = (CheckConstraint(STATUS_CHECK, name="status"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    session_id: Mapped[int] = mapped_column(ForeignKey("sessions.id", ondelete="CASCADE"), index=True)
    recipe_version_id: Mapped[Optional[int]] = mapped_column(
        ForeignKey("recipe_versions.id", ondelete="SET NULL"), index=True
    )
    recipe_yaml: Mapped[str] = mapped_column(Text)
    method: Mapped[Optional[str]] = mapped_column(Text)
    status: Mapped[str] = mapped_column(Text, index=True)
    started_at: Mapped[datetime] = mapped_column(UTCDateTime)
    finished_at: Mapped[Optional[datetime]] = mapped_column(UTCDateTime)
    seconds: Mapped[Optional[float]] = mapped_column(Float)
    output_path: Mapped[str] = mapped_column(Text)
    error: Mapped[Optional[str]] = mapped_column(Text)
    settings: Mapped[str] = mapped_column(Text)  # JSON object
    peak_memory_bytes: Mapped[Optional[int]] = mapped_column(BigInteger)  # 0002


class NoteRow(Base):  # 0002
    __tablename__ = "notes"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    session_id: Mapped[int] = mapped_column(ForeignKey("sessions.id", ondelete="CASCADE"), index=True)
    text: Mapped[str] = mapped_column(Text)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime)
    updated_at: Mapped[datetime] = mapped_column(UTCDateTime)


class TokenRunRow(Base):  # 0003
    """One token-merging run of the Tokens panel: model, method, options, figures, view images."""

    __tablename__ = "token_runs"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    session_id: Mapped[int] = mapped_column(ForeignKey("sessions.id", ondelete="CASCADE"), index=True)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime)
    model_path: Mapped[str] = mapped_column(Text)
    model_name: Mapped[str] = mapped_column(Text)
    method: Mapped[str] = mapped_column(Text)
    options: Mapped[str] = mapped_column(Text)  # JSON object
    figures: Mapped[str] = mapped_column(Text)  # JSON object
    images: Mapped[str] = mapped_column(Text)  # JSON list of paths
    label: Mapped[Optional[str]] = mapped_column(Text)


class InspectionRow(Base):  # 0004
    """One Compare or Inspect result: kind, models, settings, results (JSON) and the files written."""

    __tablename__ = "inspections"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    session_id: Mapped[int] = mapped_column(ForeignKey("sessions.id", ondelete="CASCADE"), index=True)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime)
    kind: Mapped[str] = mapped_column(Text)
    models: Mapped[str] = mapped_column(Text)  # JSON list of paths
    settings: Mapped[str] = mapped_column(Text)  # JSON object
    results: Mapped[str] = mapped_column(Text)  # JSON object
    files: Mapped[str] = mapped_column(Text)  # JSON list of paths
    status: Mapped[str] = mapped_column(Text)  # done | stopped | failed | partial
    label: Mapped[Optional[str]] = mapped_column(Text)


__all__ = [
    "Base",
    "InspectionRow",
    "HEAD",
    "ModelRow",
    "NoteRow",
    "REVISIONS",
    "RecipeVersionRow",
    "RunRow",
    "SessionRow",
    "TokenRunRow",
    "UTCDateTime",
]
