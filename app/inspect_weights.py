"""The Weights sub-tab of Inspect: the layers x modules heat map of weight differences and one tensor's figures."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import TYPE_CHECKING, Any, Optional, Sequence

from PySide6.QtWidgets import (
    QAbstractItemView,
    QComboBox,
    QFormLayout,
    QHBoxLayout,
    QHeaderView,
    QLabel,
    QPushButton,
    QSplitter,
    QTableWidget,
    QTableWidgetItem,
    QVBoxLayout,
    QWidget,
)

from app.inspect_common import METRICS, device_combo, resolve_device, InspectTab
from app.inspect_tokens import CheckList
from app.workers import GeneratorWorker

if TYPE_CHECKING:  # pragma: no cover
    from app.inspect_panel import InspectPanel


def short_labels(names: Sequence[str]) -> list[str]:
    """Column labels for module names: a trailing ".weight" dropped (".bias" stays), then the
    shortest dotted suffix that is still unique ("self_attn.q_proj.weight" -> "q_proj",
    "mlp.up_proj.bias" -> "up_proj.bias")."""
    stems = [n[: -len(".weight")] if n.endswith(".weight") else n for n in names]
    parts = [stem.split(".") for stem in stems]
    out = []
    for mine in parts:
        first = 2 if len(mine) > 1 and mine[-1] == "bias" else 1  # "bias" alone names nothing
        for k in range(first, len(mine) + 1):
            suffix = mine[-k:]
            if sum(1 for other in parts if other[-k:] == suffix) == 1:
                out.append(".".join(suffix))
                break
        else:
            out.append(".".join(mine))  # the same name twice: keep it whole
    # Norm layers have the longest names and the least to show: "post_attention_layernorm" -> "post_attention_norm".
    return [label.replace("layernorm", "norm").replace("layer_norm", "norm") for label in out]



def _compare_weights(models: list[str], base: Optional[str], device: str, out: Optional[Path]):
    from core.inspect.weights import iter_weight_diff

    result = yield from iter_weight_diff(models, base, device=resolve_device(device))
    saved = None
    if out is not None:
        saved = _write_json(out, result.to_json())
    return result, saved


def _write_json(path: Path, data: dict) -> Path:
    """Atomic JSON write (temporary file in the same folder, then rename)."""
    import os
    import tempfile

    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=str(path.parent))
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            json.dump(data, fh, ensure_ascii=False)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path



def load_weight_diff(path: Path) -> Any:
    """A WeightDiff from the JSON the Weights tab saved (``WeightDiff.to_json``; None back to NaN)."""
    from core.errors import MergeStudioError
    from core.inspect.weights import TensorDiff, WeightDiff

    def num(v: Any) -> float:
        return math.nan if v is None else float(v)

    try:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
        tensors = [
            TensorDiff(name=t["name"], layer=t["layer"], module=t["module"], shape=tuple(t["shape"]), numel=t["numel"],
                       rel_l2=[num(v) for v in t["rel_l2"]], abs_l2=[num(v) for v in t["abs_l2"]],
                       top10_share=[num(v) for v in t["top10_share"]],
                       cosine=None if t["cosine"] is None else [[num(v) for v in row] for row in t["cosine"]],
                       sign_conflict=None if t["sign_conflict"] is None else num(t["sign_conflict"]))
            for t in data["tensors"]
        ]
        return WeightDiff(models=data["models"], base=data["base"], reference=data["reference"], tensors=tensors,
                          skipped=[tuple(s) for s in data["skipped"]], layers=data["layers"], modules=data["modules"])
    except (OSError, KeyError, ValueError, TypeError) as exc:
        raise MergeStudioError(f"{path} is not a weight comparison saved by Merge Studio ({exc}).") from None



class WeightsTab(InspectTab):
    """Layer-wise weight differences of the checked models (against a base or the first)."""

    kinds = ("weights",)

    def __init__(self, panel: "InspectPanel") -> None:
        super().__init__(panel)
        from app.plots import HeatmapView

        self.diff: Any = None  # the WeightDiff shown
        self.model_list = CheckList()
        self.model_list.setToolTip("Models to compare (without a base, the first checked one is the reference)")
        self.base_combo = QComboBox()
        self.base_combo.setToolTip("The common base: task vectors are model − base")
        self.device_combo = device_combo()
        self.compare_button = QPushButton("Compare")
        self.compare_button.clicked.connect(self.compare)
        self.metric_combo = QComboBox()
        for data, label in METRICS:
            self.metric_combo.addItem(label, data)
        self.metric_combo.currentIndexChanged.connect(self.show_current)
        self.compared_combo = QComboBox()
        self.compared_combo.setToolTip("The model whose figures are shown (relative L2 and top-10% share)")
        self.compared_combo.currentIndexChanged.connect(self.show_current)
        self.heatmap = HeatmapView(colormap="magma")
        self.heatmap.cellClicked.connect(self.show_cell)
        self.heatmap.problem.connect(self.fail)
        self.cell_table = QTableWidget(0, 2)
        self.cell_table.setHorizontalHeaderLabels(["", ""])
        self.cell_table.verticalHeader().setVisible(False)
        self.cell_table.horizontalHeader().setVisible(False)
        self.cell_table.setEditTriggers(QAbstractItemView.EditTrigger.NoEditTriggers)
        self.cell_table.horizontalHeader().setSectionResizeMode(0, QHeaderView.ResizeMode.Interactive)
        self.cell_table.horizontalHeader().setSectionResizeMode(1, QHeaderView.ResizeMode.Stretch)
        self.cell_table.setColumnWidth(0, 165)
        self.cell_table.setMinimumWidth(310)
        self.cell_table.setWordWrap(False)
        self.cell_table.setToolTip("Click a cell of the heat map to see that tensor's figures")
        self.skipped_label = QLabel("")
        self.skipped_label.setObjectName("muted")
        self.skipped_label.setWordWrap(True)

        left = QWidget()
        l_layout = QVBoxLayout(left)
        l_layout.addWidget(QLabel("Models"))
        l_layout.addWidget(self.model_list, 1)
        form = QFormLayout()
        form.addRow("Base", self.base_combo)
        form.addRow("Device", self.device_combo)
        l_layout.addLayout(form)
        buttons = QHBoxLayout()
        buttons.addWidget(self.compare_button)
        buttons.addWidget(self.stop_button)
        l_layout.addLayout(buttons)
        for widget in self.status_widgets():
            l_layout.addWidget(widget)

        right = QWidget()
        r_layout = QVBoxLayout(right)
        r_layout.setContentsMargins(0, 0, 0, 0)
        choose = QHBoxLayout()
        choose.addWidget(QLabel("Metric"))
        choose.addWidget(self.metric_combo, 1)
        choose.addWidget(QLabel("Model"))
        choose.addWidget(self.compared_combo, 2)
        r_layout.addLayout(choose)
        views = QSplitter()
        views.addWidget(self.heatmap)
        views.addWidget(self.cell_table)
        views.setStretchFactor(0, 3)
        views.setStretchFactor(1, 1)
        views.setSizes([700, 240])
        r_layout.addWidget(views, 1)
        r_layout.addWidget(self.skipped_label)
        splitter = QSplitter()
        splitter.addWidget(left)
        splitter.addWidget(right)
        splitter.setStretchFactor(1, 3)
        splitter.setSizes([320, 820])
        layout = QVBoxLayout(self)
        layout.addWidget(splitter)
        self.fill_models()

    def fill_models(self) -> None:
        infos = list(self.panel.models())
        self.model_list.fill(infos)
        current = self.base_combo.currentData()
        self.base_combo.clear()
        self.base_combo.addItem("(none)", None)
        for info in infos:
            self.base_combo.addItem(info.name, str(info.path))
        self.base_combo.setCurrentIndex(max(0, self.base_combo.findData(current)))

    def set_base(self, path: Optional[str]) -> None:
        self.base_combo.setCurrentIndex(max(0, self.base_combo.findData(None if path is None else str(path))))

    def set_running(self, running: bool) -> None:
        self.compare_button.setEnabled(not running)

    def compare(self) -> Optional[GeneratorWorker]:
        if not self.idle():
            return None
        base = self.base_combo.currentData()
        models = [m for m in self.model_list.checked() if m != base]
        if len(models) + (base is not None) < 2:
            self.fail("Check two models, or one model and pick a base, to compare weights.")
            return None
        device = self.device_combo.currentData()
        sid = self.session_id()
        out = self.output_path("weights", ".json")
        self.status_label.setText(f"Comparing {len(models)} model(s)…")
        return self.start(_compare_weights, models, base, device, out,
                          on_result=lambda value: self._compared(value, models, base, device, sid))

    def _compared(self, value: Any, models: list[str], base: Optional[str], device: str, sid: Optional[int]) -> None:
        diff, saved = value
        self.show_diff(diff)
        summary = {
            "reference": diff.reference, "compared": diff.compared, "layers": diff.layers, "modules": diff.modules,
            "tensors": len(diff.tensors), "skipped": len(diff.skipped),
            "per_layer_rel_l2": [[v for _, v in diff.per_layer("rel_l2", i)] for i in range(len(diff.compared))],
        }
        self.record(sid, "weights", models, {"base": base, "device": device}, summary, [saved])
        self.results += 1
        saved_text = f"; saved {saved.name}." if saved else "."
        self.status_label.setText(f"Compared {len(diff.tensors)} tensors{saved_text}")
        self.done.emit("weights")

    def show_diff(self, diff: Any) -> None:
        self.diff = diff
        self.compared_combo.blockSignals(True)
        self.compared_combo.clear()
        for i, model in enumerate(diff.compared):
            self.compared_combo.addItem(f"{Path(model).name} − {Path(diff.reference).name}", i)
        self.compared_combo.blockSignals(False)
        if diff.skipped:
            first = diff.skipped[0]
            more = f" (and {len(diff.skipped) - 1} more)" if len(diff.skipped) > 1 else ""
            self.skipped_label.setText(f"{len(diff.skipped)} tensor(s) not compared: {first[0]}: {first[1]}{more}")
            self.skipped_label.setToolTip("\n".join(f"{n}: {r}" for n, r in diff.skipped))
        else:
            self.skipped_label.setText("")
        outside = [t.name for t in diff.tensors if t.layer is None]
        if outside:
            self.skipped_label.setText((self.skipped_label.text() + "  ").lstrip()
                                       + f"{len(outside)} tensor(s) outside the layers are not in the heat map.")
        self.cell_table.setRowCount(0)
        self.show_current()

    def select(self, metric: Optional[str] = None, model: Optional[int] = None) -> None:
        if metric is not None:
            self.metric_combo.setCurrentIndex(self.metric_combo.findData(metric))
        if model is not None:
            self.compared_combo.setCurrentIndex(self.compared_combo.findData(model))

    def current_heatmap(self) -> Optional[tuple]:
        if self.diff is None:
            return None
        metric = self.metric_combo.currentData()
        model = self.compared_combo.currentData() or 0
        return self.diff.heatmap(metric, model)

    def show_current(self, *args: Any) -> None:
        from core.errors import MergeStudioError

        if self.diff is None:
            return
        metric = self.metric_combo.currentData()
        per_model = metric in ("rel_l2", "top10_share")
        self.compared_combo.setEnabled(per_model)
        try:
            values, layers, modules = self.current_heatmap()
        except MergeStudioError as exc:
            self.fail(str(exc))
            return
        label = dict(METRICS)[metric]
        if metric == "cosine":
            label += " (mean over pairs of task vectors)"
        elif metric == "sign_conflict":
            label += " (all task vectors)"
        else:
            label += f": {self.compared_combo.currentText()}"
        levels = (-1.0, 1.0) if metric == "cosine" else None
        shown = short_labels(modules)  # the full name is in the cell table
        self.heatmap.set_data(values, [str(layer) for layer in layers], shown, title=label, levels=levels)
        self.heatmap.plot_item.setLabel("left", "layer")

    def show_cell(self, row: int, col: int) -> None:
        """That tensor's figures in the small table (a cell the layer lacks says so)."""
        if self.diff is None or not (0 <= row < len(self.diff.layers) and 0 <= col < len(self.diff.modules)):
            return
        layer, module = self.diff.layers[row], self.diff.modules[col]
        t = self.diff.cell(layer, module)
        rows: list[tuple[str, str]] = []
        if t is None:
            rows.append(("tensor", f"layer {layer} has no {module}"))
        else:
            rows += [("tensor", t.name), ("shape", " × ".join(map(str, t.shape))), ("elements", f"{t.numel:,}")]
            for i, model in enumerate(self.diff.compared):
                name = Path(model).name
                rows += [(f"relative L2 · {name}", _num(t.rel_l2[i])), (f"L2 · {name}", _num(t.abs_l2[i])),
                         (f"top-10% share · {name}", _num(t.top10_share[i]))]
            if t.sign_conflict is not None:
                rows.append(("sign conflict", _num(t.sign_conflict)))
            if t.cosine is not None:
                names = [Path(m).name for m in self.diff.compared]
                for i in range(len(names)):
                    for j in range(i + 1, len(names)):
                        rows.append((f"cosine · {names[i]} / {names[j]}", _num(t.cosine[i][j])))
        self.cell_table.setRowCount(len(rows))
        for r, (key, value) in enumerate(rows):
            for c, text in enumerate((key, value)):
                item = QTableWidgetItem(text)
                item.setToolTip(text)  # long tensor names are elided in the cell
                self.cell_table.setItem(r, c, item)
        self.selected_cell = (row, col)

    def cell_rows(self) -> dict[str, str]:
        """What the cell table shows, key -> value (tests)."""
        return {self.cell_table.item(r, 0).text(): self.cell_table.item(r, 1).text()
                for r in range(self.cell_table.rowCount())}

    def reload(self, row: int) -> None:
        from core.errors import MergeStudioError

        if not 0 <= row < len(self.earlier):
            return
        record = self.earlier[row]
        files = [Path(f) for f in record.files if f.endswith(".json")]
        if not files or not files[0].is_file():
            self.fail(f"The figures of that comparison are gone ({files[0] if files else 'no file was saved'}).")
            return
        try:
            self.show_diff(load_weight_diff(files[0]))
        except MergeStudioError as exc:
            self.fail(str(exc))
            return
        self.clear_problem()
        self.status_label.setText(f"Showing the saved {files[0].name}.")


def _num(value: Optional[float]) -> str:
    if value is None or not math.isfinite(value):
        return "undefined"
    return f"{value:.6g}"


