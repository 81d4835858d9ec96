"""The application entry point: ``mergestudio`` without arguments, or ``make run``.

Only Qt and the engine's light modules load before the window shows; torch is
never imported by the window process (merges run in a child process), and the
sessions database and library scan start in workers once the window is up.

``MERGESTUDIO_STARTUP_PROBE=FILE`` (used by ``bench/bench_app.py``) writes, as
JSON, when the window was first painted and the resident memory after
``MERGESTUDIO_PROBE_IDLE_S`` idle seconds, then quits.
"""

from __future__ import annotations

import json
import logging
import os
import sys
import time
from typing import Optional

from PySide6.QtCore import QEvent, QObject, QTimer
from PySide6.QtWidgets import QApplication


def _setup_logging() -> None:
    from core.paths import home

    folder = home() / "logs"
    folder.mkdir(parents=True, exist_ok=True)
    handler = logging.FileHandler(folder / "app.log", encoding="utf-8")
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    root = logging.getLogger("mergestudio")
    root.addHandler(handler)
    root.setLevel(logging.INFO)


class _FirstPaint(QObject):
    """Notes the time of the window's first paint (the moment a person sees it)."""

    def __init__(self, probe_file: str, idle_s: float) -> None:
        super().__init__()
        self.probe_file = probe_file
        self.idle_s = idle_s
        self.shown_at: Optional[float] = None

    def eventFilter(self, obj: QObject, event: QEvent) -> bool:  # noqa: N802
        if self.shown_at is None and event.type() == QEvent.Type.Paint:
            self.shown_at = time.time()
            QTimer.singleShot(int(self.idle_s * 1000), self._report)
        return False

    def _report(self) -> None:
        import psutil

        data = {
            "shown_at": self.shown_at,
            "rss_bytes": psutil.Process().memory_info().rss,
            "torch_loaded": "torch" in sys.modules,
        }
        with open(self.probe_file, "w", encoding="utf-8") as f:
            json.dump(data, f)
        app = QApplication.instance()
        for w in app.topLevelWidgets():
            if hasattr(w, "confirm_quit"):
                w.confirm_quit = False
        app.quit()


def main(argv: Optional[list[str]] = None) -> int:
    app = QApplication.instance() or QApplication(argv if argv is not None else sys.argv)
    app.setApplicationName("Merge Studio")
    app.setOrganizationName("mergestudio")
    _setup_logging()

    from app import settings as app_settings
    from app.theme import apply_theme
    from app.window import MainWindow

    from app.gc_control import GuiThreadCollector

    apply_theme(app, str(app_settings.settings().value("ui/theme") or "dark"))
    collector = GuiThreadCollector(parent=app)  # Qt objects must never be collected off the GUI thread
    window = MainWindow()
    probe = os.environ.get("MERGESTUDIO_STARTUP_PROBE")
    if probe:
        watcher = _FirstPaint(probe, float(os.environ.get("MERGESTUDIO_PROBE_IDLE_S", "5")))
        window.installEventFilter(watcher)
        window._probe = watcher  # keep it alive
    window.show()
    try:
        return app.exec()
    finally:
        collector.stop()


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
