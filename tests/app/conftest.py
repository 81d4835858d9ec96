"""Fixtures for GUI tests: a real MainWindow on a fresh MERGESTUDIO_HOME, driven with qtbot."""

from __future__ import annotations

import gc
import shutil
from pathlib import Path

import pytest

pytest.importorskip("pytestqt")


def wait_ready(qtbot, window, timeout: int = 20000) -> None:
    """The session is open and the first library scan is over."""
    qtbot.waitUntil(lambda: window.sessions.session is not None, timeout=timeout)
    qtbot.waitUntil(lambda: window.library_panel.scans >= 1 and not _scanning(window), timeout=timeout)


def _scanning(window) -> bool:
    w = window.library_panel._scan_worker
    return w is not None and w.is_running()


def wait_preflight(qtbot, window, timeout: int = 20000):
    editor = window.editor
    qtbot.waitUntil(lambda: editor.preflight_idle() and editor.last_report is not None, timeout=timeout)
    return editor.last_report


def close_window(qtbot, window) -> None:
    window.confirm_quit = False
    window.close()


@pytest.fixture(autouse=True)
def collect_garbage_on_the_gui_thread(qapp):
    """As in the app (app/gc_control.py): no automatic collection, which could run in a worker thread
    and destroy Qt objects there; the window fixtures collect on the GUI thread at teardown."""
    gc.disable()
    yield
    gc.collect()
    gc.enable()


@pytest.fixture
def models_folder(llama_family, tmp_path) -> Path:
    """A library folder holding copies of the tiny llama family (base, a, b)."""
    folder = tmp_path / "models"
    folder.mkdir()
    for key in ("base", "a", "b"):
        shutil.copytree(llama_family[key], folder / llama_family[key].name)
    return folder


@pytest.fixture
def make_window(qtbot, fresh_home):
    """Build MainWindows on the same fresh home (several in a row simulate restarts)."""
    from app.window import MainWindow

    made = []

    def make(**kwargs):
        window = MainWindow(**kwargs)
        qtbot.addWidget(window)
        window.show()
        made.append(window)
        return window

    yield make
    for window in made:
        for job in window.jobs.running():
            job.stop()
        for job in window.jobs.jobs:
            if job.worker is not None:
                job.worker.wait(20000)
        window.confirm_quit = False
        if window.sessions.store is not None:
            window.close()
    # Tear the windows down now, while no worker thread runs, instead of leaving their Python
    # wrappers to a garbage collection that may start at any moment of a later test.
    from PySide6.QtCore import QCoreApplication, QEvent

    from app.workers import running_workers

    assert not running_workers(), "a test left a worker running"
    for window in made:
        window.deleteLater()
    made.clear()
    QCoreApplication.sendPostedEvents(None, QEvent.Type.DeferredDelete)
    gc.collect()
