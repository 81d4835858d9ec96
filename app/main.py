"""The application entry point and a first main window.

This window is deliberately small (the full workspace is its own piece of
work): it opens a mergekit recipe, runs the engine's preflight in a worker
thread and shows the plan. The GUI thread never waits on the engine.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Optional

from PySide6.QtCore import QObject, QThread, Signal, Slot
from PySide6.QtGui import QAction, QFont
from PySide6.QtWidgets import (
    QApplication,
    QFileDialog,
    QLabel,
    QMainWindow,
    QPlainTextEdit,
    QSplitter,
    QTabWidget,
    QListWidget,
    QWidget,
    QVBoxLayout,
)


class PreflightWorker(QObject):
    """Runs the engine's preflight (``mergestudio check``) off the GUI thread."""

    finished = Signal(str, list)  # the plan as text, the models' names
    failed = Signal(str)  # one sentence

    def __init__(self, recipe_path: Path) -> None:
        super().__init__()
        self.recipe_path = recipe_path

    @Slot()
    def run(self) -> None:
        import core.merge as merge
        from core.cli import format_plan
        from core.errors import MergeStudioError

        try:
            plan = merge.check(self.recipe_path)
        except MergeStudioError as exc:
            self.failed.emit(f"error: {exc}")
            return
        except Exception as exc:  # a bug in the engine: show it, never take the window down
            self.failed.emit(f"internal error: {type(exc).__name__}: {exc}")
            return
        try:
            self.finished.emit(format_plan(plan, str(self.recipe_path)), plan.recipe.model_refs())
        finally:
            plan.close()


class MainWindow(QMainWindow):
    def __init__(self) -> None:
        super().__init__()
        self.setWindowTitle("Merge Studio")
        self.resize(1100, 700)
        self._thread: Optional[QThread] = None
        self._worker: Optional[PreflightWorker] = None

        library = QWidget()
        lib_layout = QVBoxLayout(library)
        lib_layout.addWidget(QLabel("Models"))
        self.models = QListWidget()
        lib_layout.addWidget(self.models)

        self.tabs = QTabWidget()
        self.plan_view = QPlainTextEdit()
        self.plan_view.setReadOnly(True)
        self.plan_view.setFont(QFont("monospace"))
        self.plan_view.setLineWrapMode(QPlainTextEdit.LineWrapMode.NoWrap)
        self.plan_view.setPlaceholderText("Open a mergekit recipe (File > Open recipe…) to check it.")
        self.tabs.addTab(self.plan_view, "Merge")

        splitter = QSplitter()
        splitter.addWidget(library)
        splitter.addWidget(self.tabs)
        splitter.setStretchFactor(1, 3)
        self.setCentralWidget(splitter)

        open_action = QAction("Open recipe…", self)
        open_action.triggered.connect(self.choose_recipe)
        self.menuBar().addMenu("&File").addAction(open_action)
        self.statusBar().showMessage("Ready")

    def choose_recipe(self) -> None:
        path, _ = QFileDialog.getOpenFileName(self, "Open recipe", "", "Recipes (*.yaml *.yml)")
        if path:
            self.open_recipe(Path(path))

    def open_recipe(self, path: Path) -> None:
        self.statusBar().showMessage(f"Checking {path.name}…")
        self.plan_view.setPlainText("Checking…")
        thread = QThread(self)
        worker = PreflightWorker(path)
        worker.moveToThread(thread)
        thread.started.connect(worker.run)
        worker.finished.connect(self._show_plan)
        worker.failed.connect(self._show_error)
        worker.finished.connect(thread.quit)
        worker.failed.connect(thread.quit)
        self._thread, self._worker = thread, worker
        thread.start()

    @Slot(str, list)
    def _show_plan(self, text: str, models: list) -> None:
        self.plan_view.setPlainText(text)
        self.models.clear()
        self.models.addItems([Path(m).name or m for m in models])
        for row, ref in enumerate(models):
            self.models.item(row).setToolTip(ref)
        self.statusBar().showMessage("Recipe checked: ready to merge")

    @Slot(str)
    def _show_error(self, text: str) -> None:
        self.plan_view.setPlainText(text)
        self.statusBar().showMessage("The recipe has a problem")


def main(argv: Optional[list[str]] = None) -> int:
    app = QApplication.instance() or QApplication(argv if argv is not None else sys.argv)
    window = MainWindow()
    window.show()
    return app.exec()
