"""The live preflight of the recipe editor: check a recipe and say what a merge would need.

:func:`preflight` runs :func:`core.merge.check` (configs and headers only) and
turns the outcome into a :class:`PreflightReport` the app can show as is: the
problem sentence and the models it names, or the plan's figures with a warning
when the merge would not fit in the free memory or on the disk.
"""

from __future__ import annotations

import re
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

from core.errors import MergeStudioError
from core.merge.recipe import Recipe


@dataclass
class PreflightReport:
    ok: bool
    problem: Optional[str] = None  # one sentence when not ok
    problem_refs: list[str] = field(default_factory=list)  # recipe model refs the problem names
    text: str = ""  # the plan report (as `mergestudio check` prints it)
    summary: dict[str, Any] = field(default_factory=dict)
    warnings: list[str] = field(default_factory=list)  # memory / disk warnings
    layer_count: Optional[int] = None
    filters: tuple[tuple[str, ...], tuple[str, ...]] = (("self_attn",), ("mlp",))
    models: dict[str, dict[str, Any]] = field(default_factory=dict)  # ref -> path, architecture, header_hash


def preflight(
    recipe: Recipe, output: Optional[Path] = None, *, overwrite: bool = False, allow_pickle: bool = False
) -> PreflightReport:
    """Check ``recipe`` (and the output folder, when given) without reading any weight."""
    import core.merge as merge
    from core.cli import format_plan, plan_summary

    try:
        plan = merge.check(recipe, allow_pickle=allow_pickle, output=output)
    except MergeStudioError as exc:
        message = " ".join(str(exc).split())
        return PreflightReport(False, message, _refs_named(recipe, message), filters=_filters_of_recipe(recipe))
    try:
        if output is not None:
            _check_output_folder(Path(output), overwrite)
        summary = plan_summary(plan, output)
        report = PreflightReport(True, text=format_plan(plan, "", output), summary=summary)
        report.warnings = _resource_warnings(summary, output)
        counts = [m.layout.count for m in plan.models if m.layout.count]
        report.layer_count = counts[0] if counts else None
        report.filters = _filters(plan)
        report.models = _model_facts(plan)
        return report
    except MergeStudioError as exc:
        message = " ".join(str(exc).split())
        return PreflightReport(False, message, _refs_named(recipe, message), filters=_filters(plan))
    finally:
        plan.close()


def _check_output_folder(output: Path, overwrite: bool) -> None:
    """The checks the writer makes first (so the editor shows them before Merge is pressed)."""
    from core.io.writer import AtomicOutput

    try:
        AtomicOutput(output, overwrite=overwrite).check()
    except MergeStudioError as exc:
        text = str(exc).replace("pass --overwrite to replace it", "tick 'Replace existing output' to replace it")
        raise MergeStudioError(text) from None


def _refs_named(recipe: Recipe, message: str) -> list[str]:
    """The refs the message names: the ref itself, or a path ending in its folder name.

    A name must stand whole ('mistral-7b' is not named by '/x/mistral-7b-instruct'),
    so a sentence about one model never marks another whose name it merely contains.
    """
    named = []
    for ref in recipe.model_refs():
        name = Path(ref).name
        if _mentions(message, ref) or (name and _mentions(message, "/" + name)):
            named.append(ref)
    return named


def _mentions(message: str, text: str) -> bool:
    """``text`` occurs in ``message`` not glued to more name characters (a final '.' ends a sentence).

    Text starting with '/' may end a longer path; other text must start a word.
    """
    before = "" if text.startswith("/") else r"(?<![\w.\-])"
    return re.search(before + re.escape(text) + r"(?![\w\-]|\.[\w\-])", message) is not None


def _resource_warnings(summary: dict[str, Any], output: Optional[Path]) -> list[str]:
    warnings = []
    try:
        import psutil

        available = psutil.virtual_memory().available
    except Exception:  # psutil is a dependency; a sandbox may still refuse the query
        available = None
    peak = summary["peak_memory_bytes"]
    if available is not None and peak > available:
        warnings.append(
            f"This merge needs about {peak / 1e9:.2f} GB of memory but only {available / 1e9:.2f} GB is free: "
            "close other programs or it may be stopped by the system."
        )
    if output is not None:
        parent = Path(output).absolute().parent
        if parent.exists():
            free = shutil.disk_usage(parent).free
            if summary["output_bytes"] > 0.9 * free:
                warnings.append(
                    f"The output ({summary['output_bytes'] / 1e9:.2f} GB) would nearly fill the disk at {parent} "
                    f"({free / 1e9:.2f} GB free)."
                )
    return warnings


def _filters(plan: Any) -> tuple[tuple[str, ...], tuple[str, ...]]:
    try:
        from core.merge.curves import detect_filters
    except ImportError:  # pragma: no cover - curves ship with the engine
        return (("self_attn",), ("mlp",))
    names = list(plan.models[0].source.tensors) if plan.models else []
    return detect_filters(names)


def _filters_of_recipe(recipe: Recipe) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """Attention/MLP filter names from the first model that opens, when the check itself failed.

    The curve editor needs them to write filters that match the model's tensors
    even while the recipe has a problem elsewhere (an output folder that exists).
    """
    from core.io.catalog import resolve_model
    from core.io.formats import open_model
    from core.merge.curves import detect_filters

    recipe_dir = recipe.source_path.parent if recipe.source_path else None
    for ref in recipe.model_refs():
        try:
            source = open_model(resolve_model(ref, recipe_dir))
        except MergeStudioError:
            continue
        try:
            return detect_filters(list(source.tensors))
        finally:
            source.close()
    return (("self_attn",), ("mlp",))


def _model_facts(plan: Any) -> dict[str, dict[str, Any]]:
    facts: dict[str, dict[str, Any]] = {}
    try:
        from core.io.catalog import header_hash
    except ImportError:  # pragma: no cover
        header_hash = None  # type: ignore[assignment]
    for m in plan.models:
        config = m.source.config or {}
        arch = (config.get("architectures") or [None])[0] or config.get("model_type") or m.source.kind
        digest = None
        if header_hash is not None:
            try:
                digest = header_hash(m.source.path)
            except MergeStudioError:
                digest = None
        facts[m.ref] = {"path": str(m.source.path), "architecture": arch, "header_hash": digest, "layers": m.layout.count}
    return facts
