"""The Inspect panel: attention maps, token counts and weight differences of library models.

Three sub-tabs, each a thin view over an engine module of :mod:`core.inspect`:

* **Attention** -- text models (:func:`core.inspect.attention.iter_text_attention`):
  an ``[N, N]`` heat map with the tokens as tick labels, per layer or the mean of all
  captured layers, per head or the mean/max of heads; vision transformers
  (:func:`~core.inspect.attention.iter_vision_attention`): the class token's attention
  or the rollout over the picture, with the merged-token groups outlined when token
  merging is on; diffusers pipelines (:func:`core.inspect.cross_attention.iter_cross_attention`):
  the generated image with one prompt token's cross-attention map (DAAM).
* **Tokens** -- :func:`core.inspect.tokenizers.compare_tokenizers` for the checked models
  (table + the pieces, the part past the model's limit in red) and
  :func:`~core.inspect.tokenizers.token_premium` over the parallel texts.
* **Weights** -- :func:`core.inspect.weights.iter_weight_diff`: layers x modules for a
  metric and a model; clicking a cell lists that tensor's figures.

Every capture, count and comparison runs in a :class:`~app.workers.GeneratorWorker`;
the GUI thread only draws results. A failure is one sentence in the sub-tab's problem
label (and the panel's ``problem`` signal) and the tab stays usable. Every result is
kept in the session (``store.add_inspection``); maps go to ``.npz`` files in the
session's inspection folder, and the "Earlier results" list reloads them.
No torch at module level: the engine modules load inside the workers.
"""

from __future__ import annotations

import html
import json
import math
import time
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

import numpy as np
from PySide6.QtCore import Qt, Signal
from PySide6.QtWidgets import (
    QAbstractItemView,
    QComboBox,
    QFileDialog,
    QFormLayout,
    QHBoxLayout,
    QHeaderView,
    QLabel,
    QLineEdit,
    QListWidget,
    QListWidgetItem,
    QPlainTextEdit,
    QProgressBar,
    QPushButton,
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

from app.workers import GeneratorWorker

DISK_IMAGE = "Image from disk…"
DEFAULT_TEXT = "The quick brown fox jumps over the lazy dog."
DEFAULT_PROMPT = "a photo of a red fox in the snow"
ALL_LAYERS = "all"  # layer combo: the mean of every captured layer
ROLLOUT = "rollout"  # vision layer combo: attention rollout
HEAD_MEAN, HEAD_MAX = "mean", "max"
METRICS = (("rel_l2", "relative L2"), ("top10_share", "top-10% share"), ("sign_conflict", "sign conflict"),
           ("cosine", "cosine"))
PIECE_COLOURS = ("#1f5f99", "#8a4f12")  # alternating backgrounds of token pieces (white text on both)
OVER_LIMIT = "#c62828"  # pieces past the model's limit
_VISION_TYPES = ("vit", "deit")


# ----------------------------------------------------------------------------- pure helpers


def parse_layers(text: str, field: str = "layers") -> Optional[list[int]]:
    """The layers field (or another index field): empty or "all" -> None (every one); "0, 2, 4-6" -> [0, 2, 4, 5, 6].

    ValueError (one sentence) for anything else; the engine checks the range.
    """
    text = text.strip()
    if not text or text.lower() == ALL_LAYERS:
        return None
    out: list[int] = []
    for part in text.replace(";", ",").split(","):
        part = part.strip()
        if not part:
            continue
        lo, sep, hi = part.partition("-")
        try:
            if sep:
                a, b = int(lo), int(hi)
                if b < a:
                    raise ValueError
                out.extend(range(a, b + 1))
            else:
                out.append(int(part))
        except ValueError:
            raise ValueError(
                f"The {field} field {text!r} is not a list of numbers like '0, 2, 4-6' (or 'all')."
            ) from None
    return sorted(set(out))


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
    if model_type in _VISION_TYPES or arch.startswith(("ViT", "DeiT")):
        return "vision"
    if model_type.startswith("clip") or "Vision" in arch:
        return None  # a CLIP or another vision tower: not a text model the capture can feed
    return "text"


def pieces_html(count: Any, colours: Sequence[str] = PIECE_COLOURS, over: str = OVER_LIMIT) -> str:
    """One TokenCount's pieces as HTML: alternating backgrounds, special tokens in italics,
    pieces from ``overflow_token`` on (past the model's limit) in red."""
    parts = []
    cut = count.overflow_token
    for i, (piece, special) in enumerate(zip(count.pieces, count.special)):
        bg = over if cut is not None and i >= cut else colours[i % len(colours)]
        text = html.escape(piece).replace(" ", "&nbsp;")
        style = f"background-color:{bg}; color:#ffffff;"
        if special:
            text = f"<i>{text}</i>"
        title = f"token {i}: id {count.ids[i]}" + (" (past the limit)" if cut is not None and i >= cut else "")
        parts.append(f'<span style="{style}" title="{html.escape(title)}">{text}</span>')
    return "&#8203;".join(parts)  # zero-width spaces: the line may wrap between pieces


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


def _sentence(text: str) -> str:
    return " ".join(str(text).split())


# ----------------------------------------------------------------------------- worker functions
# These run on a worker thread: they touch no widget, and import the engine lazily.


def _resolve_device(device: str) -> str:
    if device != "auto":
        return device
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def _capture_text(path: str, text: str, layers: Optional[list[int]], device: str, out: Optional[Path]):
    from core.inspect.attention import iter_text_attention

    result = yield from iter_text_attention(path, text, layers=layers, device=_resolve_device(device))
    saved = result.save_npz(out) if out is not None else None
    return result, saved


def _capture_vision(path: str, image: str, layers: Optional[list[int]], r: int, device: str, out: Optional[Path]):
    from core.inspect.attention import iter_vision_attention

    merging = {"method": "tome", "r": r} if r > 0 else None
    result = yield from iter_vision_attention(path, image, layers=layers, token_merging=merging,
                                              device=_resolve_device(device))
    saved = result.save_npz(out) if out is not None else None
    return result, saved


def _capture_cross(path: str, prompt: str, steps: int, size: tuple[int, int], seed: int, device: str,
                   out: Optional[Path], timesteps: Optional[list[int]] = None, level: Optional[str] = None,
                   heads: Optional[list[int]] = None):
    from core.inspect.cross_attention import iter_cross_attention

    width, height = size
    result = yield from iter_cross_attention(path, prompt, steps=steps, height=height, width=width, seed=seed,
                                             timesteps=timesteps, layers=[level] if level else None, heads=heads,
                                             device=_resolve_device(device))
    saved = result.save_npz(out) if out is not None else None
    return result, saved


def _count(models: list[str], text: str):
    from core.inspect.tokenizers import compare_tokenizers
    from core.jobs import Progress

    out = []
    for i, model in enumerate(models):
        yield Progress(i, len(models), message=f"counting with {Path(model).name}")
        out.extend(compare_tokenizers([model], text))  # a failing model becomes a row with `error`
    yield Progress(len(models), len(models), message="done")
    return out


def _premium(models: list[str]):
    from core.inspect.tokenizers import token_premium
    from core.jobs import Progress

    merged: dict = {}
    for i, model in enumerate(models):  # one model at a time, so Stop takes effect between models
        yield Progress(i, len(models), message=f"parallel texts with {Path(model).name}")
        part = token_premium([model])
        if not merged:
            merged = part
        else:
            merged["models"].extend(part["models"])
    yield Progress(len(models), len(models), message="done")
    return merged


def _compare_weights(models: list[str], base: Optional[str], device: str, out: Optional[Path]):
    from core.inspect.weights import iter_weight_diff

    result = yield from iter_weight_diff(models, base, device=_resolve_device(device))
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


# ----------------------------------------------------------------------------- reloading saved results


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


# ----------------------------------------------------------------------------- the tab frame


class _Tab(QWidget):
    """What every sub-tab has: one worker at a time, progress, Stop, a status and a problem label,
    and the session's earlier results of its kinds."""

    problem = Signal(str)
    done = Signal(str)  # the inspection kind, after a result is shown and recorded

    kinds: tuple[str, ...] = ()

    def __init__(self, panel: "InspectPanel") -> None:
        super().__init__()
        self.panel = panel
        self.worker: Optional[GeneratorWorker] = None
        self.results = 0  # results shown (tests wait on it)
        self.errors = 0
        self.earlier: list[Any] = []  # InspectionRecords listed, newest first
        self.progress = QProgressBar()
        self.progress.setRange(0, 1000)
        self.progress.setValue(0)
        self.progress.setTextVisible(True)
        self.progress.setFormat("")
        self.stop_button = QPushButton("Stop")
        self.stop_button.setEnabled(False)
        self.stop_button.setToolTip("Stop at the next step")
        self.stop_button.clicked.connect(self.stop)
        self.status_label = QLabel("")
        self.status_label.setObjectName("muted")
        self.status_label.setWordWrap(True)
        self.problem_label = QLabel("")
        self.problem_label.setObjectName("problem")
        self.problem_label.setWordWrap(True)
        self.problem_label.setTextInteractionFlags(Qt.TextInteractionFlag.TextSelectableByMouse)
        self.problem_label.hide()
        self.earlier_list = QListWidget()
        self.earlier_list.setToolTip("Results of this session; double-click one to show it again")
        self.earlier_list.setMaximumHeight(120)
        self.earlier_list.itemDoubleClicked.connect(lambda item: self.reload(self.earlier_list.row(item)))

    # -- running work ----------------------------------------------------------------
    def idle(self) -> bool:
        return self.worker is None

    def start(self, func: Callable, *args: Any, on_result: Callable[[Any], None]) -> Optional[GeneratorWorker]:
        if self.worker is not None:
            return None
        self.clear_problem()
        worker = GeneratorWorker(func, *args)
        worker.yielded.connect(self._progressed)
        worker.returned.connect(on_result)
        worker.errored.connect(self.fail)
        worker.cancelled.connect(lambda: self.status_label.setText("Stopped; nothing was kept."))
        worker.finished.connect(self._finished)
        self.worker = worker
        self.stop_button.setEnabled(True)
        self.set_running(True)
        self.progress.setValue(0)
        worker.start()
        return worker

    def stop(self) -> None:
        if self.worker is not None:
            self.worker.quit()
            self.status_label.setText("Stopping at the next step…")

    def set_running(self, running: bool) -> None:
        """Enable or disable the tab's start buttons (subclasses)."""

    def _progressed(self, value: Any) -> None:
        fraction = getattr(value, "fraction", None)
        if fraction is None:
            return
        self.progress.setValue(int(round(1000 * fraction)))
        message = getattr(value, "message", "")
        self.progress.setFormat(message[:60] if message else "%p%")

    def _finished(self) -> None:
        outcome = self.worker.outcome if self.worker is not None else None
        if outcome == "returned":
            self.progress.setValue(1000)
            self.progress.setFormat("done")
        else:
            self.progress.setValue(0)
            self.progress.setFormat("stopped" if outcome == "cancelled" else "")
        self.worker = None
        self.stop_button.setEnabled(False)
        self.set_running(False)

    def fail(self, text: str) -> None:
        self.errors += 1
        text = _sentence(text)
        self.problem_label.setText(text)
        self.problem_label.show()
        self.status_label.setText("")
        self.progress.setFormat("")
        self.progress.setValue(0)
        self.problem.emit(text)

    def clear_problem(self) -> None:
        self.problem_label.clear()
        self.problem_label.hide()

    # -- the session -------------------------------------------------------------------
    def session_id(self) -> Optional[int]:
        session = getattr(self.panel.sessions, "session", None)
        return None if session is None else session.id

    def output_path(self, kind: str, suffix: str) -> Optional[Path]:
        """A free file name in the session's inspection folder (None without a session)."""
        store, sid = self.panel.store(), self.session_id()
        if store is None or sid is None:
            return None
        from core.errors import MergeStudioError

        try:
            folder = Path(store.inspection_dir(sid))
        except MergeStudioError as exc:
            self.problem.emit(str(exc))
            return None
        self.panel.file_counter += 1
        stamp = time.strftime("%Y%m%d-%H%M%S")
        path = folder / f"{kind}-{stamp}-{self.panel.file_counter}{suffix}"
        n = 1
        while path.exists():
            n += 1
            path = folder / f"{kind}-{stamp}-{self.panel.file_counter}-{n}{suffix}"
        return path

    def record(self, session_id: Optional[int], kind: str, models: list[str], settings: dict, results: dict,
               files: Sequence[Optional[Path]] = ()) -> Optional[Any]:
        """Keep a result in the session that was open when the work was asked for."""
        from core.errors import MergeStudioError

        store = self.panel.store()
        if store is None or session_id is None:
            return None
        try:
            record = store.add_inspection(session_id, kind=kind, models=models, settings=settings,
                                          results=_json_safe(results), files=[str(f) for f in files if f is not None],
                                          status="done")
        except MergeStudioError as exc:
            for f in files:  # no file of a result the session does not hold
                if f is not None:
                    Path(f).unlink(missing_ok=True)
            self.problem.emit(f"This result was not saved in the session: {exc}")
            return None
        self.refresh_earlier()
        return record

    def refresh_earlier(self) -> None:
        from core.errors import MergeStudioError

        store, sid = self.panel.store(), self.session_id()
        self.earlier = []
        if store is not None and sid is not None:
            try:
                for kind in self.kinds:
                    self.earlier.extend(store.list_inspections(sid, kind=kind))
            except MergeStudioError as exc:
                self.problem.emit(str(exc))
        self.earlier.sort(key=lambda r: (r.created_at, r.id), reverse=True)
        self.earlier_list.clear()
        for record in self.earlier:
            when = record.created_at.astimezone().strftime("%H:%M:%S") if record.created_at else ""
            names = ", ".join(Path(m).name for m in record.models)
            what = record.settings.get("what") if isinstance(record.settings, dict) else None
            self.earlier_list.addItem(f"{when}  {what or record.kind}  {names}")

    def reload(self, row: int) -> None:
        """Show an earlier result again (subclasses)."""

    def fill_models(self) -> None:
        """Fill the model pickers from the library (subclasses)."""


def _json_safe(value: Any) -> Any:
    """NaN / infinity -> None, numpy scalars -> Python numbers, tuples -> lists (the store takes JSON only)."""
    if isinstance(value, dict):
        return {str(k): _json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_safe(v) for v in value]
    if isinstance(value, (np.floating, float)):
        v = float(value)
        return v if math.isfinite(v) else None
    if isinstance(value, np.integer):
        return int(value)
    if isinstance(value, Path):
        return str(value)
    return value


def _device_combo() -> QComboBox:
    combo = QComboBox()
    for label, data in (("auto", "auto"), ("CPU", "cpu"), ("CUDA", "cuda"), ("MPS", "mps")):
        combo.addItem(label, data)
    combo.setToolTip("Where the model runs (auto: a CUDA GPU when there is one, else the CPU)")
    return combo


# ----------------------------------------------------------------------------- Attention


class AttentionTab(_Tab):
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
        self.device_combo = _device_combo()
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
        form.addRow(self.progress)
        form.addRow(self.status_label)
        form.addRow(self.problem_label)
        form.addRow(QLabel("Earlier results"))
        form.addRow(self.earlier_list)
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


# ----------------------------------------------------------------------------- Tokens


class _CheckList(QListWidget):
    """A list of library models with check boxes."""

    def fill(self, infos: Sequence[Any]) -> None:
        checked = set(self.checked())
        self.clear()
        for info in infos:
            item = QListWidgetItem(info.name)
            item.setData(Qt.ItemDataRole.UserRole, str(info.path))
            item.setToolTip(f"{info.architecture}\n{info.path}")
            item.setFlags(item.flags() | Qt.ItemFlag.ItemIsUserCheckable)
            item.setCheckState(Qt.CheckState.Checked if str(info.path) in checked else Qt.CheckState.Unchecked)
            self.addItem(item)

    def checked(self) -> list[str]:
        return [self.item(i).data(Qt.ItemDataRole.UserRole) for i in range(self.count())
                if self.item(i).checkState() == Qt.CheckState.Checked]

    def set_checked(self, paths: Sequence[str]) -> None:
        wanted = {str(p) for p in paths}
        for i in range(self.count()):
            item = self.item(i)
            item.setCheckState(Qt.CheckState.Checked if item.data(Qt.ItemDataRole.UserRole) in wanted
                               else Qt.CheckState.Unchecked)


class TokensTab(_Tab):
    """Token counts of the checked models' tokenizers, and the token premium over languages."""

    kinds = ("tokens",)
    COLUMNS = ("Model", "Tokenizer", "Tokens", "Chars/token", "Limit")

    def __init__(self, panel: "InspectPanel") -> None:
        super().__init__(panel)
        from app.plots import BarChartView

        self.counts: list[Any] = []  # TokenCounts shown
        self.premium: Optional[dict] = None
        self.model_list = _CheckList()
        self.model_list.setToolTip("Models whose tokenizers to compare")
        self.text_edit = QPlainTextEdit(DEFAULT_TEXT)
        self.text_edit.setPlaceholderText("Text to tokenize")
        self.text_edit.setMaximumHeight(110)
        self.count_button = QPushButton("Count")
        self.count_button.clicked.connect(self.count)
        self.parallel_button = QPushButton("Parallel text")
        self.parallel_button.setToolTip("Count UDHR Article 1 in many languages: the token premium relative to English "
                                        "(Petrov et al. 2023)")
        self.parallel_button.clicked.connect(self.count_parallel)
        self.table = QTableWidget(0, len(self.COLUMNS))
        self.table.setHorizontalHeaderLabels(list(self.COLUMNS))
        self.table.verticalHeader().setVisible(False)
        self.table.setEditTriggers(QAbstractItemView.EditTrigger.NoEditTriggers)
        self.table.horizontalHeader().setSectionResizeMode(QHeaderView.ResizeMode.ResizeToContents)
        self.table.horizontalHeader().setStretchLastSection(True)
        self.pieces = QTextBrowser()
        self.pieces.setToolTip("Each model's tokens; red: past the model's limit (cut off)")
        self.premium_table = QTableWidget(0, 0)
        self.premium_table.setEditTriggers(QAbstractItemView.EditTrigger.NoEditTriggers)
        self.premium_model = QComboBox()
        self.premium_model.currentIndexChanged.connect(self.show_premium_chart)
        self.premium_note = QLabel("")
        self.premium_note.setObjectName("muted")
        self.premium_note.setWordWrap(True)
        self.chart = BarChartView()
        self.chart.problem.connect(self.fail)

        left = QWidget()
        l_layout = QVBoxLayout(left)
        l_layout.addWidget(QLabel("Models"))
        l_layout.addWidget(self.model_list, 1)
        l_layout.addWidget(QLabel("Text"))
        l_layout.addWidget(self.text_edit)
        buttons = QHBoxLayout()
        buttons.addWidget(self.count_button)
        buttons.addWidget(self.parallel_button)
        buttons.addWidget(self.stop_button)
        l_layout.addLayout(buttons)
        l_layout.addWidget(self.progress)
        l_layout.addWidget(self.status_label)
        l_layout.addWidget(self.problem_label)
        l_layout.addWidget(QLabel("Earlier results"))
        l_layout.addWidget(self.earlier_list)

        self.result_tabs = QTabWidget()
        counts_page = QSplitter(Qt.Orientation.Vertical)
        counts_page.addWidget(self.table)
        counts_page.addWidget(self.pieces)
        self.result_tabs.addTab(counts_page, "Counts")
        premium_page = QWidget()
        p_layout = QVBoxLayout(premium_page)
        p_layout.addWidget(self.premium_table, 1)
        row = QHBoxLayout()
        row.addWidget(QLabel("Chart of"))
        row.addWidget(self.premium_model, 1)
        p_layout.addLayout(row)
        p_layout.addWidget(self.chart, 1)
        p_layout.addWidget(self.premium_note)
        self.result_tabs.addTab(premium_page, "Token premium")
        splitter = QSplitter()
        splitter.addWidget(left)
        splitter.addWidget(self.result_tabs)
        splitter.setStretchFactor(1, 3)
        splitter.setSizes([320, 820])
        layout = QVBoxLayout(self)
        layout.addWidget(splitter)
        self.fill_models()

    def fill_models(self) -> None:
        self.model_list.fill([m for m in self.panel.models() if getattr(m, "kind", "") != "single_file"])

    def set_running(self, running: bool) -> None:
        self.count_button.setEnabled(not running)
        self.parallel_button.setEnabled(not running)

    def _checked_or_fail(self) -> Optional[list[str]]:
        models = self.model_list.checked()
        if not models:
            self.fail("Check at least one model whose tokenizer to use.")
            return None
        return models

    def count(self) -> Optional[GeneratorWorker]:
        models = self._checked_or_fail()
        if models is None or not self.idle():
            return None
        text = self.text_edit.toPlainText()
        if not text.strip():
            self.fail("The text is empty; type something to tokenize.")
            return None
        sid = self.session_id()
        self.status_label.setText(f"Counting with {len(models)} tokenizer(s)…")
        return self.start(_count, models, text, on_result=lambda counts: self._counted(counts, models, text, sid))

    def _counted(self, counts: list, models: list[str], text: str, sid: Optional[int]) -> None:
        self.show_counts(counts)
        summary = {"counts": [
            {"model": c.model, "component": c.component, "tokenizer": c.tokenizer, "count": c.count,
             "content_count": c.content_count, "chars_per_token": c.chars_per_token, "max_length": c.max_length,
             "limit_source": c.limit_source, "overflow_token": c.overflow_token, "overflow_char": c.overflow_char,
             "unknown": c.unknown, "error": c.error}
            for c in counts]}
        self.record(sid, "tokens", models, {"text": text, "what": "count"}, summary)
        self.results += 1
        failed = sum(1 for c in counts if c.error)
        self.status_label.setText(f"Counted with {len(counts) - failed} tokenizer(s)"
                                  + (f"; {failed} could not be used (see the table)." if failed else "."))
        if failed:
            first = next(c.error for c in counts if c.error)
            self.problem_label.setText(_sentence(first))
            self.problem_label.show()
            self.problem.emit(_sentence(first))
        self.done.emit("tokens")

    def show_counts(self, counts: list) -> None:
        self.counts = list(counts)
        self.table.setRowCount(len(counts))
        blocks = []
        for row, c in enumerate(counts):
            label = f"{Path(c.model).name}" + (f" [{c.component}]" if c.component else "")
            if c.error:
                cells = (label, "", "", "", "")
            else:
                limit = "unknown" if c.max_length is None else str(c.max_length)
                if c.overflow_token is not None:
                    limit += f" (cut at token {c.overflow_token}, character {c.overflow_char})"
                cells = (label, c.tokenizer, str(c.count), f"{c.chars_per_token:.2f}", limit)
            for col, text in enumerate(cells):
                item = QTableWidgetItem(text)
                item.setToolTip(c.error or c.model)
                self.table.setItem(row, col, item)
            if c.error:
                self.table.setSpan(row, 1, 1, len(self.COLUMNS) - 1)
                self.table.setItem(row, 1, QTableWidgetItem(_sentence(c.error)))
                blocks.append(f"<p><b>{html.escape(label)}</b>: <span style='color:{OVER_LIMIT}'>"
                              f"{html.escape(_sentence(c.error))}</span></p>")
            else:
                if self.table.columnSpan(row, 1) > 1:  # a row that held an error before
                    self.table.setSpan(row, 1, 1, 1)
                blocks.append(f"<p><b>{html.escape(label)}</b> — {html.escape(c.tokenizer)}, {c.count} tokens</p>"
                              f"<p style='line-height:150%'>{pieces_html(c)}</p>")
        self.pieces.setHtml("".join(blocks))
        self.result_tabs.setCurrentIndex(0)

    def count_parallel(self) -> Optional[GeneratorWorker]:
        models = self._checked_or_fail()
        if models is None or not self.idle():
            return None
        sid = self.session_id()
        self.status_label.setText("Counting the parallel texts…")
        return self.start(_premium, models, on_result=lambda premium: self._premium_done(premium, models, sid))

    def _premium_done(self, premium: dict, models: list[str], sid: Optional[int]) -> None:
        self.show_premium(premium)
        self.record(sid, "tokens", models, {"what": "token premium", "texts": "udhr-article1"}, premium)
        self.results += 1
        self.status_label.setText(f"Token premium over {len(premium['languages'])} languages.")
        self.done.emit("tokens")

    def premium_rows(self) -> list[dict]:
        return [] if self.premium is None else list(self.premium["models"])

    def show_premium(self, premium: dict) -> None:
        from core.inspect.tokenizers import parallel_texts

        self.premium = premium
        rows = self.premium_rows()
        languages = premium["languages"]
        try:
            names = {code: entry.get("language", code) for code, entry in parallel_texts().items()}
        except Exception:  # the table still shows the codes
            names = {}
        self.premium_table.clear()
        self.premium_table.setRowCount(len(languages))
        self.premium_table.setColumnCount(len(rows))
        self.premium_table.setHorizontalHeaderLabels(
            [Path(r["model"]).name + (f" [{r['component']}]" if r.get("component") else "") for r in rows])
        self.premium_table.setVerticalHeaderLabels([f"{names.get(c, c)} ({c})" for c in languages])
        for col, r in enumerate(rows):
            for row, code in enumerate(languages):
                if r.get("error"):
                    item = QTableWidgetItem("—")
                    item.setToolTip(_sentence(r["error"]))
                else:
                    item = QTableWidgetItem(f"{r['premium'][code]:.2f}")
                    unknown = r.get("unknown", {}).get(code, 0)
                    item.setToolTip(f"{r['counts'][code]} tokens" + (f", {unknown} unknown" if unknown else ""))
                self.premium_table.setItem(row, col, item)
        self.premium_model.blockSignals(True)
        self.premium_model.clear()
        for i, r in enumerate(rows):
            if not r.get("error"):
                self.premium_model.addItem(self.premium_table.horizontalHeaderItem(i).text(), i)
        self.premium_model.blockSignals(False)
        self.result_tabs.setCurrentIndex(1)
        self.show_premium_chart()

    def show_premium_chart(self, *args: Any) -> None:
        index = self.premium_model.currentData()
        if self.premium is None or index is None:
            return
        row = self.premium_rows()[index]
        languages = self.premium["languages"]
        self.chart.set_data([row["premium"][c] for c in languages], languages,
                            title=f"Token premium vs English: {Path(row['model']).name}", y_label="× English",
                            reference=1.0)
        lossy = [c for c in languages if row.get("unknown", {}).get(c, 0)]
        self.premium_note.setText(
            f"{len(lossy)} language(s) contain unknown tokens for this tokenizer ({', '.join(lossy[:8])}"
            f"{'…' if len(lossy) > 8 else ''}): text it cannot represent, so their premium understates the cost."
            if lossy else "")

    def reload(self, row: int) -> None:
        if not 0 <= row < len(self.earlier):
            return
        record = self.earlier[row]
        if record.settings.get("what") == "token premium" and "models" in record.results:
            self.show_premium(record.results)
            self.status_label.setText("Showing an earlier token premium.")
        else:
            self.status_label.setText("Earlier counts keep their figures only; press Count to see the pieces again.")
            if "text" in record.settings:
                self.text_edit.setPlainText(record.settings["text"])
            self.model_list.set_checked(record.models)


# ----------------------------------------------------------------------------- Weights


class WeightsTab(_Tab):
    """Layer-wise weight differences of the checked models (against a base or the first)."""

    kinds = ("weights",)

    def __init__(self, panel: "InspectPanel") -> None:
        super().__init__(panel)
        from app.plots import HeatmapView

        self.diff: Any = None  # the WeightDiff shown
        self.model_list = _CheckList()
        self.model_list.setToolTip("Models to compare (without a base, the first checked one is the reference)")
        self.base_combo = QComboBox()
        self.base_combo.setToolTip("The common base: task vectors are model − base")
        self.device_combo = _device_combo()
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
        l_layout.addWidget(self.progress)
        l_layout.addWidget(self.status_label)
        l_layout.addWidget(self.problem_label)
        l_layout.addWidget(QLabel("Earlier results"))
        l_layout.addWidget(self.earlier_list)

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


# ----------------------------------------------------------------------------- the panel


class InspectPanel(QWidget):
    """The Inspect tab of the workspace: Attention, Tokens and Weights sub-tabs.

    ``library``: the window's ModelLibrary (``.models``, ``.events.models_changed``);
    ``sessions``: the SessionController (``.store``, ``.session``; ``sessionChanged``
    refreshes the earlier-results lists when present).
    """

    problem = Signal(str)

    def __init__(self, library: Any, sessions: Any, parent: Optional[QWidget] = None) -> None:
        super().__init__(parent)
        self.library = library
        self.sessions = sessions
        self.file_counter = 0
        self.attention = AttentionTab(self)
        self.tokens = TokensTab(self)
        self.weights = WeightsTab(self)
        self.tabs = QTabWidget()
        self.tabs.addTab(self.attention, "Attention")
        self.tabs.addTab(self.tokens, "Tokens")
        self.tabs.addTab(self.weights, "Weights")
        for tab in self.sub_tabs():
            tab.problem.connect(self.problem.emit)
        layout = QVBoxLayout(self)
        layout.setContentsMargins(0, 0, 0, 0)
        layout.addWidget(self.tabs)
        events = getattr(library, "events", None)
        if events is not None and hasattr(events, "models_changed"):
            callback = self.fill_models
            events.models_changed.connect(callback)
            # The library is a plain-Python model that may outlive the panel: stop calling a deleted widget.
            self.destroyed.connect(lambda *_: events.models_changed.disconnect(callback))
        changed = getattr(sessions, "sessionChanged", None)
        if changed is not None:
            changed.connect(self.refresh_earlier)
        self.refresh_earlier()

    def sub_tabs(self) -> list[_Tab]:
        return [self.attention, self.tokens, self.weights]

    def models(self) -> list[Any]:
        return sorted(getattr(self.library, "models", []) or [], key=lambda m: m.name.lower())

    def store(self) -> Any:
        return getattr(self.sessions, "store", None)

    def fill_models(self, *args: Any) -> None:
        for tab in self.sub_tabs():
            tab.fill_models()

    def refresh_earlier(self) -> None:
        for tab in self.sub_tabs():
            tab.refresh_earlier()

    def idle(self) -> bool:
        return all(tab.idle() for tab in self.sub_tabs())

    def stop(self) -> None:
        for tab in self.sub_tabs():
            tab.stop()
