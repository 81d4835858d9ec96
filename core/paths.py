"""Where Merge Studio keeps its files.

``MERGESTUDIO_HOME`` overrides everything (tests always set it); otherwise the
platform's user data folder (platformdirs). Read on every call, so a test or a
notebook can change it at run time.
"""

from __future__ import annotations

import os
from pathlib import Path


def home() -> Path:
    """The folder for the database, cache and settings (created if missing)."""
    override = os.environ.get("MERGESTUDIO_HOME")
    if override:
        path = Path(override).expanduser()
    else:
        from platformdirs import user_data_dir

        path = Path(user_data_dir("mergestudio", appauthor=False))
    path.mkdir(parents=True, exist_ok=True)
    return path


def settings_file() -> Path:
    """The app's settings file (QSettings in INI format)."""
    return home() / "settings.ini"


def cache_dir() -> Path:
    path = home() / "cache"
    path.mkdir(parents=True, exist_ok=True)
    return path
