"""The LoRA tab: merge LoRAs into a model, combine several into one, extract one from two models.

A view over ``core.lora`` (PEFT adapter folders and kohya / A1111 files). Each
action runs as a job in the jobs area (progress per tensor, Stop), through the
engine's ``iter_*`` generators; an output joins the library when it is done.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Optional

from PySide6.QtCore import Qt, Signal
from PySide6.QtWidgets import (
    QAbstractItemView,
    QButtonGroup,
    QComboBox,
    QDoubleSpinBox,
    QFileDialog,
    QFormLayout,
    QGroupBox,
    QHBoxLayout,
    QHeaderView,
    QLabel,
    QLineEdit,
    QPushButton,
    QRadioButton,
    QScrollArea,
    QSpinBox,
    QTableWidget,
    QTableWidgetItem,
    QVBoxLayout,
    QWidget,
)

COMBINE_METHODS = ("linear", "ties", "dare_linear", "dare_ties")
MAX_RANK = 4096
DEFAULT_SVD_RANK = 16
EXACT_RANK_TEXT = "exact (ranks concatenated)"


class _ModelPicker(QComboBox):
    """A model of the library (or any path typed in)."""

    def __init__(self, library: Any) -> None:
        super().__init__()
        self.library = library
        self.setEditable(True)
        self.setMinimumWidth(260)
        self.lineEdit().setPlaceholderText("A model of the library, or a path")
        library.events.models_changed.connect(self.refresh)
        self.refresh()

    def refresh(self, *args: Any) -> None:
        current = self.path()
        self.blockSignals(True)
        self.clear()
        for info in self.library.models:
            if "LoRA" in (info.architecture or ""):
                continue  # adapters are not models to merge into
            self.addItem(f"{info.name}  ({info.architecture})", str(info.path))
        self.set_path(current)
        self.blockSignals(False)

    def path(self) -> str:
        index = self.currentIndex()
        text = self.currentText().strip()
        if index >= 0 and self.itemText(index) == text:
            return self.itemData(index) or text
        return text

    def set_path(self, path: str) -> None:
        index = self.findData(path)
        if index >= 0:
            self.setCurrentIndex(index)
        else:
            self.setEditText(path)


def _path_row(edit: QLineEdit, button: QPushButton) -> QWidget:
    row = QWidget()
    layout = QHBoxLayout(row)
    layout.setContentsMargins(0, 0, 0, 0)
    layout.addWidget(edit, 1)
    layout.addWidget(button)
    return row


class LoraPanel(QWidget):
    """Merge, combine and extract LoRAs; each runs as a job."""

    jobRequested = Signal(str, object, object)  # title, generator function, its kwargs (the window starts the job)

    def __init__(self, library: Any, parent: Optional[QWidget] = None) -> None:
        super().__init__(parent)
        self.library = library
        body = QWidget()
        layout = QVBoxLayout(body)
        layout.addWidget(self._merge_box())
        layout.addWidget(self._combine_box())
        layout.addWidget(self._extract_box())
        layout.addStretch(1)
        scroll = QScrollArea()
        scroll.setWidgetResizable(True)
        scroll.setWidget(body)
        outer = QVBoxLayout(self)
        outer.setContentsMargins(0, 0, 0, 0)
        outer.addWidget(scroll)

    # -- merge ---------------------------------------------------------------------
    def _merge_box(self) -> QGroupBox:
        box = QGroupBox("Merge LoRAs into a model:  W' = W + strength × (alpha / rank) × B·A")
        form = QFormLayout(box)
        self.merge_model = _ModelPicker(self.library)
        self.merge_loras = _LoraTable(with_strength=True)
        self.merge_output = QLineEdit()
        self.merge_output.setPlaceholderText("Output: a folder, or a .safetensors file for a single-file checkpoint")
        browse = QPushButton("Browse…")
        browse.clicked.connect(lambda: self._browse_save(self.merge_output))
        self.merge_button = QPushButton("Merge LoRAs")
        self.merge_button.setObjectName("primary")
        self.merge_button.clicked.connect(self.start_merge)
        form.addRow("Model", self.merge_model)
        form.addRow("LoRAs", self.merge_loras)
        form.addRow("Output", _path_row(self.merge_output, browse))
        form.addRow("", self.merge_button)
        return box

    def start_merge(self) -> None:
        from core.lora import iter_merge_lora

        loras = self.merge_loras.specs()
        kwargs = dict(model=self.merge_model.path(), loras=loras, output=self.merge_output.text().strip())
        self.jobRequested.emit(f"Merge {len(loras)} LoRA(s) into {Path(kwargs['model']).name}", iter_merge_lora, kwargs)

    # -- combine -------------------------------------------------------------------
    def _combine_box(self) -> QGroupBox:
        box = QGroupBox("Combine LoRAs into one")
        form = QFormLayout(box)
        self.combine_loras = _LoraTable(with_strength=True, strength_label="Weight")
        self.combine_method = QComboBox()
        self.combine_method.addItems(COMBINE_METHODS)
        self.combine_method.setToolTip(
            "linear: exact (the ranks are concatenated); ties, dare_*: on each module's full change, then refactored "
            "by truncated SVD to the rank below"
        )
        self.combine_density = QDoubleSpinBox()
        self.combine_density.setRange(0.01, 1.0)
        self.combine_density.setSingleStep(0.05)
        self.combine_density.setValue(0.5)
        self.combine_rank = QSpinBox()
        self._svd_rank = DEFAULT_SVD_RANK  # the rank ties / dare_* refactor to, kept while linear is shown
        self.combine_method.currentTextChanged.connect(self._combine_method_changed)
        self._combine_method_changed(self.combine_method.currentText())
        self.combine_output = QLineEdit()
        self.combine_output.setPlaceholderText("Output LoRA (.safetensors for kohya, a folder for PEFT)")
        browse = QPushButton("Browse…")
        browse.clicked.connect(lambda: self._browse_save(self.combine_output))
        self.combine_button = QPushButton("Combine")
        self.combine_button.clicked.connect(self.start_combine)
        form.addRow("LoRAs", self.combine_loras)
        form.addRow("Method", self.combine_method)
        form.addRow("Density (TIES, DARE)", self.combine_density)
        form.addRow("Rank of the result", self.combine_rank)
        form.addRow("Output", _path_row(self.combine_output, browse))
        form.addRow("", self.combine_button)
        return box

    def _combine_method_changed(self, method: str) -> None:
        """linear may keep the exact concatenated ranks (rank 0); ties / dare_* must refactor to a rank >= 1."""
        spin = self.combine_rank
        spin.blockSignals(True)
        if spin.value() >= 1:  # the rank given so far carries over to an SVD method
            self._svd_rank = spin.value()
        if method == "linear":
            spin.setRange(0, MAX_RANK)
            spin.setSpecialValueText(EXACT_RANK_TEXT)
            spin.setValue(0)
            spin.setToolTip("Exact keeps every rank (their sum); a number refactors the sum by truncated SVD")
        else:
            spin.setSpecialValueText("")  # the special text would otherwise label the minimum, rank 1
            spin.setRange(1, MAX_RANK)
            spin.setValue(self._svd_rank)
            spin.setToolTip(f"{method} changes each module densely; the result is refactored to this rank")
        spin.blockSignals(False)
        self.combine_density.setEnabled(method != "linear")

    def start_combine(self) -> None:
        from core.lora import iter_combine

        specs = self.combine_loras.specs()
        method = self.combine_method.currentText()
        kwargs: dict[str, Any] = dict(
            loras=[s[0] for s in specs],
            output=self.combine_output.text().strip(),
            method=method,
            weights=[s[1] for s in specs],
        )
        if method != "linear":
            kwargs["density"] = self.combine_density.value()
            kwargs["rank"] = max(1, self.combine_rank.value())  # the spin box allows no 0 here; never send "exact"
        elif self.combine_rank.value():
            kwargs["rank"] = self.combine_rank.value()
        self.jobRequested.emit(f"Combine {len(specs)} LoRAs ({method})", iter_combine, kwargs)

    # -- extract -------------------------------------------------------------------
    def _extract_box(self) -> QGroupBox:
        box = QGroupBox("Extract a LoRA from two models (truncated SVD of tuned − base)")
        form = QFormLayout(box)
        self.extract_base = _ModelPicker(self.library)
        self.extract_tuned = _ModelPicker(self.library)
        self.by_rank = QRadioButton("Rank")
        self.by_energy = QRadioButton("Energy")
        group = QButtonGroup(self)
        group.addButton(self.by_rank)
        group.addButton(self.by_energy)
        self.by_rank.setChecked(True)
        self.extract_rank = QSpinBox()
        self.extract_rank.setRange(1, 4096)
        self.extract_rank.setValue(16)
        self.extract_energy = QDoubleSpinBox()
        self.extract_energy.setRange(0.01, 1.0)
        self.extract_energy.setDecimals(3)
        self.extract_energy.setValue(0.9)
        self.extract_energy.setToolTip("Keep the smallest rank per module whose singular values hold this share of the energy")
        target = QWidget()
        t_layout = QHBoxLayout(target)
        t_layout.setContentsMargins(0, 0, 0, 0)
        for w in (self.by_rank, self.extract_rank, self.by_energy, self.extract_energy):
            t_layout.addWidget(w)
        t_layout.addStretch(1)
        self.extract_format = QComboBox()
        self.extract_format.addItems(["auto", "peft", "kohya"])
        self.extract_format.setToolTip("auto: PEFT for transformers models, kohya for Stable Diffusion checkpoints")
        self.extract_output = QLineEdit()
        self.extract_output.setPlaceholderText("Output: a folder (PEFT adapter) or a .safetensors file (kohya)")
        browse = QPushButton("Browse…")
        browse.clicked.connect(lambda: self._browse_save(self.extract_output))
        self.extract_button = QPushButton("Extract")
        self.extract_button.clicked.connect(self.start_extract)
        form.addRow("Base", self.extract_base)
        form.addRow("Tuned", self.extract_tuned)
        form.addRow("Keep", target)
        form.addRow("Format", self.extract_format)
        form.addRow("Output", _path_row(self.extract_output, browse))
        form.addRow("", self.extract_button)
        return box

    def start_extract(self) -> None:
        from core.lora import iter_extract

        kwargs: dict[str, Any] = dict(
            base=self.extract_base.path(),
            tuned=self.extract_tuned.path(),
            output=self.extract_output.text().strip(),
            format=self.extract_format.currentText(),
        )
        if self.by_rank.isChecked():
            kwargs["rank"] = self.extract_rank.value()
        else:
            kwargs["energy"] = self.extract_energy.value()
        self.jobRequested.emit(f"Extract a LoRA from {Path(kwargs['tuned']).name}", iter_extract, kwargs)

    def _browse_save(self, edit: QLineEdit) -> None:
        path, _ = QFileDialog.getSaveFileName(self, "Output", edit.text() or str(Path.home()))
        if path:
            edit.setText(path)


class _LoraTable(QWidget):
    """LoRA files or adapter folders with a strength (or weight) each."""

    def __init__(self, with_strength: bool = True, strength_label: str = "Strength") -> None:
        super().__init__()
        self.table = QTableWidget(0, 2)
        self.table.setHorizontalHeaderLabels(["LoRA", strength_label])
        self.table.horizontalHeader().setSectionResizeMode(0, QHeaderView.ResizeMode.Stretch)
        self.table.verticalHeader().setVisible(False)
        self.table.setSelectionBehavior(QAbstractItemView.SelectionBehavior.SelectRows)
        self.table.setMaximumHeight(120)
        add_file = QPushButton("Add file…")
        add_file.clicked.connect(self._choose_file)
        add_folder = QPushButton("Add PEFT folder…")
        add_folder.clicked.connect(self._choose_folder)
        remove = QPushButton("Remove")
        remove.clicked.connect(self._remove)
        buttons = QHBoxLayout()
        for b in (add_file, add_folder, remove):
            buttons.addWidget(b)
        buttons.addStretch(1)
        layout = QVBoxLayout(self)
        layout.setContentsMargins(0, 0, 0, 0)
        layout.addWidget(self.table)
        layout.addLayout(buttons)

    def add(self, path: str, strength: float = 1.0) -> None:
        row = self.table.rowCount()
        self.table.insertRow(row)
        item = QTableWidgetItem(str(path))
        item.setFlags(item.flags() & ~Qt.ItemFlag.ItemIsEditable)
        item.setToolTip(str(path))
        self.table.setItem(row, 0, item)
        spin = QDoubleSpinBox()
        spin.setRange(-10.0, 10.0)
        spin.setSingleStep(0.05)
        spin.setDecimals(3)
        spin.setValue(strength)
        self.table.setCellWidget(row, 1, spin)

    def specs(self) -> list[tuple[str, float]]:
        return [
            (self.table.item(r, 0).text(), float(self.table.cellWidget(r, 1).value()))
            for r in range(self.table.rowCount())
        ]

    def _choose_file(self) -> None:
        path, _ = QFileDialog.getOpenFileName(self, "A LoRA file", str(Path.home()), "LoRA (*.safetensors)")
        if path:
            self.add(path)

    def _choose_folder(self) -> None:
        path = QFileDialog.getExistingDirectory(self, "A PEFT adapter folder", str(Path.home()))
        if path:
            self.add(path)

    def _remove(self) -> None:
        rows = sorted({i.row() for i in self.table.selectedIndexes()}, reverse=True)
        for r in rows:
            self.table.removeRow(r)
