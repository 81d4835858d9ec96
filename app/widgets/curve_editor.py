"""An editor for per-layer parameter curves (mergekit gradients, "block weights").

The plot shows, for each curve group (all tensors, and optionally attention and
MLP tensors), the value every layer gets, with the curve's anchors as handles
that drag vertically within the parameter's legal range. The controls pick a
group, its number of anchors, a preset shape, smoothing or a flat reset. All
curve maths lives in :mod:`core.merge.curves`; this widget only shows and edits.
"""

from __future__ import annotations

import weakref
from typing import Optional

import pyqtgraph as pg
from PySide6.QtCore import QPointF, Qt, Signal
from PySide6.QtWidgets import (
    QCheckBox,
    QComboBox,
    QHBoxLayout,
    QLabel,
    QPushButton,
    QSpinBox,
    QVBoxLayout,
    QWidget,
)

from core.merge.curves import PRESETS, Curve, LayerCurves

COLOURS = {"default": "#1f77b4", "attention": "#ff7f0e", "mlp": "#2ca02c"}
LABELS = {"default": "All tensors", "attention": "Attention", "mlp": "MLP"}
_PRESET_PROMPT = "Preset…"
_MAX_TICK_LABELS = 16


class _Handles(pg.ScatterPlotItem):
    """The anchors of one curve; dragging one moves it vertically through the editor."""

    def __init__(self, editor: "CurveEditor", key: str) -> None:
        colour = COLOURS[key]
        super().__init__(
            size=13,
            pen=pg.mkPen(colour, width=2),
            brush=pg.mkBrush("w"),
            hoverable=True,
            hoverBrush=pg.mkBrush(colour),
        )
        # A weak reference: the editor owns its handles, and a Python reference cycle through
        # scene items would leave their teardown to the garbage collector at an arbitrary moment.
        self._editor_ref = weakref.ref(editor)
        self.key = key
        self._index: Optional[int] = None
        self.setZValue(10)
        self.setCursor(Qt.CursorShape.SizeVerCursor)

    @property
    def _editor(self) -> Optional["CurveEditor"]:
        return self._editor_ref()

    def mouseDragEvent(self, ev) -> None:  # noqa: N802 (Qt naming)
        editor = self._editor
        if editor is None or ev.button() != Qt.MouseButton.LeftButton:
            ev.ignore()
            return
        if ev.isStart():
            points = self.pointsAt(ev.buttonDownPos())
            if len(points) == 0:
                ev.ignore()
                return
            self._index = int(points[0].index())
            editor._begin_drag()
        elif self._index is None:
            ev.ignore()
            return
        ev.accept()
        editor.drag_point(self.key, self._index, float(ev.pos().y()))
        if ev.isFinish():
            self._index = None
            editor._end_drag()


class CurveEditor(QWidget):
    """Edit a :class:`LayerCurves` over ``n_layers`` layers within a value range."""

    curvesChanged = Signal(object)  # LayerCurves, on every user edit
    editFinished = Signal(object)  # LayerCurves, once per completed edit (drag released, preset, ...)

    def __init__(self, parent: Optional[QWidget] = None) -> None:
        super().__init__(parent)
        self._curves = LayerCurves(Curve((0.5,)))
        self._n = 1
        self._range = (0.0, 1.0)
        self._selected = "default"
        self._dragging = False
        self._drag_changed = False
        self._updating = False
        self._build()
        self.set_curves(self._curves, 1, self._range, "")

    # -- construction ---------------------------------------------------------------
    def _build(self) -> None:
        self.split_check = QCheckBox("Separate attention and MLP curves")
        self.group_combo = QComboBox()
        self.group_combo.setToolTip("The curve that presets, points, smoothing and reset act on")
        self.points_spin = QSpinBox()
        self.points_spin.setKeyboardTracking(False)
        self.points_spin.setSpecialValueText("Constant")
        self.points_spin.setToolTip("Number of anchors of the selected curve")
        self.preset_combo = QComboBox()
        self.preset_combo.addItems([_PRESET_PROMPT, *PRESETS])
        self.smooth_button = QPushButton("Smooth")
        self.reset_button = QPushButton("Reset to flat")

        # Two rows, so the editor fits a narrow column.
        controls = QVBoxLayout()
        first = QHBoxLayout()
        first.addWidget(self.split_check)
        first.addStretch(1)
        first.addWidget(QLabel("Curve"))
        first.addWidget(self.group_combo)
        first.addWidget(QLabel("Points"))
        first.addWidget(self.points_spin)
        second = QHBoxLayout()
        second.addWidget(self.preset_combo, 1)
        second.addWidget(self.smooth_button)
        second.addWidget(self.reset_button)
        controls.addLayout(first)
        controls.addLayout(second)

        self.reason_label = QLabel()
        self.reason_label.setWordWrap(True)
        self.reason_label.hide()
        self.hover_label = QLabel(" ")

        self.plot = pg.PlotWidget()
        item = self.plot.getPlotItem()
        item.hideButtons()
        item.showGrid(x=True, y=True, alpha=0.2)
        item.setLabel("bottom", "layer")
        self._view = item.getViewBox()
        self._view.setMouseEnabled(x=False, y=False)
        self._view.setMenuEnabled(False)
        # The legend is a line above the plot, so it never hides a handle.
        self._legend = QLabel()
        self._legend.setTextFormat(Qt.TextFormat.RichText)
        dash = pg.mkPen("#888888", width=1, style=Qt.PenStyle.DashLine)
        self._edges = [pg.InfiniteLine(angle=0, pen=dash, movable=False) for _ in range(2)]
        for line in self._edges:
            item.addItem(line, ignoreBounds=True)
        self._lines: dict[str, pg.PlotDataItem] = {}
        self._handles: dict[str, _Handles] = {}
        for key, colour in COLOURS.items():
            line = pg.PlotDataItem(
                pen=pg.mkPen(colour, width=1.5), symbol="o", symbolSize=6,
                symbolBrush=pg.mkBrush(colour), symbolPen=None, name=LABELS[key],
            )
            handles = _Handles(self, key)
            item.addItem(line)
            item.addItem(handles)
            self._lines[key], self._handles[key] = line, handles
        self.plot.scene().sigMouseMoved.connect(self._on_mouse_moved)

        layout = QVBoxLayout(self)
        layout.addLayout(controls)
        layout.addWidget(self.reason_label)
        layout.addWidget(self._legend)
        layout.addWidget(self.plot, 1)
        layout.addWidget(self.hover_label)

        self.split_check.toggled.connect(self._on_split)
        self.group_combo.currentIndexChanged.connect(self._on_group)
        self.points_spin.valueChanged.connect(self._on_points)
        self.preset_combo.activated.connect(self._on_preset)
        self.smooth_button.clicked.connect(self._on_smooth)
        self.reset_button.clicked.connect(self._on_reset)

    # -- public API -------------------------------------------------------------------
    def set_blocks(self, names: Optional[list[str]], bands: Optional[list[tuple[int, int, str]]] = None) -> None:
        """Block mode (Stable Diffusion block weights): x positions are the named blocks, shaded in bands
        such as IN / MID / OUT; attention/MLP curves do not apply. ``None`` goes back to layer mode."""
        import pyqtgraph as pg

        self._block_names = list(names) if names else None
        for region in getattr(self, "_bands", []):
            self.plot.getPlotItem().removeItem(region)
        self._bands = []
        if names:
            shades = ("#4c9be822", "#f0a35e22", "#7ccf7c22")
            for k, (start, end, text) in enumerate(bands or []):
                region = pg.LinearRegionItem((start - 0.5, end + 0.5), movable=False, brush=shades[k % len(shades)])
                region.setZValue(-10)
                for line in region.lines:
                    line.setPen(pg.mkPen(None))
                label = pg.InfLineLabel(region.lines[0], text, position=0.95, anchors=[(0, 0), (0, 0)])
                del label  # owned by its line
                self.plot.getPlotItem().addItem(region)
                self._bands.append(region)
        self.split_check.setVisible(not names)
        self.plot.getPlotItem().setLabel("bottom", "block" if names else "layer")

    def set_curves(
        self, curves: LayerCurves, n_layers: int, value_range: tuple[float, float], label: str
    ) -> None:
        """Show ``curves`` over ``n_layers`` layers with legal values in ``value_range`` (no signal)."""
        lo, hi = float(value_range[0]), float(value_range[1])
        if n_layers < 1:
            raise ValueError(f"The curve editor needs at least one layer, got {n_layers}.")
        if not lo < hi:
            raise ValueError(f"The value range of '{label}' is empty: low {lo:g} is not below high {hi:g}.")
        self._curves, self._n, self._range = curves, int(n_layers), (lo, hi)
        self._dragging = self._drag_changed = False
        for handles in self._handles.values():
            handles._index = None  # a drag in progress ends here; its later moves are ignored
        if self._selected not in self._keys():
            self._selected = "default"
        item = self.plot.getPlotItem()
        item.setLabel("left", label)
        names = getattr(self, "_block_names", None)
        if names and len(names) == self._n:
            step = 2 if self._n > 16 else 1
            major = [(i, names[i]) for i in range(0, self._n, step)]
        else:
            step = max(1, -(-self._n // _MAX_TICK_LABELS))
            major = [(i, str(i)) for i in range(0, self._n, step)]
        item.getAxis("bottom").setTicks([major, [(i, "") for i in range(self._n)]])
        for line, value in zip(self._edges, (lo, hi)):
            line.setValue(value)
        values = [v for g in curves.groups() for v in g.curve.anchors]
        self._view.setXRange(-0.5, self._n - 0.5, padding=0)
        self._view.setYRange(min(lo, *values), max(hi, *values), padding=0.06)
        self._sync_structure()

    def curves(self) -> LayerCurves:
        """The curves as currently edited."""
        return self._curves

    @property
    def dragging(self) -> bool:
        """True while a handle is held with the mouse (``set_curves`` would end that drag)."""
        return self._dragging

    def apply_colors(self, background: str, foreground: str) -> None:
        """Follow the app's theme: plot background, axes and labels."""
        self.plot.setBackground(background)
        item = self.plot.getPlotItem()
        pen = pg.mkPen(foreground)
        for name in ("left", "bottom"):
            axis = item.getAxis(name)
            axis.setPen(pen)
            axis.setTextPen(pen)

    def set_enabled_reason(self, text: Optional[str]) -> None:
        """Disable editing and say why (``text``), or enable it again (None)."""
        enabled = not text
        self.reason_label.setText(text or "")
        self.reason_label.setVisible(not enabled)
        for widget in (self.split_check, self.group_combo, self.points_spin, self.preset_combo,
                       self.smooth_button, self.reset_button, self.plot):
            widget.setEnabled(enabled)
        self._sync_controls()

    def drag_point(self, group_key: str, index: int, value: float) -> None:
        """Move anchor ``index`` of a curve to ``value`` (kept within the range), as a drag does.

        Outside a mouse drag the move is a complete edit and editFinished follows.
        """
        lo, hi = self._range
        curve = self._curves.curve(group_key)
        value = min(hi, max(lo, float(value)))
        if curve.anchors[index] != value:
            self._curves = self._curves.replace(group_key, curve.with_anchor(index, value))
            self._redraw(group_key)
            self.curvesChanged.emit(self._curves)
            self._drag_changed = True
        if not self._dragging:
            self._finish_edit()

    def handle_pos(self, group_key: str, index: int) -> QPointF:
        """Where anchor ``index`` of a curve is drawn, in plot (data) coordinates."""
        curve = self._curves.curve(group_key)
        return QPointF(self._anchor_xs(len(curve))[index], curve.anchors[index])

    # -- drags ----------------------------------------------------------------------------
    def _begin_drag(self) -> None:
        self._dragging = True
        self._drag_changed = False

    def _end_drag(self) -> None:
        self._dragging = False
        self._finish_edit()

    def _finish_edit(self) -> None:
        if self._drag_changed:
            self._drag_changed = False
            self.editFinished.emit(self._curves)

    # -- control handlers ------------------------------------------------------------
    def _apply(self, curves: LayerCurves) -> None:
        """A whole edit from a control: show it and announce it."""
        if curves == self._curves:
            self._sync_controls()
            return
        self._curves = curves
        self._sync_structure()
        self.curvesChanged.emit(curves)
        self.editFinished.emit(curves)

    def _on_split(self, on: bool) -> None:
        if self._updating:
            return
        c = self._curves
        if on:
            self._apply(LayerCurves(c.default, c.default, c.default, c.attention_filters, c.mlp_filters))
        else:
            self._selected = "default"
            self._apply(LayerCurves(c.default, None, None, c.attention_filters, c.mlp_filters))

    def _on_group(self, row: int) -> None:
        if self._updating or row < 0:
            return
        self._selected = self.group_combo.itemData(row)
        self._sync_controls()
        self._style_lines()

    def _on_points(self, k: int) -> None:
        if self._updating:
            return
        curve = self._curves.curve(self._selected)
        if k != len(curve):
            self._apply(self._curves.replace(self._selected, curve.resampled(k)))

    def _on_preset(self, row: int) -> None:
        name = self.preset_combo.itemText(row)
        self.preset_combo.setCurrentIndex(0)
        if self._updating or name not in PRESETS:
            return
        curve = self._curves.curve(self._selected)
        k = len(curve) if len(curve) > 1 else self._n
        self._apply(self._curves.replace(self._selected, PRESETS[name](k, *self._range)))

    def _on_smooth(self) -> None:
        curve = self._curves.curve(self._selected)
        self._apply(self._curves.replace(self._selected, curve.smoothed(1)))

    def _on_reset(self) -> None:
        curve = self._curves.curve(self._selected)
        lo, hi = self._range
        flat = Curve((min(hi, max(lo, curve.mean())),) * len(curve))
        self._apply(self._curves.replace(self._selected, flat))

    # -- drawing ------------------------------------------------------------------------
    def _keys(self) -> list[str]:
        return [g.key for g in self._curves.groups()]

    def _anchor_xs(self, k: int) -> list[float]:
        if k == 1:
            return [(self._n - 1) / 2]
        return [i * (self._n - 1) / (k - 1) for i in range(k)]

    def _sync_structure(self) -> None:
        """Visibility, legend and controls after the set of curves changed."""
        keys = self._keys()
        if self._selected not in keys:
            self._selected = "default"
        entries = []
        for key in COLOURS:
            shown = key in keys
            self._lines[key].setVisible(shown)
            self._handles[key].setVisible(shown)
            if shown:
                entries.append(f'<span style="color:{COLOURS[key]}">●</span> {LABELS[key]}')
                self._redraw(key)
        self._legend.setText("&nbsp;&nbsp;&nbsp;".join(entries))
        self._style_lines()
        self._sync_controls()

    def _sync_controls(self) -> None:
        self._updating = True
        try:
            self.split_check.setChecked(self._curves.split)
            self.group_combo.clear()
            for group in self._curves.groups():
                self.group_combo.addItem(group.label, group.key)
            self.group_combo.setCurrentIndex(self._keys().index(self._selected))
            self.group_combo.setEnabled(self._curves.split and self.plot.isEnabled())
            k = len(self._curves.curve(self._selected))
            self.points_spin.setRange(1, max(2, self._n, k))
            self.points_spin.setValue(k)
        finally:
            self._updating = False

    def _style_lines(self) -> None:
        for key, line in self._lines.items():
            selected = key == self._selected
            line.setPen(pg.mkPen(COLOURS[key], width=3 if selected else 1.5))
            self._handles[key].setZValue(11 if selected else 10)  # on top where handles overlap

    def _redraw(self, key: str) -> None:
        curve = self._curves.curve(key)
        self._lines[key].setData(list(range(self._n)), curve.at_layers(self._n))
        self._handles[key].setData(x=self._anchor_xs(len(curve)), y=list(curve.anchors))

    def _on_mouse_moved(self, scene_pos) -> None:
        if not self._view.sceneBoundingRect().contains(scene_pos):
            self.hover_label.setText(" ")
            return
        point = self._view.mapSceneToView(scene_pos)
        layer = min(self._n - 1, max(0, int(round(point.x()))))
        t = layer / (self._n - 1) if self._n > 1 else 1.0
        group = min(self._curves.groups(), key=lambda g: abs(g.curve.value_at(t) - point.y()))
        names = getattr(self, "_block_names", None)
        where = names[layer] if names and len(names) == self._n else f"layer {layer}"
        text = f"{where}: {group.curve.value_at(t):.3g}"
        if self._curves.split:
            text += f" ({group.label})"
        self.hover_label.setText(text)
        self.plot.setToolTip(text)
