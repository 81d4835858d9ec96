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
    lines += _sd_lines(plan)
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


def _sd_lines(plan: "MergePlan") -> list[str]:
    """Stable Diffusion merges: the architecture, A1111 options and the block weights applied."""
    hooks = getattr(plan, "hooks", None)
    if hooks is None or not hooks.is_sd:
        return []
    first = plan.models[0].sd
    lines = ["", "## Stable Diffusion", "", f"Architecture: {first.describe() if first else hooks.kind}."]
    if hooks.inpainting_merge:
        lines.append(
            f"Model A's {hooks.out_channels}-channel first convolution: its first 4 input channels are merged, "
            "the others copied from A (A1111's inpainting merge)."
        )
    if hooks.vae_ref:
        lines.append(f"VAE baked in: `{hooks.vae_ref}`.")
    if hooks.drop:
        lines.append("Tensors left out (regular expressions): " + ", ".join(f"`{p}`" for p in hooks.drop) + ".")
    if hooks.ema != "keep":
        lines.append("EMA copies left out." if hooks.ema == "drop" else "EMA weights written in place of the UNet's.")
    table = plan.block_weights
    if table:
        lines += ["", "## Block weights", "", "The per-block values applied (also in the metadata key "
                  "`mergestudio_block_weights`):", ""]
        columns = [(name, values) for name, values in table["parameters"].items()]
        for ref, params in table["models"].items():
            columns += [(f"{name} ({ref})", values) for name, values in params.items()]
        lines.append("| block | " + " | ".join(name for name, _ in columns) + " |")
        lines.append("|---|" + "---|" * len(columns))
        for block in table["blocks"]:
            cells = [_cell(values.get(block)) for _, values in columns]
            lines.append(f"| {block} | " + " | ".join(cells) + " |")
    return lines


def _cell(value) -> str:
    if isinstance(value, list):
        return ", ".join(_cell(v) for v in value)
    if isinstance(value, float):
        return f"{value:g}"
    return "" if value is None else str(value)
