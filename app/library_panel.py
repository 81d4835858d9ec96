"""The model library at the side of the window: folders the user added, plus the Hugging Face cache.

A view of :class:`core.library.ModelLibrary`. Scanning (configs and headers
only) runs in a worker that hands batches of models to the GUI thread, so a
large folder never freezes the window; models appear as they are found.
Models drag onto the recipe (or double-click to add them).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Optional

from PySide6.QtCore import QAbstractTableModel, QModelIndex, QSortFilterProxyModel, Qt, Signal
from PySide6.QtWidgets import (
    QAbstractItemView,
    QFileDialog,
    QHBoxLayout,
    QHeaderView,
    QLabel,
    QLineEdit,
    QListWidget,
    QMenu,
    QPushButton,
    QStackedWidget,
    QTableView,
    QVBoxLayout,
    QWidget,
)

from app.format import count_text, size_text
from app.slots_table import model_mime
from app.workers import GeneratorWorker

COLUMNS = ("Name", "Architecture", "Parameters", "dtype", "Size", "Merged from", "Folder")


def provenance_text(info: Any) -> str:
    p = getattr(info, "provenance", None)
    if p is None:
        return ""
    return f"{p.tool}: {p.detail}" if p.detail else p.tool


class LibraryTableModel(QAbstractTableModel):
    """Rows of ModelInfo (the library's filtered list)."""

    def __init__(self) -> None:
        super().__init__()
        self.rows: list[Any] = []

    def set_rows(self, rows: list[Any]) -> None:
        self.beginResetModel()
        self.rows = list(rows)
        self.endResetModel()

    def rowCount(self, parent: QModelIndex = QModelIndex()) -> int:  # noqa: N802
        return 0 if parent.isValid() else len(self.rows)

    def columnCount(self, parent: QModelIndex = QModelIndex()) -> int:  # noqa: N802
        return len(COLUMNS)

    def headerData(self, section: int, orientation, role=Qt.ItemDataRole.DisplayRole):  # noqa: N802
        if role == Qt.ItemDataRole.DisplayRole and orientation == Qt.Orientation.Horizontal:
            return COLUMNS[section]
        return None

    def data(self, index: QModelIndex, role=Qt.ItemDataRole.DisplayRole):
        if not index.isValid():
            return None
        info = self.rows[index.row()]
        col = index.column()
        if role == Qt.ItemDataRole.DisplayRole:
            return (
                info.name,
                info.architecture,
                count_text(info.num_parameters),
                info.dtype,
                size_text(info.size_bytes),
                provenance_text(info),
                info.source,
            )[col]
        if role == Qt.ItemDataRole.UserRole:  # sort keys
            return (info.name.lower(), info.architecture, info.num_parameters, info.dtype, info.size_bytes,
                    provenance_text(info), info.source)[col]
        if role == Qt.ItemDataRole.ToolTipRole:
            lines = [str(info.path), f"{info.kind}, {info.layer_count or '?'} layers"]
            if info.provenance is not None:
                lines.append(provenance_text(info))
                if info.provenance.models:
                    lines.append("Models: " + ", ".join(info.provenance.models))
            return "\n".join(lines)
        return None

    def flags(self, index: QModelIndex):
        base = super().flags(index)
        return base | Qt.ItemFlag.ItemIsDragEnabled if index.isValid() else base

    def mimeTypes(self) -> list[str]:  # noqa: N802
        from app.slots_table import MODEL_MIME

        return [MODEL_MIME, "text/plain"]

    def mimeData(self, indexes: list[QModelIndex]):  # noqa: N802
        rows = list(dict.fromkeys(i.row() for i in indexes))  # in selection order, each once
        return model_mime([str(self.rows[r].path) for r in rows])


class LibraryPanel(QWidget):
    """Library folders, the models found in them, and scan problems."""

    addToRecipe = Signal(list)  # model paths
    useAsBase = Signal(str)
    demoRequested = Signal()
    foldersChanged = Signal(list)  # the library folders, to remember them

    def __init__(self, library: Any, parent: Optional[QWidget] = None) -> None:
        super().__init__(parent)
        self.library = library
        self.scans = 0  # finished scans (tests wait on it)
        self._scan_worker: Optional[GeneratorWorker] = None
        self._rescan_pending = False
        self._stopped = False  # the window is closing: no scan starts any more

        self.filter_edit = QLineEdit()
        self.filter_edit.setPlaceholderText("Filter: name, architecture, dtype, method…")
        self.filter_edit.setClearButtonEnabled(True)
        self.filter_edit.textChanged.connect(self._refilter)
        self.add_button = QPushButton("Add folder…")
        self.add_button.clicked.connect(self.choose_folder)
        self.rescan_button = QPushButton("Rescan")
        self.rescan_button.clicked.connect(lambda: self.scan())
        buttons = QHBoxLayout()
        buttons.addWidget(self.add_button)
        buttons.addWidget(self.rescan_button)
        buttons.addStretch(1)

        self.table_model = LibraryTableModel()
        self.proxy = QSortFilterProxyModel()
        self.proxy.setSourceModel(self.table_model)
        self.proxy.setSortRole(Qt.ItemDataRole.UserRole)
        self.table = QTableView()
        self.table.setModel(self.proxy)
        self.table.setSortingEnabled(True)
        self.table.sortByColumn(0, Qt.SortOrder.AscendingOrder)
        self.table.setSelectionBehavior(QAbstractItemView.SelectionBehavior.SelectRows)
        self.table.setSelectionMode(QAbstractItemView.SelectionMode.ExtendedSelection)
        self.table.setDragEnabled(True)
        self.table.setDragDropMode(QAbstractItemView.DragDropMode.DragOnly)
        self.table.verticalHeader().setVisible(False)
        self.table.horizontalHeader().setSectionResizeMode(QHeaderView.ResizeMode.Interactive)
        self.table.horizontalHeader().setStretchLastSection(True)
        self.table.setContextMenuPolicy(Qt.ContextMenuPolicy.CustomContextMenu)
        self.table.customContextMenuRequested.connect(self._context_menu)
        self.table.doubleClicked.connect(lambda index: self.addToRecipe.emit(self.selected_paths()))

        empty = QWidget()
        empty_layout = QVBoxLayout(empty)
        self.empty_label = QLabel(
            "No models found yet.\n\nAdd a folder that holds models (Hugging Face folders, diffusers pipelines or "
            ".safetensors checkpoints), or create a small demo family to try a merge right away: a tiny base model "
            "and two fine-tune-like variants with a tokenizer, built on this machine in seconds."
        )
        self.empty_label.setWordWrap(True)
        self.empty_label.setAlignment(Qt.AlignmentFlag.AlignCenter)
        self.demo_button = QPushButton("Create demo models")
        self.demo_button.setObjectName("primary")
        self.demo_button.clicked.connect(self.demoRequested.emit)
        empty_add = QPushButton("Add folder…")
        empty_add.clicked.connect(self.choose_folder)
        empty_layout.addStretch(1)
        empty_layout.addWidget(self.empty_label)
        row = QHBoxLayout()
        row.addStretch(1)
        row.addWidget(empty_add)
        row.addWidget(self.demo_button)
        row.addStretch(1)
        empty_layout.addLayout(row)
        empty_layout.addStretch(2)

        self.stack = QStackedWidget()
        self.stack.addWidget(self.table)
        self.stack.addWidget(empty)

        self.status_label = QLabel()
        self.status_label.setObjectName("muted")
        self.status_label.setWordWrap(True)
        self.problems = QListWidget()
        self.problems.setMaximumHeight(90)
        self.problems.setVisible(False)
        self.problems.setWordWrap(True)

        layout = QVBoxLayout(self)
        layout.setContentsMargins(4, 4, 4, 4)
        layout.addWidget(self.filter_edit)
        layout.addLayout(buttons)
        layout.addWidget(self.stack, 1)
        layout.addWidget(self.problems)
        layout.addWidget(self.status_label)

        library.events.models_changed.connect(self._refilter)
        library.events.models_changed.connect(self._count_changed)
        library.events.problems_changed.connect(self._show_problems)
        self._refilter()

    # -- folders and scanning ------------------------------------------------------------
    def choose_folder(self) -> None:
        folder = QFileDialog.getExistingDirectory(self, "Add a folder of models", str(Path.home()))
        if folder:
            self.add_folder(Path(folder))

    def add_folder(self, folder: Path) -> bool:
        """Add ``folder`` to the library and scan it; a problem shows in the status line."""
        from core.errors import MergeStudioError

        try:
            self.library.add_folder(folder)
        except MergeStudioError as exc:
            self.status_label.setText(str(exc))
            return False
        self.foldersChanged.emit([str(f) for f in self.library.folders])
        self.scan([Path(folder)], hf_cache=False)
        return True

    def scan(self, roots: Optional[list[Path]] = None, *, hf_cache: bool = True) -> None:
        """Scan ``roots`` (default: every library folder and the HF cache) in a worker."""
        if self._stopped:
            return
        if self._scan_worker is not None and self._scan_worker.is_running():
            self._rescan_pending = True  # one more full scan when this one ends
            return
        from core.library import iter_scan

        roots = list(self.library.folders) if roots is None else roots
        self.library.begin_scan(roots)
        self.status_label.setText("Scanning…")
        self.rescan_button.setEnabled(False)
        worker = GeneratorWorker(iter_scan, roots, hf_cache=hf_cache)
        worker.yielded.connect(self._batch_found)
        worker.returned.connect(self._scan_done)
        worker.errored.connect(self._scan_failed)
        worker.finished.connect(self._scan_ended)
        self._scan_worker = worker
        worker.start()

    def _batch_found(self, batch: Any) -> None:
        self.library.apply(batch)
        self.status_label.setText(f"Scanning… {len(self.library.models)} models")

    def _scan_done(self, summary: Any) -> None:
        self.library.finish_scan(summary)
        parts = [f"{len(self.library.models)} models"]
        if summary.problems:
            parts.append(f"{summary.problems} problems")
        for root in summary.empty_roots:
            parts.append(f"no models found in {root}")
        self.status_label.setText("; ".join(parts) + ".")

    def _scan_failed(self, text: str) -> None:
        self.status_label.setText(f"Scan stopped: {text}")

    def _scan_ended(self) -> None:
        self.scans += 1
        self.rescan_button.setEnabled(True)
        if self._rescan_pending:
            self._rescan_pending = False
            self.scan()

    def stop(self) -> None:
        """Stop the scan for good (the window is closing): no pending rescan starts after it."""
        self._stopped = True
        self._rescan_pending = False
        if self._scan_worker is not None:
            self._scan_worker.quit()

    # -- views --------------------------------------------------------------------------
    def _refilter(self, *args: Any) -> None:
        rows = self.library.filter(self.filter_edit.text())
        self.table_model.set_rows(rows)
        self.table.resizeColumnToContents(0)
        nothing = not self.library.models
        self.stack.setCurrentIndex(1 if nothing else 0)

    def _count_changed(self, *args: Any) -> None:
        if self._scan_worker is None or not self._scan_worker.is_running():
            text = self.status_label.text()
            if text.endswith(" models.") or " models; " in text or not text:
                rest = text.split(" models", 1)[1] if " models" in text else "."
                self.status_label.setText(f"{len(self.library.models)} models{rest}")

    def _show_problems(self, *args: Any) -> None:
        self.problems.clear()
        for p in self.library.problems:
            self.problems.addItem(p.message)
        self.problems.setVisible(bool(self.library.problems))

    def selected_paths(self) -> list[str]:
        rows = sorted({self.proxy.mapToSource(i).row() for i in self.table.selectionModel().selectedRows()})
        return [str(self.table_model.rows[r].path) for r in rows]

    def visible_names(self) -> list[str]:
        return [self.proxy.index(r, 0).data() for r in range(self.proxy.rowCount())]

    def select_path(self, path: str) -> bool:
        for r in range(self.proxy.rowCount()):
            source = self.proxy.mapToSource(self.proxy.index(r, 0))
            if str(self.table_model.rows[source.row()].path) == str(path):
                self.table.selectRow(r)
                return True
        return False

    def _context_menu(self, pos) -> None:
        paths = self.selected_paths()
        if not paths:
            return
        menu = QMenu(self)
        menu.addAction("Add to recipe", lambda: self.addToRecipe.emit(paths))
        if len(paths) == 1:
            menu.addAction("Add as base model", lambda: self.useAsBase.emit(paths[0]))
        menu.exec(self.table.viewport().mapToGlobal(pos))
