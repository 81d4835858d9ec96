"""The Attention sub-tab of Inspect: text heat maps, ViT class-token attention and rollout, diffusion cross-attention."""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Any, Optional

import numpy as np
from PySide6.QtCore import Qt
from PySide6.QtWidgets import (
    QComboBox,
    QFileDialog,
    QFormLayout,
    QHBoxLayout,
    QLabel,
    QLineEdit,
    QListWidget,
    QPushButton,
    QSpinBox,
    QSplitter,
    QStackedWidget,
    QVBoxLayout,
    QWidget,
)

from app.inspect_common import (ALL_LAYERS, DEFAULT_PROMPT, DEFAULT_TEXT, DISK_IMAGE, HEAD_MAX, HEAD_MEAN, ROLLOUT,
                                VISION_TYPES, device_combo, resolve_device, InspectTab, parse_layers)
from app.workers import GeneratorWorker

if TYPE_CHECKING:  # pragma: no cover
    from app.inspect_panel import InspectPanel


def text_map(result: Any, layer: Any, head: Any) -> np.ndarray:
    """The ``[N, N]`` map a text capture shows for a layer choice and a head choice.

    ``head``: a head index, ``"mean"`` or ``"max"`` (over heads, per layer). ``layer``: a
    captured layer index, or ``"all"``: the mean over captured layers of the head-reduced
    maps. So ``("all", "max")`` is ``mean_l max_h maps[l][h]``.
    """
    layers = list(result.layers) if layer == ALL_LAYERS else [int(layer)]
    per_layer = []
    for lay in layers:
        maps = np.asarray(result.maps[lay])  # [heads, N, N]
        if head == HEAD_MEAN:
            per_layer.append(maps.mean(axis=0))
        elif head == HEAD_MAX:
            per_layer.append(maps.max(axis=0))
        else:
            per_layer.append(maps[int(head)])
    return np.mean(per_layer, axis=0).astype(np.float32)


def vision_map(result: Any, layer: Any, head: Any) -> np.ndarray:
    """The ``[gh, gw]`` map a vision capture shows: the rollout, or one layer's class-token
    attention (``cls_attention[layer] [heads, gh, gw]``) for a head, or its mean / max over heads."""
    if layer == ROLLOUT:
        return np.asarray(result.rollout, dtype=np.float32)
    maps = np.asarray(result.cls_attention[int(layer)])
    if head == HEAD_MEAN:
        return maps.mean(axis=0).astype(np.float32)
    if head == HEAD_MAX:
        return maps.max(axis=0).astype(np.float32)
    return maps[int(head)].astype(np.float32)


def attention_kind(info: Any) -> Optional[str]:
    """"text", "vision", "diffusion" or None (the Attention tab cannot capture this model)."""
    kind = getattr(info, "kind", "")
    model_type = (getattr(info, "model_type", None) or "").lower()
    arch = getattr(info, "architecture", "") or ""
    path = Path(getattr(info, "path", ""))
    if kind == "diffusers":
        return "diffusion" if (path / "model_index.json").is_file() else None
    if kind != "transformers":
        return None
    if model_type in VISION_TYPES or arch.startswith(("ViT", "DeiT")):
        return "vision"
    if model_type.startswith("clip") or "Vision" in arch:
        return None  # a CLIP or another vision tower: not a text model the capture can feed
    return "text"



def _capture_text(path: str, text: str, layers: Optional[list[int]], device: str, out: Optional[Path]):
    from core.inspect.attention import iter_text_attention

    result = yield from iter_text_attention(path, text, layers=layers, device=resolve_device(device))
    saved = result.save_npz(out) if out is not None else None
    return result, saved


def _capture_vision(path: str, image: str, layers: Optional[list[int]], r: int, device: str, out: Optional[Path]):
    from core.inspect.attention import iter_vision_attention

    merging = {"method": "tome", "r": r} if r > 0 else None
    result = yield from iter_vision_attention(path, image, layers=layers, token_merging=merging,
                                              device=resolve_device(device))
    saved = result.save_npz(out) if out is not None else None
    return result, saved


def _capture_cross(path: str, prompt: str, steps: int, size: tuple[int, int], seed: int, device: str,
                   out: Optional[Path], timesteps: Optional[list[int]] = None, level: Optional[str] = None,
                   heads: Optional[list[int]] = None):
    from core.inspect.cross_attention import iter_cross_attention

    width, height = size
    result = yield from iter_cross_attention(path, prompt, steps=steps, height=height, width=width, seed=seed,
                                             timesteps=timesteps, layers=[level] if level else None, heads=heads,
                                             device=resolve_device(device))
    saved = result.save_npz(out) if out is not None else None
    return result, saved



def load_text_attention(path: Path) -> Any:
    """A TextAttention from a file its ``save_npz`` wrote (``layer_<i>`` arrays, ``tokens``, ``meta``)."""
    from core.errors import MergeStudioError
    from core.inspect.attention import TextAttention

    try:
        with np.load(path, allow_pickle=False) as data:
            meta = json.loads(str(data["meta"]))
            maps = {int(k[len("layer_"):]): np.array(data[k]) for k in data.files if k.startswith("layer_")}
    except (OSError, KeyError, ValueError) as exc:
        raise MergeStudioError(f"{path} is not an attention .npz written by Merge Studio ({exc}).") from None
    return TextAttention(model=meta["model"], text=meta["text"], tokens=list(meta["tokens"]),
                         layers=list(meta["layers"]),
                         num_layers=meta["num_layers"], heads=meta["heads"], maps=maps, causal=meta["causal"],
                         truncated=meta["truncated"], notes=list(meta.get("notes", [])))


def load_vision_attention(path: Path) -> Any:
    """A VisionAttention from a file its ``save_npz`` wrote."""
    from core.errors import MergeStudioError
    from core.inspect.attention import VisionAttention

    try:
        with np.load(path, allow_pickle=False) as data:
            meta = json.loads(str(data["meta"]))
            cls = {int(k[len("cls_"):]): np.array(data[k]) for k in data.files if k.startswith("cls_")}
            image, rollout = np.array(data["image"]), np.array(data["rollout"])
            groups = np.array(data["groups"]) if "groups" in data.files else None
    except (OSError, KeyError, ValueError) as exc:
        raise MergeStudioError(f"{path} is not a vision-attention .npz written by Merge Studio ({exc}).") from None
    return VisionAttention(model=meta["model"], image=image, grid=tuple(meta["grid"]), layers=list(meta["layers"]),
                           num_layers=meta["num_layers"], heads=meta["heads"], cls_attention=cls, rollout=rollout,
                           groups=groups, tokens_per_layer=list(meta["tokens_per_layer"]),
                           token_merging=meta.get("token_merging"), notes=list(meta.get("notes", [])),
                           output_tokens=meta.get("output_tokens", 0), special_tokens=meta.get("special_tokens", 1),
                           head_fusion=meta.get("head_fusion", "mean"))



class AttentionTab(InspectTab):
    """Capture attention of a text model, a vision transformer or a diffusion pipeline."""

    kinds = ("attention", "vision-attention", "cross-attention")

    def __init__(self, panel: "InspectPanel") -> None:
        super().__init__(panel)
        from app.plots import HeatmapView, ImageOverlayView

        self.result: Any = None  # TextAttention | VisionAttention | CrossAttentionMaps shown now
        self.result_kind: Optional[str] = None  # "text" | "vision" | "diffusion"
        self.model_combo = QComboBox()
        self.model_combo.setToolTip("Text models, vision transformers (ViT, DeiT) and diffusers pipelines "
                                    "of the library")
        self.model_combo.currentIndexChanged.connect(self._model_changed)
        self.text_edit = QLineEdit(DEFAULT_TEXT)
        self.text_edit.setPlaceholderText("A sentence (text models) or a prompt (pipelines)")
        self.image_combo = QComboBox()
        self.image_combo.activated.connect(self._image_picked)
        self._image_index = 0
        self.layers_edit = QLineEdit()
        self.layers_edit.setPlaceholderText("all (or e.g. 0, 2, 4-6)")
        self.layers_edit.setToolTip("Layers to capture, 0-based; only these are kept")
        self.r_spin = QSpinBox()
        self.r_spin.setRange(0, 512)
        self.r_spin.setToolTip("ViT: ToMe tokens merged per layer (0: no token merging)")
        self.steps_spin = QSpinBox()
        self.steps_spin.setRange(1, 200)
        self.steps_spin.setValue(20)
        self.size_spin = QSpinBox()
        self.size_spin.setRange(64, 2048)
        self.size_spin.setSingleStep(64)
        self.size_spin.setValue(512)
        self.size_spin.setToolTip("Image width (a multiple of 8)")
        self.height_spin = QSpinBox()
        self.height_spin.setRange(64, 2048)
        self.height_spin.setSingleStep(64)
        self.height_spin.setValue(512)
        self.height_spin.setToolTip("Image height (a multiple of 8)")
        self.timesteps_edit = QLineEdit()
        self.timesteps_edit.setPlaceholderText("all steps (or e.g. 0-9)")
        self.timesteps_edit.setToolTip("Denoising steps (0-based) whose attention is summed")
        self.level_combo = QComboBox()
        for label, level in (("all cross-attention layers", None), ("down blocks", "down"),
                             ("middle block", "mid"), ("up blocks", "up")):
            self.level_combo.addItem(label, level)
        self.heads_edit = QLineEdit()
        self.heads_edit.setPlaceholderText("all heads (or e.g. 0, 2)")
        self.seed_spin = QSpinBox()
        self.seed_spin.setRange(0, 2**31 - 1)
        self.device_combo = device_combo()
        self.capture_button = QPushButton("Capture")
        self.capture_button.clicked.connect(self.capture)

        form = QFormLayout()
        self.form = form
        form.addRow("Model", self.model_combo)
        form.addRow("Text", self.text_edit)
        form.addRow("Image", self.image_combo)
        form.addRow("Layers", self.layers_edit)
        form.addRow("Token merging r", self.r_spin)
        form.addRow("Steps", self.steps_spin)
        form.addRow("Width", self.size_spin)
        form.addRow("Height", self.height_spin)
        form.addRow("Steps summed", self.timesteps_edit)
        form.addRow("UNet layers", self.level_combo)
        form.addRow("Heads", self.heads_edit)
        form.addRow("Seed", self.seed_spin)
        form.addRow("Device", self.device_combo)
        buttons = QHBoxLayout()
        buttons.addWidget(self.capture_button)
        buttons.addWidget(self.stop_button)
        form.addRow(buttons)
        for widget in self.status_widgets():
            form.addRow(widget)
        left = QWidget()
        left.setLayout(form)

        # Views
        self.layer_combo = QComboBox()
        self.layer_combo.currentIndexChanged.connect(self.show_current)
        self.head_combo = QComboBox()
        self.head_combo.currentIndexChanged.connect(self.show_current)
        self.heatmap = HeatmapView()
        self.overlay = ImageOverlayView()
        self.token_list = QListWidget()
        self.token_list.setToolTip("Click a prompt token to see its cross-attention map")
        self.token_list.currentRowChanged.connect(lambda _row: self.show_current())
        self.token_list.setMaximumWidth(180)
        for view in (self.heatmap, self.overlay):
            view.problem.connect(self.fail)
        self.notes_label = QLabel("")
        self.notes_label.setObjectName("muted")
        self.notes_label.setWordWrap(True)
        choose = QHBoxLayout()
        choose.addWidget(QLabel("Layer"))
        choose.addWidget(self.layer_combo, 1)
        choose.addWidget(QLabel("Head"))
        choose.addWidget(self.head_combo, 1)
        self.view_stack = QStackedWidget()
        self.view_stack.addWidget(self.heatmap)  # 0: text
        overlay_page = QWidget()
        o_layout = QHBoxLayout(overlay_page)
        o_layout.setContentsMargins(0, 0, 0, 0)
        o_layout.addWidget(self.overlay, 1)
        o_layout.addWidget(self.token_list)
        self.view_stack.addWidget(overlay_page)  # 1: vision / diffusion
        right = QWidget()
        r_layout = QVBoxLayout(right)
        r_layout.setContentsMargins(0, 0, 0, 0)
        self.choose_row = QWidget()
        self.choose_row.setLayout(choose)
        r_layout.addWidget(self.choose_row)
        r_layout.addWidget(self.view_stack, 1)
        r_layout.addWidget(self.notes_label)
        splitter = QSplitter()
        splitter.addWidget(left)
        splitter.addWidget(right)
        splitter.setStretchFactor(1, 3)
        splitter.setSizes([340, 800])
        layout = QVBoxLayout(self)
        layout.addWidget(splitter)
        self._fill_images()
        self.fill_models()
        self._show_kind(None)

    # -- models and inputs ---------------------------------------------------------------
    def fill_models(self) -> None:
        current = self.model_combo.currentData()
        infos = [(attention_kind(m), m) for m in self.panel.models()]
        infos = sorted([(k, m) for k, m in infos if k is not None], key=lambda km: (km[0], km[1].name.lower()))
        self.model_combo.blockSignals(True)
        self.model_combo.clear()
        for kind, info in infos:
            self.model_combo.addItem(f"{info.name}  ({kind})", (str(info.path), kind))
            self.model_combo.setItemData(self.model_combo.count() - 1, f"{info.architecture}\n{info.path}",
                                         Qt.ItemDataRole.ToolTipRole)
        index = next((i for i in range(self.model_combo.count()) if self.model_combo.itemData(i) == current), 0)
        self.model_combo.setCurrentIndex(index)
        self.model_combo.blockSignals(False)
        self._model_changed()

    def select_model(self, path: str) -> bool:
        for i in range(self.model_combo.count()):
            if self.model_combo.itemData(i)[0] == str(path):
                self.model_combo.setCurrentIndex(i)
                return True
        return False

    def current_kind(self) -> Optional[str]:
        data = self.model_combo.currentData()
        return None if data is None else data[1]

    def _model_changed(self, *args: Any) -> None:
        kind = self.current_kind()
        self.form.setRowVisible(self.text_edit, kind in ("text", "diffusion", None))
        self.form.setRowVisible(self.image_combo, kind == "vision")
        self.form.setRowVisible(self.layers_edit, kind in ("text", "vision"))
        self.form.setRowVisible(self.r_spin, kind == "vision")
        for spin in (self.steps_spin, self.size_spin, self.height_spin, self.seed_spin, self.timesteps_edit,
                     self.level_combo, self.heads_edit):
            self.form.setRowVisible(spin, kind == "diffusion")
        if kind == "diffusion" and self.text_edit.text() == DEFAULT_TEXT:
            self.text_edit.setText(DEFAULT_PROMPT)
        elif kind == "text" and self.text_edit.text() == DEFAULT_PROMPT:
            self.text_edit.setText(DEFAULT_TEXT)
        self.capture_button.setEnabled(kind is not None and self.idle())

    def _fill_images(self) -> None:
        from core.tokens.lab import sample_images

        self.image_combo.clear()
        for path in sample_images():
            self.image_combo.addItem(f"Sample: {path.stem}", str(path))
        self.image_combo.addItem(DISK_IMAGE, None)

    def _image_picked(self, index: int) -> None:
        if self.image_combo.itemData(index) is not None:
            self._image_index = index
            return
        dialog = QFileDialog(self, "An image", str(Path.home()), "Images (*.png *.jpg *.jpeg *.bmp *.webp)")
        dialog.setOption(QFileDialog.Option.DontUseNativeDialog, True)
        dialog.setFileMode(QFileDialog.FileMode.ExistingFile)
        dialog.fileSelected.connect(lambda path: self.use_image(Path(path)))
        dialog.rejected.connect(lambda: self.image_combo.setCurrentIndex(self._image_index))
        self.image_dialog = dialog
        dialog.open()

    def use_image(self, path: Path) -> None:
        index = self.image_combo.findData(str(path))
        if index < 0:
            self.image_combo.insertItem(max(0, self.image_combo.count() - 1), f"File: {path.name}", str(path))
            index = self.image_combo.findData(str(path))
        self.image_combo.setCurrentIndex(index)
        self._image_index = index

    # -- capture -------------------------------------------------------------------------
    def set_running(self, running: bool) -> None:
        self.capture_button.setEnabled(not running and self.current_kind() is not None)

    def capture(self) -> Optional[GeneratorWorker]:
        data = self.model_combo.currentData()
        if data is None or not self.idle():
            return None
        path, kind = data
        device = self.device_combo.currentData()
        text = self.text_edit.text()
        try:
            layers = parse_layers(self.layers_edit.text()) if kind in ("text", "vision") else None
        except ValueError as exc:
            self.fail(str(exc))
            return None
        sid = self.session_id()
        if kind == "text":
            settings = {"text": text, "layers": layers, "device": device}
            out = self.output_path("attention", ".npz")
            args: tuple = (_capture_text, path, text, layers, device, out)
        elif kind == "vision":
            image = self.image_combo.itemData(self._image_index) or self.image_combo.itemData(0)
            settings = {"image": image, "layers": layers, "token_merging": {"method": "tome", "r": self.r_spin.value()}
                        if self.r_spin.value() else None, "device": device}
            out = self.output_path("vision-attention", ".npz")
            args = (_capture_vision, path, image, layers, self.r_spin.value(), device, out)
        else:
            try:
                timesteps = parse_layers(self.timesteps_edit.text(), "steps summed")
                heads = parse_layers(self.heads_edit.text(), "heads")
            except ValueError as exc:
                self.fail(str(exc))
                return None
            level = self.level_combo.currentData()
            size = (self.size_spin.value(), self.height_spin.value())
            settings = {"prompt": text, "steps": self.steps_spin.value(), "width": size[0], "height": size[1],
                        "seed": self.seed_spin.value(), "timesteps": timesteps, "layers": level, "heads": heads,
                        "device": device}
            out = self.output_path("cross-attention", ".npz")
            args = (_capture_cross, path, text, self.steps_spin.value(), size, self.seed_spin.value(), device, out,
                    timesteps, level, heads)
        self.status_label.setText(f"Capturing {Path(path).name}…")
        return self.start(*args, on_result=lambda value: self._captured(value, kind, path, settings, sid))

    def _captured(self, value: Any, kind: str, path: str, settings: dict, sid: Optional[int]) -> None:
        result, saved = value
        self.show_result(result, kind)
        inspection = {"text": "attention", "vision": "vision-attention", "diffusion": "cross-attention"}[kind]
        summary = result.to_json() if kind == "diffusion" else result.meta()
        self.record(sid, inspection, [path], settings, summary, [saved])
        self.results += 1
        self.status_label.setText(f"Captured {Path(path).name}" + (f"; saved {saved.name}." if saved else "."))
        self.done.emit(inspection)

    # -- showing ---------------------------------------------------------------------------
    def _show_kind(self, kind: Optional[str]) -> None:
        self.view_stack.setCurrentIndex(0 if kind in ("text", None) else 1)
        self.choose_row.setVisible(kind in ("text", "vision"))
        self.token_list.setVisible(kind == "diffusion")

    def show_result(self, result: Any, kind: str) -> None:
        """Show a capture (a fresh one or one reloaded from the session)."""
        self.result, self.result_kind = result, kind
        self._show_kind(kind)
        for combo in (self.layer_combo, self.head_combo):
            combo.blockSignals(True)
            combo.clear()
        if kind == "text":
            for layer in result.layers:
                self.layer_combo.addItem(f"layer {layer}", layer)
            if len(result.layers) > 1:
                self.layer_combo.addItem("all layers, mean", ALL_LAYERS)
        elif kind == "vision":
            self.layer_combo.addItem("rollout (all layers)", ROLLOUT)
            for layer in result.layers:
                self.layer_combo.addItem(f"layer {layer}: class token", layer)
        if kind in ("text", "vision"):
            self.head_combo.addItem("mean of heads", HEAD_MEAN)
            self.head_combo.addItem("max of heads", HEAD_MAX)
            for head in range(result.heads):
                self.head_combo.addItem(f"head {head}", head)
        for combo in (self.layer_combo, self.head_combo):
            combo.blockSignals(False)
        if kind == "diffusion":
            self.token_list.blockSignals(True)
            self.token_list.clear()
            for i, token in enumerate(result.tokens):
                self.token_list.addItem(f"{i}: {token}")
            self.token_list.setCurrentRow(0)
            self.token_list.blockSignals(False)
        notes = list(getattr(result, "notes", []) or [])
        if kind == "vision":
            notes.insert(0, "Tokens per layer: " + ", ".join(map(str, result.tokens_per_layer)))
        self.notes_label.setText("\n".join(notes))
        self.show_current()

    def select(self, layer: Any = None, head: Any = None) -> None:
        """Pick a layer and/or head choice by its data (a layer index, "all", "rollout"; a head, "mean", "max")."""
        if layer is not None:
            self.layer_combo.setCurrentIndex(self.layer_combo.findData(layer))
        if head is not None:
            self.head_combo.setCurrentIndex(self.head_combo.findData(head))

    def show_current(self, *args: Any) -> None:
        result, kind = self.result, self.result_kind
        if result is None:
            return
        if kind == "text":
            layer, head = self.layer_combo.currentData(), self.head_combo.currentData()
            if layer is None or head is None:
                return
            what = "all layers (mean)" if layer == ALL_LAYERS else f"layer {layer}"
            how = {HEAD_MEAN: "mean of heads", HEAD_MAX: "max of heads"}.get(head, f"head {head}")
            self.heatmap.set_data(text_map(result, layer, head), result.tokens, result.tokens,
                                  title=f"{Path(result.model).name}: {what}, {how} (rows: queries)")
        elif kind == "vision":
            layer, head = self.layer_combo.currentData(), self.head_combo.currentData()
            if layer is None or head is None:
                return
            self.head_combo.setEnabled(layer != ROLLOUT)
            heat = vision_map(result, layer, head)
            title = "attention rollout" if layer == ROLLOUT else f"layer {layer}: class token → patches"
            self.overlay.set_data(result.image, heat, result.groups, title=f"{Path(result.model).name}: {title}")
        elif kind == "diffusion":
            row = self.token_list.currentRow()
            if not 0 <= row < len(result.tokens):
                return
            self.overlay.set_data(result.image, result.maps[row], None, levels=(0.0, 1.0),
                                  title=f"'{result.tokens[row]}' (peak {result.raw_max[row]:.3g})")

    # -- earlier results -------------------------------------------------------------------
    def reload(self, row: int) -> None:
        from core.errors import MergeStudioError

        if not 0 <= row < len(self.earlier):
            return
        record = self.earlier[row]
        files = [Path(f) for f in record.files if f.endswith(".npz")]
        if not files or not files[0].is_file():
            self.fail(f"The maps of that {record.kind} result are gone ({files[0] if files else 'no file was saved'}).")
            return
        try:
            if record.kind == "attention":
                self.show_result(load_text_attention(files[0]), "text")
            elif record.kind == "vision-attention":
                self.show_result(load_vision_attention(files[0]), "vision")
            else:
                from core.inspect.cross_attention import CrossAttentionMaps

                self.show_result(CrossAttentionMaps.load_npz(files[0]), "diffusion")
        except MergeStudioError as exc:
            self.fail(str(exc))
            return
        self.clear_problem()
        self.status_label.setText(f"Showing the saved {files[0].name}.")


