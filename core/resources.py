"""Where the files of ``resources/`` are: beside the source tree, or in a frozen build."""

from __future__ import annotations

import sys
from pathlib import Path


def resources_dir() -> Path:
    """The ``resources`` folder (PyInstaller unpacks it under ``sys._MEIPASS``)."""
    frozen = getattr(sys, "_MEIPASS", None)
    if frozen:
        return Path(frozen) / "resources"
    return Path(__file__).resolve().parent.parent / "resources"


def resource(*parts: str) -> Path:
    """A path inside ``resources/`` (not checked for existence)."""
    return resources_dir().joinpath(*parts)
