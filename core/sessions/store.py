"""The session store: one SQLite file per user, opened by one Merge Studio at a time.

``SessionStore.open()`` takes the lock file, checks the database with the
standard library (header, ``PRAGMA quick_check``, schema revision), backs up and
upgrades an older database with Alembic, marks runs left "running" by a process
that died as "interrupted", and returns the store. SQLAlchemy loads there, not
at import; Alembic only when an upgrade is needed.

Every write is one transaction (``BEGIN IMMEDIATE``): it is applied whole or
not at all. Every connection runs with ``journal_mode=WAL``,
``foreign_keys=ON``, ``synchronous=NORMAL`` and a busy timeout. SQLite errors
come out as :class:`StoreError` with one sentence naming the database file.
Methods may be called from any thread (one operation at a time); they return
frozen records, never ORM objects.

Token runs keep the paths of their view images; the images themselves live in
:meth:`SessionStore.token_views_dir` (``token-views/session-<id>`` beside the
database file), which goes when the session is deleted. A new database starts
without views: a ``token-views`` folder left by an earlier one (after
:meth:`SessionStore.recover`, or a deleted database) is renamed
``token-views.old-YYYYmmdd-HHMMSS``, so new sessions never share old images.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import sqlite3
import tempfile
import threading
from contextlib import contextmanager
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterator, Optional, Sequence, Union

from core import paths
from core.sessions import dbfile, tokenruns
from core.sessions.records import (
    FINISHED_STATUSES,
    INSPECTION_KINDS,
    INSPECTION_STATUSES,
    InspectionRecord,
    INTERRUPTED_ERROR,
    ModelRecord,
    NoteRecord,
    RecipeVersion,
    RunRecord,
    SessionInfo,
    StoreError,
    TokenRunRecord,
)

if TYPE_CHECKING:
    from alembic.config import Config
    from sqlalchemy.engine import Connection, Engine
    from sqlalchemy.orm import Session as OrmSession

    from core.sessions import schema as S

PathLike = Union[str, "os.PathLike[str]"]
DB_NAME = "sessions.db"
DEFAULT_BUSY_TIMEOUT_S = 5.0
_WRITE_OPTION = "mergestudio_write"


def default_path() -> Path:
    """``core.paths.home() / "sessions.db"`` (``MERGESTUDIO_HOME`` honoured)."""
    return paths.home() / DB_NAME


def alembic_config(connection: Optional["Connection"] = None) -> "Config":
    """Alembic's configuration for the sessions migrations, built in code (no alembic.ini).

    ``connection`` is what ``migrations/env.py`` migrates, inside the caller's transaction.
    """
    from alembic.config import Config

    from core.sessions import migrations

    config = Config()
    config.set_main_option("script_location", str(Path(migrations.__file__).parent))
    if connection is not None:
        config.attributes["connection"] = connection
    return config


_clock_lock = threading.Lock()
_last_time = datetime.min.replace(tzinfo=timezone.utc)


def _now() -> datetime:
    """UTC now, strictly increasing within the process (so "most recent" never ties)."""
    global _last_time
    with _clock_lock:
        now = datetime.now(timezone.utc)
        if now <= _last_time:
            now = _last_time + timedelta(microseconds=1)
        _last_time = now
        return now


class SessionStore:
    """Sessions, their models, recipe versions, merge runs, token runs, notes and workspace state.

    Open with :meth:`open`, :meth:`in_memory` or :meth:`recover`; close with
    :meth:`close` (or use it as a context manager).
    """

    def __init__(
        self,
        engine: "Engine",
        path: Optional[Path],
        *,
        lock: Optional[dbfile.ProcessLock] = None,
        read_only: bool = False,
        backup_path: Optional[Path] = None,
    ) -> None:
        self._engine = engine
        self._writer = engine.execution_options(**{_WRITE_OPTION: True})  # its transactions: BEGIN IMMEDIATE
        self._lock = lock
        self._mutex = threading.RLock()
        self._closed = False
        self.path = path
        self.read_only = read_only
        self.backup_path = backup_path
        self.interrupted_runs: list[RunRecord] = []
        # The folders of the token runs' view images: beside the file, or a temporary one for an in-memory store.
        self._views_root: Optional[Path] = None if path is None else path.parent / tokenruns.VIEWS_FOLDER
        self._temporary_views = path is None

    # ------------------------------------------------------------------ opening

    @classmethod
    def open(
        cls,
        path: Optional[PathLike] = None,
        *,
        read_only: bool = False,
        busy_timeout: float = DEFAULT_BUSY_TIMEOUT_S,
    ) -> "SessionStore":
        """Open (create, or upgrade after a backup) the database; default :func:`default_path`.

        Raises StoreLocked if another Merge Studio has it open, StoreCorrupt if it
        is damaged (nothing changed on disk; see :meth:`recover`), StoreError if
        it was written by a newer Merge Studio or cannot be used. ``read_only``
        opens a database another process holds, without the lock, for reading
        (an up-to-date one only; nothing is marked or upgraded).
        """
        db = _resolve(path)
        if read_only:
            return cls._open_read_only(db, busy_timeout)
        lock = dbfile.ProcessLock.acquire(db)
        try:
            return cls._open_locked(db, lock, busy_timeout)
        except BaseException:
            lock.release()
            raise

    @classmethod
    def in_memory(cls) -> "SessionStore":
        """The same schema in memory: nothing persisted (the app's fallback when the file cannot be used)."""
        from sqlalchemy import create_engine
        from sqlalchemy.pool import StaticPool

        from core.sessions.schema import Base

        engine = create_engine(
            "sqlite://",
            creator=lambda: sqlite3.connect(":memory:", check_same_thread=False),
            poolclass=StaticPool,
        )
        _configure(engine, DEFAULT_BUSY_TIMEOUT_S)
        with engine.begin() as conn:
            Base.metadata.create_all(conn)
        return cls(engine, None)

    @classmethod
    def recover(
        cls, path: Optional[PathLike] = None, *, busy_timeout: float = DEFAULT_BUSY_TIMEOUT_S
    ) -> tuple["SessionStore", Path]:
        """Set a damaged database aside (``sessions.db.corrupt-YYYYmmdd-HHMMSS``, with its -wal/-shm)
        and start a fresh one; returns the new store and the name the old file is kept under."""
        db = _resolve(path)
        lock = dbfile.ProcessLock.acquire(db)
        try:
            kept = dbfile.set_aside(db)
            return cls._open_locked(db, lock, busy_timeout), kept
        except BaseException:
            lock.release()
            raise

    @classmethod
    def _open_locked(cls, db: Path, lock: dbfile.ProcessLock, busy_timeout: float) -> "SessionStore":
        from core.sessions import schema

        revision = dbfile.inspect(db, schema.REVISIONS, locked=True)  # reads only; StoreCorrupt, StoreError
        backup_path = None
        if revision is not None and revision != schema.HEAD:
            backup_path = dbfile.backup(db, revision)
        if revision is None:  # a new database: views left by an earlier one are not its sessions'
            views = db.parent / tokenruns.VIEWS_FOLDER
            tokenruns.move_aside(views, f".old-{dbfile.stamp()}", "the token views of an earlier sessions database")
        engine = _file_engine(db, read_only=False, busy_timeout=busy_timeout)
        try:
            if revision != schema.HEAD:
                _upgrade(engine, db)
            store = cls(engine, db, lock=lock, backup_path=backup_path)
            store.interrupted_runs = store._mark_interrupted()
            return store
        except BaseException:
            engine.dispose()
            raise

    @classmethod
    def _open_read_only(cls, db: Path, busy_timeout: float) -> "SessionStore":
        from core.sessions import schema

        revision = dbfile.inspect(db, schema.REVISIONS, locked=False)
        if revision is None:
            raise StoreError(f"There is no sessions database at {db}.")
        if revision != schema.HEAD:
            raise StoreError(
                f"The sessions database {db} has an older layout (revision {revision}); "
                "open it once in Merge Studio to upgrade it."
            )
        return cls(_file_engine(db, read_only=True, busy_timeout=busy_timeout), db, read_only=True)

    def close(self) -> None:
        """Close the connections and release the lock (idempotent); an in-memory store's views go too."""
        with self._mutex:
            if self._closed:
                return
            self._closed = True
            try:
                self._engine.dispose()
            finally:
                if self._lock is not None:
                    self._lock.release()
                if self._temporary_views and self._views_root is not None:
                    shutil.rmtree(self._views_root, ignore_errors=True)  # a temporary folder of ours

    def __enter__(self) -> "SessionStore":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def __repr__(self) -> str:
        state = "closed" if self._closed else ("read-only" if self.read_only else "open")
        return f"<SessionStore {dbfile.where(self.path)} {state}>"

    # ------------------------------------------------------------------ sessions

    def create_session(self, name: Optional[str] = None) -> SessionInfo:
        """A new empty session; ``None`` names it "Session YYYY-MM-DD HH:MM" (local time)."""
        from core.sessions.schema import SessionRow

        if name is None:
            name = datetime.now().strftime("Session %Y-%m-%d %H:%M")
        name = _name(name)
        now = _now()
        with self._write() as s:
            row = SessionRow(name=name, created_at=now, updated_at=now)
            s.add(row)
            s.flush()
            return _session_info(row, 0, 0)

    def list_sessions(self, limit: Optional[int] = None) -> list[SessionInfo]:
        """Sessions, most recently updated first (at most ``limit``)."""
        from sqlalchemy import select

        from core.sessions.schema import SessionRow

        if limit is not None and (not isinstance(limit, int) or isinstance(limit, bool) or limit < 0):
            raise StoreError(f"The number of sessions to list must be a whole number of at least 0, got {limit!r}.")
        stmt = _with_counts(select(SessionRow)).order_by(SessionRow.updated_at.desc(), SessionRow.id.desc())
        if limit is not None:
            stmt = stmt.limit(limit)
        with self._read() as s:
            return [_session_info(*found) for found in s.execute(stmt)]

    def get_session(self, session_id: int) -> SessionInfo:
        from sqlalchemy import select

        from core.sessions.schema import SessionRow

        with self._read() as s:
            found = s.execute(_with_counts(select(SessionRow)).where(SessionRow.id == session_id)).first()
            if found is None:
                raise self._missing("Session", session_id)
            return _session_info(*found)

    def rename_session(self, session_id: int, name: str) -> SessionInfo:
        name = _name(name)
        with self._write() as s:
            row = self._session_row(s, session_id)
            row.name = name
            row.updated_at = _now()
        return self.get_session(session_id)

    def delete_session(self, session_id: int) -> None:
        """Delete the session and everything it holds (models, versions, runs, token runs, notes, view images).

        The views folder is renamed aside first (and renamed back if the delete
        fails), then removed once the rows are gone.
        """
        with self._mutex:
            self._check_writable()
            folder = self._views_folder(session_id)
            aside = None
            if folder is not None:
                aside = tokenruns.move_aside(folder, ".deleted", f"the token views of session {session_id}")
            try:
                with self._write() as s:
                    s.delete(self._session_row(s, session_id))  # the database cascades to its rows
            except BaseException:
                tokenruns.move_back(aside, folder)
                raise
            tokenruns.remove_tree(aside, f"Session {session_id}")

    def save_workspace(self, session_id: int, state: dict[str, Any]) -> None:
        """Store the app's workspace state (a JSON object, opaque here); bumps ``updated_at``."""
        text = _json_object(state, "workspace state")
        with self._write() as s:
            row = self._session_row(s, session_id)
            row.workspace = text
            row.updated_at = _now()

    def load_workspace(self, session_id: int) -> Optional[dict[str, Any]]:
        """The last saved workspace state, or None if none was saved."""
        with self._read() as s:
            text = self._session_row(s, session_id).workspace
        if text is None:
            return None
        return _loads(text, f"The workspace state of session {session_id} in {dbfile.where(self.path)}")

    # ------------------------------------------------------------------ models

    def add_model(
        self,
        session_id: int,
        path: PathLike,
        *,
        name: str,
        architecture: Optional[str] = None,
        header_hash: Optional[str] = None,
    ) -> ModelRecord:
        """Record a model the session uses; the same ``path`` again updates its record.

        On an update, ``architecture`` and ``header_hash`` left at None keep what
        was stored.
        """
        from sqlalchemy import select

        from core.sessions.schema import ModelRow

        where = os.fspath(path)
        if not where.strip():
            raise StoreError("A model needs a path; got an empty one.")
        display = _text(name, f"The display name of the model {where}")
        now = _now()
        with self._write() as s:
            session = self._session_row(s, session_id)
            row = s.scalars(
                select(ModelRow).where(ModelRow.session_id == session_id, ModelRow.path == where)
            ).first()
            if row is None:
                row = ModelRow(session_id=session_id, path=where, added_at=now)
                s.add(row)
            row.name = display
            row.updated_at = now
            if architecture is not None or row.architecture is None:
                row.architecture = architecture
            if header_hash is not None or row.header_hash is None:
                row.header_hash = header_hash
            session.updated_at = now
            s.flush()
            return _model(row)

    def list_models(self, session_id: int) -> list[ModelRecord]:
        """The session's models in the order they were first added."""
        from sqlalchemy import select

        from core.sessions.schema import ModelRow

        with self._read() as s:
            self._session_row(s, session_id)
            rows = s.scalars(select(ModelRow).where(ModelRow.session_id == session_id).order_by(ModelRow.id))
            return [_model(row) for row in rows]

    # ------------------------------------------------------------------ recipe versions

    def add_recipe_version(
        self, session_id: int, yaml_text: str, *, method: Optional[str] = None, label: Optional[str] = None
    ) -> RecipeVersion:
        """Save a recipe version; the same text as the session's latest version returns that one unchanged."""
        from sqlalchemy import select

        from core.sessions.schema import RecipeVersionRow

        if not isinstance(yaml_text, str) or not yaml_text.strip():
            raise StoreError("A recipe version needs the recipe's YAML text; got an empty one.")
        with self._write() as s:
            session = self._session_row(s, session_id)
            latest = s.scalars(
                select(RecipeVersionRow)
                .where(RecipeVersionRow.session_id == session_id)
                .order_by(RecipeVersionRow.number.desc())
                .limit(1)
            ).first()
            if latest is not None and latest.yaml_text == yaml_text:
                return _version(latest)
            now = _now()
            row = RecipeVersionRow(
                session_id=session_id,
                number=1 if latest is None else latest.number + 1,
                yaml_text=yaml_text,
                method=method,
                label=label,
                created_at=now,
            )
            s.add(row)
            session.updated_at = now
            s.flush()
            return _version(row)

    def list_recipe_versions(self, session_id: int) -> list[RecipeVersion]:
        """The session's recipe versions, newest first."""
        from sqlalchemy import select

        from core.sessions.schema import RecipeVersionRow

        with self._read() as s:
            self._session_row(s, session_id)
            rows = s.scalars(
                select(RecipeVersionRow)
                .where(RecipeVersionRow.session_id == session_id)
                .order_by(RecipeVersionRow.number.desc())
            )
            return [_version(row) for row in rows]

    def get_recipe_version(self, version_id: int) -> RecipeVersion:
        from core.sessions.schema import RecipeVersionRow

        with self._read() as s:
            return _version(self._row(s, RecipeVersionRow, version_id, "Recipe version"))

    # ------------------------------------------------------------------ runs

    def start_run(
        self,
        session_id: int,
        recipe_yaml: str,
        output_path: PathLike,
        *,
        method: Optional[str] = None,
        settings: Optional[dict[str, Any]] = None,
        recipe_version_id: Optional[int] = None,
    ) -> RunRecord:
        """Record a merge that starts now (status "running"); ``settings`` is a JSON object."""
        from core.sessions.schema import RecipeVersionRow, RunRow

        if not isinstance(recipe_yaml, str) or not recipe_yaml.strip():
            raise StoreError("A merge run needs the recipe's YAML text; got an empty one.")
        settings_text = _json_object({} if settings is None else settings, "run settings")
        output = os.fspath(output_path)
        now = _now()
        with self._write() as s:
            session = self._session_row(s, session_id)
            if recipe_version_id is not None:
                version = self._row(s, RecipeVersionRow, recipe_version_id, "Recipe version")
                if version.session_id != session_id:
                    raise StoreError(
                        f"Recipe version {recipe_version_id} belongs to session {version.session_id}, "
                        f"not to session {session_id}."
                    )
            row = RunRow(
                session_id=session_id,
                recipe_version_id=recipe_version_id,
                recipe_yaml=recipe_yaml,
                method=method,
                status="running",
                started_at=now,
                output_path=output,
                settings=settings_text,
            )
            s.add(row)
            session.updated_at = now
            s.flush()
            return _run(row)

    def finish_run(
        self,
        run_id: int,
        status: str,
        *,
        seconds: Optional[float] = None,
        peak_memory_bytes: Optional[int] = None,
        error: Optional[str] = None,
    ) -> RunRecord:
        """Record how a running merge ended: "succeeded", "failed" or "cancelled" (once).

        ``seconds`` defaults to the wall time since :meth:`start_run`.
        """
        from core.sessions.schema import RunRow, SessionRow

        if status not in FINISHED_STATUSES:
            raise StoreError(
                f"A run finishes as one of {', '.join(FINISHED_STATUSES)}, not {status!r} (run {run_id})."
            )
        if seconds is not None and (not isinstance(seconds, (int, float)) or not math.isfinite(seconds) or seconds < 0):
            raise StoreError(f"The duration of run {run_id} must be a number of seconds (0 or more), not {seconds!r}.")
        if peak_memory_bytes is not None and (
            not isinstance(peak_memory_bytes, int) or isinstance(peak_memory_bytes, bool) or peak_memory_bytes < 0
        ):
            raise StoreError(
                f"The peak memory of run {run_id} must be a whole number of bytes of at least 0, "
                f"got {peak_memory_bytes!r}."
            )
        now = _now()
        with self._write() as s:
            row = self._row(s, RunRow, run_id, "Run")
            if row.status != "running":
                raise StoreError(f"Run {run_id} has already finished ({row.status}); a run is finished only once.")
            row.status = status
            row.finished_at = now
            row.seconds = float(seconds) if seconds is not None else (now - row.started_at).total_seconds()
            row.peak_memory_bytes = peak_memory_bytes
            row.error = error
            session = s.get(SessionRow, row.session_id)
            if session is not None:
                session.updated_at = now
            s.flush()
            return _run(row)

    def list_runs(self, session_id: int) -> list[RunRecord]:
        """The session's merge runs, newest first."""
        from sqlalchemy import select

        from core.sessions.schema import RunRow

        with self._read() as s:
            self._session_row(s, session_id)
            rows = s.scalars(
                select(RunRow)
                .where(RunRow.session_id == session_id)
                .order_by(RunRow.started_at.desc(), RunRow.id.desc())
            )
            return [_run(row) for row in rows]

    def get_run(self, run_id: int) -> RunRecord:
        from core.sessions.schema import RunRow

        with self._read() as s:
            return _run(self._row(s, RunRow, run_id, "Run"))

    # ------------------------------------------------------------------ token runs

    def add_token_run(
        self,
        session_id: int,
        *,
        model_path: PathLike,
        model_name: str,
        method: str,
        options: dict[str, Any],
        figures: dict[str, Any],
        images: Sequence[PathLike] = (),
        label: Optional[str] = None,
    ) -> TokenRunRecord:
        """Record a token-merging run (options and figures: JSON objects; images: paths of PNG files)."""
        from core.sessions.schema import TokenRunRow

        where = os.fspath(model_path) if isinstance(model_path, (str, os.PathLike)) else None
        if where is None or not where.strip():
            raise StoreError(f"A token run needs the path of its model; got {model_path!r}.")
        name = _text(model_name, f"The display name of the model {where} of a token run")
        method_name = _text(method, "The method of a token run")
        options_text = tokenruns.json_text(options, "options")
        figures_text = tokenruns.json_text(figures, "figures")
        images_text = json.dumps(tokenruns.image_paths(images))
        if label is not None and not isinstance(label, str):
            raise StoreError(f"The label of a token run must be text, not {type(label).__name__}.")
        if label is not None:
            label = label.strip() or None
        now = _now()
        with self._write() as s:
            session = self._session_row(s, session_id)
            row = TokenRunRow(
                session_id=session_id,
                created_at=now,
                model_path=where,
                model_name=name,
                method=method_name,
                options=options_text,
                figures=figures_text,
                images=images_text,
                label=label,
            )
            s.add(row)
            session.updated_at = now
            s.flush()
            return self._token_run(row)

    def list_token_runs(self, session_id: int) -> list[TokenRunRecord]:
        """The session's token runs, newest first."""
        from sqlalchemy import select

        from core.sessions.schema import TokenRunRow

        with self._read() as s:
            self._session_row(s, session_id)
            rows = s.scalars(
                select(TokenRunRow)
                .where(TokenRunRow.session_id == session_id)
                .order_by(TokenRunRow.created_at.desc(), TokenRunRow.id.desc())
            )
            return [self._token_run(row) for row in rows]

    def get_token_run(self, run_id: int) -> TokenRunRecord:
        from core.sessions.schema import TokenRunRow

        with self._read() as s:
            return self._token_run(self._row(s, TokenRunRow, run_id, "Token run"))

    def delete_token_run(self, run_id: int) -> None:
        """Delete a token run, and its images in the session's views folder that no other run shows."""
        from sqlalchemy import select

        from core.sessions.schema import SessionRow, TokenRunRow

        with self._mutex:
            with self._write() as s:
                row = self._row(s, TokenRunRow, run_id, "Token run")
                session_id = row.session_id
                images = _image_list(row.images)
                kept: set[str] = set()
                for other in s.scalars(
                    select(TokenRunRow.images).where(TokenRunRow.session_id == session_id, TokenRunRow.id != run_id)
                ):
                    kept.update(_image_list(other))
                session = s.get(SessionRow, session_id)
                if session is not None:
                    session.updated_at = _now()
                s.delete(row)
            failed = self._remove_session_files(session_id, images, kept)
            if failed:
                raise StoreError(f"Token run {run_id} was deleted, but its image {failed} could not be removed.")

    def token_views_dir(self, session_id: int) -> Path:
        """The folder for the view images of the session's token runs (created; removed with the session)."""
        with self._mutex:
            self._check_writable()
            self.get_session(session_id)  # StoreError for a session that does not exist
            if self._views_root is None:
                self._views_root = Path(tempfile.mkdtemp(prefix="mergestudio-token-views-"))
            folder = tokenruns.session_folder(self._views_root, session_id)
            try:
                folder.mkdir(parents=True, exist_ok=True)
            except OSError as exc:
                raise StoreError(
                    f"The folder {folder} for the token views of session {session_id} cannot be created "
                    f"({exc.strerror or exc})."
                ) from None
            return folder

    # ------------------------------------------------------------------ inspections

    def add_inspection(
        self,
        session_id: int,
        *,
        kind: str,
        models: Sequence[PathLike],
        settings: dict[str, Any],
        results: dict[str, Any],
        files: Sequence[PathLike] = (),
        status: str = "done",
        label: Optional[str] = None,
    ) -> InspectionRecord:
        """Record a Compare or Inspect result (settings and results: JSON objects; files: paths)."""
        from core.sessions.schema import InspectionRow

        if kind not in INSPECTION_KINDS:
            raise StoreError(f"An inspection's kind must be one of {', '.join(INSPECTION_KINDS)}, not {kind!r}.")
        if status not in INSPECTION_STATUSES:
            raise StoreError(
                f"An inspection's status must be one of {', '.join(INSPECTION_STATUSES)}, not {status!r}."
            )
        model_list = [os.fspath(m) for m in models if isinstance(m, (str, os.PathLike))]
        if isinstance(models, (str, bytes)) or len(model_list) != len(models) or not all(m.strip() for m in model_list):
            raise StoreError(f"The models of an inspection must be a list of paths, not {models!r}.")
        settings_text = tokenruns.json_text(settings, "settings", "inspection")
        results_text = tokenruns.json_text(results, "results", "inspection")
        files_text = json.dumps(tokenruns.image_paths(files, "inspection"))
        if label is not None and not isinstance(label, str):
            raise StoreError(f"The label of an inspection must be text, not {type(label).__name__}.")
        label = label.strip() or None if label is not None else None
        now = _now()
        with self._write() as s:
            session = self._session_row(s, session_id)
            row = InspectionRow(
                session_id=session_id,
                created_at=now,
                kind=kind,
                models=json.dumps(model_list),
                settings=settings_text,
                results=results_text,
                files=files_text,
                status=status,
                label=label,
            )
            s.add(row)
            session.updated_at = now
            s.flush()
            return self._inspection(row)

    def list_inspections(self, session_id: int, kind: Optional[str] = None) -> list[InspectionRecord]:
        """The session's inspections (of one ``kind`` if given), newest first."""
        from sqlalchemy import select

        from core.sessions.schema import InspectionRow

        with self._read() as s:
            self._session_row(s, session_id)
            query = select(InspectionRow).where(InspectionRow.session_id == session_id)
            if kind is not None:
                query = query.where(InspectionRow.kind == kind)
            rows = s.scalars(query.order_by(InspectionRow.created_at.desc(), InspectionRow.id.desc()))
            return [self._inspection(row) for row in rows]

    def get_inspection(self, inspection_id: int) -> InspectionRecord:
        from core.sessions.schema import InspectionRow

        with self._read() as s:
            return self._inspection(self._row(s, InspectionRow, inspection_id, "Inspection"))

    def delete_inspection(self, inspection_id: int) -> None:
        """Delete an inspection and the files it wrote into the session's folder."""
        from core.sessions.schema import InspectionRow, SessionRow

        with self._mutex:
            with self._write() as s:
                row = self._row(s, InspectionRow, inspection_id, "Inspection")
                session_id = row.session_id
                files = _image_list(row.files)
                session = s.get(SessionRow, session_id)
                if session is not None:
                    session.updated_at = _now()
                s.delete(row)
            failed = self._remove_session_files(session_id, files, set())
            if failed:
                raise StoreError(f"Inspection {inspection_id} was deleted, but its file {failed} could not be removed.")

    def _remove_session_files(self, session_id: int, files: Sequence[str], kept: set[str]) -> Optional[str]:
        """Remove ``files`` that lie in the session's folder and are not in ``kept`` (another record shows
        them); a file outside the folder is not ours to delete. Returns the first that could not be
        removed ("path (reason)"), or None."""
        folder = self._views_folder(session_id)
        if folder is None:
            return None
        failed = []
        for file in dict.fromkeys(files):
            if file in kept or not tokenruns.inside(file, folder):
                continue
            try:
                Path(file).unlink(missing_ok=True)
            except OSError as exc:
                failed.append(f"{file} ({exc.strerror or exc})")
        return failed[0] if failed else None

    def inspection_dir(self, session_id: int) -> Path:
        """The folder for the files of the session's inspections (created; removed with the session)."""
        folder = self.token_views_dir(session_id) / "inspect"
        try:
            folder.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise StoreError(f"The folder {folder} for the inspections of session {session_id} cannot be created "
                             f"({exc.strerror or exc}).") from None
        return folder

    def _inspection(self, row: "S.InspectionRow") -> InspectionRecord:
        what = f"inspection {row.id} in {dbfile.where(self.path)}"

        def decoded(field: str, text: str, kind: type) -> Any:
            return _decoded(text, field, what, kind)

        return InspectionRecord(
            id=row.id,
            session_id=row.session_id,
            created_at=row.created_at,
            kind=row.kind,
            models=decoded("models", row.models, list),
            settings=decoded("settings", row.settings, dict),
            results=decoded("results", row.results, dict),
            files=decoded("files", row.files, list),
            status=row.status,
            label=row.label,
        )

    # ------------------------------------------------------------------ notes

    def add_note(self, session_id: int, text: str) -> NoteRecord:
        from core.sessions.schema import NoteRow

        _note_text(text)
        now = _now()
        with self._write() as s:
            session = self._session_row(s, session_id)
            row = NoteRow(session_id=session_id, text=text, created_at=now, updated_at=now)
            s.add(row)
            session.updated_at = now
            s.flush()
            return _note(row)

    def update_note(self, note_id: int, text: str) -> NoteRecord:
        from core.sessions.schema import NoteRow, SessionRow

        _note_text(text)
        now = _now()
        with self._write() as s:
            row = self._row(s, NoteRow, note_id, "Note")
            row.text = text
            row.updated_at = now
            session = s.get(SessionRow, row.session_id)
            if session is not None:
                session.updated_at = now
            s.flush()
            return _note(row)

    def delete_note(self, note_id: int) -> None:
        from core.sessions.schema import NoteRow, SessionRow

        with self._write() as s:
            row = self._row(s, NoteRow, note_id, "Note")
            session = s.get(SessionRow, row.session_id)
            if session is not None:
                session.updated_at = _now()
            s.delete(row)

    def list_notes(self, session_id: int) -> list[NoteRecord]:
        """The session's notes, oldest first."""
        from sqlalchemy import select

        from core.sessions.schema import NoteRow

        with self._read() as s:
            self._session_row(s, session_id)
            rows = s.scalars(select(NoteRow).where(NoteRow.session_id == session_id).order_by(NoteRow.id))
            return [_note(row) for row in rows]

    # ------------------------------------------------------------------ internals

    @contextmanager
    def _guard(self) -> Iterator[None]:
        """One operation at a time; SQLite errors become one sentence naming the file."""
        from sqlalchemy.exc import SQLAlchemyError

        with self._mutex:
            if self._closed:
                raise StoreError(f"The sessions database {dbfile.where(self.path)} is closed.")
            try:
                yield
            except (SQLAlchemyError, sqlite3.Error) as exc:
                raise dbfile.db_error(exc, self.path) from exc

    @contextmanager
    def _write(self) -> Iterator["OrmSession"]:
        """One write transaction: committed whole when the block ends, rolled back on any exception."""
        from sqlalchemy.orm import Session

        self._check_writable()
        with self._guard(), Session(self._writer, expire_on_commit=False) as s, s.begin():
            yield s

    @contextmanager
    def _read(self) -> Iterator["OrmSession"]:
        from sqlalchemy.orm import Session

        with self._guard(), Session(self._engine) as s, s.begin():
            yield s

    def _check_writable(self) -> None:
        if self._closed:
            raise StoreError(f"The sessions database {dbfile.where(self.path)} is closed.")
        if self.read_only:
            raise StoreError(
                f"The sessions database {dbfile.where(self.path)} was opened read-only (while another "
                "Merge Studio has it); nothing can be saved through it."
            )

    def _views_folder(self, session_id: int) -> Optional[Path]:
        """The session's views folder (not created), or None if this store has no views root yet."""
        if self._views_root is None:
            return None
        return tokenruns.session_folder(self._views_root, session_id)

    def _token_run(self, row: "S.TokenRunRow") -> TokenRunRecord:
        what = f"token run {row.id} in {dbfile.where(self.path)}"

        def decoded(field: str, text: str, kind: type) -> Any:
            return _decoded(text, field, what, kind)

        return TokenRunRecord(
            id=row.id,
            session_id=row.session_id,
            created_at=row.created_at,
            model_path=row.model_path,
            model_name=row.model_name,
            method=row.method,
            options=decoded("options", row.options, dict),
            figures=decoded("figures", row.figures, dict),
            images=decoded("images", row.images, list),
            label=row.label,
        )

    def _missing(self, what: str, key: Any) -> StoreError:
        return StoreError(f"{what} {key} does not exist in the sessions database {dbfile.where(self.path)}.")

    def _row(self, s: "OrmSession", cls: type, key: Any, what: str) -> Any:
        row = s.get(cls, key) if isinstance(key, int) and not isinstance(key, bool) else None
        if row is None:
            raise self._missing(what, key)
        return row

    def _session_row(self, s: "OrmSession", session_id: int) -> "S.SessionRow":
        from core.sessions.schema import SessionRow

        return self._row(s, SessionRow, session_id, "Session")

    def _mark_interrupted(self) -> list[RunRecord]:
        """Runs left "running" belong to a dead process (we hold the lock): mark them interrupted."""
        from sqlalchemy import select

        from core.sessions.schema import RunRow

        with self._write() as s:
            rows = list(s.scalars(select(RunRow).where(RunRow.status == "running").order_by(RunRow.id)))
            for row in rows:
                row.status = "interrupted"
                row.error = INTERRUPTED_ERROR
            s.flush()
            return [_run(row) for row in rows]


# ----------------------------------------------------------------------------- engine


def _resolve(path: Optional[PathLike]) -> Path:
    db = (default_path() if path is None else Path(os.fspath(path))).expanduser().absolute()
    if not db.parent.is_dir():
        raise StoreError(f"The folder {db.parent} of the sessions database {db} does not exist.")
    return db


def _file_engine(db: Path, *, read_only: bool, busy_timeout: float) -> "Engine":
    from sqlalchemy import create_engine
    from sqlalchemy.pool import QueuePool

    target = dbfile.readonly_uri(db) if read_only else str(db)

    def connect() -> sqlite3.Connection:
        return sqlite3.connect(target, uri=read_only, timeout=busy_timeout, check_same_thread=False)

    engine = create_engine("sqlite://", creator=connect, poolclass=QueuePool)
    _configure(engine, busy_timeout)
    return engine


def _configure(engine: "Engine", busy_timeout: float) -> None:
    """The pragmas on every new connection; transactions begun by us, not by the sqlite3 module.

    Writes begin with ``BEGIN IMMEDIATE`` (they wait for the write lock up front,
    through the busy timeout, instead of failing half-way); reads with ``BEGIN``.
    """
    from sqlalchemy import event

    timeout_ms = max(0, int(busy_timeout * 1000))

    @event.listens_for(engine, "connect")
    def _pragmas(dbapi_connection: Any, _record: Any) -> None:
        dbapi_connection.isolation_level = None  # so BEGIN/COMMIT are exactly ours (DDL included)
        cursor = dbapi_connection.cursor()
        try:
            cursor.execute(f"PRAGMA busy_timeout = {timeout_ms}")
            cursor.execute("PRAGMA journal_mode = WAL")
            cursor.execute("PRAGMA foreign_keys = ON")
            cursor.execute("PRAGMA synchronous = NORMAL")
        finally:
            cursor.close()

    @event.listens_for(engine, "begin")
    def _begin(conn: Any) -> None:
        conn.exec_driver_sql("BEGIN IMMEDIATE" if conn.get_execution_options().get(_WRITE_OPTION) else "BEGIN")


def _upgrade(engine: "Engine", db: Path) -> None:
    """Alembic upgrade to head in one transaction (rolled back whole if anything fails)."""
    from alembic import command
    from sqlalchemy.exc import SQLAlchemyError

    try:
        with engine.execution_options(**{_WRITE_OPTION: True}).begin() as conn:
            command.upgrade(alembic_config(conn), "head")
    except (SQLAlchemyError, sqlite3.Error) as exc:
        known = dbfile.known_error(exc, db)  # damaged, locked, full, read-only...: that sentence says it best
        raise known or StoreError(
            f"The sessions database {db} could not be upgraded to the current layout ({dbfile.error_text(exc)}); "
            "it was left as it was."
        ) from exc


# ----------------------------------------------------------------------------- conversions


def _with_counts(stmt: Any) -> Any:
    from sqlalchemy import func, select

    from core.sessions.schema import ModelRow, RunRow, SessionRow, TokenRunRow

    runs = select(func.count(RunRow.id)).where(RunRow.session_id == SessionRow.id).scalar_subquery()
    models = select(func.count(ModelRow.id)).where(ModelRow.session_id == SessionRow.id).scalar_subquery()
    token_runs = select(func.count(TokenRunRow.id)).where(TokenRunRow.session_id == SessionRow.id).scalar_subquery()
    return stmt.add_columns(runs, models, token_runs)


def _name(name: Any) -> str:
    if not isinstance(name, str) or not name.strip():
        raise StoreError(f"A session needs a name that is not empty; got {name!r}.")
    return name.strip()


def _text(value: Any, what: str) -> str:
    if not isinstance(value, str) or not value.strip():
        raise StoreError(f"{what} cannot be empty; got {value!r}.")
    return value.strip()


def _note_text(text: Any) -> None:
    if not isinstance(text, str):
        raise StoreError(f"A note's text must be a string, not {type(text).__name__}.")


def _json_object(value: Any, what: str) -> str:
    if not isinstance(value, dict):
        raise StoreError(f"The {what} must be a JSON object (a dict), not {type(value).__name__}.")
    try:
        return json.dumps(value, allow_nan=False)
    except (TypeError, ValueError) as exc:
        raise StoreError(f"The {what} cannot be saved as JSON ({exc}).") from None


def _decoded(text: str, field: str, what: str, kind: type) -> Any:
    """A JSON field of a record: a JSON object (``kind`` dict) or a list of path strings (``kind`` list)."""
    value = _loads(text, f"The {field} of {what}")
    ok = isinstance(value, kind) and (kind is dict or all(isinstance(p, str) for p in value))
    if not ok:
        expected = "a JSON object" if kind is dict else "a list of paths"
        raise StoreError(f"The {field} of {what} are not {expected}; the database was changed by another program.")
    return value


def _loads(text: str, what: str) -> Any:
    try:
        return json.loads(text)
    except ValueError:
        raise StoreError(f"{what} is not valid JSON; the database was changed by another program.") from None


def _session_info(row: "S.SessionRow", runs: int, models: int, token_runs: int = 0) -> SessionInfo:
    return SessionInfo(
        row.id, row.name, row.created_at, row.updated_at, int(runs or 0), int(models or 0), int(token_runs or 0)
    )


def _image_list(text: Optional[str]) -> list[str]:
    """A token run's image paths for deleting (a damaged field deletes nothing rather than failing)."""
    try:
        value = json.loads(text or "[]")
    except ValueError:
        return []
    return [str(p) for p in value] if isinstance(value, list) else []


def _model(row: "S.ModelRow") -> ModelRecord:
    return ModelRecord(
        row.id, row.session_id, row.path, row.name, row.architecture, row.header_hash, row.added_at, row.updated_at
    )


def _version(row: "S.RecipeVersionRow") -> RecipeVersion:
    return RecipeVersion(row.id, row.session_id, row.number, row.yaml_text, row.method, row.label, row.created_at)


def _run(row: "S.RunRow") -> RunRecord:
    return RunRecord(
        id=row.id,
        session_id=row.session_id,
        recipe_version_id=row.recipe_version_id,
        recipe_yaml=row.recipe_yaml,
        method=row.method,
        status=row.status,
        started_at=row.started_at,
        finished_at=row.finished_at,
        seconds=row.seconds,
        peak_memory_bytes=row.peak_memory_bytes,
        output_path=row.output_path,
        error=row.error,
        settings=_loads(row.settings, f"The settings of run {row.id}") if row.settings else {},
    )


def _note(row: "S.NoteRow") -> NoteRecord:
    return NoteRecord(row.id, row.session_id, row.text, row.created_at, row.updated_at)
