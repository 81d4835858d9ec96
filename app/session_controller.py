"""Sessions in the app: open the database off the GUI thread, autosave the workspace, record runs.

The store (:mod:`core.sessions`) is opened in a worker at start-up (migrations
may run, after a backup). A database locked by another Merge Studio window or
a corrupt file never stops the app: the window keeps working on an in-memory
store and says so, offering to start a new database beside the damaged one.
Every write is the store's own transaction; a failed write becomes a notice.
"""

from __future__ import annotations

from typing import Any, Callable, Optional

from PySide6.QtCore import QObject, QTimer, Signal

from app.workers import GeneratorWorker

AUTOSAVE_MS = 800


def _open_store() -> Any:
    from core.sessions import SessionStore

    return SessionStore.open()


class SessionController(QObject):
    """Owns the store and the open session; the window reacts to its signals."""

    ready = Signal()  # the store is open (maybe in memory) and a session is current
    sessionChanged = Signal(object)  # SessionInfo
    notice = Signal(str, list)  # a sentence and [(button text, callback)]
    historyChanged = Signal()

    def __init__(self, get_state: Callable[[], dict], set_state: Callable[[dict], None], parent: Optional[QObject] = None):
        super().__init__(parent)
        self.get_state = get_state
        self.set_state = set_state
        self.store: Any = None
        self.session: Any = None
        self.persistent = False
        self._worker: Optional[GeneratorWorker] = None
        self._restoring = False
        self._closed = False
        self._timer = QTimer(self)
        self._timer.setSingleShot(True)
        self._timer.setInterval(AUTOSAVE_MS)
        self._timer.timeout.connect(self.save_now)

    # -- opening ------------------------------------------------------------------
    def open_async(self, last_session_id: Optional[int] = None) -> None:
        if self._closed:  # the window closed before its start-up work began
            return
        self._last = last_session_id
        worker = GeneratorWorker(_open_store)
        worker.returned.connect(self._opened)
        worker.errored.connect(self._open_failed)
        self._worker = worker
        worker.start()

    def _opened(self, store: Any) -> None:
        if self._closed:  # the window closed while the database was opening: release it at once
            store.close()
            return
        self.store = store
        self.persistent = True
        if getattr(store, "backup_path", None):
            self.notice.emit(
                f"The sessions database was upgraded to a new format; a copy of the old one is at {store.backup_path}.",
                [],
            )
        interrupted = getattr(store, "interrupted_runs", [])
        if interrupted:
            outputs = ", ".join(r.output_path or "?" for r in interrupted[:3])
            self.notice.emit(
                f"{len(interrupted)} merge(s) were interrupted when the app last stopped ({outputs}); "
                "they are marked 'interrupted' in History and left no output.",
                [],
            )
        self._choose_initial_session()

    def _open_failed(self, text: str) -> None:
        from core.sessions import SessionStore

        if self._closed:
            return
        self.store = SessionStore.in_memory()
        self.persistent = False
        actions: list = []
        if "corrupt" in text.lower() or "not a" in text.lower() or "damaged" in text.lower():
            actions = [("Start a new database (keep the damaged file)", self.recover)]
        self.notice.emit(f"{text} Sessions are not saved in this window.", actions)
        self._choose_initial_session()

    def recover(self) -> None:
        """Move a corrupt database aside and start a new one."""
        from core.sessions import SessionStore, StoreError

        state = self.get_state()
        try:
            store, kept = SessionStore.recover()
        except StoreError as exc:
            self.notice.emit(str(exc), [])
            return
        if self.store is not None:
            self.store.close()
        self.store = store
        self.persistent = True
        self.notice.emit(f"Started a new sessions database; the damaged one was kept as {kept}.", [])
        self.session = store.create_session()
        store.save_workspace(self.session.id, state)
        self.sessionChanged.emit(self.session)
        self.historyChanged.emit()

    def _choose_initial_session(self) -> None:
        from core.sessions import StoreError

        try:
            session = None
            if self._last is not None:
                try:
                    session = self.store.get_session(int(self._last))
                except StoreError:
                    session = None
            if session is None:
                recent = self.store.list_sessions(limit=1)
                session = recent[0] if recent else self.store.create_session()
            self._switch(session)
        except StoreError as exc:
            self.notice.emit(str(exc), [])
        self.ready.emit()

    # -- sessions -----------------------------------------------------------------
    def _switch(self, session: Any) -> None:
        from core.errors import MergeStudioError

        self.session = session
        state = self.store.load_workspace(session.id)
        self._restoring = True
        try:
            self.set_state(state or {})
        except MergeStudioError as exc:
            self.notice.emit(f"The saved workspace of '{session.name}' could not be restored: {exc}", [])
        finally:
            self._restoring = False
        self.sessionChanged.emit(session)
        self.historyChanged.emit()

    def _guard(self, action: Callable[[], Any]) -> Any:
        from core.sessions import StoreError

        if self.store is None:
            return None
        try:
            return action()
        except StoreError as exc:
            self.notice.emit(str(exc), [])
            return None

    def new_session(self, name: Optional[str] = None) -> Any:
        self.save_now()
        session = self._guard(lambda: self.store.create_session(name))
        if session is not None:
            self._restoring = True
            try:
                self.set_state({})
            finally:
                self._restoring = False
            self.session = session
            self._guard(lambda: self.store.save_workspace(session.id, self.get_state()))
            self.sessionChanged.emit(session)
            self.historyChanged.emit()
        return session

    def open_session(self, session_id: int) -> Any:
        self.save_now()
        session = self._guard(lambda: self.store.get_session(session_id))
        if session is not None:
            self._switch(session)
        return session

    def rename_session(self, name: str) -> Any:
        if self.session is None:
            return None
        session = self._guard(lambda: self.store.rename_session(self.session.id, name))
        if session is not None:
            self.session = session
            self.sessionChanged.emit(session)
        return session

    def delete_session(self, session_id: int) -> None:
        if self._guard(lambda: self.store.delete_session(session_id) or True) is None:
            return
        if self.session is not None and self.session.id == session_id:
            recent = self._guard(lambda: self.store.list_sessions(limit=1)) or []
            if recent:
                self._switch(recent[0])
            else:
                self.new_session()

    def recent(self, limit: int = 10) -> list:
        return self._guard(lambda: self.store.list_sessions(limit=limit)) or []

    # -- autosave -----------------------------------------------------------------
    def changed(self) -> None:
        """The workspace changed: save it soon (debounced)."""
        if not self._restoring and self.session is not None:
            self._timer.start()

    def save_now(self) -> None:
        self._timer.stop()
        if self.store is None or self.session is None:
            return
        state = self.get_state()
        session_id = self.session.id
        self._guard(lambda: self.store.save_workspace(session_id, state))
        text = state.get("yaml") or ""
        if text.strip():
            method = state.get("method")
            before = len(self._guard(lambda: self.store.list_recipe_versions(session_id)) or [])
            self._guard(lambda: self.store.add_recipe_version(session_id, text, method=method))
            after = len(self._guard(lambda: self.store.list_recipe_versions(session_id)) or [])
            if after != before:
                self.historyChanged.emit()

    # -- runs -----------------------------------------------------------------------
    def record_models(self, facts: dict[str, dict]) -> None:
        if self.session is None:
            return
        for ref, fact in facts.items():
            self._guard(
                lambda r=ref, f=fact: self.store.add_model(
                    self.session.id,
                    f.get("path") or r,
                    name=f.get("name") or r,
                    architecture=f.get("architecture"),
                    header_hash=f.get("header_hash"),
                )
            )

    def start_run(self, recipe_yaml: str, output: str, method: str, settings: dict) -> Any:
        if self.session is None:
            return None
        session_id = self.session.id
        version = self._guard(lambda: self.store.add_recipe_version(session_id, recipe_yaml, method=method))
        run = self._guard(
            lambda: self.store.start_run(
                session_id,
                recipe_yaml,
                output,
                method=method,
                settings=settings,
                recipe_version_id=getattr(version, "id", None),
            )
        )
        self.historyChanged.emit()
        return run

    def finish_run(self, run_id: Optional[int], status: str, **values: Any) -> None:
        if run_id is None:
            return
        self._guard(lambda: self.store.finish_run(run_id, status, **values))
        self.historyChanged.emit()

    def close(self) -> None:
        self._closed = True
        if self._worker is not None and self._worker.is_running():
            self._worker.wait(30000)  # the database is opening: let it finish so its lock is released
            from PySide6.QtCore import QCoreApplication

            QCoreApplication.sendPostedEvents(self._worker)
        self.save_now()
        if self.store is not None:
            self.store.close()
            self.store = None
