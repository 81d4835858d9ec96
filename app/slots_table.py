"""The recipe's model slots: who is A, B, C, which one is the base; models dropped from the library land here."""

from __future__ import annotations

from pathlib import Path
from typing import Callable, Optional

from PySide6.QtCore import QMimeData, Qt, Signal
from PySide6.QtGui import QBrush, QColor, QDragEnterEvent, QDropEvent
from PySide6.QtWidgets import QAbstractItemView, QHeaderView, QTableWidget, QTableWidgetItem, QWidget

from core.merge.document import RecipeDocument
from core.merge.methods.base import BASE_IGNORED

MODEL_MIME = "application/x-mergestudio-models"  # newline-separated model paths


def model_mime(paths: list[str]) -> QMimeData:
    data = QMimeData()
    data.setData(MODEL_MIME, "\n".join(paths).encode("utf-8"))
    data.setText("\n".join(paths))
    return data


def paths_from_mime(data: QMimeData) -> list[str]:
    if data.hasFormat(MODEL_MIME):
        return [p for p in bytes(data.data(MODEL_MIME)).decode("utf-8").splitlines() if p]
    if data.hasUrls():
        return [u.toLocalFile() for u in data.urls() if u.isLocalFile()]
    return []


class ModelSlotsTable(QTableWidget):
    """Rows: role (A/B/Base), model name, architecture, path. Accepts drops of library models and folders."""

    COLUMNS = ("Role", "Model", "Architecture", "Path")
    modelsDropped = Signal(list)  # paths

    def __init__(self, doc: RecipeDocument, describe: Callable[[str], Optional[str]], parent: Optional[QWidget] = None) -> None:
        super().__init__(0, len(self.COLUMNS), parent)
        self.doc = doc
        self.describe = describe  # ref -> architecture text (from the library), or None
        self._problem_refs: set[str] = set()
        self.setHorizontalHeaderLabels(list(self.COLUMNS))
        self.horizontalHeader().setSectionResizeMode(QHeaderView.ResizeMode.ResizeToContents)
        self.horizontalHeader().setStretchLastSection(True)
        self.verticalHeader().setVisible(False)
        self.setSelectionBehavior(QAbstractItemView.SelectionBehavior.SelectRows)
        self.setSelectionMode(QAbstractItemView.SelectionMode.SingleSelection)
        self.setEditTriggers(QAbstractItemView.EditTrigger.NoEditTriggers)
        self.setAcceptDrops(True)
        self.viewport().setAcceptDrops(True)
        self.setDragDropMode(QAbstractItemView.DragDropMode.DropOnly)
        self.setMinimumHeight(110)
        self.setToolTip("Drag models here from the library (or double-click them there)")
        doc.events.changed.connect(self._on_doc_changed)
        self.refresh()

    def _on_doc_changed(self, what: str) -> None:
        if what in ("slots", "method", "all"):
            self.refresh()

    def set_problem_refs(self, refs: set[str]) -> None:
        """Highlight the slots a preflight problem names."""
        self._problem_refs = refs
        self.refresh()

    def refresh(self) -> None:
        doc = self.doc
        self.setRowCount(len(doc.slots))
        uses_base = doc.method.base != BASE_IGNORED
        for row, slot in enumerate(doc.slots):
            if row == doc.base_index:
                role = "Base" if uses_base else f"{doc.label(row)} · base_model"
            else:
                role = doc.label(row)
            arch = self.describe(slot.ref) or ""
            cells = (role, slot.name, arch, slot.ref)
            for col, text in enumerate(cells):
                item = QTableWidgetItem(text)
                item.setToolTip(slot.ref)
                if row == doc.base_index and col == 0:
                    font = item.font()
                    font.setBold(True)
                    item.setFont(font)
                if slot.ref in self._problem_refs or slot.name in self._problem_refs:
                    item.setForeground(QBrush(QColor("#e25c5c")))
                self.setItem(row, col, item)

    def selected_slot(self) -> Optional[int]:
        rows = {i.row() for i in self.selectedIndexes()}
        return next(iter(rows)) if rows else None

    # -- drops -------------------------------------------------------------------
    def dragEnterEvent(self, event: QDragEnterEvent) -> None:  # noqa: N802 (Qt naming)
        if paths_from_mime(event.mimeData()):
            event.acceptProposedAction()
        else:
            event.ignore()

    def dragMoveEvent(self, event) -> None:  # noqa: N802
        if paths_from_mime(event.mimeData()):
            event.acceptProposedAction()
        else:
            event.ignore()

    def dropEvent(self, event: QDropEvent) -> None:  # noqa: N802
        paths = paths_from_mime(event.mimeData())
        if paths:
            event.acceptProposedAction()
            self.modelsDropped.emit([str(Path(p)) for p in paths])
        else:
            event.ignore()
