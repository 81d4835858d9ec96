"""Merge a recipe into memory, for trying it out before writing it to disk.

The same engine as ``core.merge.run``: the recipe is planned by
:func:`core.merge.plan.plan_merge` (every check, from headers) and each output
tensor is read and computed by the executor's per-tensor ``_load`` / ``_compute``,
so a tensor merged here is bit-identical to the one ``core.merge.run`` writes.
Instead of going to shards, the results are kept in a state dict. Nothing is
written to disk.

Holding the whole merged model in memory is the point here, so the merge is
refused (one sentence) when its estimated size is larger than the memory
available (psutil, else /proc/meminfo) or than ``max_bytes``.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Generator, Optional, Union

from core.errors import MergeStudioError
from core.jobs import CancelToken, Progress, drive

if TYPE_CHECKING:  # pragma: no cover
    from torch import Tensor

    from core.merge.plan import MergePlan
    from core.merge.recipe import Recipe

RecipeLike = Union[str, Path, dict, "Recipe"]


@dataclass
class InMemoryMerge:
    """A merged model held in memory.

    state: output tensor name -> tensor (CPU), exactly as ``core.merge.run`` would write them.
    folder: the model whose config.json (and, by default, tokenizer) the merge uses.
    tokenizer_folder: the model whose tokenizer the merge uses (``tokenizer_source``).
    config: the merged model's config.json as a dict (layer count and dtype adjusted).
    chat_template: the recipe's ``chat_template`` resolved to Jinja text, or None.
    """

    state: dict[str, "Tensor"]
    folder: Path
    tokenizer_folder: Optional[Path]
    config: Optional[dict[str, Any]]
    chat_template: Optional[str] = None
    bytes: int = 0
    seconds: float = 0.0
    notes: list[str] = field(default_factory=list)


def describe(recipe: RecipeLike) -> str:
    """A short name for a recipe in messages: its file, or 'the recipe'."""
    if isinstance(recipe, (str, Path)):
        return f"Recipe {recipe}"
    path = getattr(recipe, "source_path", None)
    return f"Recipe {path}" if path else "The recipe"


def as_recipe(recipe: RecipeLike) -> "Recipe":
    """A Recipe from a YAML path, a mergekit-style dict, or a Recipe."""
    from core.merge.recipe import Recipe, load_recipe, recipe_from_dict

    if isinstance(recipe, Recipe):
        return recipe
    if isinstance(recipe, dict):
        return recipe_from_dict(recipe)
    if isinstance(recipe, (str, Path)):
        return load_recipe(recipe)
    raise MergeStudioError(f"recipe: expected a YAML path or a mapping, got {type(recipe).__name__}.")


def available_memory() -> Optional[int]:
    """Bytes of memory available to a new allocation (psutil, else /proc/meminfo), or None if unknown."""
    try:
        import psutil

        return int(psutil.virtual_memory().available)
    except ImportError:
        pass
    try:
        with open("/proc/meminfo", encoding="ascii") as fh:
            for line in fh:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024  # reported in kB
    except (OSError, ValueError, IndexError):
        pass
    return None


def needed_bytes(plan: "MergePlan") -> int:
    """Estimated memory of an in-memory merge: every output tensor plus the executor's working peak."""
    return plan.output_bytes + plan.peak_memory_bytes


def check_memory(plan: "MergePlan", where: str, max_bytes: Optional[int] = None) -> list[str]:
    """Refuse (MergeStudioError) when the merge will not fit; returns notes (e.g. memory unknown)."""
    need = needed_bytes(plan)
    if max_bytes is not None and need > max_bytes:
        raise MergeStudioError(
            f"{where}: the merged model needs about {size_text(need)} in memory, more than the limit of "
            f"{size_text(max_bytes)} (max_bytes); merge it to disk with `mergestudio merge` instead."
        )
    free = available_memory()
    if free is None:
        return ["Available memory is unknown on this system (no psutil, no /proc/meminfo); it was not checked."]
    if need > free:
        raise MergeStudioError(
            f"{where}: the merged model needs about {size_text(need)} in memory but only {size_text(free)} is available; "
            "merge it to disk with `mergestudio merge` instead."
        )
    return []


def iter_merge_in_memory(
    recipe: RecipeLike,
    *,
    device: str = "cpu",
    max_bytes: Optional[int] = None,
    seed: int = 0,
    allow_pickle: bool = False,
) -> Generator[Progress, None, InMemoryMerge]:
    """Merge ``recipe`` tensor by tensor into memory, yielding Progress after each tensor.

    Close the generator to cancel (the partial state is dropped). ``seed`` is
    the random methods' seed (DARE, DELLA), as in ``core.merge.run``.
    """
    from core.merge.executor import CHATML_TEMPLATE, _compute, _load, _read_template, resolve_device
    from core.merge.plan import plan_merge

    where = describe(recipe)
    parsed = as_recipe(recipe)
    dev = resolve_device(device)
    plan = plan_merge(parsed, allow_pickle=allow_pickle)
    try:
        notes = list(plan.notes) + check_memory(plan, where, max_bytes)
        started = time.monotonic()
        state: dict[str, "Tensor"] = {}
        done = 0
        for i, op in enumerate(plan.ops):
            inputs = _load(plan, op, dev)
            state[op.out_name] = _compute(plan, op, inputs, seed)  # always on the CPU
            del inputs
            done += op.out_bytes
            yield Progress(i + 1, len(plan.ops), done, plan.output_bytes, time.monotonic() - started, op.out_name)
        config_src = plan.models[plan.config_model or 0].source
        tok_folder = plan.models[plan.tokenizer_model].source.path if plan.tokenizer_model is not None else None
        template = parsed.chat_template
        if template == "chatml":
            template = CHATML_TEMPLATE
        elif template == "auto":
            template = _read_template(config_src.path / "tokenizer_config.json")
        return InMemoryMerge(
            state=state,
            folder=config_src.path,
            tokenizer_folder=tok_folder,
            config=plan.config,
            chat_template=template,
            bytes=done,
            seconds=time.monotonic() - started,
            notes=notes,
        )
    finally:
        plan.close()


def merge_in_memory(
    recipe: RecipeLike,
    *,
    device: str = "cpu",
    max_bytes: Optional[int] = None,
    seed: int = 0,
    cancel: Optional[CancelToken] = None,
) -> tuple[dict[str, "Tensor"], Path]:
    """Merge ``recipe`` (YAML path or dict) into memory; return (state dict, folder of its config/tokenizer).

    Raises MergeStudioError when the recipe is invalid, when the merged model
    would not fit in memory (or in ``max_bytes``), or CancelledError on ``cancel``.
    """
    merged = drive(iter_merge_in_memory(recipe, device=device, max_bytes=max_bytes, seed=seed), cancel=cancel)
    return merged.state, merged.folder


def size_text(n: int) -> str:
    """``1.23 GB``, or ``4.6 MB`` below a tenth of a gigabyte (a tiny model is not "0.00 GB")."""
    return f"{n / 1e9:.2f} GB" if n >= 1e8 else f"{n / 1e6:.1f} MB"
