"""Sessions kept in SQLite: models, recipe versions, merge runs, token runs, inspections, notes, workspace.

``SessionStore.open()`` opens (creating or upgrading) ``core.paths.home() /
"sessions.db"``; see :mod:`core.sessions.store`. Importing this package is cheap:
SQLAlchemy and Alembic load only when a store is opened.
"""

from core.sessions.records import (
    FINISHED_STATUSES,
    INSPECTION_KINDS,
    INTERRUPTED_ERROR,
    InspectionRecord,
    RUN_STATUSES,
    ModelRecord,
    NoteRecord,
    RecipeVersion,
    RunRecord,
    SessionInfo,
    StoreCorrupt,
    StoreError,
    StoreLocked,
    TokenRunRecord,
)
from core.sessions.store import SessionStore, default_path

__all__ = [
    "FINISHED_STATUSES",
    "INSPECTION_KINDS",
    "InspectionRecord",
    "INTERRUPTED_ERROR",
    "RUN_STATUSES",
    "ModelRecord",
    "NoteRecord",
    "RecipeVersion",
    "RunRecord",
    "SessionInfo",
    "SessionStore",
    "StoreCorrupt",
    "StoreError",
    "StoreLocked",
    "TokenRunRecord",
    "default_path",
]
