"""The Tokens panel: token merging on a local model, with live speed, fidelity, token counts and merged-token views.

Pick a model from the library and an input (a sample image or one from disk, a
sentence, a prompt), pick a method from ``core.tokens.methods()``: its controls
are generated from the method's schema and bounded by the legal range the
engine computes for this model and input (``core.tokens.lab.legal_ranges``), so
no value is ever capped silently. Every change re-measures in a worker
(debounced; a newer setting stops the running measurement between two
forwards). Settings can be kept as variants side by side, swept (speed-up
against fidelity), copied as a line of Python or saved as a JSON preset that
``mergestudio tokens bench --preset`` reads; every measurement is kept in the
session.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

from PySide6.QtCore import Qt, QTimer, Signal
from PySide6.QtGui import QPixmap
from PySide6.QtWidgets import (
    QAbstractItemView,
    QApplication,
    QCheckBox,
    QComboBox,
    QDoubleSpinBox,
    QFileDialog,
    QFormLayout,
    QGridLayout,
    QGroupBox,
    QHBoxLayout,
    QHeaderView,
    QLabel,
    QLineEdit,
    QPushButton,
    QScrollArea,
    QSlider,
    QSpinBox,
    QSplitter,
    QStackedWidget,
    QTableWidget,
    QTableWidgetItem,
    QTabWidget,
    QTextBrowser,
    QVBoxLayout,
    QWidget,
)

from app.format import size_text
from app.workers import GeneratorWorker

UPDATE_DELAY_MS = 400
_STEPS = 1000
_DECIMALS = 3  # what a float option's value box holds
DISK_IMAGE = "Image from disk…"
_DEFAULT_CHOICE = "(engine default)"


@dataclass
class Request:
    """One measurement the panel asks for: what the worker needs, captured on the GUI thread."""

    model_path: Path
    kind_hint: str
    image: Optional[Path]
    text: Optional[str]
    prompt: Optional[str]
    timestep: int
    method: str
    options: dict
    group_block: Optional[int] = None
    sweep: Optional[tuple[str, list]] = None
    group_block_name: Optional[str] = None  # diffusion: the block to show, by name (its index changes with the setting)
    session_id: Optional[int] = None  # the session that was open when the measurement was asked for


@dataclass
class _Cache:
    """What the worker keeps between measurements (touched only by the one running worker)."""

    model: Any = None
    model_path: Optional[Path] = None
    work: Any = None
    work_key: Any = None


def _measure(request: Request, cache: _Cache):
    """The worker: load the model and input if they changed, send the legal ranges, then measure."""
    from core.jobs import Progress
    from core.tokens import lab

    if cache.model_path != request.model_path:
        yield Progress(0, 1, message=f"Loading {request.model_path.name}…")
        cache.model, cache.model_path, cache.work, cache.work_key = None, None, None, None
        cache.model = lab.load_model(request.model_path)
        cache.model_path = request.model_path
    key = (request.image, request.text, request.prompt, request.timestep)
    if cache.work_key != key:
        cache.work = lab.make_workload(
            cache.model,
            lab.LabInput(image=request.image, text=request.text, prompt=request.prompt, timestep=request.timestep),
        )
        cache.work_key = key
    ranges = lab.legal_ranges(cache.model, cache.work, request.method, request.options)
    yield ("ranges", cache.model.kind, ranges)
    beyond = _beyond(request.options, ranges, _choice_names(request.method))
    if beyond:  # e.g. the default r of a new model, or a shorter sentence: the panel says so and moves the control
        return ("adjust", request, beyond)
    if request.sweep is not None:
        name, values = request.sweep
        results = yield from lab.iter_sweep(
            cache.model, cache.work, request.method, request.options, name, values, collect_garbage=False
        )
        return ("sweep", request, results)
    block = request.group_block
    if cache.model.kind == "unet" and request.group_block_name is not None:
        block = _block_index(cache.model, request.method, request.options, request.group_block_name)
    result = yield from lab.iter_evaluate(
        cache.model, cache.work, request.method, request.options, group_block=block,
        collect_garbage=False,  # the GUI thread collects (app/gc_control.py)
    )
    return ("result", request, result)


def _choice_names(method: str) -> frozenset:
    """The options of ``method`` that are choices (their legal values are a list, never a range)."""
    import core.tokens

    spec = next((m for m in core.tokens.methods() if m["name"] == method), None)
    return frozenset(p["name"] for p in (spec or {}).get("parameters", []) if p["type"] == "choice")


def _block_index(model: Any, method: str, options: dict, name: str) -> Optional[int]:
    """The index of the patched block called ``name`` under this setting (None: not patched, show the first)."""
    from core import tokens

    handle = tokens.apply(model.model, method=method, **options)  # hooks only, no forward
    try:
        names = handle.block_names()
    finally:
        handle.remove()
    return names.index(name) if name in names else None


def _beyond(options: dict, ranges: dict, choices: frozenset = frozenset()) -> dict:
    """Options outside their legal range for this model and input: name -> (value, nearest legal value).

    ``choices`` name options whose legal values are a list of choices, not a (low, high) range.
    """
    out = {}
    for name, value in options.items():
        bounds = ranges.get(name)
        if name in choices or not (isinstance(bounds, tuple) and len(bounds) == 2) or isinstance(value, bool):
            continue
        if not isinstance(value, (int, float)):
            continue
        lo, hi = bounds
        if lo is not None and value < lo:
            out[name] = (value, lo)
        elif hi is not None and value > hi:
            out[name] = (value, hi)
    return out


class _OptionRow(QWidget):
    """One option of a token-merging method: slider + value, check box or choice."""

    changed = Signal()

    def __init__(self, spec: dict) -> None:
        super().__init__()
        self.spec = spec
        self.name = spec["name"]
        self.kind = spec["type"]
        self.bounds: tuple = tuple(spec.get("range") or (None, None))
        self._updating = False
        layout = QHBoxLayout(self)
        layout.setContentsMargins(0, 0, 0, 0)
        self.setToolTip(spec.get("help", ""))
        self.slider: Optional[QSlider] = None
        self.spin: Any = None
        self.check: Optional[QCheckBox] = None
        self.combo: Optional[QComboBox] = None
        self.auto: Optional[QCheckBox] = None  # "default": a number the engine chooses when left unset
        self.range_label = QLabel()
        self.range_label.setObjectName("muted")
        default = spec.get("default")
        if self.kind == "bool":
            self.check = QCheckBox()
            self.check.setChecked(bool(default))
            self.check.toggled.connect(self._emit)
            layout.addWidget(self.check)
            layout.addStretch(1)
        elif self.kind == "choice":
            self.combo = QComboBox()
            if default is None:
                self.combo.addItem(_DEFAULT_CHOICE, None)
            for choice in spec.get("choices") or []:
                self.combo.addItem(str(choice), choice)
            if default is not None:
                self.combo.setCurrentIndex(max(0, self.combo.findData(default)))
            self.combo.currentIndexChanged.connect(self._emit)
            layout.addWidget(self.combo, 1)
        else:
            self.slider = QSlider(Qt.Orientation.Horizontal)
            self.slider.valueChanged.connect(self._slid)
            if self.kind in ("int", "r"):
                self.spin = QSpinBox()
                self.spin.setRange(-(2**31), 2**31 - 1)
            else:
                self.spin = QDoubleSpinBox()
                self.spin.setDecimals(_DECIMALS)
                self.spin.setSingleStep(0.01)
                self.spin.setRange(-1e9, 1e9)
            self.spin.setKeyboardTracking(False)
            if default is not None:
                self.spin.setValue(default if not isinstance(default, (list, tuple)) else default[0])
            self.spin.valueChanged.connect(self._typed)
            layout.addWidget(self.slider, 1)
            layout.addWidget(self.spin)
            if default is None and not spec.get("exclusive"):  # e.g. PiToMe's margin: None is the paper's schedule
                self.auto = QCheckBox("default")
                self.auto.setToolTip("Leave the value to the engine (this option's default); uncheck to choose one")
                self.auto.setChecked(True)
                self.auto.toggled.connect(self._auto_toggled)
                layout.addWidget(self.auto)
                self._show_auto(True)
            layout.addWidget(self.range_label)
            self.set_bounds(self.bounds)

    # -- the legal range ---------------------------------------------------------
    def set_bounds(self, bounds: tuple) -> None:
        """Bound the slider and the value box by the engine's legal range (a value outside it stays, shown as a problem)."""
        if self.slider is None:
            if self.combo is not None and isinstance(bounds, tuple) and bounds and not isinstance(bounds[0], (int, float)):
                pass
            return
        lo, hi = (list(bounds) + [None, None])[:2]
        self.bounds = (lo, hi)
        self._updating = True
        try:
            # A float box holds _DECIMALS decimals: its bounds are rounded inwards, so it never holds a value
            # beyond the engine's (2/3 would round up to 0.667, which the engine refuses).
            box_lo, box_hi = (lo, hi) if self.kind in ("int", "r") else _inward(lo, hi)
            slider_lo = float(box_lo) if box_lo is not None else 0.0
            slider_hi = (
                float(box_hi) if box_hi is not None else max(slider_lo + 1.0, float(self.spin.value()) * 2 or 16.0)
            )
            self._span = (slider_lo, slider_hi)
            if self.kind in ("int", "r"):
                top = 2**31 - 1  # Qt's spin boxes and sliders hold 32-bit ints
                wide = hi is not None and hi > top
                self.slider.setVisible(not wide)  # a seed's 64-bit span is typed, not slid
                self.slider.setRange(int(max(slider_lo, -top)), int(min(slider_hi, top)))
                self.spin.setRange(int(lo) if lo is not None else -top, int(min(hi, top)) if hi is not None else top)
            else:
                self.slider.setRange(0, _STEPS)
                self.spin.setRange(box_lo if box_lo is not None else -1e9, box_hi if box_hi is not None else 1e9)
            self._place(self.spin.value())
            shown_lo = "−∞" if lo is None else f"{lo:g}"
            shown_hi = "∞" if hi is None else f"{hi:g}"
            self.range_label.setText(f"[{shown_lo}, {shown_hi}]")
            tip = "The legal range for this model and input, as the engine computes it"
            if self.kind in ("int", "r") and hi is not None and hi > 2**31 - 1:
                tip += f"; this box takes values up to {2**31 - 1} (use the Python API for larger ones)"
            self.range_label.setToolTip(tip)
        finally:
            self._updating = False

    def _place(self, value: float) -> None:
        assert self.slider is not None
        if self.kind in ("int", "r"):
            self.slider.setValue(int(value))
        else:
            lo, hi = self._span
            frac = 0.0 if hi == lo else (float(value) - lo) / (hi - lo)
            self.slider.setValue(int(round(max(0.0, min(1.0, frac)) * _STEPS)))

    # -- values -------------------------------------------------------------------
    def value(self) -> Any:
        if self.auto is not None and self.auto.isChecked():
            return None
        if self.check is not None:
            return self.check.isChecked()
        if self.combo is not None:
            return self.combo.currentData()
        return int(self.spin.value()) if self.kind in ("int", "r") else float(self.spin.value())

    def set_value(self, value: Any) -> None:
        self._updating = True
        try:
            if self.check is not None:
                self.check.setChecked(bool(value))
            elif self.combo is not None:
                self.combo.setCurrentIndex(max(0, self.combo.findData(value)))
            else:
                if self.auto is not None:
                    self.auto.setChecked(value is None)
                if value is not None and not isinstance(value, (list, tuple)):
                    self.spin.setValue(value)
                    self._place(value)
        finally:
            self._updating = False

    def _show_auto(self, auto: bool) -> None:
        self.slider.setEnabled(not auto)
        self.spin.setEnabled(not auto)

    def _auto_toggled(self, auto: bool) -> None:
        self._show_auto(auto)
        self._emit()

    def _slid(self, position: int) -> None:
        if self._updating:
            return
        if self.kind in ("int", "r"):
            value: Any = position
        else:
            lo, hi = self._span
            value = round(lo + (hi - lo) * position / _STEPS, _DECIMALS)
        self._updating = True
        self.spin.setValue(value)
        self._updating = False
        self._emit()

    def _typed(self, value: Any) -> None:
        if self._updating:
            return
        self._updating = True
        self._place(value)
        self._updating = False
        self._emit()

    def _emit(self, *args: Any) -> None:
        if not self._updating:
            self.changed.emit()


class TokensPanel(QWidget):
    """The Tokens tab of the workspace."""

    problem = Signal(str)
    measured = Signal(object)  # a LabResult, after it is shown

    def __init__(self, library: Any, sessions: Any, parent: Optional[QWidget] = None) -> None:
        super().__init__(parent)
        self.library = library
        self.sessions = sessions
        self.cache = _Cache()
        self.last_result: Any = None
        self.last_request: Optional[Request] = None
        self.ranges: dict = {}
        self.variants: list[Any] = []
        self.sweep_results: list[Any] = []
        self.measurements = 0  # finished measurements (tests wait on it)
        self.errors = 0
        self._worker: Optional[GeneratorWorker] = None
        self._pending = False
        self._pending_sweep: Optional[tuple[str, list]] = None
        self._methods = {m["name"]: m for m in _methods()}
        self._rows: dict[str, _OptionRow] = {}
        self._mode_combo: Optional[QComboBox] = None
        self._plots_ready = False
        self._kind: Optional[str] = None
        self._closed = False  # the window closed: no more measurements
        self._input_index = 0  # the input measured last (a cancelled file dialog goes back to it)

        self._build()
        self._timer = QTimer(self)
        self._timer.setSingleShot(True)
        self._timer.setInterval(UPDATE_DELAY_MS)
        self._timer.timeout.connect(self.measure_now)
        library.events.models_changed.connect(self._fill_models)
        self._fill_models()

    # -- building ------------------------------------------------------------------
    def _build(self) -> None:
        self.model_combo = QComboBox()
        self.model_combo.setToolTip("A model of the library (ViT, DeiT, CLIP vision, BERT-style encoders, diffusers UNets)")
        self.model_combo.activated.connect(self._model_picked)
        self.input_combo = QComboBox()
        self.input_combo.activated.connect(self._input_picked)
        self.text_edit = QLineEdit()
        self.text_edit.setPlaceholderText("A sentence for a text encoder, or a prompt for a diffusion model")
        self.text_edit.editingFinished.connect(self.request_update)
        self.step_spin = QSpinBox()
        self.step_spin.setRange(0, 999)
        self.step_spin.setValue(500)
        self.step_spin.setToolTip("Diffusion: the timestep of the measured UNet forward (999 = first, noisiest step)")
        self.step_spin.setKeyboardTracking(False)  # typed: on Enter; arrows: at once
        self.step_spin.valueChanged.connect(self.request_update)
        self.method_combo = QComboBox()
        self.method_combo.activated.connect(self._method_picked)
        self.method_info = QLabel()
        self.method_info.setWordWrap(True)
        self.method_info.setOpenExternalLinks(True)
        self.options_box = QGroupBox("Options")
        self.options_form = QFormLayout(self.options_box)

        self.keep_button = QPushButton("Keep as variant")
        self.keep_button.clicked.connect(self.keep_variant)
        self.sweep_button = QPushButton("Sweep")
        self.sweep_button.setToolTip("Measure several values of the main option and plot speed-up against fidelity")
        self.sweep_button.clicked.connect(lambda: self.start_sweep())
        self.sweep_points = QSpinBox()
        self.sweep_points.setRange(2, 16)
        self.sweep_points.setValue(5)
        self.sweep_points.setToolTip("Settings in a sweep")
        self.copy_button = QPushButton("Copy Python")
        self.copy_button.clicked.connect(self.copy_python)
        self.preset_button = QPushButton("Save preset…")
        self.preset_button.clicked.connect(self._choose_preset_file)
        for b in (self.keep_button, self.sweep_button, self.copy_button, self.preset_button):
            b.setEnabled(False)

        left = QWidget()
        form = QFormLayout(left)
        self._input_form = form
        form.addRow("Model", self.model_combo)
        form.addRow("Input", self.input_combo)
        form.addRow("Text", self.text_edit)
        form.addRow("Step", self.step_spin)
        form.addRow("Method", self.method_combo)
        form.addRow(self.method_info)
        form.addRow(self.options_box)
        buttons = QGridLayout()
        buttons.addWidget(self.keep_button, 0, 0)
        sweep = QHBoxLayout()
        sweep.addWidget(self.sweep_button)
        sweep.addWidget(self.sweep_points)
        buttons.addLayout(sweep, 0, 1)
        buttons.addWidget(self.copy_button, 1, 0)
        buttons.addWidget(self.preset_button, 1, 1)
        form.addRow(buttons)
        self.status_label = QLabel("Pick a model to start.")
        self.status_label.setWordWrap(True)
        self.status_label.setObjectName("muted")
        self.error_label = QLabel()
        self.error_label.setWordWrap(True)
        self.error_label.setObjectName("problem")
        self.error_label.setTextInteractionFlags(Qt.TextInteractionFlag.TextSelectableByMouse)
        self.error_label.hide()
        form.addRow(self.status_label)
        form.addRow(self.error_label)
        left_scroll = QScrollArea()
        left_scroll.setWidgetResizable(True)
        left_scroll.setWidget(left)

        # Figures
        self.figures = QLabel("No measurement yet.")
        self.figures.setWordWrap(True)
        self.figures.setTextFormat(Qt.TextFormat.RichText)
        self.figures.setTextInteractionFlags(Qt.TextInteractionFlag.TextSelectableByMouse)
        self.blocks_label = QLabel()
        self.blocks_label.setWordWrap(True)

        # Charts and views: built on first show (pyqtgraph loads then, not at start-up).
        self.chart_holder = QVBoxLayout()
        self.group_stack = QStackedWidget()
        self.group_image = QLabel()
        self.group_image.setAlignment(Qt.AlignmentFlag.AlignCenter)
        self.group_image.setMinimumSize(240, 240)
        self.group_text = QTextBrowser()
        self.group_stack.addWidget(self.group_image)
        self.group_stack.addWidget(self.group_text)
        self.layer_slider = QSlider(Qt.Orientation.Horizontal)
        self.layer_slider.setRange(0, 0)
        self.layer_slider.valueChanged.connect(self._show_groups)
        self.layer_label = QLabel()
        self.block_combo = QComboBox()
        self.block_combo.setToolTip("Diffusion: the UNet block whose merged groups are shown")
        self.block_combo.activated.connect(self._block_picked)
        self.block_combo.hide()
        groups_box = QGroupBox("Merged tokens")
        g_layout = QVBoxLayout(groups_box)
        g_layout.addWidget(self.group_stack, 1)
        slider_row = QHBoxLayout()
        slider_row.addWidget(self.layer_label)
        slider_row.addWidget(self.layer_slider, 1)
        slider_row.addWidget(self.block_combo)
        g_layout.addLayout(slider_row)
        self.counts_label = QLabel()
        self.counts_label.setObjectName("muted")
        self.counts_label.setWordWrap(True)
        g_layout.addWidget(self.counts_label)

        chart_box = QGroupBox("Tokens per layer")
        chart_box.setLayout(self.chart_holder)

        views = QSplitter()
        views.addWidget(chart_box)
        views.addWidget(groups_box)
        views.setStretchFactor(0, 1)
        views.setStretchFactor(1, 1)
        views.setSizes([420, 420])

        # Variants, sweep, runs
        self.bottom_tabs = QTabWidget()
        self.variants_area = QScrollArea()
        self.variants_area.setWidgetResizable(True)
        self._variants_body = QWidget()
        self._variants_layout = QHBoxLayout(self._variants_body)
        self._variants_layout.addStretch(1)
        self.variants_area.setWidget(self._variants_body)
        self.bottom_tabs.addTab(self.variants_area, "Variants")
        self.sweep_holder = QVBoxLayout()
        sweep_page = QWidget()
        sweep_page.setLayout(self.sweep_holder)
        self.bottom_tabs.addTab(sweep_page, "Sweep")
        self.runs_table = QTableWidget(0, 6)
        self.runs_table.setHorizontalHeaderLabels(["Time", "Model", "Method", "Options", "Speed-up", "Fidelity"])
        self.runs_table.verticalHeader().setVisible(False)
        self.runs_table.setEditTriggers(QAbstractItemView.EditTrigger.NoEditTriggers)
        self.runs_table.setSelectionBehavior(QAbstractItemView.SelectionBehavior.SelectRows)
        self.runs_table.horizontalHeader().setSectionResizeMode(QHeaderView.ResizeMode.ResizeToContents)
        self.runs_table.horizontalHeader().setStretchLastSection(True)
        self.runs_table.doubleClicked.connect(lambda index: self.restore_run(index.row()))
        self.runs_table.setToolTip("Every measurement of this session; double-click one to set it up again")
        self.bottom_tabs.addTab(self.runs_table, "Runs in this session")
        self.token_runs: list[Any] = []

        right = QWidget()
        r_layout = QVBoxLayout(right)
        r_layout.setContentsMargins(0, 0, 0, 0)
        r_layout.addWidget(self.figures)
        r_layout.addWidget(self.blocks_label)
        r_layout.addWidget(views, 3)
        r_layout.addWidget(self.bottom_tabs, 2)

        splitter = QSplitter()
        splitter.addWidget(left_scroll)
        splitter.addWidget(right)
        splitter.setStretchFactor(0, 2)
        splitter.setStretchFactor(1, 5)
        splitter.setSizes([380, 900])
        layout = QVBoxLayout(self)
        layout.addWidget(splitter)

    def showEvent(self, event) -> None:  # noqa: N802
        super().showEvent(event)
        self._ensure_plots()

    def _ensure_plots(self) -> None:
        if self._plots_ready:
            return
        import pyqtgraph as pg

        from app.theme import plot_colors

        colors = plot_colors()
        self.bar_plot = pg.PlotWidget()
        self.bar_plot.setBackground(colors["background"])
        self.bar_plot.getPlotItem().setLabel("left", "tokens")
        self.bar_plot.getPlotItem().setLabel("bottom", "layer / block")
        self.bar_plot.getPlotItem().showGrid(y=True, alpha=0.2)
        self.bar_plot.setMouseEnabled(x=False, y=False)
        self.bars: Any = None
        self.chart_holder.addWidget(self.bar_plot)
        self.sweep_plot = pg.PlotWidget()
        self.sweep_plot.setBackground(colors["background"])
        self.sweep_plot.getPlotItem().setLabel("bottom", "speed-up (×)")
        self.sweep_plot.getPlotItem().setLabel("left", "fidelity (cosine)")
        self.sweep_plot.getPlotItem().showGrid(x=True, y=True, alpha=0.2)
        for axis in ("bottom", "left"):  # plain numbers: no "(x0.001)" prefixes on speed-ups and cosines
            self.sweep_plot.getPlotItem().getAxis(axis).enableAutoSIPrefix(False)
        self.sweep_scatter = pg.ScatterPlotItem(size=10, brush=pg.mkBrush(colors["curves"][0]), hoverable=True)
        self.sweep_plot.addItem(self.sweep_scatter)
        self.sweep_curve = pg.PlotDataItem(pen=pg.mkPen(colors["curves"][0], width=1))
        self.sweep_plot.addItem(self.sweep_curve)
        self.sweep_labels: list = []
        self.sweep_holder.addWidget(self.sweep_plot)
        self._plots_ready = True

    # -- model, input, method --------------------------------------------------------
    def _fill_models(self, *args: Any) -> None:
        current = self.model_combo.currentData()
        models = sorted(self.library.models, key=lambda m: (not _looks_supported(m), m.name.lower()))
        self.model_combo.blockSignals(True)
        self.model_combo.clear()
        self.model_combo.addItem("(pick a model)", None)
        for info in models:
            label = info.name if _looks_supported(info) else f"{info.name}  (not a supported kind)"
            self.model_combo.addItem(label, str(info.path))
            self.model_combo.setItemData(self.model_combo.count() - 1, f"{info.architecture}\n{info.path}",
                                         Qt.ItemDataRole.ToolTipRole)
        index = self.model_combo.findData(current)
        self.model_combo.setCurrentIndex(max(0, index))
        self.model_combo.blockSignals(False)

    def select_model(self, path: str) -> bool:
        index = self.model_combo.findData(str(path))
        if index < 0:
            return False
        self.model_combo.setCurrentIndex(index)
        self._model_picked(index)
        return True

    def _model_picked(self, index: int) -> None:
        path = self.model_combo.itemData(index)
        if not path:
            return
        info = self.library.get(Path(path))
        kind = _kind_hint(info)
        self._kind = kind
        self.ranges = {}  # the last model's ranges do not bound this one's controls
        self._fill_inputs(kind)
        self._fill_methods(kind)
        self.request_update(immediate=True)

    def _fill_inputs(self, kind: str) -> None:
        from core.tokens import lab

        self.input_combo.clear()
        self._input_index = 0
        if kind == "vit":
            for path in lab.sample_images():
                self.input_combo.addItem(f"Sample: {path.stem}", str(path))
            self.input_combo.addItem(DISK_IMAGE, None)
        elif kind == "bert":
            self.input_combo.addItem("The sentence below", None)
        else:
            self.input_combo.addItem("The prompt below (random latents)", None)
        self._input_form.setRowVisible(self.text_edit, kind != "vit")
        self._input_form.setRowVisible(self.step_spin, kind == "unet")
        if kind == "bert" and not self.text_edit.text().strip():
            self.text_edit.setText("Token merging combines similar tokens so a transformer runs on fewer of them.")
        if kind == "unet" and not self.text_edit.text().strip():
            self.text_edit.setText("a photo of a red fox in the snow, detailed, soft light")

    def _fill_methods(self, kind: str) -> None:
        wanted = [m for m in self._methods.values() if _method_fits(m, kind)]
        current = self.method_combo.currentData()
        self.method_combo.clear()
        for m in wanted:
            self.method_combo.addItem(f"{m['display_name']} ({m['name']})", m["name"])
        index = self.method_combo.findData(current)
        self.method_combo.setCurrentIndex(max(0, index))
        self._build_options()

    def select_method(self, name: str) -> None:
        index = self.method_combo.findData(name)
        if index >= 0:
            self.method_combo.setCurrentIndex(index)
            self._method_picked(index)

    def _method_picked(self, index: int) -> None:
        self.ranges = {}  # the last method's ranges do not bound this one's controls
        self._build_options()
        self.request_update()

    def _input_picked(self, index: int) -> None:
        if self.input_combo.itemText(index) == DISK_IMAGE:
            path, _ = QFileDialog.getOpenFileName(self, "An image", str(Path.home()), "Images (*.png *.jpg *.jpeg *.bmp *.webp)")
            if not path:
                self.input_combo.setCurrentIndex(self._input_index)  # cancelled: the input stays what it was
                return
            self.use_image(Path(path))
            return
        self._input_index = index
        self.request_update()

    def use_image(self, path: Path) -> None:
        """Measure on an image from disk (added to the input list)."""
        index = self.input_combo.findData(str(path))
        if index < 0:
            self.input_combo.insertItem(max(0, self.input_combo.count() - 1), f"File: {path.name}", str(path))
            index = self.input_combo.findData(str(path))
        self.input_combo.setCurrentIndex(index)
        self._input_index = index
        self.request_update()

    def _build_options(self) -> None:
        while self.options_form.rowCount():
            self.options_form.removeRow(0)
        self._rows = {}
        self._mode_combo = None
        method = self._methods.get(self.method_combo.currentData())
        if method is None:
            self.method_info.setText("")
            return
        paper = f' · <a href="{method["paper"]}">paper</a>' if method.get("paper") else ""
        self.method_info.setText(f"{method['description']}{paper}")
        exclusive = [p for p in method["parameters"] if p.get("exclusive")]
        if exclusive:
            self._mode_combo = QComboBox()
            for p in method["parameters"]:
                if p.get("exclusive"):
                    self._mode_combo.addItem("Fixed r per layer" if p["name"] == "r" else f"By {p['name']}", p["name"])
            self._mode_combo.currentIndexChanged.connect(self._mode_changed)
            self.options_form.addRow("Mode", self._mode_combo)
        for p in method["parameters"]:
            if p["name"] == "trace_source":
                continue  # the panel always traces what it shows
            row = _OptionRow(p)
            if p["name"] == "threshold" and p.get("default") is None:
                row.set_value(0.9)
            bounds = self.ranges.get(p["name"])
            if isinstance(bounds, tuple) and len(bounds) == 2 and row.slider is not None:
                row.set_bounds(bounds)
            row.changed.connect(self.request_update)
            self._rows[p["name"]] = row
            self.options_form.addRow(p["name"], row)
        self._mode_changed()

    def _mode_changed(self, *args: Any) -> None:
        if self._mode_combo is None:
            return
        chosen = self._mode_combo.currentData()
        for i in range(self._mode_combo.count()):
            name = self._mode_combo.itemData(i)
            if name in self._rows:
                self._rows[name].setEnabled(name == chosen)
        if args:
            self.request_update()

    def set_option(self, name: str, value: Any) -> None:
        """Set an option as a user would (tests, restoring a run); a measurement follows."""
        if self._mode_combo is not None:
            index = self._mode_combo.findData(name)
            if index >= 0:
                self._mode_combo.setCurrentIndex(index)
        self._rows[name].set_value(value)
        self.request_update()

    def option_row(self, name: str) -> _OptionRow:
        return self._rows[name]

    def options(self) -> dict:
        """The method's options as the controls show them (only the active one of exclusive options)."""
        chosen = self._mode_combo.currentData() if self._mode_combo is not None else None
        method = self._methods.get(self.method_combo.currentData()) or {"parameters": []}
        out: dict = {}
        for p in method["parameters"]:
            name = p["name"]
            if name not in self._rows:
                continue
            if p.get("exclusive") and name != chosen:
                continue
            value = self._rows[name].value()
            if value is None:
                continue
            out[name] = value
        if "trace_source" in {p["name"] for p in method["parameters"]}:
            out["trace_source"] = True
        return out

    # -- measuring -------------------------------------------------------------------
    def request_update(self, *args: Any, immediate: bool = False) -> None:
        if immediate:
            self.measure_now()
        else:
            self._timer.start()

    def idle(self) -> bool:
        return not self._timer.isActive() and (self._worker is None or not self._worker.is_running()) and not self._pending

    def _request(self, sweep: Optional[tuple[str, list]] = None) -> Optional[Request]:
        path = self.model_combo.currentData()
        method = self.method_combo.currentData()
        if not path or not method:
            return None
        image = self.input_combo.currentData()
        text = self.text_edit.text().strip() or None
        kind = self._kind or "vit"
        block = self.block_combo.currentData() if kind == "unet" and self.block_combo.count() else None
        session = getattr(self.sessions, "session", None)
        return Request(
            model_path=Path(path),
            kind_hint=kind,
            image=Path(image) if image else None,
            text=text if kind == "bert" else None,
            prompt=text if kind == "unet" else None,
            timestep=self.step_spin.value(),
            method=method,
            options=self.options(),
            group_block=block,
            sweep=sweep,
            group_block_name=self.block_combo.currentText() if block is not None else None,
            session_id=getattr(session, "id", None),
        )

    def measure_now(self, sweep: Optional[tuple[str, list]] = None) -> None:
        self._timer.stop()
        if self._closed:
            return
        if self._worker is not None and self._worker.is_running():
            self._pending = True  # a newer setting: stop this one between two forwards, then measure again
            self._pending_sweep = sweep or self._pending_sweep
            self._worker.quit()
            return
        request = self._request(sweep)
        if request is None:
            return
        self._pending = False
        self._pending_sweep = None
        self.status_label.setText("Sweeping…" if sweep else "Measuring…")
        worker = GeneratorWorker(_measure, request, self.cache)
        worker.yielded.connect(self._progress)
        worker.returned.connect(self._returned)
        worker.errored.connect(self._failed)
        worker.finished.connect(self._worker_done)
        self._worker = worker
        worker.start()

    def stop(self) -> None:
        """The window closes: nothing more is measured; the running measurement is asked to stop."""
        self._closed = True
        self._timer.stop()
        self._pending = False
        self._pending_sweep = None
        if self._worker is not None and self._worker.is_running():
            self._worker.quit()

    def _superseded(self) -> bool:
        """A newer setting waits: what the running worker says about its own setting must not move the controls."""
        return self._pending or self._timer.isActive()

    def _progress(self, value: Any) -> None:
        if isinstance(value, tuple) and value and value[0] == "ranges":
            _, kind, ranges = value
            if not self._superseded():  # ranges of an older setting would clamp the newer values
                self._apply_ranges(ranges)
            return
        message = getattr(value, "message", "")
        if message:
            self.status_label.setText(message)

    def _apply_ranges(self, ranges: dict) -> None:
        self.ranges = dict(ranges)
        notes = []
        for name, bounds in ranges.items():
            row = self._rows.get(name)
            if row is not None and row.slider is not None and isinstance(bounds, tuple) and len(bounds) == 2:
                before = row.value()
                row.set_bounds(bounds)  # a Qt value box moves its value into the new range by itself
                after = row.value()
                if before is not None and after != before and not row.isEnabled():
                    # an option of the other mode (r while measuring by threshold): not measured, but changed
                    notes.append(f"{name} = {before:g} is beyond what this model and input allow; set to {after:g}.")
        if notes:
            self.adjustments = getattr(self, "adjustments", []) + notes
            self.status_label.setText(" ".join(notes))

    def _failed(self, text: str) -> None:
        self.errors += 1
        self.error_label.setText(text)
        self.error_label.show()
        self.status_label.setText("The last setting could not be measured; the figures shown are from the one before.")

    def _worker_done(self) -> None:
        if self._pending and not self._closed:
            sweep, self._pending_sweep = self._pending_sweep, None
            self._pending = False
            self.measure_now(sweep)

    def _returned(self, payload: Any) -> None:
        what, request, data = payload
        if what == "adjust":
            if self._superseded():
                return  # a newer setting is measured next; it gets its own check
            notes, stuck = [], []
            for name, (value, legal) in data.items():
                row = self._rows.get(name)
                if row is not None:
                    row.set_value(legal)
                if row is None or _beyond({name: row.value()}, {name: row.bounds}):
                    # the control cannot hold a legal value: measuring again would only loop
                    stuck.append(f"{name} = {value:g} (the nearest legal value is {legal:g})")
                    continue
                notes.append(f"{name} = {value:g} is beyond what this model and input allow; set to {row.value():g}.")
            if stuck:
                self._failed(
                    f"{' and '.join(stuck)} is beyond what this model and input allow, and the panel's control "
                    "cannot hold a legal value; set it through the Python API."
                )
                return
            self.adjustments = getattr(self, "adjustments", []) + notes
            self._pending = True  # measure again with the legal values, once this worker has ended
            self._pending_sweep = request.sweep or self._pending_sweep  # a sweep stays a sweep
            self.status_label.setText(" ".join(notes))
            return
        self.error_label.hide()
        if what == "sweep":
            self.sweep_results = list(data)
            self._show_sweep()
            self.status_label.setText(f"Sweep of {request.sweep[0]}: {len(self.sweep_results)} settings measured.")
            for result in self.sweep_results:
                self._record(request, result, view=None)
            self.measurements += 1
            return
        self.last_result, self.last_request = data, request
        self._show_result(data)
        self._record(request, data, view=self._current_view_pixmap())
        for b in (self.keep_button, self.sweep_button, self.copy_button, self.preset_button):
            b.setEnabled(True)
        self.measurements += 1
        self.measured.emit(data)

    # -- showing ---------------------------------------------------------------------
    def _show_result(self, r: Any) -> None:
        self._ensure_plots()
        speed = f"speed-up {r.speedup:.2f}×" if r.speedup else "speed-up ?"
        fidelity = f"cosine {r.cosine:.4f}" if r.cosine is not None else ""
        if r.relative_error is not None:
            fidelity += f", relative error {r.relative_error:.3g}"
        memory = ""
        if r.peak_memory_plain_bytes is not None and r.peak_memory_merged_bytes is not None:
            memory = f" · peak memory {size_text(r.peak_memory_plain_bytes)} → {size_text(r.peak_memory_merged_bytes)}"
        tokens = f"{r.input_tokens} → {r.output_tokens:g} tokens" if r.output_tokens is not None else ""
        self.figures.setText(
            f"<b>{speed}</b> · {r.time_plain_s * 1000:.1f} ms → {r.time_merged_s * 1000:.1f} ms per forward"
            f"{memory}<br>{fidelity} ({r.fidelity_metric}) · {tokens}"
        )
        if r.touched_blocks == 0:
            reason = r.notes[0] if r.notes else "the patch changed no layer."
            self.blocks_label.setText(f"No layer was changed by this setting: {reason}")
            self.blocks_label.setObjectName("problem")
        else:
            self.blocks_label.setText(f"{r.touched_blocks} of {len(r.tokens_per_layer)} layers/blocks merged tokens.")
            self.blocks_label.setObjectName("muted")
        self.blocks_label.style().unpolish(self.blocks_label)
        self.blocks_label.style().polish(self.blocks_label)
        adjusted = " ".join(getattr(self, "adjustments", []))
        self.adjustments = []
        notes = " ".join(r.notes[1:] if r.touched_blocks == 0 else r.notes)
        self.status_label.setText(" ".join(t for t in ("Measured (warm medians).", adjusted, notes) if t))
        self._show_bars(r)
        self._fill_group_selector(r)
        self._show_groups()

    def _show_bars(self, r: Any) -> None:
        import pyqtgraph as pg

        from app.theme import plot_colors

        if self.bars is not None:
            self.bar_plot.removeItem(self.bars)
        counts = [float(c) for c in r.tokens_per_layer]
        self.bars = pg.BarGraphItem(
            x=list(range(len(counts))), height=counts, width=0.7, brush=pg.mkBrush(plot_colors()["curves"][0])
        )
        self.bar_plot.addItem(self.bars)
        labels = r.layer_labels or [str(i) for i in range(len(counts))]
        step = max(1, len(labels) // 12)
        ticks = [(i, str(i)) for i in range(0, len(labels), step)]  # full names: the group view's label
        self.bar_plot.getPlotItem().getAxis("bottom").setTicks([ticks])
        self.bar_plot.getPlotItem().setYRange(0, max(counts + [1]) * 1.05)

    def bar_heights(self) -> list[float]:
        if getattr(self, "bars", None) is None:
            return []
        return [float(h) for h in self.bars.opts["height"]]

    def _fill_group_selector(self, r: Any) -> None:
        g = r.groups
        if g is None:
            self.layer_slider.setRange(0, 0)
            return
        self.layer_slider.blockSignals(True)
        self.layer_slider.setRange(0, max(0, len(g.labels) - 1))
        self.layer_slider.setValue(len(g.labels) - 1)
        self.layer_slider.blockSignals(False)
        diffusion = g.kind == "diffusion"
        self.block_combo.setVisible(diffusion)
        if diffusion:
            self.block_combo.blockSignals(True)
            if [self.block_combo.itemText(i) for i in range(self.block_combo.count())] != list(r.layer_labels):
                self.block_combo.clear()
                for i, name in enumerate(r.layer_labels):  # the UNet's patched blocks, as the bar chart lists them
                    self.block_combo.addItem(name, i)
            shown = self.block_combo.findText(g.labels[0]) if g.labels else -1
            self.block_combo.setCurrentIndex(max(0, shown))  # the block the view shows
            self.block_combo.blockSignals(False)

    def _show_groups(self, *args: Any) -> None:
        from app import tokens_views

        r = self.last_result
        if r is None or r.groups is None:
            self.group_image.setText("No merged-token view for this result.")
            self.group_stack.setCurrentIndex(0)
            return
        g = r.groups
        i = min(self.layer_slider.value(), len(g.groups) - 1)
        self.layer_label.setText(g.labels[i] if g.labels else "")
        groups = g.groups[i]
        distinct = tokens_views.distinct_groups(groups)
        if g.kind == "text":
            self.group_text.setHtml(tokens_views.text_groups_html(g.tokens or [], groups))
            self.group_stack.setCurrentIndex(1)
        else:
            if g.kind == "image" and g.image is not None:
                image = tokens_views.image_groups(g.image, groups, g.grid)
            else:
                image = tokens_views.grid_groups(groups, g.grid)
            pixmap = QPixmap.fromImage(image)
            size = self.group_image.size()
            self.group_image.setPixmap(
                pixmap.scaled(max(240, size.width()), max(240, size.height()), Qt.AspectRatioMode.KeepAspectRatio,
                              Qt.TransformationMode.FastTransformation)
            )
            self._view_pixmap = pixmap
            self.group_stack.setCurrentIndex(0)
        counts = ""
        if g.counts_per_input:
            counts = " Tokens left per input: " + ", ".join(f"{c:g}" for c in g.counts_per_input) + "."
        self.counts_label.setText(f"{distinct} groups of {len(groups)} tokens.{counts}")

    def shown_groups(self) -> int:
        """How many groups the view shows now (tests compare it with the tokens left)."""
        r = self.last_result
        if r is None or r.groups is None:
            return 0
        from app.tokens_views import distinct_groups

        return distinct_groups(r.groups.groups[min(self.layer_slider.value(), len(r.groups.groups) - 1)])

    def _block_picked(self, index: int) -> None:
        self.request_update(immediate=True)

    def _current_view_pixmap(self) -> Optional[QPixmap]:
        if self.group_stack.currentIndex() == 1:
            return self.group_text.grab()
        return getattr(self, "_view_pixmap", None)

    # -- variants and sweep ----------------------------------------------------------
    def keep_variant(self) -> None:
        """Keep the last measurement beside the others, on the same input."""
        r = self.last_result
        if r is None:
            return
        self.variants.append(r)
        card = QGroupBox(_setting_text(r.method, r.options))
        layout = QVBoxLayout(card)
        picture = QLabel()
        pixmap = self._current_view_pixmap()
        if pixmap is not None and not pixmap.isNull():
            picture.setPixmap(pixmap.scaled(160, 160, Qt.AspectRatioMode.KeepAspectRatio))
        layout.addWidget(picture)
        speed = f"{r.speedup:.2f}×" if r.speedup else "?"
        cosine = f"{r.cosine:.4f}" if r.cosine is not None else "?"
        tokens = f"\n{r.output_tokens:g} tokens out" if r.output_tokens is not None else ""
        layout.addWidget(QLabel(f"speed-up {speed}\ncosine {cosine}{tokens}"))
        remove = QPushButton("Remove")
        remove.clicked.connect(lambda: self._remove_variant(card, r))
        layout.addWidget(remove)
        self._variants_layout.insertWidget(self._variants_layout.count() - 1, card)
        self.bottom_tabs.setCurrentIndex(0)

    def _remove_variant(self, card: QWidget, result: Any) -> None:
        if result in self.variants:
            self.variants.remove(result)
        card.deleteLater()

    def sweep_values(self) -> tuple[str, list]:
        """The main option of the method and evenly spaced legal values of it."""
        method = self.method_combo.currentData()
        main = {"tome": "r", "pitome": "r", "tomesd": "ratio", "todo": "downsample_factor"}.get(method, "r")
        if self._mode_combo is not None and self._mode_combo.currentData() == "threshold":
            main = "threshold"
        row = self._rows[main]
        lo, hi = row.bounds
        n = self.sweep_points.value()
        if main in ("r", "downsample_factor"):
            lo = int(lo if lo is not None else (1 if main == "downsample_factor" else 0))
            hi = int(hi if hi is not None else max(lo + n, 8))
            values = sorted({round(lo + (hi - lo) * i / (n - 1)) for i in range(n)})
        else:
            lo, hi = _inward(lo, hi)  # legal values the panel's box can show too
            lo = float(lo if lo is not None else 0.0)
            hi = float(hi if hi is not None else 1.0)
            if main == "threshold":
                lo = max(lo, 0.5)
            values = list(dict.fromkeys(round(lo + (hi - lo) * i / (n - 1), 4) for i in range(n)))  # each once
        return main, values

    def start_sweep(self, values: Optional[list] = None) -> None:
        name, default_values = self.sweep_values()
        self.measure_now(sweep=(name, list(values) if values is not None else default_values))

    def _show_sweep(self) -> None:
        import pyqtgraph as pg

        self._ensure_plots()
        points = [(r.speedup or 0.0, r.cosine if r.cosine is not None else 0.0, r) for r in self.sweep_results]
        self.sweep_scatter.setData(
            [{"pos": (x, y), "data": _setting_text(r.method, r.options)} for x, y, r in points]
        )
        ordered = sorted(points, key=lambda p: p[0])
        self.sweep_curve.setData([p[0] for p in ordered], [p[1] for p in ordered])
        for label in self.sweep_labels:
            self.sweep_plot.removeItem(label)
        self.sweep_labels = []
        name = self.last_request.sweep[0] if self.last_request and self.last_request.sweep else None
        for x, y, r in points:
            key = next((k for k in ("r", "ratio", "threshold", "downsample_factor") if k in r.options), None)
            text = pg.TextItem(f"{key}={r.options.get(key)}" if key else "", anchor=(0, 1))
            text.setPos(x, y)
            self.sweep_plot.addItem(text)
            self.sweep_labels.append(text)
        del name
        self.bottom_tabs.setCurrentIndex(1)

    def sweep_points_shown(self) -> int:
        return len(self.sweep_scatter.data) if self._plots_ready else 0

    # -- keep and reuse --------------------------------------------------------------
    def python_line(self) -> str:
        from core.tokens.lab import python_line

        return python_line(self.method_combo.currentData(), _user_options(self.options()))

    def copy_python(self) -> None:
        line = self.python_line()
        QApplication.clipboard().setText(line)
        self.status_label.setText(f"Copied: {line}")

    def _choose_preset_file(self) -> None:
        from core.tokens.presets import default_presets_dir

        start = default_presets_dir() / f"{self.method_combo.currentData()}.json"
        path, _ = QFileDialog.getSaveFileName(self, "Save a token-merging preset", str(start), "Presets (*.json)")
        if path:
            self.save_preset_to(Path(path))

    def save_preset_to(self, path: Path) -> Optional[Path]:
        """Save the current setting as a JSON preset (``mergestudio tokens bench --preset`` reads it)."""
        from core.errors import MergeStudioError
        from core.tokens.presets import TokenPreset, save_preset

        model = self.model_combo.currentData()
        preset = TokenPreset(self.method_combo.currentData(), _user_options(self.options()), model=model)
        try:
            saved = save_preset(path, preset)
        except MergeStudioError as exc:
            self._failed(str(exc))
            return None
        self.status_label.setText(f"Saved the preset {saved}.")
        return saved

    # -- the session -----------------------------------------------------------------
    def _record(self, request: Request, result: Any, view: Optional[QPixmap]) -> None:
        from core.errors import MergeStudioError

        sessions = self.sessions
        store, session = getattr(sessions, "store", None), getattr(sessions, "session", None)
        if store is None or session is None:
            return
        # The session that was open when the measurement was asked for (another may be open by now).
        session_id = request.session_id if request.session_id is not None else session.id
        images: list[str] = []
        try:
            if view is not None and not view.isNull():
                folder = store.token_views_dir(session_id)
                path = Path(folder) / f"view-{time.strftime('%Y%m%d-%H%M%S')}-{self.measurements}.png"
                if view.save(str(path)):
                    images.append(str(path))
            info = self.library.get(request.model_path)
            store.add_token_run(
                session_id,
                model_path=str(request.model_path),
                model_name=getattr(info, "name", request.model_path.name),
                method=result.method,
                options=_user_options(dict(result.options)),
                figures={**result.figures(), "input": _input_of(request)},
                images=images,
            )
        except (MergeStudioError, OSError) as exc:
            for image in images:  # no picture of a run the session does not hold
                Path(image).unlink(missing_ok=True)
            self.problem.emit(f"This measurement was not saved in the session: {exc}")
            return
        self.refresh_runs()

    def refresh_runs(self) -> None:
        from core.errors import MergeStudioError

        store, session = getattr(self.sessions, "store", None), getattr(self.sessions, "session", None)
        self.token_runs = []
        if store is not None and session is not None:
            try:
                self.token_runs = store.list_token_runs(session.id)
            except MergeStudioError as exc:
                self.problem.emit(str(exc))
        self.runs_table.setRowCount(len(self.token_runs))
        for row, run in enumerate(self.token_runs):
            figures = run.figures or {}
            speed = figures.get("speedup")
            cosine = figures.get("cosine")
            cells = (
                run.created_at.astimezone().strftime("%H:%M:%S") if run.created_at else "",
                run.model_name,
                run.method,
                ", ".join(f"{k}={v}" for k, v in run.options.items()),
                f"{speed:.2f}×" if isinstance(speed, (int, float)) else "",
                f"{cosine:.4f}" if isinstance(cosine, (int, float)) else "",
            )
            for col, text in enumerate(cells):
                self.runs_table.setItem(row, col, QTableWidgetItem(text))

    def restore_run(self, row: int) -> None:
        """Set up an earlier measurement of this session again (model, method, options)."""
        run = self.token_runs[row]
        method, info = self._methods.get(run.method), self.library.get(Path(run.model_path))
        problem = _unshowable(method, run.method, run.options)
        if problem is None and method is not None and info is not None and not _method_fits(method, _kind_hint(info)):
            problem = f"That run's method {run.method} does not apply to {info.name}, so the panel cannot set it up."
        if problem is not None:  # refused whole: half of it set up would be measured as if it were that run
            self.error_label.setText(problem)
            self.error_label.show()
            self.status_label.setText("That run was not set up again; the controls are as they were.")
            return
        if not self.select_model(run.model_path):
            self._failed(f"The model of that run is not in the library any more: {run.model_path}.")
            return
        self.select_method(run.method)
        for name, value in run.options.items():
            if name in self._rows:
                if self._mode_combo is not None and self._mode_combo.findData(name) >= 0:
                    self._mode_combo.setCurrentIndex(self._mode_combo.findData(name))
                self._rows[name].set_value(value)
        self._restore_input((run.figures or {}).get("input") or {})
        self.request_update(immediate=True)

    def _restore_input(self, saved: dict) -> None:
        """The input the run was measured on: its image (if the file is still there), text or prompt, and step."""
        image = saved.get("image")
        if image:
            if Path(image).is_file():
                index = self.input_combo.findData(image)
                if index < 0:
                    self.input_combo.insertItem(max(0, self.input_combo.count() - 1), f"File: {Path(image).name}", image)
                    index = self.input_combo.findData(image)
                self.input_combo.setCurrentIndex(index)
            else:
                self.status_label.setText(f"That run's image {image} is gone; measuring on the current input.")
        text = saved.get("text") or saved.get("prompt")
        if text:
            self.text_edit.setText(text)
        if isinstance(saved.get("timestep"), int):
            self.step_spin.blockSignals(True)
            self.step_spin.setValue(saved["timestep"])
            self.step_spin.blockSignals(False)


# -- helpers --------------------------------------------------------------------------
def _input_of(request: "Request") -> dict:
    """What a run was measured on, kept with its figures so restoring it measures the same input."""
    return {
        "image": str(request.image) if request.image else None,
        "text": request.text,
        "prompt": request.prompt,
        "timestep": request.timestep if request.kind_hint == "unet" else None,
    }


def _inward(lo: Optional[float], hi: Optional[float]) -> tuple[Optional[float], Optional[float]]:
    """Float bounds rounded inwards to what a value box of _DECIMALS decimals holds (None stays unbounded)."""
    scale = 10**_DECIMALS
    low = None if lo is None else math.ceil(round(float(lo) * scale, 6)) / scale
    high = None if hi is None else math.floor(round(float(hi) * scale, 6)) / scale
    return low, high


_VISION = ("ViT", "DeiT", "CLIPVision")
_VISION_TYPES = ("vit", "deit", "clip", "clip_vision_model")  # model types core.tokens.lab loads as vision models
_TEXT = ("Bert", "Roberta", "MiniLM")


def _methods() -> list[dict]:
    import core.tokens

    return core.tokens.methods()


def _looks_supported(info: Any) -> bool:
    return _kind_hint(info) != "other"


def _kind_hint(info: Any) -> str:
    if info is None:
        return "other"
    arch = f"{getattr(info, 'architecture', '')} {getattr(info, 'model_type', '') or ''}"
    if getattr(info, "kind", "") == "diffusers" or "UNet2DCondition" in arch:
        return "unet"
    vision_type = (getattr(info, "model_type", None) or "") in _VISION_TYPES  # a CLIPModel: its vision tower
    if vision_type or any(k in arch for k in _VISION) or "vit" in arch.lower().split():
        return "vit"
    if any(k in arch for k in _TEXT) or "bert" in arch.lower():
        return "bert"
    return "other"


def _method_fits(method: dict, kind: str) -> bool:
    targets = " ".join(method.get("targets") or [])
    diffusion = "UNet2DConditionModel" in targets
    if kind == "unet":
        return diffusion
    return not diffusion


def _unshowable(method: Optional[dict], name: str, options: dict) -> Optional[str]:
    """Why the panel's controls cannot hold ``options`` of method ``name`` (None: they can), in one sentence."""
    if method is None:
        return f"That run used the method {name!r}, which this Merge Studio does not offer."
    params = {p["name"]: p for p in method["parameters"]}
    top = 2**31 - 1  # Qt's spin boxes hold 32-bit ints
    for option, value in options.items():
        p = params.get(option)
        if option == "trace_source":
            continue  # the panel always traces what it shows
        if p is None:
            return f"That run's option {option}={value!r} is not an option of {name}; the panel cannot set it up."
        kind = p["type"]
        if value is None:
            fits, takes = p.get("default") is None, "a value"
        elif kind == "bool":
            fits, takes = isinstance(value, bool), "true or false"
        elif kind == "choice":
            fits, takes = value in (p.get("choices") or []), f"one of {', '.join(map(str, p.get('choices') or []))}"
        elif kind in ("int", "r"):
            fits = isinstance(value, int) and not isinstance(value, bool) and -top - 1 <= value <= top
            takes = f"one whole number up to {top}"
        else:
            fits = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
            takes = "one finite number"
        if not fits:
            return (
                f"That run's {option} = {value!r} cannot be set in the panel, whose {option} control takes {takes}; "
                "use the run's options with the Python API (core.tokens.apply)."
            )
    return None


def _user_options(options: dict) -> dict:
    """The options a person chose (the panel's own tracing switch left out)."""
    return {k: v for k, v in options.items() if k != "trace_source"}


def _setting_text(method: str, options: dict) -> str:
    shown = ", ".join(f"{k}={v}" for k, v in _user_options(options).items())
    return f"{method} {shown}".strip()
