"""The planner's Stable Diffusion side: checks, block weights and A1111's merger options.

:func:`prepare` runs after the models are opened (headers only) and before
any operation is planned. It refuses what cannot be merged (core/io/sd.py:
different kinds or layouts, the wrong inpainting direction, parts present in
some models only), validates block settings against the architecture, opens
the VAE to bake in and checks that it fits (its names in the output's layout:
original for single files, diffusers for pipelines), and returns :class:`PlanHooks`,
which the op builder consults per tensor:

* ``skip``: names left out (``drop:`` patterns, EMA copies with ``ema: drop`` or
  ``use``, the models' own VAE when one is baked in);
* ``source``: the input name of an output tensor (the EMA copy with ``ema: use``);
* ``copy_first``: non-weights (noise schedule, position ids, EMA counters),
  copied from the first model that has them, as A1111 keeps model A's;
* ``shape_mismatch_ok``: the first convolution of an inpainting merge;
* ``blocks``: the :class:`BlockMap` that block settings are evaluated with.

A recipe without SD models and without ``drop:`` gets no hooks at all, so the
planner behaves exactly as before for mergekit recipes.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional

from core.errors import ModelError, RecipeError
from core.io import sd
from core.merge.blocks import BLOCK_NAMES, BlockMap, applied_table, check_settings, is_block_setting


@dataclass
class PlanHooks:
    """What the op builder asks per tensor; see the module docstring."""

    kind: Optional[str] = None  # None: not a Stable Diffusion merge (drop: only)
    layout: Optional[str] = None
    drop: list[str] = field(default_factory=list)
    ema: str = "keep"
    blocks: Optional[BlockMap] = None
    uses_blocks: bool = False
    block_params: set[str] = field(default_factory=set)
    inpainting_merge: bool = False
    out_channels: Optional[int] = None  # input channels of the output UNet
    vae_ref: Optional[str] = None
    vae_source: Any = None  # ModelSource of the VAE, added to the plan's models
    vae_index: Optional[int] = None
    vae_map: dict[str, str] = field(default_factory=dict)  # output name -> name in the VAE source
    vae_config: Optional[Path] = None  # diffusers: the VAE's config.json
    block_weights: Optional[dict[str, Any]] = None
    notes: list[str] = field(default_factory=list)
    _patterns: list[re.Pattern] = field(default_factory=list, repr=False)
    _mismatch: tuple[str, ...] = ()

    @property
    def is_sd(self) -> bool:
        return self.kind is not None

    def dropped(self, name: str) -> bool:
        return any(p.search(name) for p in self._patterns)

    def skip(self, name: str) -> bool:
        if self.dropped(name):
            return True
        if self.ema != "keep" and name.startswith(sd.EMA_PREFIX):
            return True
        return bool(self.vae_map) and name in self.vae_map

    def source(self, name: str) -> str:
        if self.ema == "use" and name.startswith(sd.UNET_PREFIX):
            return sd.ema_name(name)
        return name

    def copy_first(self, name: str) -> bool:
        return self.is_sd and self.layout == sd.LDM and sd.is_buffer(name)

    def shape_mismatch_ok(self, name: str) -> bool:
        return name in self._mismatch


def prepare(recipe: Any, method: Any, models: list[Any], open_vae: Callable[[str], Any]) -> Optional[PlanHooks]:
    """Check the SD side of a recipe from headers and return the hooks (None: nothing to do).

    ``models`` are the plan's InputModels (``.ref``, ``.source``, ``.sd``);
    ``open_vae(ref)`` opens the VAE reference as a ModelSource.
    """
    infos = [(m.ref, m.sd) for m in models]
    sd.check_kinds(infos)
    places = recipe.parameter_places()
    is_sd = bool(models) and models[0].sd is not None
    if not is_sd:
        note = f"model '{models[0].ref}' is not one" if models else "there are no models"
        check_settings(places, method, None, f"block weights apply to Stable Diffusion checkpoints only; {note}")
        for key in ("vae", "ema"):
            if getattr(recipe, key) is not None:
                raise RecipeError(f"{key}: applies to Stable Diffusion checkpoints only; {note}.")
        if not recipe.drop:
            return None
        hooks = PlanHooks(drop=list(recipe.drop))
        hooks._patterns = [re.compile(p) for p in hooks.drop]
        _check_patterns(hooks, models)
        return hooks

    first = models[0].sd
    if recipe.slices is not None:
        raise RecipeError("Stable Diffusion checkpoints are merged whole: use 'models:', not 'slices:'.")
    hooks = PlanHooks(kind=first.kind, layout=first.layout, drop=list(recipe.drop or []), ema=recipe.ema or "keep")
    hooks._patterns = [re.compile(p) for p in hooks.drop]
    _check_patterns(hooks, models)
    _check_ema(hooks, models)
    if recipe.vae is not None:
        _prepare_vae(hooks, recipe.vae, models, open_vae)
    hooks.inpainting_merge = sd.check_channels([(m.ref, m.sd) for m in models], method.name)
    if hooks.inpainting_merge:
        hooks._mismatch = sd.conv_in_names(first.layout)
    hooks.out_channels = first.in_channels
    _check_parts(hooks, models)
    if first.kind in BLOCK_NAMES:
        names = [n for m in models for n in m.source.tensors]
        unet = models[0].source.components.get("unet") if first.layout == sd.DIFFUSERS else None
        per_block = (unet.config or {}).get("layers_per_block", 2) if unet is not None else 2
        hooks.blocks = BlockMap(first.kind, first.layout, names, per_block if isinstance(per_block, int) else 2)
        refusal = ""
    else:
        refusal = f"block weights are not defined for {first.kind_name} models"
    hooks.uses_blocks = check_settings(places, method, hooks.blocks, refusal)
    hooks.block_params = {name for _, params in places for name, s in params.items() if is_block_setting(s)}
    return hooks


def _check_patterns(hooks: PlanHooks, models: list[Any]) -> None:
    """Each ``drop:`` pattern must match a tensor: a typo must not pass silently."""
    names = [n for m in models for n in m.source.tensors]
    for text, pattern in zip(hooks.drop, hooks._patterns):
        if not any(pattern.search(n) for n in names):
            raise RecipeError(f"drop: pattern {text!r} matches no tensor of the models.")


def _check_ema(hooks: PlanHooks, models: list[Any]) -> None:
    if hooks.ema == "keep":
        return
    if hooks.layout == sd.DIFFUSERS:
        raise RecipeError(
            f"ema: '{hooks.ema}' applies to single-file checkpoints; diffusers pipelines hold no EMA copies."
        )
    for m in models:
        if "ema" not in m.sd.parts and hooks.ema == "use":
            raise ModelError(f"Model '{m.ref}' has no EMA weights (model_ema.*), which 'ema: use' needs.")
    if not any("ema" in m.sd.parts for m in models):
        raise RecipeError("ema: 'drop' has nothing to drop: no model has EMA weights (model_ema.*).")


def _check_parts(hooks: PlanHooks, models: list[Any]) -> None:
    """A part (UNet, text encoder, VAE, EMA) in some models only cannot be merged: say which and how to go on."""
    present = [
        (m.ref, sd.present_parts([n for n in m.source.tensors if not hooks.skip(n)], hooks.layout, hooks.kind))
        for m in models
    ]
    for part in sd.PARTS:
        have = [ref for ref, parts in present if part in parts]
        if have and len(have) < len(present):
            lacking = next(ref for ref, parts in present if part not in parts)
            hint = {
                "ema": "; add 'ema: drop' to the recipe to leave the EMA copies out (or 'ema: use' to keep only them)",
                "vae": "; bake one VAE into the output with 'vae:', "
                "or leave it out with drop: ['^first_stage_model\\.']",
            }.get(part, "")
            raise ModelError(f"Model '{have[0]}' has {sd.PART_NAMES[part]} but model '{lacking}' has none{hint}.")


def _prepare_vae(hooks: PlanHooks, ref: str, models: list[Any], open_vae: Callable[[str], Any]) -> None:
    """Open the VAE and map each of its tensors onto the model's; a VAE that does not fit is refused."""
    source = open_vae(ref)
    hooks.vae_ref, hooks.vae_source = ref, source
    try:
        _map_vae(hooks, source, models)
    except Exception:
        source.close()
        raise


def _map_vae(hooks: PlanHooks, source: Any, models: list[Any]) -> None:
    names = list(source.tensors)
    if source.kind == "diffusers":
        theirs = {n[len("vae/"):]: n for n in names if n.startswith("vae/")}
        if "vae" in source.components:
            hooks.vae_config = source.components["vae"].path / "config.json"
    elif any(n.startswith(sd.VAE_PREFIX) for n in names):  # a whole checkpoint: its VAE
        theirs = {n[len(sd.VAE_PREFIX):]: n for n in names if n.startswith(sd.VAE_PREFIX)}
    else:  # a VAE file; 'loss.*' is the training discriminator of original .ckpt VAEs, not the VAE
        theirs = {n: n for n in names if not n.startswith("loss.")}
        if source.path.is_dir() and (source.path / "config.json").is_file():
            hooks.vae_config = source.path / "config.json"
    prefix = "vae/" if hooks.layout == sd.DIFFUSERS else sd.VAE_PREFIX
    model = models[0]
    ours = {n: info for n, info in model.source.tensors.items() if n.startswith(prefix)}
    where = f"{source.path}"
    if not theirs:
        raise ModelError(f"{where}: holds no VAE tensors to bake in.")
    _check_vae_layout(where, theirs, hooks.layout, model.ref)
    if not ours:
        if not any(k.startswith("encoder.") for k in theirs) or not any(k.startswith("decoder.") for k in theirs):
            raise ModelError(f"{where}: is not a VAE (no encoder.* and decoder.* tensors).")
        if hooks.layout == sd.DIFFUSERS and (hooks.vae_config is None or not hooks.vae_config.is_file()):
            raise ModelError(
                f"{where}: has no config.json, which a VAE added to the pipeline of model '{model.ref}' needs "
                "(vae/config.json); give the VAE's folder (or a pipeline holding it) instead."
            )
        hooks.notes.append(f"Model '{model.ref}' has no VAE; the one of {source.path.name} is added.")
    for key, name in theirs.items():
        target = prefix + key
        if ours and target not in ours:
            raise ModelError(
                f"{where}: VAE tensor '{key}' has no counterpart '{target}' in model '{model.ref}'; "
                "this VAE does not fit the model."
            )
        if ours and tuple(source.tensors[name].shape) != tuple(ours[target].shape):
            raise ModelError(
                f"{where}: VAE tensor '{key}' has shape {list(source.tensors[name].shape)} but the model's "
                f"'{target}' has {list(ours[target].shape)}; this VAE does not fit the model."
            )
        hooks.vae_map[target] = name
    for target in ours:
        if target not in hooks.vae_map:
            raise ModelError(
                f"{where}: has no tensor '{target[len(prefix):]}' for the model's '{target}'; "
                "this VAE does not fit the model."
            )


# The two namings of the same AutoencoderKL: the original (ldm) one of single-file checkpoints
# (encoder.down.0.block.1, encoder.mid.attn_1, decoder.up.3.upsample) and diffusers'
# (encoder.down_blocks.0.resnets.1, encoder.mid_block.attentions.0, decoder.up_blocks.0.upsamplers.0).
_VAE_MARKERS = {
    sd.LDM: re.compile(r"^(encoder|decoder)\.(down\.\d+\.|up\.\d+\.|mid\.(block_\d+|attn_\d+)\.)"),
    sd.DIFFUSERS: re.compile(r"^(encoder|decoder)\.(down_blocks|up_blocks|mid_block)\."),
}
_VAE_EXAMPLES = {sd.LDM: "encoder.down.0.block.0", sd.DIFFUSERS: "encoder.down_blocks.0.resnets.0"}
_VAE_LAYOUT_NAMES = {sd.LDM: "the original (ldm) VAE names", sd.DIFFUSERS: "diffusers' VAE names"}


def vae_layout(keys: Any) -> Optional[str]:
    """'ldm', 'diffusers' or 'mixed': the naming of VAE tensor names (no prefix); None if they show neither."""
    found = {layout for key in keys for layout, marker in _VAE_MARKERS.items() if marker.match(key)}
    if len(found) == 1:
        return found.pop()
    return None if not found else "mixed"


def _check_vae_layout(where: str, theirs: dict[str, str], layout: Optional[str], ref: str) -> None:
    """Refuse a VAE named in the other layout than the output's: its tensors would be written unloadable."""
    found = vae_layout(theirs)
    if found is None or found == layout:
        return
    if found == "mixed":
        raise ModelError(
            f"{where}: its VAE tensors mix the original (ldm) and diffusers names, so it cannot be baked in."
        )
    needed = layout or sd.LDM
    raise ModelError(
        f"{where}: this VAE uses {_VAE_LAYOUT_NAMES[found]} ({_VAE_EXAMPLES[found]}...) but model '{ref}' is "
        f"{sd.LAYOUT_NAMES[needed]}, which needs {_VAE_LAYOUT_NAMES[needed]} ({_VAE_EXAMPLES[needed]}...); "
        "convert the VAE to that layout first."
    )


def vae_ops(hooks: PlanHooks, models: list[Any], out_override: Optional[str], make_op: Callable) -> list:
    """Copy operations writing the VAE's tensors under the model's names.

    They keep the dtype the model's own VAE tensor would have had in the
    output (the recipe's out_dtype, else the model's), so the file stays uniform.
    """
    ops = []
    model = models[0].source.tensors
    for target, name in hooks.vae_map.items():
        info = hooks.vae_source.tensors[name]
        own = model.get(target)
        out = out_override or (own.dtype if own is not None else info.dtype)
        if not info.dtype.startswith(("F", "BF")) or info.dtype.startswith("F8"):
            out = info.dtype
        ops.append(make_op(target, (hooks.vae_index, name), info, out))
    return ops


def finish(hooks: PlanHooks, ops: list, refs: list[str]) -> None:
    """After planning: the applied block weights (for the metadata and the card)."""
    if hooks.uses_blocks and hooks.blocks is not None:
        hooks.block_weights = applied_table(ops, hooks.blocks, refs, hooks.block_params)


def a1111_recipe_fields(plan: Any, output: Path) -> dict[str, Any]:
    """The fields of A1111's ``sd_merge_recipe`` beyond the model hashes, for this plan."""
    hooks: PlanHooks = plan.hooks
    method = plan.method
    ratio = {"weighted_sum": "alpha", "add_difference": "multiplier"}.get(method.name)
    multiplier = None
    if ratio is not None:
        setting = plan.recipe.parameters.get(ratio, method.parameter(ratio).default)
        if is_block_setting(setting):
            setting = setting.get("default")
        if isinstance(setting, (int, float)) and not isinstance(setting, bool):
            multiplier = float(setting)
    out_dtypes = {op.out_dtype for op in plan.ops if not op.copy}
    name = output.name[: -len(".safetensors")] if output.name.endswith(".safetensors") else output.name
    return {
        "interp_method": sd.INTERP_METHODS.get(method.name, method.display_name),
        "multiplier": multiplier,
        "save_as_half": out_dtypes == {"F16"},
        "custom_name": name,
        "config_source": 0,
        "bake_in_vae": Path(hooks.vae_ref).name if hooks.vae_ref else "None",
        "discard_weights": "|".join(hooks.drop),
        "is_inpainting": hooks.out_channels == 9,
        "is_instruct_pix2pix": hooks.out_channels == 8,
        # ours, beyond A1111's fields:
        "merge_method": method.name,
        "out_dtype": sorted(out_dtypes),
        "ema": hooks.ema,
        "block_weights": hooks.block_weights,
    }
