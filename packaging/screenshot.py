"""Take the README's screenshot of the real window.

    Xvfb :99 -screen 0 1600x1000x24 &
    DISPLAY=:99 .venv/bin/python packaging/screenshot.py resources/screenshots/main-window.png

Builds the demo family in a temporary MERGESTUDIO_HOME, lets the app set up its
TIES recipe, gives one model's density a per-layer curve (separate attention and
MLP curves), runs the merge, and saves the window (a second path: also the History
tab). Without $DISPLAY it uses Qt's offscreen platform; MERGESTUDIO_SHOT_THEME=light
takes the light theme.
"""

from __future__ import annotations

import os
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def _wait(app, condition, timeout_s: float = 120) -> None:
    end = time.monotonic() + timeout_s
    while not condition():
        if time.monotonic() > end:
            raise SystemExit("timed out")
        app.processEvents()
        time.sleep(0.01)


def main() -> int:
    target = Path(sys.argv[1] if len(sys.argv) > 1 else ROOT / "resources" / "screenshots" / "main-window.png")
    home = Path(tempfile.mkdtemp(prefix="mergestudio-shot-"))
    os.environ["MERGESTUDIO_HOME"] = str(home)
    os.environ["HF_HUB_CACHE"] = str(home / "no-hf-cache")
    if not os.environ.get("DISPLAY"):
        os.environ["QT_QPA_PLATFORM"] = "offscreen"
    from PySide6.QtWidgets import QApplication

    app = QApplication([])
    from app.theme import apply_theme
    from app.window import MainWindow

    apply_theme(app, os.environ.get("MERGESTUDIO_SHOT_THEME", "dark"))
    window = MainWindow()
    window.resize(1560, 960)
    window.show()
    _wait(app, lambda: window.sessions.session is not None)
    window.sessions.rename_session("Demo: TIES of chat + code")
    window.create_demo_models()
    _wait(app, lambda: len(window.doc.slots) == 3)
    editor = window.editor
    _wait(app, lambda: editor.preflight_idle() and editor.last_report is not None)
    editor.select_curve("density", 2)
    editor.params.row("density", 2).curve_button.setChecked(True)
    _wait(app, lambda: editor.curve_editor is not None)
    curve = editor.curve_editor
    curve.split_check.setChecked(True)
    for row, (group, values) in enumerate((("attention", (0.3, 0.5, 0.7, 0.9)), ("mlp", (0.9, 0.6, 0.4, 0.3))), 1):
        curve.group_combo.setCurrentIndex(row)
        curve.points_spin.setValue(len(values))
        for i, v in enumerate(values):
            curve.drag_point(group, i, v)
    editor.run_preflight()
    _wait(app, lambda: editor.preflight_idle() and editor.last_report is not None)
    job = window.start_merge()
    _wait(app, lambda: job is not None and not job.running, 300)
    window.history.refresh()
    editor.side_tabs.setCurrentIndex(0)
    for _ in range(50):
        app.processEvents()
        time.sleep(0.02)
    target.parent.mkdir(parents=True, exist_ok=True)
    screen = window.screen()
    if os.environ.get("DISPLAY") and screen is not None:
        pixmap = screen.grabWindow(window.winId())
    else:
        pixmap = window.grab()
    pixmap.save(str(target))
    print(f"saved {target} ({pixmap.width()}x{pixmap.height()}); merge {job.status}")
    if len(sys.argv) > 2:  # a second picture: the History tab
        window.workspace.setCurrentWidget(window.history)
        window.history.select_run(0)
        for _ in range(20):
            app.processEvents()
            time.sleep(0.02)
        shot = screen.grabWindow(window.winId()) if os.environ.get("DISPLAY") and screen is not None else window.grab()
        shot.save(sys.argv[2])
    window.confirm_quit = False
    window.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
