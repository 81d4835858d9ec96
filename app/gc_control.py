"""Garbage collection on the GUI thread only.

Python's cyclic garbage collector runs in whichever thread happens to allocate
when a threshold is crossed. If that is a worker thread and the garbage holds
Qt objects (widgets, plot items), they are destroyed off the GUI thread, which
can crash the process. So the app turns automatic collection off and collects
from a GUI-thread timer instead, with the same generation thresholds (the
approach of pyqtgraph's ``GarbageCollector``, written here from its idea).
"""

from __future__ import annotations

import gc
from typing import Optional

from PySide6.QtCore import QObject, QTimer


class GuiThreadCollector(QObject):
    """Collects garbage from a timer on the thread that creates it (the GUI thread)."""

    def __init__(self, interval_ms: int = 1000, parent: Optional[QObject] = None) -> None:
        super().__init__(parent)
        self.thresholds = gc.get_threshold()
        gc.disable()
        self.timer = QTimer(self)
        self.timer.setInterval(interval_ms)
        self.timer.timeout.connect(self.check)
        self.timer.start()

    def check(self) -> None:
        """Collect the generations whose counts passed their thresholds, as automatic collection would."""
        counts = gc.get_count()
        if counts[0] > self.thresholds[0]:
            generation = 0
            if counts[1] > self.thresholds[1]:
                generation = 1
                if counts[2] > self.thresholds[2]:
                    generation = 2
            gc.collect(generation)

    def stop(self) -> None:
        self.timer.stop()
        gc.enable()
