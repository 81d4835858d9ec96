"""Weight merging: recipes, the method registry, planning and the streaming executor.

Python API::

    from core.merge import load_recipe, check, run
    plan = check("recipe.yaml")              # headers only: problems raise MergeStudioError
    result = run("recipe.yaml", "out/", seed=0, on_progress=print)
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Optional, Union

from core.merge.recipe import Recipe, load_recipe

if TYPE_CHECKING:  # pragma: no cover
    from core.jobs import CancelToken, ProgressCallback
    from core.merge.executor import MergeResult
    from core.merge.plan import MergePlan


def _as_recipe(recipe: Union[Recipe, str, Path]) -> Recipe:
    return recipe if isinstance(recipe, Recipe) else load_recipe(recipe)


def check(
    recipe: Union[Recipe, str, Path], *, allow_pickle: bool = False, output: Optional[Path] = None
) -> "MergePlan":
    """Validate ``recipe`` from configs and headers; return the plan."""
    from core.merge.plan import plan_merge

    return plan_merge(_as_recipe(recipe), allow_pickle=allow_pickle, output=output)


def run(
    recipe: Union[Recipe, str, Path],
    output: Union[str, Path],
    *,
    device: str = "auto",
    seed: int = 0,
    shard_size: Optional[int] = None,
    overwrite: bool = False,
    allow_pickle: bool = False,
    on_progress: Optional["ProgressCallback"] = None,
    cancel: Optional["CancelToken"] = None,
    model_card: bool = True,
    tensor_delay_s: float = 0.0,
) -> "MergeResult":
    """Merge ``recipe`` into the folder ``output`` and return a MergeResult.

    Runs every check first (nothing is read before they pass), streams tensor
    by tensor and writes atomically. ``cancel`` stops it between two tensors
    (raising CancelledError) and leaves no output behind. ``model_card=False``
    skips README.md; ``tensor_delay_s`` sleeps after each tensor (demos, tests).
    """
    from core.io.writer import DEFAULT_SHARD_BYTES
    from core.jobs import drive
    from core.merge.executor import iter_merge

    output = Path(output)
    plan = check(recipe, allow_pickle=allow_pickle, output=output)
    try:
        work = iter_merge(
            plan,
            output,
            device=device,
            seed=seed,
            shard_size=DEFAULT_SHARD_BYTES if shard_size is None else shard_size,
            overwrite=overwrite,
            model_card=model_card,
            tensor_delay_s=tensor_delay_s,
        )
        return drive(work, on_progress, cancel)
    finally:
        plan.close()


__all__ = ["Recipe", "check", "load_recipe", "run"]
