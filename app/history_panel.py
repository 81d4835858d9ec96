"""The session's history: every merge run and recipe version, loadable back into the editor, and notes."""

from __future__ import annotations

from typing import Any, Optional

from PySide6.QtCore import Qt, Signal
from PySide6.QtWidgets import (
    QAbstractItemView,
    QHBoxLayout,
    QHeaderView,
    QLabel,
    QLineEdit,
    QListWidget,
    QListWidgetItem,
    QPlainTextEdit,
    QPushButton,
    QSplitter,
    QTableWidget,
    QTableWidgetItem,
    QVBoxLayout,
    QWidget,
)

from app.format import seconds_text, size_text

RUN_COLUMNS = ("Started", "Status", "Method", "Output", "Time", "Peak memory", "Message")
VERSION_COLUMNS = ("Saved", "Method", "Label")
STATUS_TEXT = {
    "running": "running",
    "succeeded": "done",
    "failed": "failed",
    "cancelled": "stopped",
    "interrupted": "interrupted",
}


def _when(dt: Any) -> str:
    if dt is None:
        return ""
    try:
        return dt.astimezone().strftime("%Y-%m-%d %H:%M:%S")
    except (AttributeError, ValueError):
        return str(dt)


class HistoryPanel(QWidget):
    """Runs (newest first), recipe versions and notes of the open session."""

    loadRecipe = Signal(str)  # recipe YAML
    loadSettings = Signal(dict)  # a run's export settings (device, seed, shard size, model card), after loadRecipe
    addOutput = Signal(str)  # an output folder for the library
    problem = Signal(str)

    def __init__(self, parent: Optional[QWidget] = None) -> None:
        super().__init__(parent)
        self.store: Any = None
        self.session_id: Optional[int] = None
        self.runs: list[Any] = []
        self.versions: list[Any] = []
        self._selected_yaml = ""
        self._selected_settings: dict = {}
        self._selected_output = ""

        self.runs_table = self._table(RUN_COLUMNS)
        self.runs_table.itemSelectionChanged.connect(self._run_selected)
        self.versions_table = self._table(VERSION_COLUMNS)
        self.versions_table.itemSelectionChanged.connect(self._version_selected)
        self.preview = QPlainTextEdit()
        self.preview.setReadOnly(True)
        self.preview.setPlaceholderText("Select a run or a recipe version to see its recipe.")
        self.load_button = QPushButton("Load recipe into editor")
        self.load_button.setEnabled(False)
        self.load_button.clicked.connect(self._load_clicked)
        self.output_button = QPushButton("Add output to library")
        self.output_button.setEnabled(False)
        self.output_button.clicked.connect(lambda: self.addOutput.emit(self._selected_output))

        self.notes = QListWidget()
        self.notes.setWordWrap(True)
        self.note_edit = QLineEdit()
        self.note_edit.setPlaceholderText("Add a note to this session and press Enter")
        self.note_edit.returnPressed.connect(self._add_note)
        self.delete_note_button = QPushButton("Delete note")
        self.delete_note_button.clicked.connect(self._delete_note)

        runs_box = QWidget()
        runs_layout = QVBoxLayout(runs_box)
        runs_layout.setContentsMargins(0, 0, 0, 0)
        runs_layout.addWidget(QLabel("<b>Merge runs</b>"))
        runs_layout.addWidget(self.runs_table)
        versions_box = QWidget()
        v_layout = QVBoxLayout(versions_box)
        v_layout.setContentsMargins(0, 0, 0, 0)
        v_layout.addWidget(QLabel("<b>Recipe versions</b>"))
        v_layout.addWidget(self.versions_table)
        preview_box = QWidget()
        p_layout = QVBoxLayout(preview_box)
        p_layout.setContentsMargins(0, 0, 0, 0)
        p_layout.addWidget(self.preview, 1)
        buttons = QHBoxLayout()
        buttons.addWidget(self.load_button)
        buttons.addWidget(self.output_button)
        buttons.addStretch(1)
        p_layout.addLayout(buttons)
        notes_box = QWidget()
        n_layout = QVBoxLayout(notes_box)
        n_layout.setContentsMargins(0, 0, 0, 0)
        n_layout.addWidget(QLabel("<b>Notes</b>"))
        n_layout.addWidget(self.notes, 1)
        n_layout.addWidget(self.note_edit)
        n_layout.addWidget(self.delete_note_button, 0, Qt.AlignmentFlag.AlignLeft)

        lower = QSplitter()
        lower.addWidget(versions_box)
        lower.addWidget(preview_box)
        lower.addWidget(notes_box)
        lower.setStretchFactor(1, 2)
        outer = QSplitter(Qt.Orientation.Vertical)
        outer.addWidget(runs_box)
        outer.addWidget(lower)
        layout = QVBoxLayout(self)
        layout.addWidget(outer)

    @staticmethod
    def _table(columns: tuple[str, ...]) -> QTableWidget:
        table = QTableWidget(0, len(columns))
        table.setHorizontalHeaderLabels(list(columns))
        table.verticalHeader().setVisible(False)
        table.setSelectionBehavior(QAbstractItemView.SelectionBehavior.SelectRows)
        table.setSelectionMode(QAbstractItemView.SelectionMode.SingleSelection)
        table.setEditTriggers(QAbstractItemView.EditTrigger.NoEditTriggers)
        table.horizontalHeader().setSectionResizeMode(QHeaderView.ResizeMode.ResizeToContents)
        table.horizontalHeader().setStretchLastSection(True)
        return table

    def set_session(self, store: Any, session_id: Optional[int]) -> None:
        self.store = store
        self.session_id = session_id
        self.refresh()

    def refresh(self) -> None:
        from core.sessions import StoreError

        self.runs, self.versions, notes = [], [], []
        if self.store is not None and self.session_id is not None:
            try:
                self.runs = self.store.list_runs(self.session_id)
                self.versions = self.store.list_recipe_versions(self.session_id)
                notes = self.store.list_notes(self.session_id)
            except StoreError as exc:
                self.problem.emit(str(exc))
        self.runs_table.setRowCount(len(self.runs))
        for row, run in enumerate(self.runs):
            cells = (
                _when(run.started_at),
                STATUS_TEXT.get(run.status, run.status),
                run.method or "",
                run.output_path or "",
                seconds_text(run.seconds),
                size_text(run.peak_memory_bytes),
                run.error or "",
            )
            for col, text in enumerate(cells):
                item = QTableWidgetItem(text)
                item.setToolTip(text)
                self.runs_table.setItem(row, col, item)
        self.versions_table.setRowCount(len(self.versions))
        for row, version in enumerate(self.versions):
            for col, text in enumerate((_when(version.created_at), version.method or "", version.label or "")):
                self.versions_table.setItem(row, col, QTableWidgetItem(text))
        self.notes.clear()
        for note in notes:
            item = QListWidgetItem(f"{_when(note.created_at)}  {note.text}")
            item.setData(Qt.ItemDataRole.UserRole, note.id)
            self.notes.addItem(item)

    def _run_selected(self) -> None:
        rows = {i.row() for i in self.runs_table.selectedIndexes()}
        if not rows:
            return
        run = self.runs[next(iter(rows))]
        self.versions_table.clearSelection()
        self._show(run.recipe_yaml, run.output_path if run.status == "succeeded" else "", run.settings or {})

    def _version_selected(self) -> None:
        rows = {i.row() for i in self.versions_table.selectedIndexes()}
        if not rows:
            return
        version = self.versions[next(iter(rows))]
        self.runs_table.clearSelection()
        self._show(version.yaml, "")

    def _load_clicked(self) -> None:
        self.loadRecipe.emit(self._selected_yaml)
        if self._selected_settings:
            self.loadSettings.emit(dict(self._selected_settings))

    def _show(self, text: str, output: str, settings: Optional[dict] = None) -> None:
        self._selected_settings = settings or {}
        self._selected_yaml = text or ""
        self._selected_output = output or ""
        self.preview.setPlainText(self._selected_yaml)
        self.load_button.setEnabled(bool(self._selected_yaml.strip()))
        self.output_button.setEnabled(bool(self._selected_output))

    def select_run(self, row: int) -> None:
        self.runs_table.selectRow(row)

    def _add_note(self) -> None:
        from core.sessions import StoreError

        text = self.note_edit.text().strip()
        if not text or self.store is None or self.session_id is None:
            return
        try:
            self.store.add_note(self.session_id, text)
        except StoreError as exc:
            self.problem.emit(str(exc))
            return
        self.note_edit.clear()
        self.refresh()

    def _delete_note(self) -> None:
        from core.sessions import StoreError

        item = self.notes.currentItem()
        if item is None or self.store is None:
            return
        try:
            self.store.delete_note(item.data(Qt.ItemDataRole.UserRole))
        except StoreError as exc:
            self.problem.emit(str(exc))
            return
        self.refresh()
