"""The curve editor: real mouse drags, presets, smoothing, points, split curves."""

from __future__ import annotations

import pytest

pytest.importorskip("pytestqt")

import pyqtgraph as pg  # noqa: E402
from PySide6.QtCore import QPoint, QPointF, Qt  # noqa: E402
from PySide6.QtTest import QTest  # noqa: E402

from app.widgets.curve_editor import CurveEditor  # noqa: E402
from core.merge.curves import PRESETS, Curve, LayerCurves  # noqa: E402

N = 8
RANGE = (0.0, 1.0)


@pytest.fixture
def editor(qtbot):
    widget = CurveEditor()
    qtbot.addWidget(widget)
    widget.resize(900, 500)
    widget.show()
    qtbot.waitExposed(widget)
    widget.set_curves(LayerCurves(Curve((0.2, 0.5, 0.2))), N, RANGE, "weight")
    return widget


@pytest.fixture
def every_mouse_move():
    """pyqtgraph drops mouse moves closer than 10 ms apart; test events come faster."""
    old = pg.getConfigOption("mouseRateLimit")
    pg.setConfigOption("mouseRateLimit", 0)
    yield
    pg.setConfigOption("mouseRateLimit", old)


class Recorder:
    def __init__(self, editor: CurveEditor) -> None:
        self.changed: list[LayerCurves] = []
        self.finished: list[LayerCurves] = []
        editor.curvesChanged.connect(self.changed.append)
        editor.editFinished.connect(self.finished.append)


def _viewport_point(editor: CurveEditor, x: float, y: float) -> QPoint:
    view = editor.plot.getPlotItem().getViewBox()
    return editor.plot.mapFromScene(view.mapViewToScene(QPointF(x, y)))


def _mouse_drag(editor: CurveEditor, start: QPoint, end: QPoint, steps: int = 6) -> None:
    viewport = editor.plot.viewport()
    QTest.mouseMove(viewport, start)
    QTest.mousePress(viewport, Qt.MouseButton.LeftButton, Qt.KeyboardModifier.NoModifier, start)
    for i in range(1, steps + 1):
        QTest.mouseMove(viewport, start + (end - start) * (i / steps))
    QTest.mouseRelease(viewport, Qt.MouseButton.LeftButton, Qt.KeyboardModifier.NoModifier, end)


def _line(editor: CurveEditor, label: str):
    for item in editor.plot.getPlotItem().listDataItems():
        if isinstance(item, pg.PlotDataItem) and item.name() == label:
            return item
    raise AssertionError(f"no curve named {label!r}")


def _visible_curves(editor: CurveEditor) -> list[str]:
    return [
        item.name() for item in editor.plot.getPlotItem().listDataItems()
        if isinstance(item, pg.PlotDataItem) and item.isVisible()
    ]


# -- drawing ---------------------------------------------------------------------
def test_plot_shows_per_layer_values_and_handles(editor):
    x, y = _line(editor, "All tensors").getData()
    assert list(x) == list(range(N))
    assert list(y) == pytest.approx(Curve((0.2, 0.5, 0.2)).at_layers(N))
    # anchor i of k sits at x = i * (n - 1) / (k - 1)
    assert [editor.handle_pos("default", i).x() for i in range(3)] == [0.0, 3.5, 7.0]
    assert _visible_curves(editor) == ["All tensors"]
    assert editor.points_spin.value() == 3


# -- mouse ---------------------------------------------------------------------------
def test_mouse_drag_moves_anchor(editor, every_mouse_move):
    rec = Recorder(editor)
    handle = editor.handle_pos("default", 1)
    _mouse_drag(editor, _viewport_point(editor, handle.x(), handle.y()), _viewport_point(editor, handle.x(), 0.9))
    anchors = editor.curves().default.anchors
    assert anchors[1] == pytest.approx(0.9, abs=0.02)  # a pixel is about 0.003 here
    assert anchors[0] == anchors[2] == 0.2  # only vertical, only this anchor
    assert rec.changed and rec.changed[-1] == editor.curves()
    assert rec.finished == [editor.curves()]  # once, when the drag ends
    assert list(_line(editor, "All tensors").getData()[1]) == pytest.approx(editor.curves().default.at_layers(N))


def test_mouse_drag_stops_at_range_edge(editor, every_mouse_move):
    rec = Recorder(editor)
    handle = editor.handle_pos("default", 2)
    start = _viewport_point(editor, handle.x(), handle.y())
    _mouse_drag(editor, start, QPoint(start.x(), 2))  # far above the top of the plot
    assert editor.curves().default.anchors[2] == 1.0
    assert editor.handle_pos("default", 2).y() == 1.0
    assert rec.finished[-1].default.anchors[2] == 1.0


def test_drag_on_empty_plot_changes_nothing(editor, every_mouse_move):
    rec = Recorder(editor)
    _mouse_drag(editor, _viewport_point(editor, 1.7, 0.8), _viewport_point(editor, 1.7, 0.1))
    assert editor.curves() == LayerCurves(Curve((0.2, 0.5, 0.2)))
    assert rec.changed == [] and rec.finished == []


def test_hover_shows_layer_value(editor, every_mouse_move):
    value = Curve((0.2, 0.5, 0.2)).at_layers(N)[3]
    QTest.mouseMove(editor.plot.viewport(), _viewport_point(editor, 3.1, value + 0.05))
    assert editor.hover_label.text() == f"layer 3: {value:.3g}"


# -- programmatic ------------------------------------------------------------------
def test_set_curves_emits_nothing(editor, qtbot):
    rec = Recorder(editor)
    split = LayerCurves(Curve((0.3,)), Curve((0.1, 0.9)), Curve((0.4, 0.6)))
    editor.set_curves(split, 12, (0.0, 2.0), "density")
    editor.set_curves(LayerCurves(Curve((0.7,))), 4, RANGE, "weight")
    assert rec.changed == [] and rec.finished == []
    assert editor.curves() == LayerCurves(Curve((0.7,)))
    assert not editor.split_check.isChecked()


def test_drag_point_clamps_and_announces(editor):
    rec = Recorder(editor)
    editor.drag_point("default", 0, -3.0)
    assert editor.curves().default.anchors == (0.0, 0.5, 0.2)
    assert len(rec.changed) == 1 and len(rec.finished) == 1
    editor.drag_point("default", 0, -1.0)  # already at the edge: no change, no signal
    assert len(rec.changed) == 1 and len(rec.finished) == 1


def test_set_curves_refuses_bad_range(editor):
    with pytest.raises(ValueError, match="density"):
        editor.set_curves(LayerCurves(Curve((0.5,))), 4, (1.0, 1.0), "density")
    with pytest.raises(ValueError):
        editor.set_curves(LayerCurves(Curve((0.5,))), 0, RANGE, "weight")


# -- controls ----------------------------------------------------------------------
def test_split_toggle_adds_and_removes_curves(editor, qtbot):
    rec = Recorder(editor)
    qtbot.mouseClick(editor.split_check, Qt.MouseButton.LeftButton)
    default = Curve((0.2, 0.5, 0.2))
    assert editor.curves() == LayerCurves(default, default, default)
    assert rec.changed[-1] == editor.curves() and rec.finished[-1] == editor.curves()
    assert _visible_curves(editor) == ["All tensors", "Attention", "MLP"]
    assert [editor.group_combo.itemText(i) for i in range(editor.group_combo.count())] == [
        "All tensors", "Attention", "MLP",
    ]
    editor.drag_point("mlp", 0, 0.9)
    assert editor.curves().mlp.anchors == (0.9, 0.5, 0.2)
    assert editor.curves().default == default
    qtbot.mouseClick(editor.split_check, Qt.MouseButton.LeftButton)
    assert editor.curves() == LayerCurves(default)
    assert _visible_curves(editor) == ["All tensors"]
    assert len(rec.finished) == 3


def test_preset_applies_to_selected_group(editor):
    editor.split_check.setChecked(True)
    rec = Recorder(editor)
    editor.group_combo.setCurrentIndex(editor.group_combo.findData("attention"))
    row = editor.preset_combo.findText("Ramp up")
    editor.preset_combo.setCurrentIndex(row)
    editor.preset_combo.activated.emit(row)
    curves = editor.curves()
    assert curves.attention == PRESETS["Ramp up"](3, *RANGE)
    assert curves.default == curves.mlp == Curve((0.2, 0.5, 0.2))
    assert rec.changed == [curves] and rec.finished == [curves]
    assert editor.preset_combo.currentIndex() == 0  # back to the prompt
    assert list(_line(editor, "Attention").getData()[1]) == pytest.approx(curves.attention.at_layers(N))


def test_preset_over_value_range(editor):
    editor.set_curves(LayerCurves(Curve((0.5,))), 6, (0.2, 0.8), "t")
    row = editor.preset_combo.findText("Middle high")
    editor.preset_combo.activated.emit(row)
    # a constant curve gets one anchor per layer
    assert editor.curves().default == PRESETS["Middle high"](6, 0.2, 0.8)
    assert max(editor.curves().default.anchors) <= 0.8
    assert editor.points_spin.value() == 6


def test_smooth_button(editor, qtbot):
    rec = Recorder(editor)
    qtbot.mouseClick(editor.smooth_button, Qt.MouseButton.LeftButton)
    assert editor.curves().default == Curve((0.2, 0.5, 0.2)).smoothed()
    assert len(rec.changed) == len(rec.finished) == 1


def test_reset_to_flat(editor, qtbot):
    rec = Recorder(editor)
    qtbot.mouseClick(editor.reset_button, Qt.MouseButton.LeftButton)
    assert editor.curves().default.anchors == pytest.approx((0.35, 0.35, 0.35))  # the curve's mean
    assert len(rec.finished) == 1


def test_points_resample(editor):
    rec = Recorder(editor)
    editor.points_spin.setValue(5)
    assert editor.curves().default == Curve((0.2, 0.5, 0.2)).resampled(5)
    assert [round(editor.handle_pos("default", i).x(), 6) for i in range(5)] == [0, 1.75, 3.5, 5.25, 7]
    assert len(rec.changed) == len(rec.finished) == 1
    assert editor.points_spin.maximum() == N


def test_disabled_with_reason(editor, every_mouse_move):
    rec = Recorder(editor)
    reason = "This setting uses filters the editor cannot show; edit it in YAML"
    editor.set_enabled_reason(reason)
    assert editor.reason_label.isVisible() and editor.reason_label.text() == reason
    assert not editor.smooth_button.isEnabled() and not editor.plot.isEnabled()
    handle = editor.handle_pos("default", 1)
    _mouse_drag(editor, _viewport_point(editor, handle.x(), handle.y()), _viewport_point(editor, handle.x(), 0.9))
    assert editor.curves().default.anchors[1] == 0.5
    assert rec.changed == []
    editor.set_enabled_reason(None)
    assert not editor.reason_label.isVisible() and editor.smooth_button.isEnabled()
