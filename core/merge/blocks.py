"""Block weights for Stable Diffusion: which block each tensor is in, and per-block values.

Block names follow A1111's merge-block-weighted extension and supermerger:

* SD 1.x / 2.x: ``BASE``, ``IN00``–``IN11``, ``M00``, ``OUT00``–``OUT11``;
* SDXL: ``BASE``, ``IN00``–``IN08``, ``M00``, ``OUT00``–``OUT08``, ``TE1`` (CLIP-L),
  ``TE2`` (OpenCLIP-G);
* both: ``VAE``.

Original (single-file) names: ``model.diffusion_model.input_blocks.i`` -> INii,
``middle_block`` -> M00, ``output_blocks.i`` -> OUTii. The UNet's other tensors
go where the published block-weight tools put them: the timestep embedding
``time_embed``, which runs before the input blocks, -> IN00 (merge-block-weighted);
the final norm and convolution ``out.0`` / ``out.2``, after the output blocks,
-> the last output block (OUT11 for SD 1.x/2.x, OUT08 for SDXL; merge-block-weighted
and supermerger). SDXL's ``label_emb`` (the pooled-text and size embedding)
follows ``time_embed`` into IN00, the same rule as SD 1.x/2.x's timestep
embedding; this is our rule: supermerger leaves SDXL's ``time_embed`` and
``label_emb`` unmerged (model A's), we merge them with IN00's value.
BASE is the text encoder (SD 1.x/2.x ``cond_stage_model``; SDXL:
``conditioner.embedders.0`` -> TE1, ``.1`` -> TE2, which take BASE's value unless
named) and the non-weights outside the UNet (noise-schedule buffers, EMA
counters); ``first_stage_model`` -> VAE; an EMA copy (``model_ema.*``) -> the
block of the weight it shadows.

diffusers names, through the published correspondence (k = layers_per_block + 1,
3 for every SD model): ``conv_in`` -> IN00, ``down_blocks.b.{resnets,attentions}.j``
-> IN(1 + k·b + j), ``down_blocks.b.downsamplers`` -> IN(k·b + k), ``mid_block`` ->
M00, ``up_blocks.b.{resnets,attentions}.j`` -> OUT(k·b + j), ``up_blocks.b.upsamplers``
-> OUT(k·b + k − 1); ``time_embedding``, ``add_embedding`` (SDXL's ``label_emb``),
``class_embedding`` -> IN00; ``conv_norm_out``, ``conv_out`` -> the last OUT block;
``text_encoder`` -> BASE (SDXL: TE1), ``text_encoder_2`` -> TE2, ``vae`` -> VAE.

TE1, TE2 and VAE take BASE's value when a setting does not name them, so by
default everything outside the UNet merges with one value, as A1111 and
merge-block-weighted do; the VAE is rarely merged block-wise, and ``VAE: 0``
keeps model A's.

Recipe forms (any numeric parameter, global or per model)::

    alpha: {blocks: {BASE: 0.2, IN00: 0.5, OUT11: 0.9}, default: 0.5}
    alpha: {blocks: "0.2,0.5,...", default: 0.5}

The string lists values in the order BASE, IN.., M00, OUT..: 26 values for
SD 1.x / 2.x (supermerger) or 25 without BASE (merge-block-weighted, BASE then
takes ``default``); SDXL 20 or 19. A block the setting does not give takes
``default``, else the value of the next scope out (the recipe's ``parameters:``),
else the parameter's default.
"""

from __future__ import annotations

import difflib
import re
from typing import Any, Iterable, Optional

from core.errors import ModelError, RecipeError
from core.io.sd import DIFFUSERS, EMA_PREFIX, SD1, SD2, SDXL, UNET_PREFIX, VAE_PREFIX, KIND_NAMES, ema_name

BLOCKS_KEY = "blocks"
DEFAULT_KEY = "default"
FALLBACK_TO_BASE = ("TE1", "TE2", "VAE")


def _unet_blocks(n: int) -> tuple[str, ...]:
    return (*(f"IN{i:02d}" for i in range(n)), "M00", *(f"OUT{i:02d}" for i in range(n)))


UNET_BLOCKS = {SD1: _unet_blocks(12), SD2: _unet_blocks(12), SDXL: _unet_blocks(9)}
BLOCK_NAMES = {
    SD1: ("BASE", *UNET_BLOCKS[SD1], "VAE"),
    SD2: ("BASE", *UNET_BLOCKS[SD2], "VAE"),
    SDXL: ("BASE", *UNET_BLOCKS[SDXL], "TE1", "TE2", "VAE"),
}

_LDM_BLOCK = re.compile(r"^(input_blocks|middle_block|output_blocks)\.(\d+)\.")
# Before the input blocks (IN00) and after the output blocks (the last OUT): see the module docstring.
_LDM_EMBEDDINGS = ("time_embed.", "label_emb.")
_DIFFUSERS_EMBEDDINGS = ("time_embedding.", "add_embedding.", "class_embedding.")
_DIFFUSERS_OUT = ("conv_norm_out.", "conv_out.")
_DIFFUSERS_BLOCK = re.compile(r"^(down_blocks|up_blocks)\.(\d+)\.(resnets|attentions|downsamplers|upsamplers)\.(\d+)\.")


def is_block_setting(setting: Any) -> bool:
    """True for ``{blocks: ..., default: ...}``."""
    return isinstance(setting, dict) and BLOCKS_KEY in setting


def string_orders(kind: str) -> dict[int, tuple[str, ...]]:
    """Value count -> block order of the comma-separated form."""
    unet = UNET_BLOCKS[kind]
    return {len(unet) + 1: ("BASE", *unet), len(unet): unet}


def names_text(kind: str) -> str:
    """'BASE, IN00–IN11, M00, OUT00–OUT11, VAE' (SDXL adds TE1, TE2)."""
    n = len(UNET_BLOCKS[kind]) // 2
    extra = ", TE1, TE2" if kind == SDXL else ""
    return f"BASE, IN00–IN{n - 1:02d}, M00, OUT00–OUT{n - 1:02d}{extra}, VAE"


def _last_out(kind: str) -> str:
    """OUT11 (SD 1.x/2.x) or OUT08 (SDXL): where the UNet's final norm and convolution go."""
    n = len(UNET_BLOCKS.get(kind, UNET_BLOCKS[SD1])) // 2
    return f"OUT{n - 1:02d}"


def ldm_block(name: str, kind: str) -> str:
    """The block of an original-layout tensor name (EMA copies: see :class:`BlockMap`)."""
    if name.startswith(UNET_PREFIX):
        inner = name[len(UNET_PREFIX):]
        match = _LDM_BLOCK.match(inner)
        if match is None:
            if inner.startswith(_LDM_EMBEDDINGS):
                return "IN00"
            if inner.startswith("out."):
                return _last_out(kind)
            return "BASE"  # no other UNet tensor exists in SD 1.x/2.x or SDXL
        part, index = match.group(1), int(match.group(2))
        if part == "middle_block":
            return "M00"
        return f"{'IN' if part == 'input_blocks' else 'OUT'}{index:02d}"
    if name.startswith(VAE_PREFIX):
        return "VAE"
    if kind == SDXL and name.startswith("conditioner.embedders.0."):
        return "TE1"
    if kind == SDXL and name.startswith("conditioner.embedders.1."):
        return "TE2"
    return "BASE"


def diffusers_block(name: str, kind: str, layers_per_block: int = 2) -> str:
    """The block of a ``component/tensor`` name of a diffusers pipeline."""
    comp, _, inner = name.partition("/")
    if comp == "vae":
        return "VAE"
    if comp in ("text_encoder", "text_encoder_2"):
        if kind == SDXL:
            return "TE1" if comp == "text_encoder" else "TE2"
        return "BASE"
    if comp != "unet":
        return "BASE"
    if inner.startswith("conv_in."):
        return "IN00"
    if inner.startswith("mid_block."):
        return "M00"
    if inner.startswith(_DIFFUSERS_EMBEDDINGS):
        return "IN00"
    if inner.startswith(_DIFFUSERS_OUT):
        return _last_out(kind)
    match = _DIFFUSERS_BLOCK.match(inner)
    if match is None:
        return "BASE"
    side, b, what, j = match.group(1), int(match.group(2)), match.group(3), int(match.group(4))
    k = layers_per_block + 1
    if side == "down_blocks":
        index = k * b + k if what == "downsamplers" else 1 + k * b + j
        return f"IN{index:02d}"
    index = k * b + k - 1 if what == "upsamplers" else k * b + j
    return f"OUT{index:02d}"


class BlockMap:
    """Block of every tensor of one SD architecture, and per-block values of settings."""

    def __init__(self, kind: str, layout: str, names: Iterable[str], layers_per_block: int = 2) -> None:
        if kind not in BLOCK_NAMES:
            raise ModelError(f"Block weights are not defined for {KIND_NAMES.get(kind, kind)} models.")
        self.kind = kind
        self.layout = layout
        self.names = BLOCK_NAMES[kind]
        self._blocks: dict[str, str] = {}
        self._settings: dict[int, tuple[dict, dict[str, Any], Any]] = {}
        names = list(names)
        if layout == DIFFUSERS:
            for n in names:
                self._blocks[n] = diffusers_block(n, kind, layers_per_block)
        else:
            for n in names:
                self._blocks[n] = ldm_block(n, kind)
            for n in names:  # EMA copies follow the weight they shadow
                if n.startswith(UNET_PREFIX):
                    self._blocks[ema_name(n)] = self._blocks[n]

    def block_of(self, name: str) -> str:
        block = self._blocks.get(name)
        if block is None:
            if self.layout == DIFFUSERS:
                block = diffusers_block(name, self.kind)
            elif name.startswith(EMA_PREFIX):
                block = "BASE"
            else:
                block = ldm_block(name, self.kind)
            self._blocks[name] = block
        return block

    def resolve(self, setting: dict, where: str) -> tuple[dict[str, Any], Any]:
        """``{block: value}`` and the default of a block setting; RecipeError naming ``where``."""
        cached = self._settings.get(id(setting))
        if cached is None or cached[0] is not setting:  # the setting is held, so its id is not reused
            cached = self._settings[id(setting)] = (setting, *self._resolve(setting, where))
        return cached[1], cached[2]

    def _resolve(self, setting: dict, where: str) -> tuple[dict[str, Any], Any]:
        blocks = setting[BLOCKS_KEY]
        default = setting.get(DEFAULT_KEY)
        name = KIND_NAMES[self.kind]
        if isinstance(blocks, str):
            values = parse_block_string(blocks, where)
            orders = string_orders(self.kind)
            if len(values) not in orders:
                counts = sorted(orders, reverse=True)
                raise RecipeError(
                    f"{where}.{BLOCKS_KEY}: {len(values)} values given, but {name} takes {counts[0]} "
                    f"(BASE, {', '.join(_ranges(orders[counts[1]]))}) or {counts[1]} (without BASE)."
                )
            return dict(zip(orders[len(values)], values)), default
        mapping = {}
        for block, value in blocks.items():
            block = str(block)
            if block not in self.names:
                close = difflib.get_close_matches(block.upper(), self.names, n=1, cutoff=0.6)
                hint = f" (did you mean '{close[0]}'?)" if close else ""
                raise RecipeError(
                    f"{where}.{BLOCKS_KEY}: '{block}' is not a block of {name} models{hint}; "
                    f"their blocks are {names_text(self.kind)}."
                )
            mapping[block] = value
        return mapping, default

    def pick(self, setting: dict, tensor_name: str, where: str = "parameters") -> Any:
        """The raw value a block setting gives ``tensor_name`` (None: not set for its block)."""
        mapping, default = self.resolve(setting, where)
        block = self.block_of(tensor_name)
        if block not in self.names:
            raise ModelError(
                f"Tensor '{tensor_name}' lies in block {block}, which {KIND_NAMES[self.kind]} models do not have; "
                "is the model really this kind?"
            )
        if block in mapping:
            return mapping[block]
        if block in FALLBACK_TO_BASE and "BASE" in mapping:
            return mapping["BASE"]
        return default


def _ranges(order: tuple[str, ...]) -> list[str]:
    """('IN00', ..., 'IN11', 'M00', 'OUT00', ...) -> ['IN00–IN11', 'M00', 'OUT00–OUT11']."""
    groups: dict[str, list[str]] = {}
    for block in order:
        groups.setdefault(block.rstrip("0123456789"), []).append(block)
    return [g[0] if len(g) == 1 else f"{g[0]}–{g[-1]}" for g in groups.values()]


def parse_block_string(text: str, where: str) -> list[float]:
    """'0.2, 0.5,1' -> [0.2, 0.5, 1.0]; RecipeError naming the position of a bad value."""
    values = []
    for i, part in enumerate(text.split(",")):
        try:
            values.append(float(part.strip()))
        except ValueError:
            raise RecipeError(f"{where}.{BLOCKS_KEY}: value {i + 1} ({part.strip()!r}) is not a number.") from None
    return values


def check_settings(places: list[tuple[str, dict]], method: Any, block_map: Optional[BlockMap], refusal: str) -> bool:
    """Validate every block setting of a recipe before any weight is read; True if there is one.

    ``places`` are (field path, parameters mapping) pairs. Block settings where
    there are no blocks (``block_map`` None: ``refusal`` says why), on a
    non-numeric parameter, with unknown block names, a wrong count of values or
    out-of-range values are RecipeErrors naming the field.
    """
    found = False
    for where, params in places:
        for name, setting in params.items():
            if not is_block_setting(setting):
                continue
            found = True
            field = f"{where}.{name}"
            param = method.parameter(name)
            if block_map is None:
                raise RecipeError(f"{field}: {refusal}.")
            if param is None:
                continue  # the planner names unknown parameters
            if param.kind not in (int, float):
                raise RecipeError(
                    f"{field}: block weights need a numeric parameter; '{name}' is {param.kind.__name__}."
                )
            mapping, default = block_map.resolve(setting, field)
            for block, value in mapping.items():
                param.validate(value, f"{field}.{BLOCKS_KEY}.{block}")
            if default is not None:
                param.validate(default, f"{field}.{DEFAULT_KEY}")
    return found


def applied_table(plan_ops: list, block_map: BlockMap, refs: list[str], names: set[str]) -> dict[str, Any]:
    """The per-block values the plan applies, for the metadata and the model card.

    ``{"architecture": "sd1", "blocks": [...], "parameters": {name: {block: value}},
    "models": {ref: {name: {block: value}}}}`` for the parameters in ``names``;
    a value that varies inside a block (another filter) is listed as its distinct values.
    """
    seen: dict[str, dict[str, list]] = {}
    per_model: dict[str, dict[str, dict[str, list]]] = {}
    used: list[str] = []
    for op in plan_ops:
        if op.copy:
            continue
        block = block_map.block_of(op.out_name)
        if block not in used:
            used.append(block)
        for name, value in op.params.items():
            if name in names:
                _add(seen.setdefault(name, {}), block, value)
        for (mi, _), values in zip(op.inputs, op.model_params):
            for name, value in values.items():
                if name in names:
                    _add(per_model.setdefault(refs[mi], {}).setdefault(name, {}), block, value)
    order = [b for b in block_map.names if b in used]

    def finish(table: dict[str, list]) -> dict[str, Any]:
        return {b: (table[b][0] if len(table[b]) == 1 else table[b]) for b in order if b in table}

    return {
        "architecture": block_map.kind,
        "blocks": order,
        "parameters": {name: finish(t) for name, t in seen.items()},
        "models": {ref: {name: finish(t) for name, t in params.items()} for ref, params in per_model.items()},
    }


def _add(table: dict[str, list], block: str, value: Any) -> None:
    values = table.setdefault(block, [])
    if value not in values:
        values.append(value)
