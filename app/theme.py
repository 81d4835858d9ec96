"""Dark and light themes: a Qt style sheet from ``resources/themes`` plus matching plot colours."""

from __future__ import annotations

from PySide6.QtGui import QColor, QPalette
from PySide6.QtWidgets import QApplication

from core.resources import resource

THEMES = ("dark", "light")
# Plot colours per theme (pyqtgraph widgets read these when they are built or the theme changes).
PLOT_COLORS = {
    "dark": {"link": "#7fb8ff", "background": "#15171b", "foreground": "#cfd5dd", "curves": ["#4c9be8", "#f0a35e", "#7ccf7c", "#d67bd6"]},
    "light": {"link": "#1f5fae", "background": "#ffffff", "foreground": "#2b323b", "curves": ["#1f6fc5", "#d9711c", "#2e8b3a", "#9c3fa0"]},
}

_current = "dark"


def current_theme() -> str:
    return _current


def apply_theme(app: QApplication, name: str) -> str:
    """Apply theme ``name`` (unknown names fall back to dark, and say so in the return value)."""
    global _current
    if name not in THEMES:
        name = "dark"
    path = resource("themes", f"{name}.qss")
    app.setStyle("Fusion")
    palette = app.palette()
    palette.setColor(QPalette.ColorRole.Link, QColor(PLOT_COLORS[name]["link"]))
    app.setPalette(palette)
    app.setStyleSheet(path.read_text(encoding="utf-8") if path.is_file() else "")
    _current = name
    return name


def plot_colors() -> dict:
    return PLOT_COLORS[_current]
