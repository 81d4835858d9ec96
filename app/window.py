"""The main window: library at the side, workspace in the middle, jobs below, status at the bottom.

The window wires views to Qt-free models (the recipe document, the model
library, the session store) and starts long work in workers or child
processes; it never computes and never waits on work.
"""

from __future__ import annotations

import shutil
import time
from pathlib import Path
from typing import Any, Callable, Optional

from PySide6.QtCore import QCoreApplication, Qt, QTimer, Signal
from PySide6.QtGui import QAction, QActionGroup, QCloseEvent, QKeySequence
from PySide6.QtWidgets import (
    QApplication,
    QDockWidget,
    QFileDialog,
    QFrame,
    QHBoxLayout,
    QInputDialog,
    QLabel,
    QMainWindow,
    QMessageBox,
    QPushButton,
    QTabWidget,
    QVBoxLayout,
    QWidget,
)

from app import settings as app_settings
from app.format import size_text
from app.history_panel import HistoryPanel
from app.jobs_panel import FunctionJob, JobsPanel, MergeJob, MergeRequest
from app.library_panel import LibraryPanel
from app.recipe_editor import RecipeEditor
from app.session_controller import SessionController
from app.theme import THEMES, apply_theme, current_theme
from app.workers import GeneratorWorker, stop_workers
from core import paths
from core.errors import MergeStudioError
from core.merge.document import RecipeDocument

MERGE_OUTPUTS = "Merge outputs"


def _describe_outputs(paths: list[Path]):
    """Yield one ScanBatch per remembered merge output; one that no longer loads becomes a library problem."""
    from core.io.catalog import describe_model
    from core.jobs import Progress
    from core.library import ScanBatch, ScanProblem

    for i, path in enumerate(paths, 1):
        try:
            batch = ScanBatch(MERGE_OUTPUTS, [describe_model(path, source=MERGE_OUTPUTS)], [], Progress(i, len(paths)))
        except MergeStudioError as exc:
            batch = ScanBatch(MERGE_OUTPUTS, [], [ScanProblem(path, str(exc))], Progress(i, len(paths)))
        yield batch
CLOSE_GRACE_MS = 15000  # how long closing waits for running work to stop (then merge processes are killed)


class LazyTab(QWidget):
    """A workspace tab whose content is built the first time it is shown or asked for."""

    def __init__(self, build: Callable[[], QWidget], parent: Optional[QWidget] = None) -> None:
        super().__init__(parent)
        self._build = build
        self._content: Optional[QWidget] = None
        layout = QVBoxLayout(self)
        layout.setContentsMargins(0, 0, 0, 0)

    @property
    def built(self) -> bool:
        return self._content is not None

    def content(self) -> QWidget:
        if self._content is None:
            self._content = self._build()
            self.layout().addWidget(self._content)
        return self._content

    def showEvent(self, event) -> None:  # noqa: N802
        self.content()
        super().showEvent(event)


class NoticeBar(QFrame):
    """A message across the top of the workspace, with optional action buttons."""

    def __init__(self, parent: Optional[QWidget] = None) -> None:
        super().__init__(parent)
        self.setObjectName("notice")
        self.label = QLabel()
        self.label.setWordWrap(True)
        self.label.setTextInteractionFlags(Qt.TextInteractionFlag.TextSelectableByMouse)
        self._buttons: list[QPushButton] = []
        self._layout = QHBoxLayout(self)
        self._layout.setContentsMargins(8, 4, 4, 4)
        self._layout.addWidget(self.label, 1)
        close = QPushButton("×")
        close.setFixedWidth(28)
        close.setToolTip("Dismiss")
        close.clicked.connect(self.hide)
        self._close = close
        self._layout.addWidget(close)
        self.history: list[str] = []
        self.hide()

    def show_message(self, text: str, actions: Optional[list] = None) -> None:
        self.history.append(text)
        self.label.setText(text)
        for b in self._buttons:
            b.deleteLater()
        self._buttons = []
        for caption, callback in actions or []:
            button = QPushButton(caption)
            button.clicked.connect(callback)
            button.clicked.connect(self.hide)
            self._layout.insertWidget(self._layout.count() - 1, button)
            self._buttons.append(button)
        self.show()

    def text(self) -> str:
        return self.label.text() if self.isVisible() else ""

    def buttons(self) -> list[QPushButton]:
        return list(self._buttons)


class MainWindow(QMainWindow):
    """Merge Studio's window."""

    mergeFinished = Signal(object)  # the MergeJob

    def __init__(self, *, start_background: bool = True) -> None:
        super().__init__()
        from core.library import ModelLibrary

        self.setWindowTitle("Merge Studio")
        self.setObjectName("MainWindow")
        self.resize(1400, 900)
        self.doc = RecipeDocument()
        self.library = ModelLibrary()
        self.merge_options: dict[str, Any] = {}  # extra ChildMerge options (tests and demos: tensor_delay_s)
        self.confirm_quit = True
        self._auto_output: Optional[str] = None

        self.sessions = SessionController(self._workspace_state, self._restore_workspace, self)
        self.sessions.notice.connect(self.notify)
        self.sessions.sessionChanged.connect(self._session_changed)
        self.sessions.historyChanged.connect(self._history_changed)

        # -- centre: notices + workspace tabs ---------------------------------------------
        self.notice = NoticeBar()
        self.editor = RecipeEditor(self.doc, self.library.get_ref if hasattr(self.library, "get_ref") else self._describe)
        self.editor.mergeRequested.connect(self.start_merge)
        self.editor.problem.connect(lambda text: self.notify(text))
        self.history = HistoryPanel()
        self.history.loadRecipe.connect(self.load_recipe_text)
        self.history.loadSettings.connect(self._load_run_settings)
        self.history.addOutput.connect(self.add_output_to_library)
        self.history.problem.connect(lambda text: self.notify(text))
        self.workspace = QTabWidget()
        self.workspace.setDocumentMode(True)
        from app.tokens_panel import TokensPanel

        self.tokens = TokensPanel(self.library, self.sessions)
        self.tokens.problem.connect(lambda text: self.notify(text))
        from app.lora_panel import LoraPanel

        self.lora = LoraPanel(self.library)
        self.lora.jobRequested.connect(self.start_function_job)
        from app.compare_panel import ComparePanel

        self.compare = ComparePanel(self.library, self.sessions, recipe_source=self._recipe_for_compare)
        self.compare.problem.connect(lambda text: self.notify(text))
        # The Inspect tab is built when first shown (or asked for): its plots need pyqtgraph and
        # numpy, which would add about a second and 60 MB to every start-up.
        self._inspect_host = LazyTab(self._build_inspect)
        self.workspace.addTab(self.editor, "Merge")
        self.workspace.addTab(self.lora, "LoRA")
        self.workspace.addTab(self.tokens, "Tokens")
        self.workspace.addTab(self.compare, "Compare")
        self.workspace.addTab(self._inspect_host, "Inspect")
        self.workspace.addTab(self.history, "History")
        centre = QWidget()
        centre_layout = QVBoxLayout(centre)
        centre_layout.setContentsMargins(0, 0, 0, 0)
        centre_layout.addWidget(self.notice)
        centre_layout.addWidget(self.workspace, 1)
        self.setCentralWidget(centre)

        # -- docks ----------------------------------------------------------------------
        self.library_panel = LibraryPanel(self.library)
        self.library_panel.addToRecipe.connect(self.editor.add_models)
        self.library_panel.useAsBase.connect(self._add_as_base)
        self.library_panel.demoRequested.connect(self.create_demo_models)
        self.library_panel.foldersChanged.connect(lambda folders: app_settings.set_value("library/folders", folders))
        self.library_dock = QDockWidget("Library")
        self.library_dock.setObjectName("LibraryDock")
        self.library_dock.setWidget(self.library_panel)
        self.addDockWidget(Qt.DockWidgetArea.LeftDockWidgetArea, self.library_dock)
        self.jobs = JobsPanel()
        self.jobs.jobEnded.connect(self._job_ended)
        self.jobs_dock = QDockWidget("Jobs")
        self.jobs_dock.setObjectName("JobsDock")
        self.jobs_dock.setWidget(self.jobs)
        self.addDockWidget(Qt.DockWidgetArea.BottomDockWidgetArea, self.jobs_dock)
        self._docks_sized = False

        # -- status bar -------------------------------------------------------------------
        self.session_label = QLabel("Session: opening…")
        self.device_label = QLabel(self._device_text())
        self.memory_label = QLabel()
        for w in (self.session_label, self.device_label, self.memory_label):
            self.statusBar().addPermanentWidget(w)
        self._memory_timer = QTimer(self)
        self._memory_timer.setInterval(2000)
        self._memory_timer.timeout.connect(self._update_memory)
        self._memory_timer.start()
        self._update_memory()

        self._build_menus()
        self.doc.events.changed.connect(self._doc_changed)
        self._restore_settings()
        if start_background:
            QTimer.singleShot(0, self.start_background_work)

    # -- start-up ----------------------------------------------------------------------
    def start_background_work(self) -> None:
        """Open the sessions database and scan the library (both in workers)."""
        if self.sessions._closed:  # closed before the event loop got here
            return
        last = app_settings.settings().value("sessions/last")
        self.sessions.open_async(int(last) if last not in (None, "") else None)
        self._load_library_folders()

    def _load_library_folders(self) -> None:
        for folder in app_settings.get_list("library/folders"):
            try:
                self.library.add_folder(Path(folder))
            except MergeStudioError as exc:
                self.notify(f"Library folder skipped: {exc}")
        outputs = [Path(p) for p in app_settings.get_list("library/models") if Path(p).exists()]
        if outputs:  # earlier merge outputs: described (headers only) in a worker, like a scan
            worker = GeneratorWorker(_describe_outputs, outputs)
            worker.yielded.connect(self.library.apply)
            self._outputs_worker = worker
            worker.start()
        self.library_panel.scan()

    def _describe(self, ref: str) -> Any:
        info = self.library.get(Path(ref))
        if info is None and not Path(ref).is_absolute() and self.doc.source_path is not None:
            info = self.library.get(self.doc.source_path.parent / ref)
        return info

    # -- menus -------------------------------------------------------------------------
    def _build_menus(self) -> None:
        bar = self.menuBar()
        session_menu = bar.addMenu("&Session")
        session_menu.addAction("New session", self.new_session, QKeySequence.StandardKey.New)
        session_menu.addAction("Open session…", self.choose_session, QKeySequence.StandardKey.Open)
        self.recent_menu = session_menu.addMenu("Recent sessions")
        self.recent_menu.aboutToShow.connect(self._fill_recent)
        session_menu.addAction("Rename session…", self.choose_rename)
        session_menu.addAction("Delete session…", self.choose_delete)
        session_menu.addSeparator()
        session_menu.addAction("Open recipe…", self.choose_recipe)
        session_menu.addAction("Save recipe as…", self.choose_save_recipe, QKeySequence.StandardKey.SaveAs)
        session_menu.addSeparator()
        session_menu.addAction("Quit", self.close, QKeySequence.StandardKey.Quit)

        library_menu = bar.addMenu("&Library")
        library_menu.addAction("Add folder…", self.library_panel.choose_folder)
        library_menu.addAction("Rescan", lambda: self.library_panel.scan())
        library_menu.addAction("Create demo models", self.create_demo_models)

        view_menu = bar.addMenu("&View")
        theme_menu = view_menu.addMenu("Theme")
        group = QActionGroup(self)
        self.theme_actions: dict[str, QAction] = {}
        for name in THEMES:
            action = QAction(name.capitalize(), self, checkable=True)
            action.triggered.connect(lambda checked, n=name: self.set_theme(n))
            group.addAction(action)
            theme_menu.addAction(action)
            self.theme_actions[name] = action
        view_menu.addSeparator()
        view_menu.addAction(self.library_dock.toggleViewAction())
        view_menu.addAction(self.jobs_dock.toggleViewAction())

        help_menu = bar.addMenu("&Help")
        help_menu.addAction("About Merge Studio", self._about)

    def _fill_recent(self) -> None:
        self.recent_menu.clear()
        for s in self.sessions.recent(10):
            action = self.recent_menu.addAction(s.name, lambda sid=s.id: self.open_session(sid))
            action.setCheckable(True)
            action.setChecked(self.sessions.session is not None and s.id == self.sessions.session.id)

    def set_theme(self, name: str) -> None:
        app = QApplication.instance()
        if app is not None:
            name = apply_theme(app, name)
        app_settings.set_value("ui/theme", name)
        if name in self.theme_actions:
            self.theme_actions[name].setChecked(True)
        if self.editor.curve_editor is not None:
            from app.theme import plot_colors

            colors = plot_colors()
            self.editor.curve_editor.apply_colors(colors["background"], colors["foreground"])

    def _about(self) -> None:
        QMessageBox.about(
            self,
            "About Merge Studio",
            "Merge Studio: compare and merge models on your workstation.\n"
            f"Data folder: {paths.home()}",
        )

    # -- notices and status ------------------------------------------------------------
    def notify(self, text: str, actions: Optional[list] = None) -> None:
        self.notice.show_message(" ".join(str(text).split()), actions or [])

    @property
    def inspect(self) -> Any:
        """The Inspect panel (built on first use)."""
        return self._inspect_host.content()

    def _build_inspect(self) -> QWidget:
        from app.inspect_panel import InspectPanel

        panel = InspectPanel(self.library, self.sessions)
        panel.problem.connect(lambda text: self.notify(text))
        return panel

    def _recipe_for_compare(self) -> Optional[dict]:
        """The recipe being edited, as mergekit's YAML gives it (merged in memory by the Compare tab); None if empty."""
        if not self.doc.slots:
            return None
        import yaml

        return yaml.safe_load(self.doc.to_yaml())

    def _device_text(self) -> str:
        # Without importing torch in the window: the merge process reports the device it used.
        gpu = Path("/proc/driver/nvidia/version").exists() or shutil.which("nvidia-smi") is not None
        return "Device: auto (NVIDIA GPU present)" if gpu else "Device: CPU"

    def _update_memory(self) -> None:
        try:
            import psutil

            proc = psutil.Process()
            rss = proc.memory_info().rss
            merging = 0
            for job in self.jobs.running():
                pid = getattr(getattr(job, "child", None), "pid", None)
                if pid:
                    try:
                        merging += psutil.Process(pid).memory_info().rss
                    except psutil.Error:
                        pass
            available = psutil.virtual_memory().available
        except Exception:  # a sandbox may refuse process queries: the label just stays empty
            return
        text = f"App {size_text(rss)}"
        if merging:
            text += f" · merges {size_text(merging)}"
        self.memory_label.setText(f"{text} · {size_text(available)} free")

    def _session_changed(self, session: Any) -> None:
        persistent = "" if self.sessions.persistent else " (not saved)"
        self.session_label.setText(f"Session: {session.name}{persistent}")
        self.setWindowTitle(f"{session.name} — Merge Studio")
        if self.sessions.persistent:
            app_settings.set_value("sessions/last", session.id)
        self.history.set_session(self.sessions.store, session.id)
        self.tokens.refresh_runs()
        self.compare.refresh_earlier()

    def _history_changed(self) -> None:
        if self.sessions.session is not None:
            self.history.set_session(self.sessions.store, self.sessions.session.id)

    # -- workspace state ---------------------------------------------------------------
    def _workspace_state(self) -> dict:
        state = self.doc.to_state()
        state["method"] = self.doc.method_name
        state["tab"] = self.workspace.tabText(self.workspace.currentIndex())  # by name: tabs are added over releases
        state["library_filter"] = self.library_panel.filter_edit.text()
        return state

    def _restore_workspace(self, state: dict) -> None:
        if not state:
            self.doc.clear()
            self.doc.set_export(output="")
            self._auto_output = None
            return
        self.doc.restore_state(state)
        tab = state.get("tab")
        names = [self.workspace.tabText(i) for i in range(self.workspace.count())]
        if isinstance(tab, str) and tab in names:
            self.workspace.setCurrentIndex(names.index(tab))
        self.library_panel.filter_edit.setText(state.get("library_filter") or "")

    def _doc_changed(self, what: str) -> None:
        if self.doc.slots and not self.doc.export.output.strip():
            self._suggest_output()
        self.sessions.changed()

    def _suggest_output(self) -> None:
        folder = paths.home() / "merges"
        folder.mkdir(parents=True, exist_ok=True)
        stem = time.strftime("merge-%Y%m%d-%H%M%S")
        # Single-file checkpoints (A1111 / ComfyUI) merge into one .safetensors file, folders into a folder.
        suffix = ".safetensors" if all(s.ref.endswith(".safetensors") for s in self.doc.slots) else ""
        candidate = folder / f"{stem}{suffix}"
        n = 2
        while candidate.exists():
            candidate = folder / f"{stem}-{n}{suffix}"
            n += 1
        self._auto_output = str(candidate)
        self.doc.set_export(output=str(candidate))

    # -- sessions (menu actions) ---------------------------------------------------------
    def new_session(self, name: Optional[str] = None) -> Any:
        return self.sessions.new_session(name)

    def open_session(self, session_id: int) -> Any:
        return self.sessions.open_session(session_id)

    def choose_session(self) -> None:
        sessions = self.sessions.recent(200)
        if not sessions:
            return
        labels = [f"{s.name}  ({s.updated_at.astimezone().strftime('%Y-%m-%d %H:%M')}, {s.run_count} runs)" for s in sessions]
        label, ok = QInputDialog.getItem(self, "Open session", "Session:", labels, 0, False)
        if ok:
            self.open_session(sessions[labels.index(label)].id)

    def choose_rename(self) -> None:
        if self.sessions.session is None:
            return
        name, ok = QInputDialog.getText(self, "Rename session", "Name:", text=self.sessions.session.name)
        if ok:
            self.sessions.rename_session(name)

    def choose_delete(self) -> None:
        session = self.sessions.session
        if session is None:
            return
        answer = QMessageBox.question(
            self, "Delete session", f"Delete the session '{session.name}' with its history? Merged models stay on disk."
        )
        if answer == QMessageBox.StandardButton.Yes:
            self.sessions.delete_session(session.id)

    # -- recipes from and to files -----------------------------------------------------------
    def choose_recipe(self) -> None:
        path, _ = QFileDialog.getOpenFileName(self, "Open recipe", "", "Recipes (*.yaml *.yml)")
        if path:
            self.open_recipe(Path(path))

    def open_recipe(self, path: Path) -> bool:
        """Load a mergekit YAML file into the editor; an error leaves the current recipe as it was."""
        try:
            text = Path(path).read_text(encoding="utf-8")
            self.doc.load_yaml(text, source_path=Path(path).absolute(), names=self._names())
        except (OSError, UnicodeDecodeError) as exc:
            self.notify(f"{path}: cannot read the recipe ({exc}).")
            return False
        except MergeStudioError as exc:
            self.notify(f"The recipe was not opened: {exc}")
            return False
        self.workspace.setCurrentWidget(self.editor)
        return True

    def choose_save_recipe(self) -> None:
        path, _ = QFileDialog.getSaveFileName(self, "Save recipe", "recipe.yaml", "Recipes (*.yaml *.yml)")
        if path:
            self.save_recipe(Path(path))

    def save_recipe(self, path: Path) -> bool:
        tmp = Path(path).with_name(f".{Path(path).name}.tmp")
        try:
            text = self.doc.to_yaml()
            tmp.write_text(text, encoding="utf-8")
            tmp.replace(path)
        except (OSError, MergeStudioError) as exc:
            try:
                tmp.unlink(missing_ok=True)  # nothing half-written is left beside the target
            except OSError:
                pass
            reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else " ".join(str(exc).split())
            self.notify(f"{path}: the recipe was not saved ({reason.rstrip('.')}).")
            return False
        return True

    def load_recipe_text(self, text: str) -> None:
        try:
            self.doc.load_yaml(text, names=self._names())
        except MergeStudioError as exc:
            self.notify(f"That recipe could not be loaded: {exc}")
            return
        self.workspace.setCurrentWidget(self.editor)

    def _load_run_settings(self, settings: dict) -> None:
        """Replay an earlier run: its device, seed, shard size and card (not its output folder, which now exists)."""
        keep = {k: settings[k] for k in ("device", "seed", "shard_size", "model_card") if k in settings}
        if keep:
            self.doc.set_export(**keep)

    def _names(self) -> dict[str, str]:
        return {str(m.path): m.name for m in self.library.models}

    def _add_as_base(self, path: str) -> None:
        info = self.library.get(Path(path))
        try:
            self.doc.add_model(path, getattr(info, "name", None), as_base=True)
        except MergeStudioError as exc:
            self.notify(str(exc))

    # -- merging -------------------------------------------------------------------------
    def start_merge(self) -> Optional[MergeJob]:
        """Merge the current recipe in a child process; the run is recorded in the session."""
        from core.cli import parse_size
        from core.merge.child import absolute_refs

        report = self.editor.last_report
        if report is None or not report.ok or not self.editor.preflight_idle():
            self.notify("Check the recipe first: the preflight has not passed.")
            return None
        export = self.doc.export
        try:
            recipe = self.doc.to_recipe()
            shard = parse_size(export.shard_size) if export.shard_size.strip() else None
        except MergeStudioError as exc:
            self.notify(str(exc))
            return None
        except Exception:  # argparse.ArgumentTypeError from parse_size
            self.notify(f"Shard size '{export.shard_size}' is not a size (examples: 5GB, 500MB, 2GiB).")
            return None
        output = Path(export.output).expanduser().absolute()
        if any(j.running and getattr(j, "request", None) and j.request.output == output for j in self.jobs.jobs):
            self.notify(f"A merge into {output} is already running.")
            return None
        recipe_yaml = absolute_refs(recipe).to_yaml()  # a snapshot that replays from History wherever it came from
        facts = {ref: dict(f, name=self._display_name(ref)) for ref, f in report.models.items()}
        self.sessions.record_models(facts)
        settings = {
            "device": export.device,
            "seed": export.seed,
            "shard_size": export.shard_size,
            "out_dtype": self.doc.out_dtype,
            "model_card": export.model_card,
            "overwrite": export.overwrite,
        }
        run = self.sessions.start_run(recipe_yaml, str(output), self.doc.method_name, settings)
        request = MergeRequest(
            recipe=recipe,
            output=output,
            device=export.device,
            seed=int(export.seed),
            shard_size=shard,
            overwrite=export.overwrite,
            model_card=export.model_card,
            title=f"{self.doc.method.display_name} → {output.name}",
            run_id=getattr(run, "id", None),
            options=dict(self.merge_options),
        )
        job = MergeJob(request)
        self.jobs.add(job)
        self.jobs_dock.show()
        job.start()
        self.statusBar().showMessage(f"Merging into {output}…", 5000)
        return job

    def _display_name(self, ref: str) -> str:
        for slot in self.doc.slots:
            if slot.ref == ref:
                return slot.name
        return Path(ref).name or ref

    def _job_ended(self, job: Any) -> None:
        if not isinstance(job, MergeJob):
            return
        self.statusBar().clearMessage()
        run_id = job.request.run_id
        peak = job.peak_rss_bytes
        if job.status == "succeeded":
            self.sessions.finish_run(run_id, "succeeded", seconds=job.seconds, peak_memory_bytes=peak)
            output = str(job.request.output)
            self.add_output_to_library(output, announce=False)
            device = getattr(job.result, "device", None)
            if device:
                self.device_label.setText(f"Device: {device} (last merge)")
            self.notify(
                f"Merged into {output} in {job.seconds:.1f} s.",
                [("Add it to the recipe", lambda: self.editor.add_models([output]))],
            )
            if self._auto_output is not None and self.doc.export.output == self._auto_output:
                self._suggest_output()  # the next merge gets a fresh folder, not this one
        elif job.status == "cancelled":
            self.sessions.finish_run(run_id, "cancelled", seconds=job.seconds, error=job.error)
        else:
            self.sessions.finish_run(run_id, "failed", seconds=job.seconds, error=job.error)
            self.notify(f"The merge failed: {job.error}")
        self.editor.schedule_preflight()  # the output folder may now exist
        self.mergeFinished.emit(job)

    def add_output_to_library(self, path: str, announce: bool = True) -> None:
        try:
            self.library.add_model(Path(path), source=MERGE_OUTPUTS)
        except MergeStudioError as exc:
            self.notify(f"The output could not be added to the library: {exc}")
            return
        remembered = app_settings.get_list("library/models")
        if path not in remembered:
            app_settings.set_value("library/models", remembered + [path])
        if announce:
            self.statusBar().showMessage(f"Added {path} to the library.", 5000)

    # -- other engine jobs (LoRA) ----------------------------------------------------------------
    def start_function_job(self, title: str, func: Any, kwargs: dict) -> Optional[FunctionJob]:
        """Run one of the engine's progress generators as a job; its output joins the library when done."""
        output = str(kwargs.get("output") or "").strip()
        if not output:
            self.notify(f"{title}: choose an output first.")
            return None
        job = FunctionJob(title, func, **kwargs)
        job.ended.connect(lambda j, out=output: self._function_job_done(j, out))
        self.jobs.add(job)
        self.jobs_dock.show()
        job.start()
        return job

    def _function_job_done(self, job: Any, output: str) -> None:
        if job.status == "succeeded":
            self.add_output_to_library(output, announce=False)
            self.notify(f"{job.title}: done, written to {output}.")
        elif job.status == "failed":
            self.notify(f"{job.title} failed: {job.error}")

    # -- demo models ---------------------------------------------------------------------------
    def create_demo_models(self) -> Optional[FunctionJob]:
        from core.demo import default_demo_dir, iter_make_demo_family_in_child

        if any(j.running and j.title == "Create demo models" for j in self.jobs.jobs):
            return None
        root = default_demo_dir()
        job = FunctionJob("Create demo models", iter_make_demo_family_in_child, root)
        job.ended.connect(lambda j: self._demo_done(j, root))
        self.jobs.add(job)
        self.jobs_dock.show()
        self.library_panel.demo_button.setEnabled(False)
        job.start()
        return job

    def _demo_done(self, job: Any, root: Path) -> None:
        self.library_panel.demo_button.setEnabled(True)
        if job.status != "succeeded":
            if job.status == "failed":
                self.notify(f"The demo models were not created: {job.error}")
            return
        paths_made = [str(p) for p in job.result]
        if root not in self.library.folders:
            self.library_panel.add_folder(root)
        else:
            self.library_panel.scan([root], hf_cache=False)
        if not self.doc.slots and len(paths_made) >= 3:
            base, *variants = paths_made
            self.doc.set_method("ties")
            self.doc.add_model(base, Path(base).name, as_base=True)
            for v in variants:
                index = self.doc.add_model(v, Path(v).name)
                self.doc.set_param("weight", 0.5, index)
                self.doc.set_param("density", 0.5, index)
            self.notify("Demo models ready: a TIES recipe of the two variants over the base is set up. Press Merge to try it.")

    # -- settings and closing ------------------------------------------------------------------
    def showEvent(self, event) -> None:  # noqa: N802
        super().showEvent(event)
        if not self._docks_sized:  # first show without a remembered layout: sensible dock sizes
            self._docks_sized = True
            self.resizeDocks([self.library_dock], [max(380, self.width() // 3)], Qt.Orientation.Horizontal)
            self.resizeDocks([self.jobs_dock], [140], Qt.Orientation.Vertical)

    def _restore_settings(self) -> None:
        s = app_settings.settings()
        geometry = s.value("window/geometry")
        state = s.value("window/state")
        if geometry is not None:
            self.restoreGeometry(geometry)
        if state is not None:
            self._docks_sized = self.restoreState(state)
        theme = s.value("ui/theme") or "dark"
        if theme in self.theme_actions:
            self.theme_actions[theme].setChecked(True)

    def save_settings(self) -> None:
        s = app_settings.settings()
        s.setValue("window/geometry", self.saveGeometry())
        s.setValue("window/state", self.saveState())
        s.sync()

    def closeEvent(self, event: QCloseEvent) -> None:  # noqa: N802
        running = self.jobs.running()
        if running and self.confirm_quit:
            answer = QMessageBox.question(
                self, "Quit Merge Studio", f"{len(running)} job(s) are running. Stop them and quit?"
            )
            if answer != QMessageBox.StandardButton.Yes:
                event.ignore()
                return
        for job in running:
            job.stop()
        self.library_panel.stop()
        self.tokens.stop()  # no measurement starts once the window closes
        self.compare.stop()
        if self._inspect_host.built:
            self.inspect.stop()
        self.compare.keep_finished(CLOSE_GRACE_MS)  # the panes that finished are recorded before the store closes
        # Each job's own answer first (a merge process may have written its output just before Stop)...
        if not all(job.worker is None or job.worker.wait(CLOSE_GRACE_MS) for job in running):
            for job in running:  # a merge process that did not stop in time is killed: it leaves nothing
                kill = getattr(getattr(job, "child", None), "kill", None)
                if kill is not None:
                    kill()
        # ...then every worker thread must end: one still running when the app exits aborts the process.
        stop_workers(CLOSE_GRACE_MS)
        for job in running:  # their last reports, so each run is recorded before the store closes
            if job.worker is not None:
                QCoreApplication.sendPostedEvents(job.worker)
        self.editor.stop_checks()
        self.save_settings()
        self.sessions.close()
        super().closeEvent(event)
