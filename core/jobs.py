"""One progress and cancel protocol for the CLI, the tests and the GUI.

Long work is written as a generator that yields :class:`Progress` between
steps (napari's generator workers): the caller decides how to show it and can
stop the work between any two yields. Code that is not a generator takes a
:class:`CancelToken` and calls :meth:`CancelToken.raise_if_cancelled` between
steps. Either way, work stops at the next step boundary and cleans up after
itself.
"""

from __future__ import annotations

import sys
import threading
import time
from dataclasses import dataclass
from typing import Callable, Generator, Optional, TextIO, TypeVar

from core.errors import CancelledError

T = TypeVar("T")


@dataclass(frozen=True)
class Progress:
    """A snapshot of a running job."""

    done: int
    total: int
    bytes_done: int = 0
    bytes_total: int = 0
    elapsed_s: float = 0.0
    message: str = ""

    @property
    def fraction(self) -> float:
        if self.bytes_total:
            return min(1.0, self.bytes_done / self.bytes_total)
        return self.done / self.total if self.total else 1.0

    @property
    def eta_s(self) -> Optional[float]:
        """Seconds left, extrapolated from the bytes (or steps) done so far."""
        frac = self.fraction
        if frac <= 0 or self.elapsed_s <= 0:
            return None
        return self.elapsed_s * (1 - frac) / frac


class CancelToken:
    """A thread-safe flag: set by whoever wants the job stopped."""

    def __init__(self) -> None:
        self._event = threading.Event()

    def cancel(self) -> None:
        self._event.set()

    @property
    def cancelled(self) -> bool:
        return self._event.is_set()

    def raise_if_cancelled(self) -> None:
        if self._event.is_set():
            raise CancelledError()


ProgressCallback = Callable[[Progress], None]


def drive(
    work: Generator[Progress, None, T],
    on_progress: Optional[ProgressCallback] = None,
    cancel: Optional[CancelToken] = None,
) -> T:
    """Run a progress generator to the end and return its result.

    When ``cancel`` is set the generator is closed at its next yield, so its
    ``finally`` blocks clean up, and CancelledError is raised. An exception
    from ``on_progress`` (or Ctrl-C) closes the generator the same way before
    it propagates, so clean-up never waits for garbage collection.
    """
    try:
        while True:
            progress = next(work)
            if on_progress is not None:
                on_progress(progress)
            if cancel is not None and cancel.cancelled:
                work.close()
                raise CancelledError()
    except StopIteration as stop:
        return stop.value
    except BaseException:
        work.close()  # no-op when the generator itself raised or has finished
        raise


class TerminalProgress:
    """A one-line progress bar on a terminal (nothing when not a TTY)."""

    def __init__(self, stream: TextIO = sys.stderr, label: str = "merging") -> None:
        self.stream = stream
        self.label = label
        self.enabled = stream.isatty()
        self._last = 0.0
        self._drawn = False  # a bar is on the current line, not yet ended by a newline

    def __call__(self, p: Progress) -> None:
        if not self.enabled:
            return
        now = time.monotonic()
        if now - self._last < 0.1 and p.done < p.total:
            return
        self._last = now
        width = 30
        filled = int(width * p.fraction)
        eta = p.eta_s
        eta_text = f" ETA {eta:5.1f}s" if eta is not None and p.done < p.total else ""
        size = f" {p.bytes_done / 1e9:.2f}/{p.bytes_total / 1e9:.2f} GB" if p.bytes_total else ""
        line = f"\r{self.label} [{'#' * filled}{'.' * (width - filled)}] {p.done}/{p.total} tensors{size}{eta_text}"
        self.stream.write(line + "\x1b[K")  # clear what a longer previous line left
        self._drawn = p.done < p.total
        if not self._drawn:
            self.stream.write("\n")
        self.stream.flush()

    def clear(self) -> None:
        """Erase an unfinished bar, so an error message that follows starts its own line."""
        if self._drawn:
            self.stream.write("\r\x1b[K")
            self.stream.flush()
            self._drawn = False
