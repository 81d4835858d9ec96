"""What the session store hands out: plain frozen records and its errors.

Nothing here imports SQLAlchemy, so the GUI can import these names (and catch
the errors) before the database is opened. Records are copies: they never hold
a database connection and can be passed between threads freely. Datetimes are
timezone-aware UTC.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any, Optional

from core.errors import MergeStudioError

RUN_STATUSES = ("running", "succeeded", "failed", "cancelled", "interrupted")
FINISHED_STATUSES = ("succeeded", "failed", "cancelled")
INTERRUPTED_ERROR = "The app stopped while this merge was running."


class StoreError(MergeStudioError):
    """The session store cannot do what was asked; the message names the database file or the record."""


class StoreLocked(StoreError):
    """Another Merge Studio process holds the database (``pid`` is its process id, or None if unknown)."""

    def __init__(self, message: str, *, path: Path, pid: Optional[int]) -> None:
        super().__init__(message)
        self.path = path
        self.pid = pid


class StoreCorrupt(StoreError):
    """The file is not a SQLite database or fails its integrity check; ``SessionStore.recover`` sets it aside."""

    def __init__(self, message: str, *, path: Path) -> None:
        super().__init__(message)
        self.path = path


def _plain(value: Any) -> Any:
    if isinstance(value, datetime):
        return value.isoformat()
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_plain(v) for v in value]
    return value


class _Record:
    def to_dict(self) -> dict[str, Any]:
        """The fields as JSON-ready values (datetimes as ISO 8601 strings)."""
        return _plain(asdict(self))  # type: ignore[call-overload]


@dataclass(frozen=True)
class SessionInfo(_Record):
    """A session (a named workspace of the app) with how many runs, models and token runs it holds."""

    id: int
    name: str
    created_at: datetime
    updated_at: datetime
    run_count: int = 0
    model_count: int = 0
    token_run_count: int = 0


@dataclass(frozen=True)
class ModelRecord(_Record):
    """A model a session used: ``path`` as given (a folder, a file or an ``org/name`` reference)."""

    id: int
    session_id: int
    path: str
    name: str
    architecture: Optional[str]
    header_hash: Optional[str]
    added_at: datetime
    updated_at: datetime


@dataclass(frozen=True)
class RecipeVersion(_Record):
    """One saved version of a session's recipe; ``number`` counts 1, 2, 3... within the session."""

    id: int
    session_id: int
    number: int
    yaml_text: str
    method: Optional[str]
    label: Optional[str]
    created_at: datetime


@dataclass(frozen=True)
class RunRecord(_Record):
    """One merge run: the recipe as it was run, its settings, outcome and cost.

    ``status`` is one of "running", "succeeded", "failed", "cancelled" or
    "interrupted" (the app stopped while it ran); ``settings`` is a fresh dict
    per record (device, seed, shard size, dtype...).
    """

    id: int
    session_id: int
    recipe_version_id: Optional[int]
    recipe_yaml: str
    method: Optional[str]
    status: str
    started_at: datetime
    finished_at: Optional[datetime]
    seconds: Optional[float]
    peak_memory_bytes: Optional[int]
    output_path: str
    error: Optional[str]
    settings: dict[str, Any] = field(default_factory=dict)

    @property
    def finished(self) -> bool:
        return self.status != "running"


@dataclass(frozen=True)
class NoteRecord(_Record):
    """A note in a session (editable; ``updated_at`` changes on each edit)."""

    id: int
    session_id: int
    text: str
    created_at: datetime
    updated_at: datetime


@dataclass(frozen=True)
class TokenRunRecord(_Record):
    """One token-merging run: the model, the method and its options, the figures measured, the view images.

    ``options`` and ``figures`` are fresh dicts per record, as JSON gave them back
    (tuples come back as lists); ``images`` are the paths of the PNG files of the
    merged-token views, in the order they were given.
    """

    id: int
    session_id: int
    created_at: datetime
    model_path: str
    model_name: str
    method: str
    options: dict[str, Any] = field(default_factory=dict)
    figures: dict[str, Any] = field(default_factory=dict)
    images: list[str] = field(default_factory=list)
    label: Optional[str] = None


INSPECTION_KINDS = ("compare-text", "compare-image", "attention", "vision-attention", "cross-attention",
                    "tokens", "weights")
INSPECTION_STATUSES = ("done", "stopped", "failed", "partial")


@dataclass(frozen=True)
class InspectionRecord(_Record):
    """One Compare or Inspect result kept in a session.

    ``kind`` is one of :data:`INSPECTION_KINDS`; ``models`` the paths compared, in
    order; ``settings`` and ``results`` fresh dicts as JSON gave them back; ``files``
    the paths of what was written beside the database (images, .npz maps, plots).
    ``status`` is "partial" when some panes finished and others failed.
    """

    id: int
    session_id: int
    created_at: datetime
    kind: str
    models: list[str] = field(default_factory=list)
    settings: dict[str, Any] = field(default_factory=dict)
    results: dict[str, Any] = field(default_factory=dict)
    files: list[str] = field(default_factory=list)
    status: str = "done"
    label: Optional[str] = None
