"""The registry of weight-merge methods.

Each module in this package defines one family and calls :func:`register`.
Modules are imported on first use of the registry; none imports torch at module
level, so listing methods (CLI ``methods``, the GUI's picker) is cheap.
"""

from __future__ import annotations

import difflib
import importlib

from core.errors import RecipeError
from core.merge.methods.base import MergeMethod

_FAMILIES = (
    "linear",
    "slerp",
    "nuslerp",
    "multislerp",
    "karcher",
    "task_arithmetic",
    "sce",
    "model_stock",
    "nearswap",
    "arcee_fusion",
    "ram",
    "passthrough",
    "a1111",
    "widen",
    "mwa",
)

_METHODS: dict[str, MergeMethod] = {}
_loaded = False


def register(method: MergeMethod) -> MergeMethod:
    """Make ``method`` available by name; a duplicate name is a programming error."""
    if method.name in _METHODS:
        raise ValueError(f"merge method {method.name!r} is registered twice")
    _METHODS[method.name] = method
    return method


def _load() -> None:
    global _loaded
    if _loaded:
        return
    _loaded = True
    for family in _FAMILIES:
        importlib.import_module(f"{__name__}.{family}")


def all_methods() -> list[MergeMethod]:
    """Every registered method, in registration order."""
    _load()
    return list(_METHODS.values())


def get(name: str) -> MergeMethod:
    """The method called ``name``; an unknown name suggests the nearest one."""
    _load()
    try:
        return _METHODS[name]
    except KeyError:
        close = difflib.get_close_matches(str(name), list(_METHODS), n=1, cutoff=0.5)
        hint = f" Did you mean '{close[0]}'?" if close else ""
        raise RecipeError(
            f"Unknown merge method '{name}'.{hint} Run 'mergestudio methods' to list them."
        ) from None


__all__ = ["MergeMethod", "all_methods", "get", "register"]
