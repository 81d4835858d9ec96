"""The Compare tab: the same prompt, seed and settings through 2–4 models, side by side.

Text: causal LMs from the library (originals, merges) or the recipe being edited,
merged in memory; each pane streams its tokens as they are generated and then
shows time to first token, tokens per second and peak memory. Images: diffusers
pipelines, optionally the first one again with token merging on (tomesd), shown
as a grid with a difference image, progress per step. Run and Stop; the work runs
in a :class:`~app.workers.GeneratorWorker` through :mod:`core.generate`, which
loads one model at a time; Stop takes effect at the next token or step. Every run
is kept in the session (``kind`` compare-text / compare-image; images as PNG
files in the session's folder) and listed under "Earlier runs", where a click
shows it again.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any, Callable, Optional

from PySide6.QtCore import QCoreApplication, Qt, Signal
from PySide6.QtGui import QImage, QPixmap
from PySide6.QtWidgets import (QCheckBox, QComboBox, QDoubleSpinBox, QFormLayout, QFrame, QGridLayout, QGroupBox,
                               QHBoxLayout, QLabel, QListWidget, QPlainTextEdit, QProgressBar, QPushButton,
                               QSpinBox, QSplitter, QStackedWidget, QVBoxLayout, QWidget)

from app.workers import GeneratorWorker
from core.jobs import CancelToken

MAX_PANES = 4
RECIPE_SOURCE = "::recipe::"  # the combo data of "the recipe being edited, merged in memory"


def _resolve(device: str) -> str:
    from core.merge.executor import resolve_device

    return resolve_device(device)


def _run_text(sources: list, settings: Any, device: str, cancel: CancelToken, folder: Optional[Path]):
    from core.generate.text import iter_compare_text

    return (yield from iter_compare_text(sources, settings, device=_resolve(device), cancel=cancel))


def _run_images(sources: list, settings: Any, device: str, cancel: CancelToken, folder: Optional[Path]):
    """The comparison, with each finished image written as PNG into ``folder`` here, off the GUI thread.

    The file's path is put on the result as ``saved_path`` (None when nothing was written).
    """
    from core.generate.image import iter_compare_images

    work = iter_compare_images(sources, settings, device=_resolve(device), cancel=cancel)
    try:
        while True:
            try:
                event = next(work)
            except StopIteration as stop:
                return stop.value
            result = getattr(event, "result", None)
            if result is not None:
                result.saved_path = None
                if folder is not None and getattr(result, "image", None) is not None:
                    folder.mkdir(parents=True, exist_ok=True)
                    result.saved_path = result.save(folder)
            yield event
    finally:
        work.close()


def pil_to_pixmap(image: Any) -> QPixmap:
    """A PIL image (RGB) as a QPixmap (copied, so the PIL buffer may go)."""
    rgb = image.convert("RGB")
    data = rgb.tobytes()
    qimage = QImage(data, rgb.width, rgb.height, 3 * rgb.width, QImage.Format.Format_RGB888)
    return QPixmap.fromImage(qimage.copy())


class Pane(QFrame):
    """One model's column: its name, the text or image, progress and figures."""

    def __init__(self, index: int) -> None:
        super().__init__()
        self.index = index
        self.setFrameShape(QFrame.Shape.StyledPanel)
        layout = QVBoxLayout(self)
        self.title = QLabel(f"Pane {index + 1}")
        self.title.setStyleSheet("font-weight: bold")
        self.text = QPlainTextEdit()
        self.text.setReadOnly(True)
        self.image = QLabel()
        self.image.setAlignment(Qt.AlignmentFlag.AlignCenter)
        self.image.setMinimumSize(128, 128)
        self.body = QStackedWidget()
        self.body.addWidget(self.text)
        self.body.addWidget(self.image)
        self.progress = QProgressBar()
        self.progress.setTextVisible(True)
        self.figures = QLabel("")
        self.figures.setWordWrap(True)
        self.figures.setTextInteractionFlags(Qt.TextInteractionFlag.TextSelectableByMouse)
        layout.addWidget(self.title)
        layout.addWidget(self.body, 1)
        layout.addWidget(self.progress)
        layout.addWidget(self.figures)
        self.status = "idle"
        self.pixmap: Optional[QPixmap] = None

    def reset(self, label: str, mode: str) -> None:
        self.title.setText(label)
        self.text.clear()
        self.image.clear()
        self.pixmap = None
        self.body.setCurrentIndex(0 if mode == "text" else 1)
        self.progress.setRange(0, 0 if mode == "text" else 1)
        self.progress.setValue(0)
        self.figures.setText("waiting…")
        self.figures.setStyleSheet("")
        self.status = "waiting"

    def append(self, piece: str) -> None:
        cursor = self.text.textCursor()
        cursor.movePosition(cursor.MoveOperation.End)
        cursor.insertText(piece)
        self.text.setTextCursor(cursor)

    def show_image(self, pixmap: QPixmap) -> None:
        self.pixmap = pixmap
        size = max(128, min(512, self.image.width() - 4, self.image.height() - 4))
        self.image.setPixmap(pixmap.scaled(size, size, Qt.AspectRatioMode.KeepAspectRatio,
                                           Qt.TransformationMode.SmoothTransformation))

    def finish(self, status: str, figures: str, error: Optional[str]) -> None:
        self.status = status
        self.progress.setRange(0, 1)
        self.progress.setValue(1 if status == "done" else 0)
        if error:
            self.figures.setText(f"{status}: {error}")
            self.figures.setStyleSheet("color: #d9534f")
        else:
            self.figures.setText(figures)


class ComparePanel(QWidget):
    """Side-by-side generation: sources, prompt and settings, Run/Stop, panes, earlier runs."""

    problem = Signal(str)
    runFinished = Signal(object)  # the list of results

    def __init__(self, library: Any, sessions: Any, recipe_source: Optional[Callable[[], Any]] = None,
                 device: str = "auto", parent: Optional[QWidget] = None) -> None:
        super().__init__(parent)
        self.library = library
        self.sessions = sessions
        self.recipe_source = recipe_source
        self._device = device  # the device combo's first choice; a run keeps the one it was started with
        self._worker: Optional[GeneratorWorker] = None
        self._cancel: Optional[CancelToken] = None
        self._sources: list = []
        self._settings: Any = None
        self._mode = "text"
        self._session_id: Optional[int] = None
        self._closed = False
        self.results: list = []
        self.earlier: list = []
        self.difference_stats: Optional[dict] = None
        self._build()
        library.events.models_changed.connect(self._fill_models)
        self._fill_models()

    # -- layout ------------------------------------------------------------------------
    def _build(self) -> None:
        top = QVBoxLayout(self)
        controls = QHBoxLayout()
        self.mode_combo = QComboBox()
        self.mode_combo.addItem("Text (causal LMs)", "text")
        self.mode_combo.addItem("Images (diffusers pipelines)", "image")
        self.mode_combo.currentIndexChanged.connect(self._mode_changed)
        controls.addWidget(QLabel("Compare"))
        controls.addWidget(self.mode_combo)
        self.source_combos: list[QComboBox] = []
        for i in range(MAX_PANES):
            combo = QComboBox()
            combo.setMinimumContentsLength(14)
            combo.setSizeAdjustPolicy(QComboBox.SizeAdjustPolicy.AdjustToMinimumContentsLengthWithIcon)
            self.source_combos.append(combo)
            controls.addWidget(combo, 1)
        top.addLayout(controls)

        settings = QHBoxLayout()
        prompts = QVBoxLayout()
        self.prompt_edit = QPlainTextEdit()
        self.prompt_edit.setPlaceholderText("Prompt: the same text goes to every model")
        self.prompt_edit.setMaximumHeight(80)
        self.negative_edit = QPlainTextEdit()
        self.negative_edit.setPlaceholderText("Negative prompt")
        self.negative_edit.setMaximumHeight(50)
        prompts.addWidget(self.prompt_edit)
        prompts.addWidget(self.negative_edit)
        prompts.addStretch(1)  # the prompt stays at the top beside the taller settings
        settings.addLayout(prompts, 3)

        self.text_box = QGroupBox("Sampling")
        form = QFormLayout(self.text_box)
        self.seed_spin = QSpinBox()
        self.seed_spin.setRange(0, 2**31 - 1)
        self.tokens_spin = QSpinBox()
        self.tokens_spin.setRange(1, 8192)
        self.tokens_spin.setValue(64)
        self.temperature_spin = QDoubleSpinBox()
        self.temperature_spin.setRange(0.0, 5.0)
        self.temperature_spin.setSingleStep(0.1)
        self.temperature_spin.setToolTip("0 = greedy: the most likely token every time")
        self.top_p_spin = QDoubleSpinBox()
        self.top_p_spin.setRange(0.01, 1.0)
        self.top_p_spin.setValue(1.0)
        self.top_p_spin.setSingleStep(0.05)
        self.top_k_spin = QSpinBox()
        self.top_k_spin.setRange(0, 100000)
        self.top_k_spin.setToolTip("0 = no top-k cut")
        self.penalty_spin = QDoubleSpinBox()
        self.penalty_spin.setRange(0.5, 3.0)
        self.penalty_spin.setSingleStep(0.05)
        self.penalty_spin.setValue(1.0)
        self.penalty_spin.setToolTip("Repetition penalty (1 = none)")
        self.chat_check = QCheckBox("chat template")
        form.addRow("Seed", self.seed_spin)
        form.addRow("New tokens", self.tokens_spin)
        form.addRow("Temperature", self.temperature_spin)
        form.addRow("Top-p", self.top_p_spin)
        form.addRow("Top-k", self.top_k_spin)
        form.addRow("Repetition", self.penalty_spin)
        form.addRow(self.chat_check)
        settings.addWidget(self.text_box, 1)

        self.image_box = QGroupBox("Image")
        iform = QFormLayout(self.image_box)
        self.image_seed_spin = QSpinBox()
        self.image_seed_spin.setRange(0, 2**31 - 1)
        self.steps_spin = QSpinBox()
        self.steps_spin.setRange(1, 200)
        self.steps_spin.setValue(20)
        self.width_spin = QSpinBox()
        self.height_spin = QSpinBox()
        for spin in (self.width_spin, self.height_spin):
            spin.setRange(64, 2048)
            spin.setSingleStep(64)
            spin.setValue(512)
        self.guidance_spin = QDoubleSpinBox()
        self.guidance_spin.setRange(0.0, 30.0)
        self.guidance_spin.setValue(7.5)
        self.tome_check = QCheckBox("+ first pipeline with token merging")
        self.tome_ratio = QDoubleSpinBox()
        self.tome_ratio.setRange(0.05, 0.9)
        self.tome_ratio.setSingleStep(0.05)
        self.tome_ratio.setValue(0.5)
        iform.addRow("Seed", self.image_seed_spin)
        iform.addRow("Steps", self.steps_spin)
        iform.addRow("Width", self.width_spin)
        iform.addRow("Height", self.height_spin)
        iform.addRow("Guidance", self.guidance_spin)
        iform.addRow(self.tome_check)
        iform.addRow("ToMe ratio", self.tome_ratio)
        settings.addWidget(self.image_box, 1)

        buttons = QVBoxLayout()
        self.device_combo = QComboBox()
        for label, data in (("auto", "auto"), ("CPU", "cpu"), ("CUDA", "cuda"), ("MPS", "mps")):
            self.device_combo.addItem(label, data)
        self.device_combo.setToolTip("Where the models run (auto: a CUDA GPU when there is one, else the CPU)")
        index = self.device_combo.findData(self._device)
        self.device_combo.setCurrentIndex(max(0, index))
        buttons.addWidget(self.device_combo)
        self.run_button = QPushButton("Run")
        self.run_button.setDefault(True)
        self.run_button.clicked.connect(self.run)
        self.stop_button = QPushButton("Stop")
        self.stop_button.setEnabled(False)
        self.stop_button.clicked.connect(self.stop_run)
        self.status_label = QLabel("")
        self.status_label.setWordWrap(True)
        buttons.addWidget(self.run_button)
        buttons.addWidget(self.stop_button)
        buttons.addWidget(self.status_label, 1)
        settings.addLayout(buttons)
        top.addLayout(settings)

        split = QSplitter(Qt.Orientation.Horizontal)
        grid_host = QWidget()
        self.grid = QGridLayout(grid_host)
        self.panes = [Pane(i) for i in range(MAX_PANES + 1)]  # one more: the token-merging variant
        for pane in self.panes:
            pane.hide()
        self.diff_pane = Pane(MAX_PANES + 1)
        self.diff_pane.title.setText("Difference")
        self.diff_pane.hide()
        split.addWidget(grid_host)
        side = QWidget()
        side_layout = QVBoxLayout(side)
        side_layout.setContentsMargins(0, 0, 0, 0)
        side_layout.addWidget(QLabel("Earlier runs in this session"))
        self.earlier_list = QListWidget()
        self.earlier_list.setWordWrap(True)
        self.earlier_list.itemActivated.connect(lambda item: self.show_earlier(self.earlier_list.row(item)))
        self.earlier_list.itemClicked.connect(lambda item: self.show_earlier(self.earlier_list.row(item)))
        side_layout.addWidget(self.earlier_list, 1)
        side.setMaximumWidth(340)
        split.addWidget(side)
        split.setStretchFactor(0, 5)
        split.setStretchFactor(1, 1)
        split.setSizes([900, 260])
        top.addWidget(split, 1)
        self._mode_changed()

    def _mode_changed(self, *args: Any) -> None:
        self._mode = self.mode_combo.currentData()
        text = self._mode == "text"
        self.text_box.setVisible(text)
        self.image_box.setVisible(not text)
        self.negative_edit.setVisible(not text)
        self._fill_models()

    def _wanted(self, info: Any) -> bool:
        if self._mode == "image":
            return info.kind == "diffusers"
        arch = (info.architecture or "").lower()
        return info.kind == "transformers" and ("causallm" in arch or "lmhead" in arch)

    def _fill_models(self, *args: Any) -> None:
        models = sorted((m for m in self.library.models if self._wanted(m)), key=lambda m: m.name.lower())
        for i, combo in enumerate(self.source_combos):
            current = combo.currentData()
            combo.blockSignals(True)
            combo.clear()
            combo.addItem("(none)", None)
            if self._mode == "text" and self.recipe_source is not None:
                combo.addItem("The recipe being edited (merged in memory)", RECIPE_SOURCE)
            for info in models:
                combo.addItem(info.name, str(info.path))
                combo.setItemData(combo.count() - 1, str(info.path), Qt.ItemDataRole.ToolTipRole)
            index = combo.findData(current) if current is not None else -1
            if index < 0 and i < 2 and i + 1 < combo.count():
                index = -1  # leave the choice to the person: nothing is preselected
            combo.setCurrentIndex(max(0, index))
            combo.blockSignals(False)

    def select_sources(self, paths: list[str]) -> None:
        """Pick the sources (tests, restoring a run); the remaining combos go to "(none)"."""
        for i, combo in enumerate(self.source_combos):
            if i < len(paths):
                index = combo.findData(str(paths[i]))
                if index < 0:
                    raise ValueError(f"{paths[i]} is not in the Compare list of the library")
                combo.setCurrentIndex(index)
            else:
                combo.setCurrentIndex(0)

    # -- running -----------------------------------------------------------------------
    def is_running(self) -> bool:
        return self._worker is not None and self._worker.is_running()

    def _chosen(self) -> list[tuple[str, str]]:
        chosen = []
        for combo in self.source_combos:
            data = combo.currentData()
            if data:
                chosen.append((combo.currentText(), data))
        return chosen

    def run(self) -> None:
        if self.is_running() or self._closed:
            return
        prompt = self.prompt_edit.toPlainText().strip()
        chosen = self._chosen()
        if len(chosen) + (1 if self._mode == "image" and self.tome_check.isChecked() else 0) < 2:
            self._say("Pick at least two models to compare (or one pipeline with the token-merging variant).")
            return
        if not prompt:
            self._say("Write a prompt first: the same prompt goes to every model.")
            return
        try:
            sources, settings = self._request(chosen, prompt)
        except ValueError as exc:
            self._say(str(exc))
            return
        self._sources, self._settings = sources, settings
        self.results = []
        self.difference_stats = None
        self._started = time.monotonic()
        session = getattr(self.sessions, "session", None)
        self._session_id = session.id if session is not None else None
        self._show_panes([s.label for s in sources])
        self._cancel = CancelToken()
        self._device = self.device_combo.currentData()
        func = _run_text if self._mode == "text" else _run_images
        folder = self._image_folder() if self._mode == "image" else None
        worker = GeneratorWorker(func, sources, settings, self._device, self._cancel, folder)
        worker.yielded.connect(self._event)
        worker.returned.connect(self._returned)
        worker.cancelled.connect(self._cancelled)
        worker.errored.connect(self._failed)
        worker.finished.connect(self._worker_done)
        self._worker = worker
        self._run_mode = self._mode
        self.run_button.setEnabled(False)
        self.stop_button.setEnabled(True)
        self.status_label.setText("Running…")
        self.status_label.setStyleSheet("")
        worker.start()

    def _request(self, chosen: list[tuple[str, str]], prompt: str) -> tuple[list, Any]:
        from core.generate import unique_label

        labels: set[str] = set()

        def unique(name: str) -> str:
            return unique_label(name, labels)

        if self._mode == "text":
            from core.generate.text import TextSettings, TextSource

            sources = []
            for name, data in chosen:
                if data == RECIPE_SOURCE:
                    recipe = self.recipe_source() if self.recipe_source else None
                    if not recipe:
                        raise ValueError("The recipe being edited is empty: add models to it in the Merge tab.")
                    sources.append(TextSource(label=unique("recipe (in memory)"), recipe=recipe))
                else:
                    sources.append(TextSource(label=unique(name), model=data))
            settings = TextSettings(prompt=prompt, seed=self.seed_spin.value(), max_new_tokens=self.tokens_spin.value(),
                                    temperature=self.temperature_spin.value(), top_p=self.top_p_spin.value(),
                                    top_k=self.top_k_spin.value(), repetition_penalty=self.penalty_spin.value(),
                                    chat_template=self.chat_check.isChecked())
            return sources, settings
        from core.generate.image import ImageSettings, ImageSource

        sources = [ImageSource(label=unique(name), pipeline=data) for name, data in chosen]
        if self.tome_check.isChecked():
            first_name, first = chosen[0] if chosen else (None, None)
            if first is None:
                raise ValueError("Pick the pipeline the token-merging variant should use.")
            ratio = round(self.tome_ratio.value(), 3)
            sources.append(ImageSource(label=unique(f"{first_name} + ToMe {ratio:g}"), pipeline=first,
                                       token_merging={"method": "tomesd", "ratio": ratio}))
        settings = ImageSettings(prompt=prompt, negative_prompt=self.negative_edit.toPlainText().strip(),
                                 seed=self.image_seed_spin.value(), steps=self.steps_spin.value(),
                                 height=self.height_spin.value(), width=self.width_spin.value(),
                                 guidance_scale=self.guidance_spin.value())
        return sources, settings

    def _image_folder(self) -> Optional[Path]:
        """A new folder for this run's images in the session's folder (None without a session)."""
        import uuid

        from core.errors import MergeStudioError

        store = getattr(self.sessions, "store", None)
        if store is None or self._session_id is None:
            return None
        try:
            root = Path(store.inspection_dir(self._session_id))
        except MergeStudioError as exc:
            self.problem.emit(f"The images of this comparison will not be kept: {exc}")
            return None
        return root / f"compare-{time.strftime('%Y%m%d-%H%M%S')}-{uuid.uuid4().hex[:8]}"

    def _show_panes(self, labels: list[str]) -> None:
        for pane in self.panes + [self.diff_pane]:
            self.grid.removeWidget(pane)
            pane.hide()
        columns = 2 if len(labels) + (self._mode == "image") > 3 else len(labels) + (self._mode == "image")
        for i, label in enumerate(labels):
            pane = self.panes[i]
            pane.reset(label, self._mode)
            self.grid.addWidget(pane, i // max(1, columns), i % max(1, columns))
            pane.show()
        if self._mode == "image":
            self.diff_pane.reset("Difference", "image")
            self.diff_pane.figures.setText("shown when two images are done")
            n = len(labels)
            self.grid.addWidget(self.diff_pane, n // max(1, columns), n % max(1, columns))
            self.diff_pane.show()

    def stop_run(self) -> None:
        """Stop at the next token or step; the panes keep what they have."""
        if self._cancel is not None:
            self._cancel.cancel()
        self.status_label.setText("Stopping…")

    def stop(self) -> None:
        """The window closes: the run stops at its next token or step and what finished is kept."""
        self._closed = True
        if self._cancel is not None:
            self._cancel.cancel()

    def keep_finished(self, msecs: int) -> None:
        """At close, after :meth:`stop`: wait for the run to end (it stops at its next token or step) and
        deliver its last reports now, so what finished is recorded before the session store closes."""
        worker = self._worker
        if worker is not None and worker.is_running():
            worker.wait(msecs)
        if worker is not None:
            QCoreApplication.sendPostedEvents(worker)

    # -- events from the worker (GUI thread) --------------------------------------------
    def _event(self, event: Any) -> None:
        kind = type(event).__name__
        pane = self.panes[event.pane] if hasattr(event, "pane") and event.pane < len(self.panes) else None
        if pane is None:
            return
        if kind == "PaneStarted":
            pane.figures.setText("loading and generating…")
            pane.status = "running"
            if self._run_mode == "text":
                pane.append(self._settings.prompt)
        elif kind == "PaneMerging":
            pane.progress.setRange(0, max(1, event.total))
            pane.progress.setValue(event.done)
            pane.figures.setText(f"merging the recipe in memory: tensor {event.done} of {event.total}")
        elif kind == "PaneToken":
            if pane.progress.maximum() != 0:
                pane.progress.setRange(0, 0)
            pane.append(event.text)
        elif kind == "PaneStep":
            pane.progress.setRange(0, max(1, event.total))
            pane.progress.setValue(event.step)
        elif kind == "PaneFinished":
            self._pane_finished(pane, event.result)

    def _pane_finished(self, pane: Pane, result: Any) -> None:
        self.results.append(result)
        notes = "".join(f"\nnote: {n}" for n in getattr(result, "notes", None) or [])
        if self._run_mode == "text":
            pane.finish(result.status, text_figures(result) + notes, result.error)
            return
        if getattr(result, "image", None) is not None:
            pane.show_image(pil_to_pixmap(result.image))
        pane.finish(result.status, image_figures(result) + notes, result.error)
        self._update_difference()

    def _difference_pair(self) -> Optional[tuple[Any, Any]]:
        """The two finished images to compare: the token-merging variant against the pipeline it varies
        (merging on/off), otherwise the second pane against the first."""
        by_pane = {r.pane: r for r in self.results if getattr(r, "image", None) is not None}
        for i, source in enumerate(self._sources):
            if getattr(source, "token_merging", None):
                plain = next((j for j, other in enumerate(self._sources) if other.pipeline == source.pipeline
                              and not getattr(other, "token_merging", None)), None)
                if plain is not None:
                    return (by_pane[plain], by_pane[i]) if plain in by_pane and i in by_pane else None
        return (by_pane[0], by_pane[1]) if 0 in by_pane and 1 in by_pane else None

    def _update_difference(self) -> None:
        if self.difference_stats is not None:
            return
        pair = self._difference_pair()
        if pair is None:
            return
        from core.generate.image import difference_image

        first, second = pair
        try:
            image, stats = difference_image(first.image, second.image)
        except Exception as exc:  # e.g. different sizes: say so, keep the panes
            self.diff_pane.finish("failed", "", f"no difference image: {exc}")
            return
        self.difference_stats = stats
        self.diff_pane.title.setText(f"Difference: {second.label} vs {first.label}")
        self.diff_pane.show_image(pil_to_pixmap(image))
        psnr = stats.get("psnr")
        psnr_text = "identical" if psnr is None or psnr == float("inf") else f"PSNR {psnr:.1f} dB"
        self.diff_pane.finish("done", f"mean |difference| {stats.get('mean_abs', 0):.4f}, "
                                      f"max {stats.get('max_abs', 0):.4f}, {psnr_text}", None)

    def _returned(self, results: Any) -> None:
        if isinstance(results, list) and len(results) >= len(self.results):
            self.results = list(results)
        self._record()
        failed = sum(1 for r in self.results if r.status == "failed")
        stopped = sum(1 for r in self.results if r.status == "stopped")
        parts = [f"{len(self.results)} pane(s) in {time.monotonic() - self._started:.1f} s"]
        if stopped:
            parts.append(f"{stopped} stopped")
        if failed:
            parts.append(f"{failed} failed")
        self.status_label.setText(", ".join(parts) + ".")
        self.runFinished.emit(list(self.results))

    def _cancelled(self) -> None:
        """The worker was stopped before it could return (the window closed): keep the panes that finished."""
        if self.results:
            self._record()

    def _failed(self, text: str) -> None:
        self._say(text)
        for pane in self.panes:
            if pane.isVisible() and pane.status in ("waiting", "running"):
                pane.finish("failed", "", text)
        if self.results:
            self._record()

    def _worker_done(self) -> None:
        self._worker = None
        self.run_button.setEnabled(True)
        self.stop_button.setEnabled(False)
        if self._cancel is not None and self._cancel.cancelled and not self.status_label.text().endswith("."):
            self.status_label.setText("Stopped.")

    def _say(self, text: str) -> None:
        self.status_label.setText(text)
        self.status_label.setStyleSheet("color: #d9534f")
        self.problem.emit(text)

    # -- session -----------------------------------------------------------------------
    def _record(self) -> None:
        from core.errors import MergeStudioError

        store = getattr(self.sessions, "store", None)
        session_id = self._session_id
        if store is None or session_id is None or not self.results:
            return
        files: list[str] = []
        panes = []
        try:
            for r in self.results:
                entry = r.to_json()
                saved = getattr(r, "saved_path", None)  # written by the worker
                if saved is not None:
                    files.append(str(saved))
                    entry["file"] = str(saved)
                panes.append(entry)
            statuses = {r.status for r in self.results}
            status = ("done" if statuses == {"done"} else "failed" if statuses == {"failed"}
                      else "stopped" if "stopped" in statuses and "failed" not in statuses else "partial")
            results = {"panes": panes}
            if self.difference_stats is not None:
                results["difference"] = {k: (None if v == float("inf") else v)
                                         for k, v in self.difference_stats.items()}
            models = [getattr(s, "model", None) or getattr(s, "pipeline", None) or "(recipe in memory)"
                      for s in self._sources]
            settings = {**self._settings.to_json(), "labels": [s.label for s in self._sources],
                        "token_merging": [getattr(s, "token_merging", None) for s in self._sources],
                        "device": self._device}
            store.add_inspection(session_id, kind=f"compare-{self._run_mode}", models=models, settings=settings,
                                 results=results, files=files, status=status)
        except (MergeStudioError, OSError) as exc:
            for f in files:
                Path(f).unlink(missing_ok=True)
            self.problem.emit(f"This comparison was not saved in the session: {exc}")
            return
            return
        self.refresh_earlier()

    def refresh_earlier(self) -> None:
        from core.errors import MergeStudioError

        store, session = getattr(self.sessions, "store", None), getattr(self.sessions, "session", None)
        self.earlier = []
        if store is not None and session is not None:
            try:
                self.earlier = [r for r in store.list_inspections(session.id)
                                if r.kind in ("compare-text", "compare-image")]
            except MergeStudioError as exc:
                self.problem.emit(str(exc))
        self.earlier_list.clear()
        for r in self.earlier:
            when = r.created_at.astimezone().strftime("%H:%M:%S") if r.created_at else ""
            prompt = str(r.settings.get("prompt", ""))[:40]
            self.earlier_list.addItem(f"{when}  {r.kind[8:]}  {len(r.models)} models  {r.status}  “{prompt}”")
            self.earlier_list.item(self.earlier_list.count() - 1).setToolTip("\n".join(r.models))

    def show_earlier(self, row: int) -> None:
        """Show a stored comparison again in the panes (text and figures; images from their files)."""
        if self.is_running() or not (0 <= row < len(self.earlier)):
            return
        record = self.earlier[row]
        mode = record.kind[len("compare-"):]
        self.mode_combo.setCurrentIndex(self.mode_combo.findData(mode))
        self.prompt_edit.setPlainText(str(record.settings.get("prompt", "")))
        panes = record.results.get("panes", [])
        self._show_panes([str(p.get("label", f"pane {i + 1}")) for i, p in enumerate(panes)])
        for i, entry in enumerate(panes[:len(self.panes)]):
            pane = self.panes[i]
            if mode == "text":
                pane.append(str(record.settings.get("prompt", "")) + str(entry.get("text", "")))
                pane.finish(str(entry.get("status", "done")), text_figures(entry), entry.get("error"))
            else:
                file = entry.get("file")
                if file and Path(file).is_file():
                    pane.show_image(QPixmap(file))
                pane.finish(str(entry.get("status", "done")), image_figures(entry), entry.get("error"))
        if mode == "image":
            self.diff_pane.hide()
        self.status_label.setText(f"Shown from the session: {record.created_at.astimezone():%Y-%m-%d %H:%M}.")
        self.status_label.setStyleSheet("")


def _get(result: Any, name: str) -> Any:
    return result.get(name) if isinstance(result, dict) else getattr(result, name, None)


def text_figures(result: Any) -> str:
    """'12 tokens · first token 35 ms · 48.2 tokens/s · peak 210 MB · ended: eos'."""
    parts = [f"{_get(result, 'new_tokens') or 0} tokens"]
    ttft, rate, peak = _get(result, "ttft_s"), _get(result, "tokens_per_s"), _get(result, "peak_memory_bytes")
    if ttft is not None:
        parts.append(f"first token {ttft * 1000:.0f} ms")
    if rate is not None:
        parts.append(f"{rate:.1f} tokens/s")
    if peak is not None:
        parts.append(f"peak {peak / 1e6:.0f} MB")
    reason = _get(result, "finish_reason") or _get(result, "status")
    if reason:
        parts.append(f"ended: {reason}")
    return " · ".join(parts)


def image_figures(result: Any) -> str:
    parts = []
    seconds, peak = _get(result, "seconds"), _get(result, "peak_memory_bytes")
    if seconds is not None:
        parts.append(f"{seconds:.2f} s")
    per_step = _get(result, "seconds_per_step")
    if per_step is not None:
        parts.append(f"{per_step * 1000:.0f} ms/step")
    if peak is not None:
        parts.append(f"peak {peak / 1e6:.0f} MB")
    merging = _get(result, "token_merging")
    if merging:
        parts.append("token merging " + ", ".join(f"{k}={v}" for k, v in merging.items()))
    return " · ".join(parts) or str(_get(result, "status") or "")
