"""Helpers of the store's token runs: strict JSON encoding and the folders of the view images.

Standard library only (the store calls these before and after its transactions).

JSON: options and figures are JSON objects. A value JSON cannot hold exactly (a
tensor, NaN, a key that is not a string) is refused with one sentence naming
where it is (``options['r'][1]``), never converted silently. Tuples are JSON
arrays: they come back as lists.

Folders: each session's view images live in ``<views root>/session-<id>``; the
views root is ``token-views`` beside the database file (for the app's database,
``core.paths.home() / "token-views"``), or a temporary folder for an in-memory
store. A folder is removed by renaming it aside first, so a folder that is half
deleted never keeps a session's name.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import sys
from pathlib import Path
from typing import Any, Optional, Sequence

from core.sessions.records import StoreError

VIEWS_FOLDER = "token-views"


def json_text(value: Any, what: str, record: str = "token run") -> str:
    """``value`` (a dict) as JSON text; StoreError naming the first value JSON cannot hold."""
    if not isinstance(value, dict):
        raise StoreError(f"The {what} of a {record} must be a JSON object (a dict), not {type(value).__name__}.")
    problem = _first_problem(value, what)
    if problem is not None:
        raise StoreError(f"The {what} of the {record} cannot be saved as JSON: {problem}.")
    return json.dumps(value, allow_nan=False)


def _first_problem(value: Any, where: str) -> Optional[str]:
    if value is None or isinstance(value, (str, bool, int)):
        return None
    if isinstance(value, float):
        return None if math.isfinite(value) else f"{where} is {value!r} (NaN and infinity are not JSON numbers)"
    if isinstance(value, dict):
        for key, item in value.items():
            if not isinstance(key, str):
                return f"{where} has the key {key!r}, which is not a string"
            problem = _first_problem(item, f"{where}[{key!r}]")
            if problem is not None:
                return problem
        return None
    if isinstance(value, (list, tuple)):
        for index, item in enumerate(value):
            problem = _first_problem(item, f"{where}[{index}]")
            if problem is not None:
                return problem
        return None
    return f"{where} is of type {type(value).__name__}, which JSON cannot store"


def image_paths(images: Any, record: str = "token run") -> list[str]:
    """The image (or file) paths as strings; StoreError for anything but a sequence of non-empty paths."""
    what = "images" if record == "token run" else "files"
    if isinstance(images, (str, bytes, os.PathLike)) or not isinstance(images, Sequence):
        raise StoreError(f"The {what} of a {record} must be a list of paths, not {type(images).__name__}.")
    paths = []
    for index, image in enumerate(images):
        if not isinstance(image, (str, os.PathLike)) or not os.fspath(image).strip():
            raise StoreError(f"{what[:-1].capitalize()} {index} of the {record} must be a path, not {image!r}.")
        paths.append(os.fspath(image))
    return paths


def session_folder(root: Path, session_id: int) -> Path:
    return root / f"session-{session_id}"


def free_name(candidate: Path) -> Path:
    """``candidate`` or ``candidate-2``, ``-3``... (the first name not taken)."""
    name, n = candidate, 1
    while name.exists():
        n += 1
        name = candidate.with_name(f"{candidate.name}-{n}")
    return name


def move_aside(folder: Path, suffix: str, what: str) -> Optional[Path]:
    """Rename ``folder`` to ``<folder><suffix>`` (a free name); None if there is no such folder."""
    if not folder.exists():
        return None
    target = free_name(folder.with_name(folder.name + suffix))
    try:
        os.replace(folder, target)
    except OSError as exc:
        raise StoreError(f"The folder {folder} of {what} could not be renamed ({exc.strerror or exc}).") from None
    return target


def move_back(aside: Optional[Path], folder: Path) -> None:
    """Undo :func:`move_aside` (best effort: the caller is already failing with its own error)."""
    if aside is not None:
        try:
            os.replace(aside, folder)
        except OSError:
            pass


def remove_tree(folder: Optional[Path], what: str) -> None:
    """Remove ``folder`` and what it holds; StoreError (naming it) if something stays behind."""
    if folder is None:
        return
    errors: list[str] = []

    def failed(_function: Any, path: str, exc: Any) -> None:
        exc = exc[1] if isinstance(exc, tuple) else exc  # onerror gives exc_info, onexc the exception
        errors.append(f"{path}: {getattr(exc, 'strerror', None) or exc}")

    if sys.version_info >= (3, 12):
        shutil.rmtree(folder, onexc=failed)
    else:  # pragma: no cover - Python 3.11
        shutil.rmtree(folder, onerror=failed)
    if errors or folder.exists():
        detail = errors[0] if errors else "it is still there"
        raise StoreError(f"{what} was deleted, but its folder {folder} could not be removed ({detail}).")


def inside(path: str, folder: Path) -> bool:
    """True if ``path`` lies inside ``folder`` (both resolved: links and ``..`` cannot escape)."""
    try:
        Path(path).resolve().relative_to(folder.resolve())
    except (ValueError, OSError):
        return False
    return True
