"""The Merge workspace: build a recipe by pointing and clicking, see it checked live, press Merge.

The editor is a view of a :class:`~core.merge.document.RecipeDocument`: the
slots table, the parameter panel, the curve editor and the YAML view all edit
that one model and redraw from its ``changed`` event, so they never disagree.
The preflight (``core.merge.preflight``) runs in a worker, debounced, and
only its latest result is shown.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable, Optional

from PySide6.QtCore import Qt, QTimer, Signal
from PySide6.QtWidgets import (
    QCheckBox,
    QComboBox,
    QFileDialog,
    QGridLayout,
    QGroupBox,
    QHBoxLayout,
    QLabel,
    QLineEdit,
    QPlainTextEdit,
    QPushButton,
    QSpinBox,
    QSplitter,
    QStackedWidget,
    QTabWidget,
    QVBoxLayout,
    QWidget,
)

from app.format import size_text
from app.param_panel import ParameterPanel, value_span
from app.slots_table import ModelSlotsTable
from app.workers import GeneratorWorker
from core.errors import MergeStudioError
from core.merge.document import RecipeDocument
from core.merge.methods import all_methods
from core.merge.methods.base import BASE_IGNORED, BASE_OPTIONAL, BASE_REQUIRED, GLOBAL

PREFLIGHT_DELAY_MS = 300
YAML_DELAY_MS = 600
OUT_DTYPES = (("Same as inputs", None), ("bfloat16", "bfloat16"), ("float16", "float16"), ("float32", "float32"))


class RecipeEditor(QWidget):
    """The Merge tab. ``mergeRequested`` fires when the user presses Merge on a checked recipe."""

    mergeRequested = Signal()
    problem = Signal(str)  # a sentence for the window's notice bar

    def __init__(self, doc: RecipeDocument, describe: Callable[[str], Optional[Any]], parent: Optional[QWidget] = None):
        super().__init__(parent)
        self.doc = doc
        self.describe = describe  # ref -> ModelInfo-like (architecture, layer_count) or None
        self.last_report: Any = None
        self.preflight_runs = 0  # finished preflights (tests wait on it)
        self._preflight_seq = 0
        self._shown_seq = 0
        self._preflight_worker: Optional[GeneratorWorker] = None
        self._curve_target: Optional[tuple[str, Optional[int]]] = None
        self._filters: tuple[tuple[str, ...], tuple[str, ...]] = (("self_attn",), ("mlp",))
        self._yaml_updating = False
        self._yaml_dirty = False  # the YAML view holds edits not (yet, or not validly) applied to the recipe
        self._curve_editing = False  # a change that came from the curve editor: don't reset it mid-drag
        self.curve_editor: Any = None

        # -- method picker and formula -------------------------------------------
        self.method_combo = QComboBox()
        for m in all_methods():
            self.method_combo.addItem(f"{m.display_name}  ({m.name})", m.name)
        self.method_combo.setToolTip("Merge method (from the engine's registry)")
        self.method_combo.activated.connect(self._method_picked)
        self.method_info = QLabel()
        self.method_info.setWordWrap(True)
        self.method_info.setOpenExternalLinks(True)
        self.method_info.setTextFormat(Qt.TextFormat.RichText)
        self.formula_label = QLabel()
        self.formula_label.setObjectName("formula")
        self.formula_label.setWordWrap(True)
        self.formula_label.setTextInteractionFlags(Qt.TextInteractionFlag.TextSelectableByMouse)
        self.formula_label.setToolTip("What the merge computes, with the models' names")

        # -- slots ---------------------------------------------------------------------
        self.slots_table = ModelSlotsTable(doc, lambda ref: getattr(self.describe(ref), "architecture", None))
        self.slots_table.modelsDropped.connect(self.add_models)
        self.slots_table.setMinimumHeight(90)
        self.remove_button = QPushButton("Remove")
        self.up_button = QPushButton("Up")
        self.down_button = QPushButton("Down")
        self.base_button = QPushButton("Set as base")
        self.remove_button.clicked.connect(self._remove_slot)
        self.up_button.clicked.connect(lambda: self._move_slot(-1))
        self.down_button.clicked.connect(lambda: self._move_slot(1))
        self.base_button.clicked.connect(self._toggle_base)
        slot_buttons = QHBoxLayout()
        for b in (self.remove_button, self.up_button, self.down_button, self.base_button):
            slot_buttons.addWidget(b)
        slot_buttons.addStretch(1)

        # -- parameters -------------------------------------------------------------
        self.params = ParameterPanel(doc)
        self.params.curve_seed = self._curve_seed  # per layer (gradients) or per block (Stable Diffusion)
        self.params.curveRequested.connect(self._curve_requested)

        slots_box = QWidget()
        slots_layout = QVBoxLayout(slots_box)
        slots_layout.setContentsMargins(0, 0, 0, 0)
        models_label = QLabel("Models (drag from the library)")
        models_label.setObjectName("muted")
        slots_layout.addWidget(models_label)
        slots_layout.addWidget(self.slots_table, 1)
        slots_layout.addLayout(slot_buttons)
        left = QSplitter(Qt.Orientation.Vertical)
        left.addWidget(slots_box)
        left.addWidget(self.params)
        left.setStretchFactor(0, 1)
        left.setStretchFactor(1, 3)
        left.setSizes([170, 480])

        # -- right: curve, YAML, plan --------------------------------------------------
        self.side_tabs = QTabWidget()
        self.curve_stack = QStackedWidget()
        self.curve_hint = QLabel("Press 'Per layer' beside a parameter to edit its curve over the layers.")
        self.curve_hint.setWordWrap(True)
        self.curve_hint.setAlignment(Qt.AlignmentFlag.AlignCenter)
        self.curve_hint.setObjectName("muted")
        self.curve_target_label = QLabel()
        curve_page = QWidget()
        self._curve_page_layout = QVBoxLayout(curve_page)
        self._curve_page_layout.addWidget(self.curve_target_label)
        self.curve_stack.addWidget(self.curve_hint)
        self.curve_stack.addWidget(curve_page)
        self.side_tabs.addTab(self.curve_stack, "Per-layer curve")

        self.yaml_view = QPlainTextEdit()
        self.yaml_view.setLineWrapMode(QPlainTextEdit.LineWrapMode.NoWrap)
        font = self.yaml_view.font()
        font.setFamily("monospace")
        self.yaml_view.setFont(font)
        self.yaml_view.setPlaceholderText("The recipe in mergekit's YAML format; edits here update the editor.")
        self.yaml_view.textChanged.connect(self._yaml_typed)
        self.yaml_status = QLabel()
        self.yaml_status.setWordWrap(True)
        yaml_page = QWidget()
        yaml_layout = QVBoxLayout(yaml_page)
        yaml_layout.setContentsMargins(0, 0, 0, 0)
        yaml_layout.addWidget(self.yaml_view, 1)
        yaml_layout.addWidget(self.yaml_status)
        self.side_tabs.addTab(yaml_page, "YAML")

        self.plan_view = QPlainTextEdit()
        self.plan_view.setReadOnly(True)
        self.plan_view.setLineWrapMode(QPlainTextEdit.LineWrapMode.NoWrap)
        self.plan_view.setFont(font)
        self.side_tabs.addTab(self.plan_view, "Plan")

        splitter = QSplitter()
        splitter.addWidget(left)
        splitter.addWidget(self.side_tabs)
        splitter.setStretchFactor(0, 5)
        splitter.setStretchFactor(1, 4)
        splitter.setSizes([560, 440])
        self.splitter = splitter

        # -- preflight and export ---------------------------------------------------------
        self.preflight_label = QLabel("Add models to check a recipe.")
        self.preflight_label.setWordWrap(True)
        self.preflight_label.setTextInteractionFlags(Qt.TextInteractionFlag.TextSelectableByMouse)
        self.estimate_label = QLabel()
        self.estimate_label.setObjectName("muted")
        self.estimate_label.setWordWrap(True)

        export = QGroupBox("Export")
        grid = QGridLayout(export)
        self.output_edit = QLineEdit()
        self.output_edit.setPlaceholderText("Output folder for the merged model")
        self.output_edit.editingFinished.connect(self._export_edited)
        browse = QPushButton("Browse…")
        browse.clicked.connect(self._browse_output)
        self.dtype_combo = QComboBox()
        for text, value in OUT_DTYPES:
            self.dtype_combo.addItem(text, value)
        self.dtype_combo.activated.connect(self._dtype_picked)
        self.shard_edit = QLineEdit()
        self.shard_edit.setMaximumWidth(90)
        self.shard_edit.setToolTip("Largest shard file, e.g. 5GB, 500MB, 2GiB")
        self.shard_edit.editingFinished.connect(self._export_edited)
        self.card_check = QCheckBox("Model card")
        self.card_check.setToolTip("Write README.md describing the merge (the recipe is always saved)")
        self.card_check.toggled.connect(self._export_edited)
        self.overwrite_check = QCheckBox("Replace existing output")
        self.overwrite_check.toggled.connect(self._export_edited)
        self.device_combo = QComboBox()
        self.device_combo.addItems(["auto", "cpu", "cuda"])
        self.device_combo.activated.connect(self._export_edited)
        self.seed_spin = QSpinBox()
        self.seed_spin.setRange(0, 2**31 - 1)
        self.seed_spin.setToolTip("Seed of the random methods (DARE, DELLA): the same seed gives the same merge")
        self.seed_spin.editingFinished.connect(self._export_edited)
        self.merge_button = QPushButton("Merge")
        self.merge_button.setObjectName("primary")
        self.merge_button.setEnabled(False)
        self.merge_button.clicked.connect(self._merge_clicked)
        grid.addWidget(QLabel("Output"), 0, 0)
        grid.addWidget(self.output_edit, 0, 1, 1, 5)
        grid.addWidget(browse, 0, 6)
        grid.addWidget(QLabel("dtype"), 1, 0)
        grid.addWidget(self.dtype_combo, 1, 1)
        grid.addWidget(QLabel("Shard size"), 1, 2)
        grid.addWidget(self.shard_edit, 1, 3)
        grid.addWidget(QLabel("Device"), 1, 4)
        grid.addWidget(self.device_combo, 1, 5)
        grid.addWidget(QLabel("Seed"), 2, 0)
        grid.addWidget(self.seed_spin, 2, 1)
        grid.addWidget(self.card_check, 2, 2, 1, 2)
        grid.addWidget(self.overwrite_check, 2, 4, 1, 2)
        grid.addWidget(self.merge_button, 1, 6, 2, 1)

        top = QHBoxLayout()
        top.addWidget(QLabel("Method"))
        top.addWidget(self.method_combo)
        top.addWidget(self.method_info, 1)
        layout = QVBoxLayout(self)
        layout.addLayout(top)
        layout.addWidget(self.formula_label)
        layout.addWidget(splitter, 1)
        layout.addWidget(self.preflight_label)
        layout.addWidget(self.estimate_label)
        layout.addWidget(export)

        self._preflight_timer = QTimer(self)
        self._preflight_timer.setSingleShot(True)
        self._preflight_timer.setInterval(PREFLIGHT_DELAY_MS)
        self._preflight_timer.timeout.connect(self.run_preflight)
        self._yaml_timer = QTimer(self)
        self._yaml_timer.setSingleShot(True)
        self._yaml_timer.setInterval(YAML_DELAY_MS)
        self._yaml_timer.timeout.connect(self.apply_yaml)

        doc.events.changed.connect(self._on_doc_changed)
        self._on_doc_changed("all")

    # -- public -------------------------------------------------------------------
    def add_models(self, paths: list[str], names: Optional[dict[str, str]] = None) -> None:
        """Add models to the recipe (drops, double-clicks); a problem goes to the notice bar."""
        for path in paths:
            info = self.describe(path)
            name = (names or {}).get(path) or getattr(info, "name", None)
            try:
                self.doc.add_model(path, name)
            except MergeStudioError as exc:
                self.problem.emit(str(exc))

    def schedule_preflight(self) -> None:
        """Check the recipe again soon; until then the last result is stale, so Merge waits for it."""
        self.merge_button.setEnabled(False)
        self._preflight_timer.start()

    def run_preflight(self) -> None:
        """Check the current recipe in a worker; a newer request makes older results stale."""
        self._preflight_timer.stop()
        self._preflight_seq += 1
        seq = self._preflight_seq
        if not self.doc.slots:
            self._show_report(seq, None)
            return
        try:
            recipe = self.doc.to_recipe()
        except MergeStudioError as exc:
            from core.merge.preflight import PreflightReport

            self._show_report(seq, PreflightReport(False, str(exc)))
            return
        from core.merge.preflight import preflight

        output = Path(self.doc.export.output).expanduser() if self.doc.export.output.strip() else None
        self.preflight_label.setText("Checking…")
        worker = GeneratorWorker(preflight, recipe, output, overwrite=self.doc.export.overwrite)
        worker.setProperty("seq", seq)
        # Bound methods (not lambdas): Qt drops the connection if this editor is gone before the check ends.
        worker.returned.connect(self._preflight_returned)
        worker.errored.connect(self._preflight_errored)
        self._preflight_worker = worker
        worker.start()

    def stop_checks(self) -> None:
        """Start no more checks (the window is closing)."""
        self._preflight_timer.stop()
        self._yaml_timer.stop()

    def preflight_idle(self) -> bool:
        """True when the shown preflight result belongs to the current recipe (nothing pending)."""
        return (
            not self._preflight_timer.isActive()
            and not self._yaml_timer.isActive()
            and self._shown_seq == self._preflight_seq
        )

    def select_curve(self, name: str, slot: Optional[int]) -> None:
        """Show the curve of parameter ``name`` (of model ``slot``, or global) in the curve editor."""
        self._curve_requested(name, slot)

    # -- document -> views ----------------------------------------------------------
    def _on_doc_changed(self, what: str) -> None:
        doc = self.doc
        label = "Per block" if self.block_names() is not None else None
        if label != self.params.curve_label:
            self.params.curve_label = label
            self.params.rebuild()
        index = self.method_combo.findData(doc.method_name)
        if index >= 0 and index != self.method_combo.currentIndex():
            self.method_combo.setCurrentIndex(index)
        self.method_combo.setEnabled(doc.editable)
        self._show_method_info()
        self.formula_label.setText(doc.formula())
        for b in (self.remove_button, self.up_button, self.down_button, self.base_button):
            b.setEnabled(doc.editable)
        if what in ("export", "all"):
            self._show_export()
        if what != "yaml":
            self._show_yaml()
        self._refresh_curve()
        self.schedule_preflight()

    def _show_method_info(self) -> None:
        m = self.doc.method
        base = {
            BASE_REQUIRED: "needs a base model",
            BASE_OPTIONAL: "base model optional",
            BASE_IGNORED: "no base model role",
        }.get(m.base, "")
        count = f"{m.min_models}+" if m.max_models is None else (
            str(m.min_models) if m.min_models == m.max_models else f"{m.min_models}–{m.max_models}"
        )
        link = f' · <a href="{m.paper}">paper</a>' if m.paper else ""
        self.method_info.setText(f"{m.description} <i>({base}; {count} models)</i>{link}")
        self.base_button.setToolTip(
            "Mark the selected model as the base"
            + ("" if m.base != BASE_IGNORED else " (this method merges the base_model as one more input)")
        )

    def _show_export(self) -> None:
        e = self.doc.export
        widgets = (self.output_edit, self.shard_edit, self.card_check, self.overwrite_check, self.device_combo, self.seed_spin)
        for w in widgets:
            w.blockSignals(True)
        self.output_edit.setText(e.output)
        self.shard_edit.setText(e.shard_size)
        self.card_check.setChecked(e.model_card)
        self.overwrite_check.setChecked(e.overwrite)
        self.device_combo.setCurrentText(e.device)
        self.seed_spin.setValue(int(e.seed))
        for w in widgets:
            w.blockSignals(False)
        index = self.dtype_combo.findData(self.doc.out_dtype)
        self.dtype_combo.setCurrentIndex(index if index >= 0 else 0)

    def _show_yaml(self) -> None:
        text = self.doc.to_yaml()
        self._yaml_dirty = False  # the view shows the recipe (again)
        if text == self.yaml_view.toPlainText():
            return
        self._yaml_updating = True
        try:
            self.yaml_view.setPlainText(text)
        finally:
            self._yaml_updating = False
        self.yaml_status.setText("")

    # -- views -> document -------------------------------------------------------
    def _method_picked(self, index: int) -> None:
        name = self.method_combo.itemData(index)
        try:
            self.doc.set_method(name)
        except MergeStudioError as exc:
            self.problem.emit(str(exc))

    def _remove_slot(self) -> None:
        row = self.slots_table.selected_slot()
        if row is not None:
            self.doc.remove_slot(row)

    def _move_slot(self, step: int) -> None:
        row = self.slots_table.selected_slot()
        if row is not None:
            self.doc.move_slot(row, row + step)
            self.slots_table.selectRow(max(0, min(len(self.doc.slots) - 1, row + step)))

    def _toggle_base(self) -> None:
        row = self.slots_table.selected_slot()
        if row is None:
            return
        self.doc.set_base(None if row == self.doc.base_index else row)

    def _yaml_typed(self) -> None:
        if not self._yaml_updating:
            self._yaml_dirty = True
            self.merge_button.setEnabled(False)  # Merge would merge the recipe before this edit
            self._yaml_timer.start()

    def apply_yaml(self) -> None:
        """Read the YAML view into the document; on an error the document keeps its last good state."""
        self._yaml_timer.stop()
        text = self.yaml_view.toPlainText()
        if text == self.doc.to_yaml():
            self._yaml_dirty = False
            self._update_merge_button()
            return
        if not text.strip():
            self.yaml_status.setText("The YAML is empty; the editor keeps the last recipe.")
            self.yaml_status.setObjectName("problem")
            self._restyle(self.yaml_status)
            return
        names = {s.ref: s.name for s in self.doc.slots}
        try:
            self.doc.events.changed.disconnect(self._on_doc_changed)
            try:
                self.doc.load_yaml(text, source_path=self.doc.source_path, names=names)
            finally:
                self.doc.events.changed.connect(self._on_doc_changed)
        except MergeStudioError as exc:
            self.yaml_status.setText(f"Not applied: {' '.join(str(exc).split())}")
            self.yaml_status.setObjectName("problem")
            self._restyle(self.yaml_status)
            return
        self._yaml_dirty = False
        self.yaml_status.setText("Applied.")
        self.yaml_status.setObjectName("ok")
        self._restyle(self.yaml_status)
        self._on_doc_changed("yaml")

    def _export_edited(self, *args: Any) -> None:
        self.doc.set_export(
            output=self.output_edit.text().strip(),
            shard_size=self.shard_edit.text().strip() or "5GB",
            model_card=self.card_check.isChecked(),
            overwrite=self.overwrite_check.isChecked(),
            device=self.device_combo.currentText(),
            seed=self.seed_spin.value(),
        )

    def _dtype_picked(self, index: int) -> None:
        self.doc.set_out_dtype(self.dtype_combo.itemData(index))

    def _browse_output(self) -> None:
        start = self.doc.export.output or str(Path.home())
        if self.doc.slots and all(s.ref.endswith(".safetensors") for s in self.doc.slots):
            # Single-file checkpoints merge into one .safetensors file (A1111, ComfyUI).
            chosen, _ = QFileDialog.getSaveFileName(self, "Output checkpoint", start, "Checkpoints (*.safetensors)")
        else:
            chosen = QFileDialog.getExistingDirectory(self, "Output folder (its parent must exist)", start)
        if chosen:
            self.output_edit.setText(chosen)
            self._export_edited()

    def _merge_clicked(self) -> None:
        if self.last_report is not None and self.last_report.ok:
            self.mergeRequested.emit()

    # -- preflight -----------------------------------------------------------------
    def _show_report(self, seq: int, report: Any) -> None:
        if seq != self._preflight_seq:
            return  # a newer check is on its way
        self._shown_seq = seq
        self.preflight_runs += 1
        self.last_report = report
        if report is None:
            self.preflight_label.setText("Add models to check a recipe.")
            self.preflight_label.setObjectName("muted")
            self.estimate_label.setText("")
            self.plan_view.setPlainText("")
            self.slots_table.set_problem_refs(set())
        elif not report.ok:
            self.preflight_label.setText(f"Problem: {report.problem}")
            self.preflight_label.setObjectName("problem")
            self.estimate_label.setText("")
            self.plan_view.setPlainText(report.problem or "")
            self._filters = report.filters
            self.slots_table.set_problem_refs(set(report.problem_refs))
        else:
            s = report.summary
            self.preflight_label.setText(
                f"Ready: {s['tensors']} tensors, {s['output_layers']} layers, output {size_text(s['output_bytes'])}."
                + "".join(f"  Warning: {w}" for w in report.warnings)
            )
            self.preflight_label.setObjectName("problem" if report.warnings else "ok")
            free_disk = s.get("free_disk_bytes")
            disk = f"; free disk {size_text(free_disk)}" if free_disk is not None else ""
            self.estimate_label.setText(f"Estimated peak memory {size_text(s['peak_memory_bytes'])} (merge process){disk}.")
            self.plan_view.setPlainText(report.text)
            self.slots_table.set_problem_refs(set())
            self._filters = report.filters
        self._restyle(self.preflight_label)
        self._update_merge_button()
        self._refresh_curve()

    def _update_merge_button(self) -> None:
        """Merge only a checked recipe with an output folder, and only the recipe the YAML view shows."""
        report = self.last_report
        label = "Per block" if self.block_names() is not None else None
        if label != self.params.curve_label:  # the check told us these are Stable Diffusion models
            self.params.curve_label = label
            self.params.rebuild()
        needs_output = bool(self.doc.export.output.strip())
        yaml_applied = not self._yaml_dirty
        ready = report is not None and report.ok and self.preflight_idle()
        self.merge_button.setEnabled(bool(ready and needs_output and yaml_applied))
        if not needs_output:
            self.merge_button.setToolTip("Choose an output folder first")
        elif not yaml_applied:
            self.merge_button.setToolTip("The YAML view has changes that are not applied to the recipe")
        else:
            self.merge_button.setToolTip("")

    def _preflight_returned(self, report: Any) -> None:
        self._show_report(int(self.sender().property("seq")), report)

    def _preflight_errored(self, text: str) -> None:
        self._show_error(int(self.sender().property("seq")), text)

    def _show_error(self, seq: int, text: str) -> None:
        from core.merge.preflight import PreflightReport

        self._show_report(seq, PreflightReport(False, text))

    @staticmethod
    def _restyle(widget: QWidget) -> None:
        widget.style().unpolish(widget)
        widget.style().polish(widget)

    # -- curves ----------------------------------------------------------------------
    def layer_count(self) -> int:
        report = self.last_report
        if report is not None and getattr(report, "layer_count", None):
            return int(report.layer_count)
        for slot in self.doc.slots:
            count = getattr(self.describe(slot.ref), "layer_count", None)
            if count:
                return int(count)
        return 1

    def _curve_requested(self, name: str, slot: Optional[int]) -> None:
        if not name:
            self._curve_target = None
        else:
            self._curve_target = (name, slot)
            self.side_tabs.setCurrentIndex(0)
        self._refresh_curve()

    def _ensure_curve_editor(self) -> Any:
        if self.curve_editor is None:
            from app.widgets.curve_editor import CurveEditor  # pyqtgraph loads here, after the window is up

            from app.theme import plot_colors

            self.curve_editor = CurveEditor()
            colors = plot_colors()
            self.curve_editor.apply_colors(colors["background"], colors["foreground"])
            self.curve_editor.curvesChanged.connect(self._curve_edited)
            self._curve_page_layout.addWidget(self.curve_editor, 1)
        return self.curve_editor

    def _refresh_curve(self) -> None:
        if self._curve_editing or (self.curve_editor is not None and self.curve_editor.dragging):
            return  # the editor shows the change being made; resetting it would end the drag
        target = self._curve_target
        if target is None or not self.doc.editable:
            self.curve_stack.setCurrentIndex(0)
            return
        name, slot = target
        param = self.doc.method.parameter(name)
        if param is None:
            valid = False
        elif slot is None:
            valid = param.scope == GLOBAL
        else:  # a model's parameter, and one this model takes (the base takes no 'non-base' ones)
            valid = slot < len(self.doc.slots) and param in self.doc.slot_parameters(slot)
        if not valid:
            self._curve_target = None
            self.curve_stack.setCurrentIndex(0)
            return
        from core.merge.curves import Curve, LayerCurves, block_bands, block_values

        setting = self.doc.param_value(name, slot)
        editor = self._ensure_curve_editor()
        owner = "the recipe" if slot is None else self.doc.display(slot)
        self.curve_target_label.setText(f"<b>{name}</b> of {owner}")
        blocks = self.block_names()
        if blocks is not None:  # Stable Diffusion: one value per block, over IN / MID / OUT bands
            default = param.default if isinstance(param.default, (int, float)) else 0.5
            values = block_values(setting, blocks, default)
            editor.set_blocks(blocks, block_bands(blocks))
            if values is None:
                editor.set_enabled_reason(
                    "This setting names blocks the curve does not show (TE1, TE2, VAE) or is not one value per block; "
                    "edit it in the YAML view."
                )
            else:
                editor.set_enabled_reason(None)
                editor.set_curves(LayerCurves(Curve(tuple(values))), len(blocks), value_span(param, values), name)
            self.curve_stack.setCurrentIndex(1)
            return
        editor.set_blocks(None)
        attention, mlp = self._filters
        curves = LayerCurves.from_setting(setting, attention_filters=attention, mlp_filters=mlp)
        if curves is None:
            editor.set_enabled_reason("This setting uses filters the curve editor cannot show; edit it in the YAML view.")
        else:
            editor.set_enabled_reason(None)
            editor.set_curves(curves, self.layer_count(), value_span(param, setting), name)
        self.curve_stack.setCurrentIndex(1)

    def sd_kind(self) -> Optional[str]:
        """'sd1', 'sd2' or 'sdxl' when the recipe merges Stable Diffusion models (block weights apply), else None."""
        report = self.last_report
        sd = (getattr(report, "summary", None) or {}).get("stable_diffusion") if report is not None else None
        if sd and sd.get("kind") in ("sd1", "sd2", "sdxl"):
            return sd["kind"]
        for slot in self.doc.slots:
            kind = getattr(self.describe(slot.ref), "model_type", None)
            if kind in ("sd1", "sd2", "sdxl"):
                return kind
        return None

    def block_names(self) -> Optional[list[str]]:
        """The blocks a per-block curve spans: BASE and the UNet's IN / MID / OUT blocks."""
        kind = self.sd_kind()
        if kind is None:
            return None
        from core.merge.blocks import UNET_BLOCKS

        return ["BASE", *UNET_BLOCKS[kind]]

    def _curve_seed(self, value: float) -> Any:
        """The setting a parameter gets when 'Per layer' ('Per block' for SD) is switched on."""
        blocks = self.block_names()
        if blocks is None:
            return [value, value]
        from core.merge.curves import block_setting

        return block_setting([value] * len(blocks), blocks)

    def _curve_edited(self, curves: Any) -> None:
        if self._curve_target is None:
            return
        name, slot = self._curve_target
        blocks = self.block_names()
        if blocks is not None:
            from core.merge.curves import block_setting

            setting = block_setting(curves.default.at_layers(len(blocks)), blocks)
        else:
            setting = curves.to_setting()
        self._curve_editing = True
        try:
            self.doc.set_param(name, setting, slot)
        finally:
            self._curve_editing = False
