"""The model card (README.md) written next to a merged model."""

from __future__ import annotations

from typing import TYPE_CHECKING

import yaml

if TYPE_CHECKING:  # pragma: no cover
    from core.merge.plan import MergePlan


def model_card(plan: "MergePlan") -> str:
    """Front matter for the Hub, then the method, the models and the recipe."""
    method = plan.method
    base = plan.recipe.base_model
    refs = plan.recipe.model_refs()  # the merged models (not a separate tokenizer source)
    library = None
    if plan.config is not None:
        library = "diffusers" if plan.models[plan.config_model or 0].source.kind == "diffusers" else "transformers"
    front = {
        "base_model": refs,
        "library_name": library,
        "tags": ["merge", "mergestudio"],
    }
    front = {k: v for k, v in front.items() if v is not None}
    named = f"[{method.display_name}]({method.paper})" if method.paper else method.display_name
    lines = [
        "---",
        yaml.safe_dump(front, sort_keys=False).rstrip(),
        "---",
        "",
        "# Merged model",
        "",
        f"This model was merged with [Merge Studio](https://pypi.org/project/mergestudio/) "
        f"using the {named} method.",
        "",
        "## Models",
        "",
    ]
    if base:
        lines.append(f"Base model: `{base}`")
        lines.append("")
        lines.append("Merged into it:")
        lines.append("")
    for ref in refs:
        if ref != base:
            lines.append(f"* `{ref}`")
    lines += [
        "",
        "## Recipe",
        "",
        "The recipe below is in mergekit's YAML format; `mergestudio merge` and `mergekit-yaml` both read it.",
        "",
        "```yaml",
        plan.recipe.to_yaml().rstrip(),
        "```",
        "",
    ]
    return "\n".join(lines)
