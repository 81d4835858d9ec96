"""Long work off the GUI thread, napari-style.

A :class:`GeneratorWorker` runs a generator function in its own QThread: each
value it yields reaches the GUI thread through ``yielded``, its return value
through ``returned``. ``quit()`` (from the GUI thread) asks it to stop: the
generator is closed at its next yield, so its ``finally`` blocks clean up.
Errors never escape as tracebacks: a :class:`~core.errors.MergeStudioError`
arrives as its one sentence through ``errored``; anything else is a bug,
reported in one line and logged with its traceback under MERGESTUDIO_HOME.

Signals are queued to the receiver's thread, so slots connected from the GUI
thread run on the GUI thread and may touch widgets.
"""

from __future__ import annotations

import logging
import threading
from typing import Any, Callable, Optional

from PySide6.QtCore import QObject, QThread, Signal, Slot

log = logging.getLogger("mergestudio.app")

_running: set["GeneratorWorker"] = set()  # keeps workers alive until their thread ends


class GeneratorWorker(QObject):
    """Runs ``func(*args, **kwargs)`` (a generator function, or a plain one) in a thread."""

    started = Signal()
    yielded = Signal(object)
    returned = Signal(object)
    errored = Signal(str)
    cancelled = Signal()
    finished = Signal()  # always last, whatever the outcome

    def __init__(self, func: Callable[..., Any], *args: Any, **kwargs: Any) -> None:
        super().__init__()
        self._func = func
        self._args = args
        self._kwargs = kwargs
        self._abort = threading.Event()
        self._thread: Optional[QThread] = None
        self.outcome: Optional[str] = None  # "returned" | "errored" | "cancelled", once finished

    @property
    def abort_requested(self) -> bool:
        return self._abort.is_set()

    def start(self) -> "GeneratorWorker":
        thread = QThread()
        thread.setObjectName(getattr(self._func, "__name__", "worker"))
        self.moveToThread(thread)
        thread.started.connect(self._run)
        self.finished.connect(thread.quit)
        thread.finished.connect(_reaper().reap)  # runs on the GUI thread, after the thread has ended
        self._thread = thread
        _running.add(self)
        thread.start()
        return self

    def quit(self) -> None:
        """Stop at the next yield (thread-safe, returns at once)."""
        self._abort.set()

    def is_running(self) -> bool:
        return self._thread is not None and self._thread.isRunning()

    def wait(self, msecs: int = 10000) -> bool:
        """Block until the thread ends (tests and shutdown only; never on the GUI thread during work)."""
        return self._thread.wait(msecs) if self._thread is not None else True

    @Slot()
    def _run(self) -> None:
        from core.errors import CancelledError, MergeStudioError

        self.started.emit()
        try:
            result = self._func(*self._args, **self._kwargs)
            if hasattr(result, "__next__"):
                result = self._drive(result)
        except _Aborted:
            self.outcome = "cancelled"
            self.cancelled.emit()
        except CancelledError:
            self.outcome = "cancelled"
            self.cancelled.emit()
        except MergeStudioError as exc:
            self.outcome = "errored"
            self.errored.emit(" ".join(str(exc).split()))
        except MemoryError:
            self.outcome = "errored"
            self.errored.emit("Out of memory: the work was stopped; the app keeps running.")
        except Exception as exc:  # a bug: one line for the user, the traceback in the log
            log.exception("worker %s failed", getattr(self._func, "__name__", self._func))
            self.outcome = "errored"
            self.errored.emit(f"Internal error: {type(exc).__name__}: {' '.join(str(exc).split())}")
        else:
            self.outcome = "returned"
            self.returned.emit(result)
        finally:
            self.finished.emit()

    def _drive(self, gen: Any) -> Any:
        try:
            while True:
                if self._abort.is_set():
                    gen.close()
                    raise _Aborted()
                value = next(gen)
                self.yielded.emit(value)
        except StopIteration as stop:
            return stop.value



class _Aborted(Exception):
    pass


class _Reaper(QObject):
    """Lives on the GUI thread; forgets workers whose thread has ended."""

    @Slot()
    def reap(self) -> None:
        thread = self.sender()
        for worker in list(_running):
            if worker._thread is thread:
                _running.discard(worker)
                worker._thread = None
        if thread is not None:
            thread.deleteLater()


_REAPER: Optional[_Reaper] = None


def _reaper() -> _Reaper:
    global _REAPER
    if _REAPER is None:
        _REAPER = _Reaper()
    return _REAPER


def start_worker(func: Callable[..., Any], *args: Any, **kwargs: Any) -> GeneratorWorker:
    """Create a worker, let the caller connect it, then start it (``start_worker(...).start()`` pattern)."""
    return GeneratorWorker(func, *args, **kwargs)


def running_workers() -> list[GeneratorWorker]:
    return list(_running)
