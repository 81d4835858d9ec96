"""The whole point-and-click flow, on the real window with tiny models.

Add a folder -> models appear; build a recipe by clicking -> the YAML matches;
an invalid recipe shows its problem; merge -> progress -> the output loads;
Stop -> no output; the run is in History after a restart; chained merges.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import yaml
from PySide6.QtCore import QPointF, Qt
from PySide6.QtGui import QDropEvent

from tests.app.conftest import wait_preflight, wait_ready


def _add_folder(qtbot, window, folder: Path, expected: int) -> None:
    assert window.library_panel.add_folder(folder)
    qtbot.waitUntil(lambda: len(window.library.models) == expected, timeout=20000)


def _pick_method(window, name: str) -> None:
    combo = window.editor.method_combo
    index = combo.findData(name)
    assert index >= 0, name
    combo.setCurrentIndex(index)
    combo.activated.emit(index)


def _drop_models(window, names: list[str]) -> None:
    """Drag library rows onto the recipe's slots table (the same mime data a mouse drag carries)."""
    panel = window.library_panel
    indexes = []
    for name in names:
        row = panel.visible_names().index(name)
        indexes.append(panel.proxy.mapToSource(panel.proxy.index(row, 0)))
    mime = panel.table_model.mimeData(indexes)
    table = window.editor.slots_table
    event = QDropEvent(QPointF(20, 20), Qt.DropAction.CopyAction, mime, Qt.MouseButton.LeftButton, Qt.KeyboardModifier.NoModifier)
    table.dropEvent(event)
    assert event.isAccepted()


def _linear_recipe(qtbot, window, folder: Path, output: Path) -> None:
    _pick_method(window, "linear")
    _drop_models(window, ["tiny-llama-base", "tiny-llama-a"])
    params = window.editor.params
    params.row("weight", 0).spin.setValue(0.7)
    params.row("weight", 1).slider.setValue(300)  # the slider spans [0, 1] for linear weights
    window.editor.output_edit.setText(str(output))
    window.editor.output_edit.editingFinished.emit()


def test_add_folder_shows_models_with_details(qtbot, make_window, models_folder):
    window = make_window()
    wait_ready(qtbot, window)
    assert window.library_panel.stack.currentIndex() == 1  # nothing yet: the first-run page
    _add_folder(qtbot, window, models_folder, 3)
    panel = window.library_panel
    assert panel.stack.currentIndex() == 0
    assert sorted(panel.visible_names()) == ["tiny-llama-a", "tiny-llama-b", "tiny-llama-base"]
    info = window.library.get(models_folder / "tiny-llama-a")
    assert info.architecture == "LlamaForCausalLM"
    assert info.num_parameters > 0 and info.size_bytes > 0 and info.dtype == "F32"
    row = panel.visible_names().index("tiny-llama-a")
    assert panel.proxy.index(row, 1).data() == "LlamaForCausalLM"
    panel.filter_edit.setText("LLAMA-a")
    assert panel.visible_names() == ["tiny-llama-a"]
    panel.filter_edit.setText("llama f32 base")  # every word must match (name, dtype, ...)
    assert panel.visible_names() == ["tiny-llama-base"]
    panel.filter_edit.setText("")


def test_build_recipe_by_clicking_matches_yaml(qtbot, make_window, models_folder, tmp_path):
    window = make_window()
    wait_ready(qtbot, window)
    _add_folder(qtbot, window, models_folder, 3)
    _linear_recipe(qtbot, window, models_folder, tmp_path / "out")
    editor = window.editor
    assert editor.formula_label.text() == "0.70 × tiny-llama-base + 0.30 × tiny-llama-a"

    # A per-layer curve for model A's weight, one point dragged.
    qtbot.mouseClick(editor.params.row("weight", 1).curve_button, Qt.MouseButton.LeftButton)
    assert editor.curve_editor is not None and editor.curve_stack.currentIndex() == 1
    editor.curve_editor.drag_point("default", 1, 0.9)
    qtbot.waitUntil(lambda: "0.9" in editor.yaml_view.toPlainText(), timeout=5000)
    expected = {
        "models": [
            {"model": str(models_folder / "tiny-llama-base"), "parameters": {"weight": 0.7}},
            {"model": str(models_folder / "tiny-llama-a"), "parameters": {"weight": [0.3, 0.9]}},
        ],
        "merge_method": "linear",
    }
    assert yaml.safe_load(editor.yaml_view.toPlainText()) == expected
    report = wait_preflight(qtbot, window)
    assert report.ok, report.problem
    assert editor.merge_button.isEnabled()
    assert "Ready" in editor.preflight_label.text()
    assert "peak memory" in editor.estimate_label.text()


def test_yaml_view_edits_the_recipe_both_ways(qtbot, make_window, models_folder):
    window = make_window()
    wait_ready(qtbot, window)
    _add_folder(qtbot, window, models_folder, 3)
    editor = window.editor
    text = yaml.safe_dump(
        {
            "merge_method": "slerp",
            "base_model": str(models_folder / "tiny-llama-base"),
            "models": [{"model": str(models_folder / "tiny-llama-base")}, {"model": str(models_folder / "tiny-llama-b")}],
            "parameters": {"t": 0.25},
        }
    )
    editor.yaml_view.setPlainText(text)
    editor.apply_yaml()
    assert editor.method_combo.currentData() == "slerp"
    assert editor.slots_table.rowCount() == 2
    assert editor.slots_table.item(0, 0).text() == "Base"
    assert "at t = 0.25" in editor.formula_label.text() and "75 % tiny-llama-base" in editor.formula_label.text()
    assert editor.params.row("t").spin.value() == pytest.approx(0.25)
    # A broken edit is refused and the editor keeps the last good recipe.
    editor.yaml_view.setPlainText("merge_method: [oops\n")
    editor.apply_yaml()
    assert editor.yaml_status.text().startswith("Not applied:")
    assert window.doc.method_name == "slerp" and len(window.doc.slots) == 2


def test_invalid_recipe_shows_its_problem(qtbot, make_window, models_folder):
    window = make_window()
    wait_ready(qtbot, window)
    _add_folder(qtbot, window, models_folder, 3)
    _pick_method(window, "slerp")
    _drop_models(window, ["tiny-llama-base", "tiny-llama-a", "tiny-llama-b"])
    report = wait_preflight(qtbot, window)
    assert not report.ok
    assert "exactly 2" in window.editor.preflight_label.text()
    assert not window.editor.merge_button.isEnabled()


def test_shape_problem_names_model_and_tensor(qtbot, make_window, models_folder, bad_models):
    window = make_window()
    wait_ready(qtbot, window)
    bad = bad_models.shape_mismatch
    _add_folder(qtbot, window, models_folder, 3)
    window.editor.add_models([str(models_folder / "tiny-llama-base"), str(bad.path)])
    report = wait_preflight(qtbot, window)
    assert not report.ok
    assert bad.tensor in report.problem
    assert str(bad.path) in report.problem_refs
    # The slot of the model at fault is highlighted.
    row = [s.ref for s in window.doc.slots].index(str(bad.path))
    assert window.editor.slots_table.item(row, 1).foreground().color().name() == "#e25c5c"


def test_merge_progress_output_history_restart_and_chain(qtbot, make_window, models_folder, tmp_path):
    window = make_window()
    wait_ready(qtbot, window)
    _add_folder(qtbot, window, models_folder, 3)
    out = tmp_path / "merged"
    _linear_recipe(qtbot, window, models_folder, out)
    window.editor.seed_spin.setValue(7)
    window.editor.seed_spin.editingFinished.emit()
    assert wait_preflight(qtbot, window).ok
    window.merge_options = {"tensor_delay_s": 0.02}
    seen = []
    with qtbot.waitSignal(window.mergeFinished, timeout=60000) as finished:
        qtbot.mouseClick(window.editor.merge_button, Qt.MouseButton.LeftButton)
        job = window.jobs.jobs[-1]
        job.progressed.connect(lambda p: seen.append(p.done))
    job = finished.args[0]
    assert job.status == "succeeded", job.error
    assert seen and seen == sorted(seen) and seen[-1] == job.last_progress.total
    row = window.jobs.row_of(job)
    assert row.bar.value() == 1000 and "Done in" in row.detail.text()

    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(out)
    assert model.config.num_hidden_layers == 4
    info = window.library.get(out)
    assert info is not None and info.provenance is not None and info.provenance.tool == "Merge Studio"

    runs = window.history.runs
    assert len(runs) == 1 and runs[0].status == "succeeded" and runs[0].output_path == str(out)
    assert runs[0].peak_memory_bytes and runs[0].peak_memory_bytes > 0
    assert window.history.runs_table.item(0, 1).text() == "done"
    saved_yaml = window.doc.to_yaml()

    # Restart: the session, its workspace and its history come back.
    from tests.app.conftest import close_window

    close_window(qtbot, window)
    again = make_window()
    wait_ready(qtbot, again)
    assert again.doc.to_yaml() == saved_yaml
    assert again.history.runs and again.history.runs[0].status == "succeeded"
    assert again.library.get(out) is not None  # merge outputs stay in the library
    again.history.select_run(0)
    assert again.history.load_button.isEnabled()

    # Chain: the merged model is an input of the next recipe.
    assert again.history.runs[0].settings["seed"] == 7
    again.doc.clear()
    again.doc.set_export(seed=0)
    again.history.load_button.click()  # the earlier recipe back in the editor, with the run's settings
    assert again.doc.to_yaml() == saved_yaml
    assert again.doc.export.seed == 7 and again.editor.seed_spin.value() == 7
    again.doc.clear()
    _pick_method(again, "linear")
    again.editor.add_models([str(out), str(models_folder / "tiny-llama-b")])
    out2 = tmp_path / "chained"
    again.editor.output_edit.setText(str(out2))
    again.editor.output_edit.editingFinished.emit()
    assert wait_preflight(qtbot, again).ok
    with qtbot.waitSignal(again.mergeFinished, timeout=60000) as finished2:
        again.editor.merge_button.click()
    assert finished2.args[0].status == "succeeded", finished2.args[0].error
    info2 = again.library.get(out2)
    assert info2 is not None and str(out) in info2.provenance.models
    assert len(again.history.runs) == 2


def test_stop_cancels_promptly_and_leaves_nothing(qtbot, make_window, models_folder, tmp_path):
    window = make_window()
    wait_ready(qtbot, window)
    _add_folder(qtbot, window, models_folder, 3)
    out = tmp_path / "stopped"
    _linear_recipe(qtbot, window, models_folder, out)
    assert wait_preflight(qtbot, window).ok
    window.merge_options = {"tensor_delay_s": 0.5}
    window.editor.merge_button.click()
    job = window.jobs.jobs[-1]
    qtbot.waitUntil(lambda: job.last_progress is not None and job.last_progress.done >= 2, timeout=30000)
    assert any(p.name.startswith(".stopped.partial-") for p in tmp_path.iterdir())
    row = window.jobs.row_of(job)
    with qtbot.waitSignal(window.mergeFinished, timeout=15000):
        qtbot.mouseClick(row.stop_button, Qt.MouseButton.LeftButton)
    assert job.status == "cancelled"
    assert job.last_progress.done < job.last_progress.total
    assert not out.exists()
    assert not [p for p in tmp_path.iterdir() if ".partial-" in p.name]
    assert window.history.runs[0].status == "cancelled"
    assert window.history.runs_table.item(0, 1).text() == "stopped"


def test_failed_merge_is_a_message_not_a_crash(qtbot, make_window, models_folder, tmp_path):
    """A disk that fills during export: the job fails with one sentence, nothing is left, the app goes on."""
    import sys

    window = make_window()
    wait_ready(qtbot, window)
    _add_folder(qtbot, window, models_folder, 3)
    out = tmp_path / "full"
    _linear_recipe(qtbot, window, models_folder, out)
    assert wait_preflight(qtbot, window).ok
    # The merge process may write at most 64 KiB per file: the shard write fails like a full disk does.
    wrapper = tmp_path / "python-small-disk"
    wrapper.write_text(f"#!/bin/sh\nulimit -f 128\nexec {sys.executable} \"$@\"\n")
    wrapper.chmod(0o755)
    window.merge_options = {"python": str(wrapper)}
    with qtbot.waitSignal(window.mergeFinished, timeout=60000) as finished:
        window.editor.merge_button.click()
    job = finished.args[0]
    assert job.status == "failed"
    assert str(out) in job.error and "\n" not in job.error
    assert not out.exists() and not [p for p in tmp_path.iterdir() if ".partial-" in p.name]
    assert "The merge failed" in window.notice.text()
    assert window.history.runs[0].status == "failed"
    # The window still works: the next check runs.
    window.doc.set_param("weight", 0.5, 0)
    assert wait_preflight(qtbot, window).ok


def test_first_run_demo_family(qtbot, make_window):
    window = make_window()
    wait_ready(qtbot, window)
    panel = window.library_panel
    assert panel.stack.currentIndex() == 1 and panel.demo_button.isVisible()
    qtbot.mouseClick(panel.demo_button, Qt.MouseButton.LeftButton)
    qtbot.waitUntil(lambda: len(window.library.models) == 3, timeout=60000)
    qtbot.waitUntil(lambda: len(window.doc.slots) == 3, timeout=10000)
    assert window.doc.method_name == "ties" and window.doc.base_index == 0
    assert wait_preflight(qtbot, window).ok
    assert window.editor.merge_button.isEnabled()
