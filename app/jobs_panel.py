"""The jobs area: every long job (merge, demo models) with progress, ETA and a Stop button that really stops.

A merge runs in a child process (:class:`core.merge.child.ChildMerge`), so an
out-of-memory kill takes the merge down, not the window. The child is driven
from a worker thread; Stop asks the child to stop between two tensors and the
engine removes its partial output.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional

from PySide6.QtCore import QObject, Qt, Signal
from PySide6.QtWidgets import (
    QFrame,
    QHBoxLayout,
    QLabel,
    QProgressBar,
    QPushButton,
    QScrollArea,
    QVBoxLayout,
    QWidget,
)

from app.format import seconds_text, size_text
from app.workers import GeneratorWorker


@dataclass
class MergeRequest:
    """Everything a merge job needs, captured when Merge was pressed."""

    recipe: Any  # core.merge.recipe.Recipe
    output: Path
    device: str = "auto"
    seed: int = 0
    shard_size: Optional[int] = None
    overwrite: bool = False
    model_card: bool = True
    title: str = ""
    run_id: Optional[int] = None
    options: dict[str, Any] = field(default_factory=dict)  # extra ChildMerge options (tensor_delay_s for demos/tests)


class Job(QObject):
    """A long piece of work with a status; subclasses say how to run and stop it."""

    progressed = Signal(object)  # core.jobs.Progress
    ended = Signal(object)  # the job itself

    def __init__(self, title: str) -> None:
        super().__init__()
        self.title = title
        self.status = "waiting"  # running | succeeded | failed | cancelled
        self.error: Optional[str] = None
        self.result: Any = None
        self.started_at: Optional[float] = None
        self.seconds: Optional[float] = None
        self.last_progress: Any = None
        self.worker: Optional[GeneratorWorker] = None

    @property
    def running(self) -> bool:
        return self.status == "running"

    def _run_worker(self, func: Callable[..., Any], *args: Any, **kwargs: Any) -> None:
        self.status = "running"
        self.started_at = time.monotonic()
        worker = GeneratorWorker(func, *args, **kwargs)
        worker.yielded.connect(self._progressed)
        worker.returned.connect(self._returned)
        worker.errored.connect(self._errored)
        worker.cancelled.connect(self._cancelled)
        self.worker = worker
        worker.start()

    def stop(self) -> None:
        if self.worker is not None:
            self.worker.quit()

    def _progressed(self, progress: Any) -> None:
        self.last_progress = progress
        self.progressed.emit(progress)

    def _finish(self, status: str) -> None:
        self.status = status
        self.seconds = time.monotonic() - (self.started_at or time.monotonic())
        self.ended.emit(self)

    def _returned(self, result: Any) -> None:
        self.result = result
        self._finish("succeeded")

    def _errored(self, text: str) -> None:
        self.error = text
        self._finish("failed")

    def _cancelled(self) -> None:
        self.error = "Stopped by the user; nothing was written."
        self._finish("cancelled")

    def detail_text(self) -> str:
        return ""


class MergeJob(Job):
    """A merge in a child process."""

    def __init__(self, request: MergeRequest) -> None:
        super().__init__(request.title or f"Merge into {request.output.name}")
        self.request = request
        self.child: Any = None

    def start(self) -> None:
        from core.merge.child import ChildMerge

        r = self.request
        self.child = ChildMerge(
            r.recipe,
            r.output,
            device=r.device,
            seed=r.seed,
            shard_size=r.shard_size,
            overwrite=r.overwrite,
            model_card=r.model_card,
            **r.options,
        )
        self._run_worker(self.child.run)

    def stop(self) -> None:
        # Only the merge process knows whether it stopped in time or had already written the output,
        # so the worker is not cut off here: the child's own answer (cancelled, or its result) ends the job.
        if self.child is not None:
            self.child.cancel()  # the child stops between two tensors, even with no progress due
        else:
            super().stop()

    @property
    def peak_rss_bytes(self) -> Optional[int]:
        return getattr(self.result, "peak_rss_bytes", None)

    def detail_text(self) -> str:
        p = self.last_progress
        if p is None:
            return "Starting the merge process…"
        parts = [f"{p.done}/{p.total} tensors"]
        if p.bytes_total:
            parts.append(f"{size_text(p.bytes_done)} of {size_text(p.bytes_total)}")
        eta = p.eta_s
        if eta is not None and p.done < p.total:
            parts.append(f"ETA {seconds_text(eta)}")
        rss = getattr(self.child, "rss_bytes", None)
        if rss:
            parts.append(f"memory {size_text(rss)}")
        return " · ".join(parts)


class FunctionJob(Job):
    """Any generator function yielding core.jobs.Progress (e.g. building the demo models)."""

    def __init__(self, title: str, func: Callable[..., Any], *args: Any, **kwargs: Any) -> None:
        super().__init__(title)
        self._call = (func, args, kwargs)

    def start(self) -> None:
        func, args, kwargs = self._call
        self._run_worker(func, *args, **kwargs)

    def detail_text(self) -> str:
        p = self.last_progress
        if p is None:
            return "Starting…"
        return p.message or f"{p.done}/{p.total}"


class JobRow(QFrame):
    """One job: title, progress bar, details, Stop; after the end, its outcome."""

    def __init__(self, job: Job, parent: Optional[QWidget] = None) -> None:
        super().__init__(parent)
        self.job = job
        self.setFrameShape(QFrame.Shape.StyledPanel)
        self.title = QLabel(f"<b>{job.title}</b>")
        self.bar = QProgressBar()
        self.bar.setRange(0, 1000)
        self.bar.setValue(0)
        self.detail = QLabel(job.detail_text())
        self.detail.setObjectName("muted")
        self.detail.setWordWrap(True)
        self.detail.setTextInteractionFlags(Qt.TextInteractionFlag.TextSelectableByMouse)
        self.stop_button = QPushButton("Stop")
        self.stop_button.setObjectName("danger")
        self.stop_button.clicked.connect(self._stop_clicked)
        self.dismiss_button = QPushButton("Dismiss")
        self.dismiss_button.setVisible(False)
        self.dismiss_button.clicked.connect(self.deleteLater)
        top = QHBoxLayout()
        top.addWidget(self.title, 1)
        top.addWidget(self.stop_button)
        top.addWidget(self.dismiss_button)
        layout = QVBoxLayout(self)
        layout.setContentsMargins(6, 4, 6, 4)
        layout.addLayout(top)
        layout.addWidget(self.bar)
        layout.addWidget(self.detail)
        job.progressed.connect(self._progressed)
        job.ended.connect(self._ended)

    def _stop_clicked(self) -> None:
        self.stop_button.setEnabled(False)
        self.stop_button.setText("Stopping…")
        self.job.stop()

    def _progressed(self, p: Any) -> None:
        self.bar.setValue(int(round(p.fraction * 1000)))
        self.detail.setText(self.job.detail_text())

    def _ended(self, job: Job) -> None:
        self.stop_button.setVisible(False)
        self.dismiss_button.setVisible(True)
        took = seconds_text(job.seconds)
        if job.status == "succeeded":
            self.bar.setValue(1000)
            peak = getattr(job, "peak_rss_bytes", None)
            extra = f", peak memory {size_text(peak)}" if peak else ""
            self.detail.setText(f"Done in {took}{extra}.")
            self.detail.setObjectName("ok")
        elif job.status == "cancelled":
            self.detail.setText(f"Stopped after {took}; nothing was written.")
            self.detail.setObjectName("muted")
        else:
            self.detail.setText(f"Failed: {job.error}")
            self.detail.setObjectName("problem")
        self.detail.style().unpolish(self.detail)
        self.detail.style().polish(self.detail)


class JobsPanel(QScrollArea):
    """The list of jobs, newest first."""

    jobEnded = Signal(object)

    def __init__(self, parent: Optional[QWidget] = None) -> None:
        super().__init__(parent)
        self.setWidgetResizable(True)
        self.jobs: list[Job] = []
        body = QWidget()
        self._layout = QVBoxLayout(body)
        self._layout.setContentsMargins(4, 4, 4, 4)
        self.empty = QLabel("No jobs yet. Merges and other long work appear here with progress and a Stop button.")
        self.empty.setObjectName("muted")
        self._layout.addWidget(self.empty)
        self._layout.addStretch(1)
        self.setWidget(body)

    def add(self, job: Job) -> JobRow:
        self.jobs.append(job)
        self.empty.setVisible(False)
        row = JobRow(job)
        self._layout.insertWidget(0, row)
        job.ended.connect(self.jobEnded.emit)
        return row

    def running(self) -> list[Job]:
        return [j for j in self.jobs if j.running]

    def row_of(self, job: Job) -> Optional[JobRow]:
        for i in range(self._layout.count()):
            w = self._layout.itemAt(i).widget()
            if isinstance(w, JobRow) and w.job is job:
                return w
        return None
