"""Long work off the GUI thread, napari-style.

A :class:`GeneratorWorker` runs a generator function in its own QThread: each
value it yields reaches the GUI thread through ``yielded``, its return value
through ``returned``. ``quit()`` asks it to stop: the generator is closed at
its next yield, so its ``finally`` blocks clean up. Errors never escape as
tracebacks: a :class:`~core.errors.MergeStudioError` arrives as its one
sentence through ``errored``; anything else is a bug, reported in one line and
logged with its traceback under MERGESTUDIO_HOME/logs.

The worker object itself stays on the GUI thread and re-emits what a runner
object (living on the work thread) sends it through queued connections. So
every public signal is emitted on the GUI thread, and any callable connected
to it (lambdas included) runs there and may touch widgets.
"""

from __future__ import annotations

import logging
import threading
import time
from typing import Any, Callable, Optional

from PySide6.QtCore import QObject, QThread, Signal, Slot

log = logging.getLogger("mergestudio.app")

_running: set["GeneratorWorker"] = set()  # keeps workers alive until their thread ends


class _Runner(QObject):
    """Lives on the work thread; runs the function and reports to the worker."""

    yielded = Signal(object)
    returned = Signal(object)
    errored = Signal(str)
    cancelled = Signal()
    done = Signal()

    def __init__(self, func: Callable[..., Any], args: tuple, kwargs: dict, abort: threading.Event) -> None:
        super().__init__()
        self._func = func
        self._args = args
        self._kwargs = kwargs
        self._abort = abort

    @Slot()
    def run(self) -> None:
        from core.errors import CancelledError, MergeStudioError

        try:
            result = self._func(*self._args, **self._kwargs)
            if hasattr(result, "__next__"):
                result = self._drive(result)
        except (_Aborted, CancelledError):
            self.cancelled.emit()
        except MergeStudioError as exc:
            self.errored.emit(" ".join(str(exc).split()))
        except MemoryError:
            self.errored.emit("Out of memory: the work was stopped; the app keeps running.")
        except Exception as exc:  # a bug: one line for the user, the traceback in the log
            log.exception("worker %s failed", getattr(self._func, "__name__", self._func))
            self.errored.emit(f"Internal error: {type(exc).__name__}: {' '.join(str(exc).split())}")
        else:
            self.returned.emit(result)
        finally:
            self.done.emit()
            QThread.currentThread().quit()  # the thread ends by itself, so wait() never depends on the GUI thread

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


class GeneratorWorker(QObject):
    """Runs ``func(*args, **kwargs)`` (a generator function, or a plain one) in a thread."""

    yielded = Signal(object)
    returned = Signal(object)
    errored = Signal(str)
    cancelled = Signal()
    finished = Signal()  # always last, whatever the outcome

    def __init__(self, func: Callable[..., Any], *args: Any, **kwargs: Any) -> None:
        super().__init__()
        self._func = func
        self._abort = threading.Event()
        self._runner = _Runner(func, args, kwargs, self._abort)
        self._thread: Optional[QThread] = None
        self._done = threading.Event()
        self.outcome: Optional[str] = None  # "returned" | "errored" | "cancelled", once finished

    @property
    def abort_requested(self) -> bool:
        return self._abort.is_set()

    def start(self) -> "GeneratorWorker":
        thread = QThread()
        thread.setObjectName(getattr(self._func, "__name__", "worker"))
        runner = self._runner
        runner.moveToThread(thread)
        thread.started.connect(runner.run)
        runner.yielded.connect(self._on_yielded)
        runner.returned.connect(self._on_returned)
        runner.errored.connect(self._on_errored)
        runner.cancelled.connect(self._on_cancelled)
        runner.done.connect(self._on_done)
        self._thread = thread
        _running.add(self)
        thread.start()
        return self

    def quit(self) -> None:
        """Stop at the next yield (thread-safe, returns at once)."""
        self._abort.set()

    def is_running(self) -> bool:
        return self._thread is not None and not self._done.is_set()

    def wait(self, msecs: int = 10000) -> bool:
        """Block until the work thread ends (tests and shutdown only, never during normal work)."""
        thread = self._thread
        return thread.wait(msecs) if thread is not None else True

    # -- relays, on the GUI thread -------------------------------------------------
    @Slot(object)
    def _on_yielded(self, value: Any) -> None:
        self.yielded.emit(value)

    @Slot(object)
    def _on_returned(self, value: Any) -> None:
        self.outcome = "returned"
        self.returned.emit(value)

    @Slot(str)
    def _on_errored(self, text: str) -> None:
        self.outcome = "errored"
        self.errored.emit(text)

    @Slot()
    def _on_cancelled(self) -> None:
        self.outcome = "cancelled"
        self.cancelled.emit()

    @Slot()
    def _on_done(self) -> None:
        self._done.set()
        thread = self._thread
        if thread is not None:
            thread.wait()  # it quits by itself right after run(): this returns at once
            thread.deleteLater()
            self._thread = None
        _running.discard(self)
        self.finished.emit()


class _Aborted(Exception):
    pass


def running_workers() -> list[GeneratorWorker]:
    return list(_running)


def stop_workers(timeout_ms: int) -> list[GeneratorWorker]:
    """Ask every running worker to stop and wait for their threads (shutdown only); returns those still running.

    A thread still running when the app exits aborts the whole process, so the
    window calls this before it closes.
    """
    deadline = time.monotonic() + timeout_ms / 1000
    workers = running_workers()
    for worker in workers:
        worker.quit()
    left = []
    for worker in workers:
        remaining = max(0, int((deadline - time.monotonic()) * 1000))
        if not worker.wait(remaining):
            left.append(worker)
    return left
