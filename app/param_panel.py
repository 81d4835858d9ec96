"""The parameter panel: one row per parameter, generated from the method's schema.

Numbers get a labelled slider with an editable value beside it (the slider
spans the schema's typical range; the value box accepts anything the schema
allows, so a recipe value outside the slider's span is kept, never capped),
booleans a check box, choices a combo box. Numeric parameters can become a
per-layer curve ("Per layer"), edited in the curve editor.
"""

from __future__ import annotations

import html
import math
from typing import Any, Optional

from PySide6.QtCore import Qt, Signal
from PySide6.QtWidgets import (
    QCheckBox,
    QComboBox,
    QDoubleSpinBox,
    QFormLayout,
    QGroupBox,
    QHBoxLayout,
    QLabel,
    QScrollArea,
    QSlider,
    QSpinBox,
    QToolButton,
    QVBoxLayout,
    QWidget,
)

from core.merge.document import RecipeDocument
from core.merge.formula import value_text
from core.merge.methods.base import Parameter

_STEPS = 1000  # slider resolution
# Methods whose ratios people misread between tools: their help ("0.3 = 30 % of model B") shows under the slider.
_SPELL_OUT = ("weighted_sum", "add_difference")


def value_span(param: Parameter, setting: Any = None) -> tuple[float, float]:
    """The span a slider (or curve) shows for ``param``: its typical range, widened to hold ``setting``."""
    if param.slider is not None:
        lo, hi = float(param.slider[0]), float(param.slider[1])
    elif param.minimum is not None and param.maximum is not None:
        lo, hi = float(param.minimum), float(param.maximum)
    else:
        lo = float(param.minimum) if param.minimum is not None else 0.0
        hi = float(param.maximum) if param.maximum is not None else max(1.0, lo + 1.0)
    values = _numbers(setting)
    if values:
        lo, hi = min(lo, min(values)), max(hi, max(values))
    return lo, hi


def _numbers(setting: Any) -> list[float]:
    if isinstance(setting, bool) or setting is None:
        return []
    if isinstance(setting, (int, float)):
        return [float(setting)]
    if isinstance(setting, list):
        out: list[float] = []
        for item in setting:
            out.extend(_numbers(item["value"] if isinstance(item, dict) else item))
        return out
    if isinstance(setting, dict):
        return _numbers(setting.get("value"))
    return []


def _decimals(lo: float, hi: float) -> int:
    span = abs(hi - lo) or 1.0
    return max(2, min(8, 3 - math.floor(math.log10(span))))


class ParameterRow(QWidget):
    """Editor of one parameter's setting. ``edited`` carries the new setting."""

    edited = Signal(object)
    curveToggled = Signal(bool)
    curveShown = Signal()  # the per-layer label was clicked: show this curve as it is

    def __init__(self, param: Parameter, setting: Any, parent: Optional[QWidget] = None) -> None:
        super().__init__(parent)
        self.param = param
        self._setting = setting
        self._updating = False
        layout = QHBoxLayout(self)
        layout.setContentsMargins(0, 0, 0, 0)
        tip = f"{param.help}\nRange: {param.range_text()}" + ("  (required)" if param.required else "")
        self.setToolTip(tip)
        self.slider: Optional[QSlider] = None
        self.spin: Optional[QDoubleSpinBox | QSpinBox] = None
        self.check: Optional[QCheckBox] = None
        self.combo: Optional[QComboBox] = None
        self.curve_button: Optional[QToolButton] = None
        self.curve_label: Optional[QLabel] = None
        if param.kind is bool:
            self.check = QCheckBox()
            self.check.toggled.connect(self._bool_edited)
            layout.addWidget(self.check)
            layout.addStretch(1)
        elif param.choices:
            self.combo = QComboBox()
            self.combo.addItems(list(param.choices))
            self.combo.currentTextChanged.connect(self._choice_edited)
            layout.addWidget(self.combo, 1)
        elif param.kind in (int, float):
            self.slider = QSlider(Qt.Orientation.Horizontal)
            self.slider.setRange(0, _STEPS)
            self.slider.valueChanged.connect(self._slider_moved)
            if param.kind is int:
                self.spin = QSpinBox()
                self.spin.setRange(
                    int(param.minimum) if param.minimum is not None else -(10**9),
                    int(param.maximum) if param.maximum is not None else 10**9,
                )
            else:
                self.spin = QDoubleSpinBox()
                lo, hi = value_span(param, setting)
                self.spin.setDecimals(_decimals(lo, hi))
                self.spin.setSingleStep(10 ** -min(3, _decimals(lo, hi) - 1))
                minimum = param.minimum if param.minimum is not None else -1e9
                if param.exclusive_minimum:
                    minimum += 10 ** -self.spin.decimals()
                self.spin.setRange(minimum, param.maximum if param.maximum is not None else 1e9)
            self.spin.setKeyboardTracking(False)
            self.spin.setMinimumWidth(90)
            self.spin.valueChanged.connect(self._spin_edited)
            self.curve_label = QLabel()
            self.curve_label.setObjectName("muted")
            self.curve_label.setTextFormat(Qt.TextFormat.RichText)
            self.curve_label.setToolTip("Edit this curve in the curve editor")
            self.curve_label.linkActivated.connect(lambda _link: self.curveShown.emit())
            self.curve_button = QToolButton()
            self.curve_button.setText("Per layer")
            self.curve_button.setCheckable(True)
            self.curve_button.setToolTip("Vary this parameter over the layers (a mergekit gradient), edited as a curve")
            self.curve_button.toggled.connect(self._curve_toggled)
            layout.addWidget(self.slider, 1)
            layout.addWidget(self.curve_label, 1)
            layout.addWidget(self.spin)
            layout.addWidget(self.curve_button)
        else:
            layout.addWidget(QLabel(value_text(setting)))
        self.set_setting(setting)

    # -- model -> view -------------------------------------------------------
    def set_setting(self, setting: Any) -> None:
        """Show ``setting`` without emitting ``edited``."""
        self._setting = setting
        self._updating = True
        try:
            if self.check is not None:
                self.check.setChecked(bool(setting))
            elif self.combo is not None:
                self.combo.setCurrentText(str(setting if setting is not None else self.param.default))
            elif self.spin is not None and self.slider is not None and self.curve_button is not None:
                is_scalar = isinstance(setting, (int, float)) and not isinstance(setting, bool)
                per_layer = setting is not None and not is_scalar
                self.curve_button.setChecked(per_layer)
                self.slider.setVisible(not per_layer)
                self.spin.setVisible(not per_layer)
                self.curve_label.setVisible(per_layer)  # type: ignore[union-attr]
                if per_layer:
                    text = html.escape(f"per layer: {value_text(setting)}")
                    self.curve_label.setText(f'<a href="curve">{text}</a>')  # type: ignore[union-attr]
                elif is_scalar:
                    self.spin.setValue(setting)
                    self._place_slider(float(setting))
                else:  # required and not set
                    self.spin.setSpecialValueText("")
        finally:
            self._updating = False

    def _place_slider(self, value: float) -> None:
        lo, hi = value_span(self.param)
        frac = 0.0 if hi == lo else (value - lo) / (hi - lo)
        assert self.slider is not None
        self.slider.setValue(int(round(max(0.0, min(1.0, frac)) * _STEPS)))

    # -- view -> model -------------------------------------------------------
    def _emit(self, value: Any) -> None:
        if self._updating:
            return
        self._setting = value
        self.edited.emit(value)

    def _bool_edited(self, checked: bool) -> None:
        self._emit(bool(checked))

    def _choice_edited(self, text: str) -> None:
        self._emit(text)

    def _slider_moved(self, position: int) -> None:
        if self._updating or self.spin is None:
            return
        lo, hi = value_span(self.param)
        value = lo + (hi - lo) * position / _STEPS
        if self.param.kind is int:
            value = int(round(value))
        else:
            value = round(value, self.spin.decimals())  # type: ignore[union-attr]
        if self.param.exclusive_minimum and self.param.minimum is not None and value <= self.param.minimum:
            value = self.spin.minimum()  # the slider's left end stands for the smallest legal value
        self._updating = True
        self.spin.setValue(value)
        self._updating = False
        self._emit(value)

    def _spin_edited(self, value: float) -> None:
        if self._updating:
            return
        value = int(value) if self.param.kind is int else float(value)
        self._updating = True
        self._place_slider(float(value))
        self._updating = False
        self._emit(value)

    def _curve_toggled(self, on: bool) -> None:
        if self._updating:
            return
        self.curveToggled.emit(on)


class ParameterPanel(QScrollArea):
    """Rows for the recipe's global parameters, then a group per model slot."""

    curveRequested = Signal(str, object)  # parameter name, slot index (None: global)

    def __init__(self, doc: RecipeDocument, parent: Optional[QWidget] = None) -> None:
        super().__init__(parent)
        self.doc = doc
        self.setWidgetResizable(True)
        self.rows: dict[tuple[str, Optional[int]], ParameterRow] = {}
        self._signature: tuple = ()
        # value -> the setting "Per layer" starts from (the recipe editor gives block weights for SD models)
        self.curve_seed: Optional[Any] = None
        self.curve_label: Optional[str] = None  # "Per block" for Stable Diffusion models
        self._body = QWidget()
        self._layout = QVBoxLayout(self._body)
        self._layout.setContentsMargins(4, 4, 4, 4)
        self.setWidget(self._body)
        doc.events.changed.connect(self._on_doc_changed)
        self.rebuild()

    def row(self, name: str, slot: Optional[int] = None) -> ParameterRow:
        return self.rows[(name, slot)]

    def _on_doc_changed(self, what: str) -> None:
        if what == "export":
            return
        if self._structure() != self._signature:
            self.rebuild()
        else:
            self.refresh()

    def _structure(self) -> tuple:
        doc = self.doc
        if not doc.editable:
            return ("slices",)
        slots = tuple((s.ref, s.name, tuple(p.name for p in doc.slot_parameters(i))) for i, s in enumerate(doc.slots))
        return (doc.method_name, doc.base_index, slots)

    def refresh(self) -> None:
        for (name, slot), row in self.rows.items():
            row.set_setting(self.doc.param_value(name, slot))

    def rebuild(self) -> None:
        while self._layout.count():
            item = self._layout.takeAt(0)
            if item.widget() is not None:
                item.widget().deleteLater()
        self.rows = {}
        self._signature = self._structure()
        doc = self.doc
        if not doc.editable:
            note = QLabel("This recipe uses layer slices: edit its parameters in the YAML view.")
            note.setWordWrap(True)
            self._layout.addWidget(note)
            self._layout.addStretch(1)
            return
        method = doc.method
        if method.global_parameters:
            self._layout.addWidget(self._group("Recipe", [(p, None) for p in method.global_parameters]))
        for i in range(len(doc.slots)):
            params = doc.slot_parameters(i)
            if params:
                self._layout.addWidget(self._group(doc.display(i), [(p, i) for p in params]))
        if not self.rows:
            text = "This method has no parameters." if doc.slots else "Add models to set their parameters."
            label = QLabel(text)
            label.setObjectName("muted")
            self._layout.addWidget(label)
        self._layout.addStretch(1)

    def _group(self, title: str, params: list[tuple[Parameter, Optional[int]]]) -> QGroupBox:
        box = QGroupBox(title)
        form = QFormLayout(box)
        form.setFieldGrowthPolicy(QFormLayout.FieldGrowthPolicy.AllNonFixedFieldsGrow)
        for param, slot in params:
            row = ParameterRow(param, self.doc.param_value(param.name, slot))
            row.edited.connect(lambda value, n=param.name, s=slot: self._edited(n, s, value))
            row.curveToggled.connect(lambda on, n=param.name, s=slot: self._curve_toggled(n, s, on))
            row.curveShown.connect(lambda n=param.name, s=slot: self.curveRequested.emit(n, s))
            label = QLabel(param.name + (" *" if param.required else ""))
            label.setToolTip(row.toolTip())
            form.addRow(label, row)
            self.rows[(param.name, slot)] = row
            if self.curve_label and row.curve_button is not None:
                row.curve_button.setText(self.curve_label)
            if self.doc.method_name in _SPELL_OUT:  # A1111 modes: the ratio's direction, written next to it
                meaning = QLabel(param.help)
                meaning.setObjectName("muted")
                meaning.setWordWrap(True)
                form.addRow("", meaning)
        return box

    def _edited(self, name: str, slot: Optional[int], value: Any) -> None:
        self.doc.set_param(name, value, slot)

    def _curve_toggled(self, name: str, slot: Optional[int], on: bool) -> None:
        current = self.doc.param_value(name, slot)
        if on:
            seed = self.curve_seed or (lambda v: [v, v])
            if isinstance(current, (int, float)) and not isinstance(current, bool):
                self.doc.set_param(name, seed(float(current)), slot)
            elif current is None:
                lo, hi = value_span(self.rows[(name, slot)].param)
                self.doc.set_param(name, seed(lo + (hi - lo) / 2), slot)
            self.curveRequested.emit(name, slot)
        else:
            values = _numbers(current)
            if values:
                self.doc.set_param(name, round(sum(values) / len(values), 6), slot)
            self.curveRequested.emit("", None)
