"""Find models referenced by name: local paths first, then the Hugging Face cache.

Nothing is downloaded: a name that is not on disk is an error that says where
it was looked for.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Optional

from core.errors import ModelError


def hf_cache_dir() -> Path:
    """The Hugging Face hub cache folder (HF_HUB_CACHE, HF_HOME or the default)."""
    if os.environ.get("HF_HUB_CACHE"):
        return Path(os.environ["HF_HUB_CACHE"]).expanduser()
    home = Path(os.environ.get("HF_HOME", Path.home() / ".cache" / "huggingface")).expanduser()
    return home / "hub"


def find_in_hf_cache(repo_id: str, revision: str = "main") -> Optional[Path]:
    """The snapshot folder of ``repo_id`` in the local cache, or None."""
    folder = hf_cache_dir() / ("models--" + repo_id.replace("/", "--"))
    if not folder.is_dir():
        return None
    ref = folder / "refs" / revision
    snapshots = folder / "snapshots"
    if ref.is_file():
        snap = snapshots / ref.read_text().strip()
        if snap.is_dir():
            return snap
    if (snapshots / revision).is_dir():
        return snapshots / revision
    candidates = sorted(snapshots.glob("*"), key=lambda p: p.stat().st_mtime) if snapshots.is_dir() else []
    return candidates[-1] if candidates else None


def resolve_model(ref: str, recipe_dir: Optional[Path] = None) -> Path:
    """Turn a recipe's model reference into a path on disk.

    Order: the path as given (relative to the current folder, as mergekit
    does), then relative to the recipe's folder, then ``org/name[@revision]``
    in the Hugging Face cache.
    """
    path = Path(ref).expanduser()
    if path.exists():
        return path
    if recipe_dir is not None and not path.is_absolute() and (recipe_dir / path).exists():
        return recipe_dir / path
    name, _, revision = ref.partition("@")
    if not path.is_absolute() and name.count("/") == 1:
        cached = find_in_hf_cache(name, revision or "main")
        if cached is not None:
            return cached
    raise ModelError(
        f"Model '{ref}' was not found: no such file or folder, and not in the Hugging Face cache ({hf_cache_dir()})."
    )
