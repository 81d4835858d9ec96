"""What the Inspect sub-tabs share: constants, the layers field, worker plumbing (the tab frame), device choice."""

from __future__ import annotations

import math
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Optional, Sequence

import numpy as np
from PySide6.QtCore import Qt, Signal
from PySide6.QtWidgets import QComboBox, QLabel, QListWidget, QProgressBar, QPushButton, QWidget

from app.workers import GeneratorWorker

if TYPE_CHECKING:  # pragma: no cover
    from app.inspect_panel import InspectPanel


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
VISION_TYPES = ("vit", "deit")




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



def one_line(text: str) -> str:
    return " ".join(str(text).split())



def resolve_device(device: str) -> str:
    if device != "auto":
        return device
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"



class InspectTab(QWidget):
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

    def status_widgets(self) -> list[QWidget]:
        """What every tab shows under its buttons, in order: progress, status, problem, earlier results."""
        return [self.progress, self.status_label, self.problem_label, QLabel("Earlier results"), self.earlier_list]

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
        text = one_line(text)
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
                                          results=json_safe(results), files=[str(f) for f in files if f is not None],
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


def json_safe(value: Any) -> Any:
    """NaN / infinity -> None, numpy scalars -> Python numbers, tuples -> lists (the store takes JSON only)."""
    if isinstance(value, dict):
        return {str(k): json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_safe(v) for v in value]
    if isinstance(value, (np.floating, float)):
        v = float(value)
        return v if math.isfinite(v) else None
    if isinstance(value, np.integer):
        return int(value)
    if isinstance(value, Path):
        return str(value)
    return value


def device_combo() -> QComboBox:
    combo = QComboBox()
    for label, data in (("auto", "auto"), ("CPU", "cpu"), ("CUDA", "cuda"), ("MPS", "mps")):
        combo.addItem(label, data)
    combo.setToolTip("Where the model runs (auto: a CUDA GPU when there is one, else the CPU)")
    return combo


