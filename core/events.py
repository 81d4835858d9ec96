"""A tiny event emitter for Qt-free models (napari's model layer in miniature).

Models in ``core`` announce changes through :class:`Event` objects; the app's
views connect to them and update themselves. Nothing here knows about Qt or
threads: callbacks run synchronously in the thread that calls :meth:`Event.emit`
(the app only changes its models on the GUI thread).
"""

from __future__ import annotations

from typing import Any, Callable

Callback = Callable[..., Any]


class Event:
    """One kind of change; ``connect`` a callback, ``emit`` to call them all in order."""

    def __init__(self, name: str) -> None:
        self.name = name
        self._callbacks: list[Callback] = []
        self._blocked = 0

    def connect(self, callback: Callback) -> Callback:
        if callback not in self._callbacks:
            self._callbacks.append(callback)
        return callback

    def disconnect(self, callback: Callback) -> None:
        if callback in self._callbacks:
            self._callbacks.remove(callback)

    def emit(self, *args: Any, **kwargs: Any) -> None:
        if self._blocked:
            return
        for callback in list(self._callbacks):
            callback(*args, **kwargs)

    def blocked(self) -> "_Blocker":
        """``with event.blocked(): ...`` suppresses emissions inside the block."""
        return _Blocker(self)


class _Blocker:
    def __init__(self, event: Event) -> None:
        self.event = event

    def __enter__(self) -> Event:
        self.event._blocked += 1
        return self.event

    def __exit__(self, *exc: Any) -> None:
        self.event._blocked -= 1
