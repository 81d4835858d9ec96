"""Review of the desktop app (issue 4): each test pins down a defect that was found and fixed.

Closing the window while work runs, Stop racing the end of a merge, Merge on a
stale check, the curve editor against the parameter rows and the method, and
the YAML view against the Merge button.
"""

from __future__ import annotations

import shutil
import threading
import time
from pathlib import Path

import pytest
import yaml

pytest.importorskip("pytestqt")

import pyqtgraph as pg  # noqa: E402
from PySide6.QtCore import QPoint, QPointF, Qt  # noqa: E402
from PySide6.QtTest import QTest  # noqa: E402

from tests.app.conftest import close_window, wait_preflight, wait_ready  # noqa: E402
from tests.app.test_app_flow import _add_folder, _linear_recipe, _pick_method  # noqa: E402


@pytest.fixture
def every_mouse_move():
    """pyqtgraph drops mouse moves closer than 10 ms apart; test events come faster."""
    old = pg.getConfigOption("mouseRateLimit")
    pg.setConfigOption("mouseRateLimit", 0)
    yield
    pg.setConfigOption("mouseRateLimit", old)


def _thread_ended(worker) -> bool:
    thread = worker._thread
    return thread is None or thread.isFinished()


# -- closing the window while work runs ---------------------------------------------------
def test_closing_during_a_scan_leaves_no_thread_running(qtbot, make_window, monkeypatch, tmp_path):
    """A thread still running when the app exits aborts the process ("QThread: Destroyed while running")."""
    import core.library as library
    from core.jobs import Progress

    window = make_window()
    wait_ready(qtbot, window)
    started = threading.Event()

    def slow_scan(roots, *, hf_cache=True, **options):
        started.set()
        while True:
            time.sleep(0.3)  # a large folder between two batches
            yield library.ScanBatch(str(roots[0]), [], [], Progress(0, 1))

    monkeypatch.setattr(library, "iter_scan", slow_scan)
    folder = tmp_path / "big"
    folder.mkdir()
    panel = window.library_panel
    assert panel.add_folder(folder)
    worker = panel._scan_worker
    qtbot.waitUntil(started.is_set, timeout=5000)
    panel.scan()  # a rescan asked for while scanning: it must not start after the window closed
    close_window(qtbot, window)
    assert _thread_ended(worker)
    qtbot.waitUntil(lambda: worker._thread is None, timeout=5000)  # its last reports were delivered
    assert panel._scan_worker is worker  # and no new scan was started by them


def test_closing_during_a_merge_records_the_run_as_stopped(qtbot, make_window, models_folder, tmp_path):
    from core.sessions import SessionStore

    window = make_window()
    wait_ready(qtbot, window)
    _add_folder(qtbot, window, models_folder, 3)
    out = tmp_path / "closing"
    _linear_recipe(qtbot, window, models_folder, out)
    assert wait_preflight(qtbot, window).ok
    window.merge_options = {"tensor_delay_s": 0.3}
    window.editor.merge_button.click()
    job = window.jobs.jobs[-1]
    qtbot.waitUntil(lambda: job.last_progress is not None, timeout=30000)
    run_id = job.request.run_id
    close_window(qtbot, window)
    assert _thread_ended(job.worker)
    assert not out.exists() and not [p for p in tmp_path.iterdir() if ".partial-" in p.name]
    with SessionStore.open() as store:  # the next start: the run's outcome was recorded, not left "running"
        run = store.get_run(run_id)
        assert store.interrupted_runs == []
    assert run.status == "cancelled"


# -- Stop against the child's own outcome ----------------------------------------------------
def test_stop_after_the_merge_process_committed_reports_its_result(qtbot, monkeypatch, tmp_path):
    """The child decides: a Stop that arrives once it has written the output must not report 'nothing written'."""
    import core.merge.child as child_module
    from app.jobs_panel import JobsPanel, MergeJob, MergeRequest
    from core.jobs import Progress

    proceed = threading.Event()
    made = []

    class CommittingChild:
        """Past its last cancel check: it writes the output whatever Stop says now (as the real one does)."""

        def __init__(self, recipe, output, **options) -> None:
            self.output = Path(output)
            self.pid = None
            self.rss_bytes = None
            self.cancels = 0
            made.append(self)

        def cancel(self) -> None:
            self.cancels += 1

        def kill(self) -> None:
            self.cancels += 1

        def run(self):
            yield Progress(1, 2)
            proceed.wait(10)
            self.output.mkdir()
            yield Progress(2, 2)
            return child_module.ChildResult(self.output, 2, 8, 0.1, "cpu")

    monkeypatch.setattr(child_module, "ChildMerge", CommittingChild)
    panel = JobsPanel()
    qtbot.addWidget(panel)
    job = MergeJob(MergeRequest(recipe=None, output=tmp_path / "out"))
    row = panel.add(job)
    job.start()
    qtbot.waitUntil(lambda: job.last_progress is not None, timeout=5000)
    with qtbot.waitSignal(job.ended, timeout=10000):
        row.stop_button.click()
        proceed.set()
    assert made[0].cancels == 1  # Stop reached the merge process
    assert job.status == "succeeded"
    assert (tmp_path / "out").is_dir()
    assert "nothing was written" not in row.detail.text()


# -- Merge on a stale check -------------------------------------------------------------------
def test_merge_is_disabled_when_a_merge_ends_until_the_output_is_checked_again(
    qtbot, make_window, models_folder, tmp_path
):
    from app.jobs_panel import MergeJob, MergeRequest

    window = make_window()
    wait_ready(qtbot, window)
    _add_folder(qtbot, window, models_folder, 3)
    out = tmp_path / "written"
    _linear_recipe(qtbot, window, models_folder, out)
    assert wait_preflight(qtbot, window).ok
    assert window.editor.merge_button.isEnabled()
    # A merge into that folder has just finished: the folder is now taken.
    shutil.copytree(models_folder / "tiny-llama-a", out)
    job = MergeJob(MergeRequest(recipe=window.doc.to_recipe(), output=out))
    job.status, job.seconds = "succeeded", 0.5
    window.jobs.jobEnded.emit(job)
    assert not window.editor.merge_button.isEnabled()
    assert window.start_merge() is None  # not even through the API
    report = wait_preflight(qtbot, window)
    assert not report.ok and "Replace existing output" in report.problem
    assert not window.editor.merge_button.isEnabled()


def test_yaml_being_typed_disables_merge_until_applied(qtbot, make_window, models_folder, tmp_path):
    window = make_window()
    wait_ready(qtbot, window)
    _add_folder(qtbot, window, models_folder, 3)
    _linear_recipe(qtbot, window, models_folder, tmp_path / "out")
    editor = window.editor
    assert wait_preflight(qtbot, window).ok and editor.merge_button.isEnabled()
    data = yaml.safe_load(editor.yaml_view.toPlainText())
    data["models"][0]["parameters"]["weight"] = 0.4
    editor.yaml_view.setPlainText(yaml.safe_dump(data))  # typed, not applied yet: Merge would merge the old recipe
    assert not editor.merge_button.isEnabled()
    assert wait_preflight(qtbot, window).ok
    assert window.doc.param_value("weight", 0) == 0.4 and editor.merge_button.isEnabled()

    editor.yaml_view.setPlainText("merge_method: [oops\n")
    editor.apply_yaml()
    assert editor.yaml_status.text().startswith("Not applied:")
    editor.schedule_preflight()  # a check of the (unchanged) recipe ends while the YAML view disagrees
    assert wait_preflight(qtbot, window).ok
    assert not editor.merge_button.isEnabled()
    window.doc.set_param("weight", 0.5, 0)  # an edit in the editor writes the YAML view again
    assert wait_preflight(qtbot, window).ok
    assert editor.merge_button.isEnabled()


# -- the curve editor -----------------------------------------------------------------------
def _viewport_point(curve_editor, x: float, y: float) -> QPoint:
    view = curve_editor.plot.getPlotItem().getViewBox()
    return curve_editor.plot.mapFromScene(view.mapViewToScene(QPointF(x, y)))


def test_a_curve_drag_survives_the_check_that_ends_during_it(
    qtbot, make_window, models_folder, tmp_path, every_mouse_move
):
    window = make_window()
    wait_ready(qtbot, window)
    _add_folder(qtbot, window, models_folder, 3)
    _linear_recipe(qtbot, window, models_folder, tmp_path / "out")
    editor = window.editor
    qtbot.mouseClick(editor.params.row("weight", 1).curve_button, Qt.MouseButton.LeftButton)
    assert wait_preflight(qtbot, window).ok
    curves = editor.curve_editor
    qtbot.waitExposed(curves)
    handle = curves.handle_pos("default", 1)
    viewport = curves.plot.viewport()
    start = _viewport_point(curves, handle.x(), handle.y())
    middle = _viewport_point(curves, handle.x(), 0.6)
    end = _viewport_point(curves, handle.x(), 0.9)
    QTest.mouseMove(viewport, start)
    QTest.mousePress(viewport, Qt.MouseButton.LeftButton, Qt.KeyboardModifier.NoModifier, start)
    for i in range(1, 5):
        QTest.mouseMove(viewport, start + (middle - start) * (i / 4))
    runs = editor.preflight_runs
    qtbot.waitUntil(lambda: editor.preflight_runs > runs and editor.preflight_idle(), timeout=20000)  # held still
    for i in range(1, 5):
        QTest.mouseMove(viewport, middle + (end - middle) * (i / 4))
    QTest.mouseRelease(viewport, Qt.MouseButton.LeftButton, Qt.KeyboardModifier.NoModifier, end)
    weight = window.doc.param_value("weight", 1)
    assert weight[1] == pytest.approx(0.9, abs=0.03)
    assert curves.curves().default.anchors[1] == pytest.approx(0.9, abs=0.03)


def test_curve_of_a_parameter_the_model_no_longer_takes_is_closed(qtbot, make_window, llama_family):
    window = make_window()
    wait_ready(qtbot, window)
    editor = window.editor
    editor.add_models([str(llama_family["base"]), str(llama_family["a"])])
    editor.select_curve("weight", 0)  # linear: every model has a weight
    assert editor.curve_stack.currentIndex() == 1
    _pick_method(window, "ties")  # the first model becomes the base, which takes no weight
    assert window.doc.base_index == 0
    assert editor.curve_stack.currentIndex() == 0
    editor.curve_editor.drag_point("default", 0, 0.9)  # nothing to edit: no error, no change
    assert "weight" not in window.doc.slots[0].params

    _pick_method(window, "della")
    editor.select_curve("epsilon", 1)  # della: epsilon per model
    assert editor.curve_stack.currentIndex() == 1
    _pick_method(window, "ram")  # ram: epsilon for the whole recipe
    assert editor.curve_stack.currentIndex() == 0
    editor.curve_editor.drag_point("default", 0, 0.0005)
    assert "epsilon" not in window.doc.slots[1].params


def test_a_loaded_per_layer_setting_opens_in_the_curve_editor_unchanged(qtbot, make_window, llama_family):
    window = make_window()
    wait_ready(qtbot, window)
    text = yaml.safe_dump(
        {
            "merge_method": "linear",
            "models": [
                {"model": str(llama_family["base"]), "parameters": {"weight": 0.5}},
                {"model": str(llama_family["a"]), "parameters": {"weight": [0.2, 0.8]}},
            ],
        }
    )
    window.load_recipe_text(text)
    editor = window.editor
    row = editor.params.row("weight", 1)
    assert row.curve_button.isChecked() and "<a " in row.curve_label.text()  # a link, not just text
    row.curve_label.linkActivated.emit("curve")
    assert editor.curve_stack.currentIndex() == 1
    assert editor.curve_editor.curves().default.anchors == (0.2, 0.8)
    assert window.doc.param_value("weight", 1) == [0.2, 0.8]  # not flattened to its mean


# -- history ----------------------------------------------------------------------------------
def test_a_run_of_a_recipe_with_relative_paths_replays_from_history(qtbot, make_window, models_folder, monkeypatch):
    import core.merge.child as child_module
    from core.jobs import Progress

    class QuickChild:
        def __init__(self, recipe, output, **options) -> None:
            self.output = Path(output)
            self.pid = None
            self.rss_bytes = None

        def cancel(self) -> None:
            pass

        def run(self):
            yield Progress(1, 1)
            return child_module.ChildResult(self.output, 1, 1, 0.1, "cpu")

    monkeypatch.setattr(child_module, "ChildMerge", QuickChild)
    recipe = models_folder.parent / "recipe.yaml"
    recipe.write_text(
        "merge_method: linear\n"
        "models:\n"
        "  - model: models/tiny-llama-base\n    parameters: {weight: 0.5}\n"
        "  - model: models/tiny-llama-a\n    parameters: {weight: 0.5}\n"
    )
    window = make_window()
    wait_ready(qtbot, window)
    assert window.open_recipe(recipe)
    window.editor.output_edit.setText(str(models_folder.parent / "out"))
    window.editor.output_edit.editingFinished.emit()
    assert wait_preflight(qtbot, window).ok
    with qtbot.waitSignal(window.mergeFinished, timeout=10000):
        assert window.start_merge() is not None
    window.doc.clear()  # later, another recipe (or none) is in the editor
    window.history.select_run(0)
    window.history.load_button.click()
    assert len(window.doc.slots) == 2
    report = wait_preflight(qtbot, window)
    assert report is not None and report.ok, report.problem


# -- saving a recipe ----------------------------------------------------------------------------
def test_a_recipe_that_cannot_be_saved_leaves_nothing_beside_the_target(qtbot, make_window, llama_family, tmp_path):
    window = make_window()
    wait_ready(qtbot, window)
    window.editor.add_models([str(llama_family["base"]), str(llama_family["a"])])
    folder = tmp_path / "recipes"
    target = folder / "taken"
    target.mkdir(parents=True)
    (target / "keep.txt").write_text("keep me")
    assert not window.save_recipe(target)  # a folder is in the way
    assert str(target) in window.notice.text() and ".tmp" not in window.notice.text()
    assert [p.name for p in folder.iterdir()] == ["taken"]  # no hidden half-written file
    assert (target / "keep.txt").read_text() == "keep me"
    assert window.save_recipe(folder / "recipe.yaml")
    assert yaml.safe_load((folder / "recipe.yaml").read_text())["merge_method"] == "linear"
