"""Bad input in the window: each gives a clear message, the app keeps working, no session data is lost."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
import time
from pathlib import Path

from PySide6.QtCore import Qt

from tests.app.conftest import close_window, wait_preflight, wait_ready


def test_empty_folder_and_corrupt_model_are_reported(qtbot, make_window, tmp_path, bad_models):
    window = make_window()
    wait_ready(qtbot, window)
    empty = tmp_path / "empty"
    empty.mkdir()
    window.library_panel.add_folder(empty)
    qtbot.waitUntil(lambda: "no models found in" in window.library_panel.status_label.text(), timeout=20000)
    assert str(empty) in window.library_panel.status_label.text()

    broken_root = tmp_path / "broken"
    broken_root.mkdir()
    corrupt = bad_models.corrupt_header
    target = broken_root / Path(corrupt.path).name
    import shutil

    shutil.copytree(corrupt.path, target)
    window.library_panel.add_folder(broken_root)
    qtbot.waitUntil(lambda: window.library_panel.problems.count() >= 1, timeout=20000)
    messages = [window.library_panel.problems.item(i).text() for i in range(window.library_panel.problems.count())]
    assert any(target.name in m for m in messages), messages
    assert window.library_panel.problems.isVisible()


def test_bad_recipe_file_is_refused_and_the_recipe_kept(qtbot, make_window, llama_family, tmp_path):
    window = make_window()
    wait_ready(qtbot, window)
    window.editor.add_models([str(llama_family["base"]), str(llama_family["a"])])
    before = window.doc.to_yaml()
    bad = tmp_path / "bad.yaml"
    bad.write_text("merge_method: linear\nmodels:\n  - model: x\n    parameters: {weight: 1}\n  - modl: y\n")
    assert not window.open_recipe(bad)
    assert "The recipe was not opened" in window.notice.text() and "models[1]" in window.notice.text()
    assert str(bad) in window.notice.text()
    assert window.doc.to_yaml() == before
    missing = tmp_path / "nope.yaml"
    assert not window.open_recipe(missing)
    assert "nope.yaml" in window.notice.text()


def test_output_folder_without_write_permission(qtbot, make_window, llama_family, tmp_path, monkeypatch):
    window = make_window()
    wait_ready(qtbot, window)
    locked = tmp_path / "locked"
    locked.mkdir()
    real_access = os.access
    # Tests run as root, for whom chmod does not deny writes: deny this folder the way the OS would.
    monkeypatch.setattr(os, "access", lambda p, mode, **kw: False if Path(p) == locked else real_access(p, mode, **kw))
    window.editor.add_models([str(llama_family["base"]), str(llama_family["a"])])
    window.editor.output_edit.setText(str(locked / "out"))
    window.editor.output_edit.editingFinished.emit()
    report = wait_preflight(qtbot, window)
    assert not report.ok and "permission" in report.problem and str(locked) in report.problem
    assert not window.editor.merge_button.isEnabled()


def test_existing_output_needs_replace(qtbot, make_window, llama_family, tmp_path):
    window = make_window()
    wait_ready(qtbot, window)
    taken = tmp_path / "taken"
    taken.mkdir()
    (taken / "file.txt").write_text("keep me")
    window.editor.add_models([str(llama_family["base"]), str(llama_family["a"])])
    window.editor.output_edit.setText(str(taken))
    window.editor.output_edit.editingFinished.emit()
    report = wait_preflight(qtbot, window)
    assert not report.ok and "Replace existing output" in report.problem
    qtbot.mouseClick(window.editor.overwrite_check, Qt.MouseButton.LeftButton)
    assert wait_preflight(qtbot, window).ok


def test_corrupt_database_is_kept_and_a_new_one_started(qtbot, make_window, fresh_home):
    db = fresh_home / "sessions.db"
    db.write_bytes(b"this is not a database" * 100)
    window = make_window()
    qtbot.waitUntil(lambda: window.sessions.session is not None, timeout=20000)
    assert not window.sessions.persistent
    assert str(db) in window.notice.text() and "not saved" in window.notice.text()
    assert "(not saved)" in window.session_label.text()
    buttons = window.notice.buttons()
    assert buttons, "a way to start a new database is offered"
    buttons[0].click()
    assert window.sessions.persistent
    kept = [p for p in fresh_home.iterdir() if p.name.startswith("sessions.db.corrupt-")]
    assert len(kept) == 1 and kept[0].read_bytes().startswith(b"this is not a database")
    assert "(not saved)" not in window.session_label.text()


def test_database_locked_by_another_instance(qtbot, make_window, fresh_home):
    code = textwrap.dedent(
        """
        import sys, time
        from core.sessions import SessionStore
        store = SessionStore.open()
        print("ready", flush=True)
        sys.stdin.readline()
        store.close()
        """
    )
    env = dict(os.environ, MERGESTUDIO_HOME=str(fresh_home))
    other = subprocess.Popen(
        [sys.executable, "-c", code], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=env,
        cwd=str(Path(__file__).resolve().parents[2]),
    )
    try:
        assert other.stdout.readline().strip() == "ready"
        window = make_window()
        qtbot.waitUntil(lambda: window.sessions.session is not None, timeout=20000)
        assert not window.sessions.persistent
        assert str(other.pid) in window.notice.text() or "another" in window.notice.text().lower()
        # The window keeps working without saving.
        window.sessions.new_session("scratch")
        assert window.sessions.session.name == "scratch"
    finally:
        other.stdin.write("\n")
        other.stdin.flush()
        other.wait(20)


def test_interrupted_run_is_marked_on_next_start(qtbot, make_window, fresh_home):
    code = textwrap.dedent(
        """
        import os
        from core.sessions import SessionStore
        store = SessionStore.open()
        s = store.create_session("killed")
        store.save_workspace(s.id, {"yaml": ""})
        store.start_run(s.id, "merge_method: linear\\n", "/tmp/never-written", method="linear")
        os._exit(9)  # as if the machine killed the app mid-merge
        """
    )
    env = dict(os.environ, MERGESTUDIO_HOME=str(fresh_home))
    subprocess.run([sys.executable, "-c", code], env=env, cwd=str(Path(__file__).resolve().parents[2]))
    window = make_window()
    wait_ready(qtbot, window)
    assert "interrupted" in " ".join(window.notice.history)
    assert window.sessions.session.name == "killed"
    assert window.history.runs[0].status == "interrupted"
    assert window.history.runs_table.item(0, 1).text() == "interrupted"


def test_sessions_new_rename_open_delete_and_layout_remembered(qtbot, make_window, llama_family):
    window = make_window()
    wait_ready(qtbot, window)
    first = window.sessions.session
    window.editor.add_models([str(llama_family["base"])])
    window.sessions.rename_session("first")
    assert "first" in window.windowTitle()
    second = window.new_session("second")
    assert window.doc.slots == [] and window.sessions.session.id == second.id
    window.open_session(first.id)
    assert [s.ref for s in window.doc.slots] == [str(llama_family["base"])]
    window.sessions.delete_session(second.id)
    assert [s.name for s in window.sessions.recent()] == ["first"]
    window.set_theme("light")
    window.addDockWidget(Qt.DockWidgetArea.RightDockWidgetArea, window.library_dock)
    window.jobs_dock.hide()
    close_window(qtbot, window)

    again = make_window()
    wait_ready(qtbot, again)
    assert again.sessions.session.name == "first"
    assert [s.ref for s in again.doc.slots] == [str(llama_family["base"])]
    assert again.theme_actions["light"].isChecked()
    assert again.dockWidgetArea(again.library_dock) == Qt.DockWidgetArea.RightDockWidgetArea
    assert not again.jobs_dock.isVisible()


def test_window_and_engine_modules_do_not_load_torch():
    code = "import sys, app.main, app.window, core.library, core.sessions, core.merge.child; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         cwd=str(Path(__file__).resolve().parents[2]))
    assert out.stdout.strip() == "False"


def test_gui_thread_is_free_while_merging(qtbot, make_window, models_folder, tmp_path):
    """The GUI thread answers a 20 ms heartbeat while a merge runs (no timing judged: it must keep ticking)."""
    from PySide6.QtCore import QTimer

    from tests.app.test_app_flow import _add_folder, _linear_recipe

    window = make_window()
    wait_ready(qtbot, window)
    _add_folder(qtbot, window, models_folder, 3)
    _linear_recipe(qtbot, window, models_folder, tmp_path / "beat")
    assert wait_preflight(qtbot, window).ok
    window.merge_options = {"tensor_delay_s": 0.05}
    ticks = []
    timer = QTimer()
    timer.setInterval(20)
    timer.timeout.connect(lambda: ticks.append(time.monotonic()))
    timer.start()
    with qtbot.waitSignal(window.mergeFinished, timeout=60000):
        window.editor.merge_button.click()
        start = len(ticks)
    timer.stop()
    assert len(ticks) - start > 10  # the event loop kept running during the merge


def test_closing_while_the_database_opens_releases_it(qtbot, make_window):
    """A window closed at once must not keep the database locked for the next one."""
    first = make_window()
    close_window(qtbot, first)  # before its start-up work began
    opening = make_window(start_background=False)
    opening.start_background_work()
    close_window(qtbot, opening)  # while the store opens in its worker
    assert first.sessions.store is None and opening.sessions.store is None
    second = make_window()
    wait_ready(qtbot, second)
    assert second.sessions.persistent, second.notice.history
