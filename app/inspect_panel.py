"""The Inspect panel: attention maps, token counts and weight differences of library models.

Three sub-tabs, each a thin view over an engine module of :mod:`core.inspect`:

* **Attention** -- text models (:func:`core.inspect.attention.iter_text_attention`):
  an ``[N, N]`` heat map with the tokens as tick labels, per layer or the mean of all
  captured layers, per head or the mean/max of heads; vision transformers
  (:func:`~core.inspect.attention.iter_vision_attention`): the class token's attention
  or the rollout over the picture, with the merged-token groups outlined when token
  merging is on; diffusers pipelines (:func:`core.inspect.cross_attention.iter_cross_attention`):
  the generated image with one prompt token's cross-attention map (DAAM).
* **Tokens** -- :func:`core.inspect.tokenizers.compare_tokenizers` for the checked models
  (table + the pieces, the part past the model's limit in red) and
  :func:`~core.inspect.tokenizers.token_premium` over the parallel texts.
* **Weights** -- :func:`core.inspect.weights.iter_weight_diff`: layers x modules for a
  metric and a model; clicking a cell lists that tensor's figures.

Every capture, count and comparison runs in a :class:`~app.workers.GeneratorWorker`;
the GUI thread only draws results. A failure is one sentence in the sub-tab's problem
label (and the panel's ``problem`` signal) and the tab stays usable. Every result is
kept in the session (``store.add_inspection``); maps go to ``.npz`` files in the
session's inspection folder, and the "Earlier results" list reloads them.
No torch at module level: the engine modules load inside the workers.

The sub-tabs live in ``app/inspect_attention.py``, ``app/inspect_tokens.py`` and
``app/inspect_weights.py``; what they share (the tab frame with its worker, progress,
Stop and earlier results; the layers field; constants) in ``app/inspect_common.py``.
"""

from __future__ import annotations

from typing import Any, Optional

from PySide6.QtCore import Signal
from PySide6.QtWidgets import QTabWidget, QVBoxLayout, QWidget

from app.inspect_attention import AttentionTab
from app.inspect_common import InspectTab
from app.inspect_tokens import TokensTab
from app.inspect_weights import WeightsTab


class InspectPanel(QWidget):
    """The Inspect tab of the workspace: Attention, Tokens and Weights sub-tabs.

    ``library``: the window's ModelLibrary (``.models``, ``.events.models_changed``);
    ``sessions``: the SessionController (``.store``, ``.session``; ``sessionChanged``
    refreshes the earlier-results lists when present).
    """

    problem = Signal(str)

    def __init__(self, library: Any, sessions: Any, parent: Optional[QWidget] = None) -> None:
        super().__init__(parent)
        self.library = library
        self.sessions = sessions
        self.file_counter = 0
        self.attention = AttentionTab(self)
        self.tokens = TokensTab(self)
        self.weights = WeightsTab(self)
        self.tabs = QTabWidget()
        self.tabs.addTab(self.attention, "Attention")
        self.tabs.addTab(self.tokens, "Tokens")
        self.tabs.addTab(self.weights, "Weights")
        for tab in self.sub_tabs():
            tab.problem.connect(self.problem.emit)
        layout = QVBoxLayout(self)
        layout.setContentsMargins(0, 0, 0, 0)
        layout.addWidget(self.tabs)
        events = getattr(library, "events", None)
        if events is not None and hasattr(events, "models_changed"):
            callback = self.fill_models
            events.models_changed.connect(callback)
            # The library is a plain-Python model that may outlive the panel: stop calling a deleted widget.
            self.destroyed.connect(lambda *_: events.models_changed.disconnect(callback))
        changed = getattr(sessions, "sessionChanged", None)
        if changed is not None:
            changed.connect(self.refresh_earlier)
        self.refresh_earlier()

    def sub_tabs(self) -> list[InspectTab]:
        return [self.attention, self.tokens, self.weights]

    def models(self) -> list[Any]:
        return sorted(getattr(self.library, "models", []) or [], key=lambda m: m.name.lower())

    def store(self) -> Any:
        return getattr(self.sessions, "store", None)

    def fill_models(self, *args: Any) -> None:
        for tab in self.sub_tabs():
            tab.fill_models()

    def refresh_earlier(self) -> None:
        for tab in self.sub_tabs():
            tab.refresh_earlier()

    def idle(self) -> bool:
        return all(tab.idle() for tab in self.sub_tabs())

    def stop(self) -> None:
        for tab in self.sub_tabs():
            tab.stop()

