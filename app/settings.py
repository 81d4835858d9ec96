"""The app's settings (window layout, theme, library folders) in MERGESTUDIO_HOME/settings.ini."""

from __future__ import annotations

from typing import Any

from PySide6.QtCore import QSettings

from core.paths import settings_file


def settings() -> QSettings:
    """A QSettings over the INI file under MERGESTUDIO_HOME (read anew: tests change the home)."""
    return QSettings(str(settings_file()), QSettings.Format.IniFormat)


def get_list(key: str) -> list[str]:
    value: Any = settings().value(key, [])
    if value is None:
        return []
    if isinstance(value, str):
        return [value] if value else []
    return [str(v) for v in value]


def set_value(key: str, value: Any) -> None:
    s = settings()
    s.setValue(key, value)
    s.sync()
