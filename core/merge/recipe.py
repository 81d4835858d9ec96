"""Merge recipes in mergekit's YAML format, read and written.

A recipe names a method, the models and their parameters, either as a list of
whole models (``models:``) or as layer slices (``slices:``). Parameter values
are scalars, gradients (lists interpolated over the layers of a slice) or
filtered conditions (``[{filter: self_attn, value: ...}, {value: ...}]``, the
first matching filter wins). Evaluation follows mergekit exactly, so a recipe
gives the same numbers in both tools.

Model references are paths (folders or ``.safetensors`` files, relative paths
resolved against the current folder and then the recipe's folder) or Hugging
Face ids found in the local cache.

Beyond mergekit's grammar (so never in a mergekit recipe, whose YAML stays as it
was): block weights for Stable Diffusion, ``{blocks: {BASE: 0.2, IN00: 0.5},
default: 0.5}`` or ``{blocks: "0.2,0.5,...", default: 0.5}`` as the whole value
of any numeric parameter (see core/merge/blocks.py); and three top-level
options of A1111's checkpoint merger: ``vae:`` (a VAE file or folder baked into
a Stable Diffusion output), ``drop:`` (regular expressions, searched in each
tensor name as A1111's "discard weights"; matching tensors are left out of the
output, and a pattern matching no tensor is an error) and ``ema:`` (``keep``,
the default; ``drop`` leaves a checkpoint's EMA copies out; ``use`` writes the
EMA weights in place of the UNet's and leaves the copies out).
"""

from __future__ import annotations

import difflib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, Union

import yaml

from core.errors import RecipeError
from core.io.tensors import mergekit_dtype_name

Scalar = Union[bool, int, float, str]
Setting = Any  # Scalar | list[Scalar] | dict(filter, value) | list[dict]

TOP_LEVEL_KEYS = (
    "merge_method",
    "base_model",
    "models",
    "slices",
    "modules",
    "parameters",
    "dtype",
    "out_dtype",
    "tokenizer_source",
    "tokenizer",
    "chat_template",
    "vae",
    "drop",
    "ema",
)
EMA_MODES = ("keep", "drop", "use")


@dataclass
class ModelEntry:
    """One model of a ``models:`` recipe, or one source of a slice."""

    model: str
    parameters: dict[str, Setting] = field(default_factory=dict)
    layer_range: Optional[tuple[int, int]] = None  # slices only


@dataclass
class SliceEntry:
    sources: list[ModelEntry]
    base_model: Optional[str] = None
    parameters: dict[str, Setting] = field(default_factory=dict)


@dataclass
class Recipe:
    merge_method: str
    base_model: Optional[str] = None
    models: Optional[list[ModelEntry]] = None
    slices: Optional[list[SliceEntry]] = None
    parameters: dict[str, Setting] = field(default_factory=dict)
    dtype: Optional[str] = None
    out_dtype: Optional[str] = None
    tokenizer_source: Optional[str] = None
    tokenizer: Optional[dict[str, Any]] = None
    chat_template: Optional[str] = None
    vae: Optional[str] = None  # a VAE baked into a Stable Diffusion output
    drop: Optional[list[str]] = None  # regular expressions of tensor names left out
    ema: Optional[str] = None  # keep (default), drop or use
    source_path: Optional[Path] = None  # the YAML file, for resolving relative paths

    # -- serialisation ------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        """The recipe as mergekit's YAML structure (only fields that are set)."""
        out: dict[str, Any] = {}
        if self.models is not None:
            out["models"] = [_entry_dict(m) for m in self.models]
        if self.slices is not None:
            out["slices"] = []
            for s in self.slices:
                item: dict[str, Any] = {"sources": [_entry_dict(m) for m in s.sources]}
                if s.base_model:
                    item["base_model"] = s.base_model
                if s.parameters:
                    item["parameters"] = s.parameters
                out["slices"].append(item)
        out["merge_method"] = self.merge_method
        if self.base_model:
            out["base_model"] = self.base_model
        if self.parameters:
            out["parameters"] = self.parameters
        for key in ("dtype", "out_dtype", "tokenizer_source", "tokenizer", "chat_template"):
            value = getattr(self, key)
            if value is not None:
                # mergekit reads only 'float32', 'float16', 'bfloat16', 'float64': write those spellings.
                out[key] = mergekit_dtype_name(value) if key in ("dtype", "out_dtype") else value
        for key in ("vae", "drop", "ema"):  # ours (A1111's merger options); never set in mergekit recipes
            value = getattr(self, key)
            if value is not None:
                out[key] = list(value) if key == "drop" else value
        return out

    def to_yaml(self) -> str:
        return yaml.dump(self.to_dict(), Dumper=_Dumper, sort_keys=False, allow_unicode=True)

    def parameter_places(self) -> list[tuple[str, dict[str, Setting]]]:
        """Every parameters mapping of the recipe with where it is written (``models[1].parameters``)."""
        places: list[tuple[str, dict[str, Setting]]] = [("parameters", self.parameters)]
        for i, m in enumerate(self.models or []):
            places.append((f"models[{i}].parameters", m.parameters))
        for i, s in enumerate(self.slices or []):
            places.append((f"slices[{i}].parameters", s.parameters))
            for j, src in enumerate(s.sources):
                places.append((f"slices[{i}].sources[{j}].parameters", src.parameters))
        return places

    def model_refs(self) -> list[str]:
        """Every model referenced, in first-appearance order, base model included."""
        refs: list[str] = []
        entries = self.models or [src for s in (self.slices or []) for src in s.sources]
        for ref in [e.model for e in entries] + [self.base_model] + [
            s.base_model for s in (self.slices or [])
        ]:
            if ref and ref not in refs:
                refs.append(ref)
        return refs


def _entry_dict(entry: ModelEntry) -> dict[str, Any]:
    out: dict[str, Any] = {"model": entry.model}
    if entry.layer_range is not None:
        out["layer_range"] = list(entry.layer_range)
    if entry.parameters:
        out["parameters"] = entry.parameters
    return out


class _Dumper(yaml.SafeDumper):
    """Number lists (gradients) in flow style, as mergekit writes them."""


def _represent_list(dumper: yaml.SafeDumper, data: list) -> yaml.Node:
    flow = bool(data) and all(isinstance(e, (int, float)) and not isinstance(e, bool) for e in data)
    return dumper.represent_sequence("tag:yaml.org,2002:seq", data, flow_style=flow)


_Dumper.add_representer(list, _represent_list)


# -- parsing ----------------------------------------------------------------
def load_recipe(source: Union[str, Path], *, text: Optional[str] = None) -> Recipe:
    """Read a recipe from a YAML file (or from ``text``, with ``source`` as its name)."""
    path = Path(source)
    if text is None:
        if not path.is_file():
            raise RecipeError(f"{path}: recipe file not found.")
        try:
            text = path.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as exc:
            raise RecipeError(f"{path}: cannot read ({exc}).") from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}" if mark else ""
        raise RecipeError(f"{path}: not valid YAML{where}.") from None
    recipe = recipe_from_dict(data, where=str(path))
    recipe.source_path = path if path.is_file() else None
    return recipe


def recipe_from_dict(data: Any, where: str = "recipe") -> Recipe:
    if not isinstance(data, dict):
        raise RecipeError(f"{where}: a recipe must be a mapping with at least 'merge_method'.")
    for key in data:
        if key not in TOP_LEVEL_KEYS:
            raise RecipeError(f"{where}: unknown field '{key}'{_suggest(key, TOP_LEVEL_KEYS)}.")
    if "merge_method" not in data:
        raise RecipeError(f"{where}: missing 'merge_method'.")
    if data.get("modules") is not None:
        raise RecipeError(f"{where}: 'modules:' (multi-module models) is not supported yet; use 'models:' or 'slices:'.")
    present = [k for k in ("models", "slices") if data.get(k)]
    if len(present) != 1:
        raise RecipeError(f"{where}: give exactly one of 'models:' or 'slices:'.")
    tokenizer_source = data.get("tokenizer_source")
    if tokenizer_source is not None and data.get("tokenizer") is not None:
        raise RecipeError(f"{where}: give 'tokenizer_source' or 'tokenizer', not both.")
    if data.get("tokenizer") is not None and not isinstance(data["tokenizer"], dict):
        raise RecipeError(f"{where}: 'tokenizer' must be a mapping (source:, tokens:), got {data['tokenizer']!r}.")
    recipe = Recipe(
        merge_method=str(data["merge_method"]),
        base_model=_model_ref(data.get("base_model"), f"{where}: base_model"),
        parameters=_params(data.get("parameters"), f"{where}: parameters"),
        dtype=_opt_str(data.get("dtype")),
        out_dtype=_opt_str(data.get("out_dtype")),
        tokenizer_source=_model_ref(tokenizer_source, f"{where}: tokenizer_source"),
        tokenizer=data.get("tokenizer"),
        chat_template=_opt_str(data.get("chat_template")),
        vae=_model_ref(data.get("vae"), f"{where}: vae"),
        drop=_drop_patterns(data.get("drop"), where),
        ema=_ema_mode(data.get("ema"), where),
    )
    if data.get("models"):
        recipe.models = [_model_entry(m, f"{where}: models[{i}]", False) for i, m in enumerate(_list(data["models"], where, "models"))]
    else:
        recipe.slices = []
        for i, s in enumerate(_list(data["slices"], where, "slices")):
            label = f"{where}: slices[{i}]"
            if not isinstance(s, dict) or "sources" not in s:
                raise RecipeError(f"{label}: a slice needs 'sources:'.")
            for key in s:
                if key not in ("sources", "base_model", "parameters", "residual_weight"):
                    raise RecipeError(f"{label}: unknown field '{key}'.")
            if s.get("residual_weight") is not None:
                raise RecipeError(f"{label}: 'residual_weight' is not supported.")
            sources = [_model_entry(m, f"{label}.sources[{j}]", True) for j, m in enumerate(_list(s["sources"], label, "sources"))]
            if not sources:
                raise RecipeError(f"{label}: 'sources' is empty.")
            recipe.slices.append(
                SliceEntry(sources, _model_ref(s.get("base_model"), f"{label}.base_model"), _params(s.get("parameters"), f"{label}.parameters"))
            )
    return recipe


def _drop_patterns(value: Any, where: str) -> Optional[list[str]]:
    """``drop:`` is one regular expression or a list of them; each must compile."""
    import re

    if value is None:
        return None
    patterns = [value] if isinstance(value, str) else value
    if not isinstance(patterns, list) or not patterns or not all(isinstance(p, str) and p for p in patterns):
        raise RecipeError(f"{where}: 'drop' must be a regular expression or a list of them, got {value!r}.")
    for pattern in patterns:
        try:
            re.compile(pattern)
        except re.error as exc:
            raise RecipeError(f"{where}: drop pattern {pattern!r} is not a valid regular expression ({exc}).") from None
    return list(patterns)


def _ema_mode(value: Any, where: str) -> Optional[str]:
    if value is None:
        return None
    if value not in EMA_MODES:
        raise RecipeError(f"{where}: 'ema' must be one of {', '.join(EMA_MODES)}, got {value!r}.")
    return str(value)


def _suggest(word: str, choices) -> str:
    close = difflib.get_close_matches(str(word), list(choices), n=1, cutoff=0.6)
    return f" (did you mean '{close[0]}'?)" if close else ""


def _list(value: Any, where: str, key: str) -> list:
    if not isinstance(value, list):
        raise RecipeError(f"{where}: '{key}' must be a list.")
    return value


def _opt_str(value: Any) -> Optional[str]:
    return None if value is None else str(value)


def _model_ref(value: Any, where: str) -> Optional[str]:
    if value is None:
        return None
    if isinstance(value, dict) and "model" in value:  # mergekit's long form {model: {path: ...}}
        inner = value["model"]
        value = inner.get("path") if isinstance(inner, dict) else inner
    if not isinstance(value, str) or not value.strip():
        raise RecipeError(f"{where}: must be a model path or name, got {value!r}.")
    if "+" in value and not Path(value).exists():
        raise RecipeError(f"{where}: LoRA references ('model+lora') are not supported yet: {value!r}.")
    return value.strip()


def _model_entry(value: Any, where: str, is_slice: bool) -> ModelEntry:
    if not isinstance(value, dict) or "model" not in value:
        raise RecipeError(f"{where}: needs 'model:'.")
    allowed = ("model", "parameters", "layer_range") if is_slice else ("model", "parameters")
    for key in value:
        if key not in allowed:
            raise RecipeError(f"{where}: unknown field '{key}'{_suggest(key, allowed)}.")
    ref = _model_ref(value["model"], f"{where}.model")
    assert ref is not None
    layer_range = None
    if is_slice:
        lr = value.get("layer_range")
        if (
            not isinstance(lr, (list, tuple))
            or len(lr) != 2
            or not all(isinstance(x, int) and not isinstance(x, bool) for x in lr)
            or lr[0] < 0
            or lr[1] <= lr[0]
        ):
            raise RecipeError(f"{where}: 'layer_range' must be [start, end) with 0 <= start < end, got {lr!r}.")
        layer_range = (int(lr[0]), int(lr[1]))
    return ModelEntry(ref, _params(value.get("parameters"), f"{where}.parameters"), layer_range)


def _params(value: Any, where: str) -> dict[str, Setting]:
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise RecipeError(f"{where}: must be a mapping of parameter names to values.")
    for name, setting in value.items():
        _check_setting(setting, f"{where}.{name}")
    return dict(value)


def _check_setting(setting: Any, where: str, in_condition: bool = False) -> None:
    """mergekit's grammar: a scalar, a gradient (list of scalars), a condition
    ``{filter, value}`` whose value is a scalar or a gradient, or a list of conditions."""
    if isinstance(setting, (bool, int, float, str)):
        return
    if isinstance(setting, dict) and "blocks" in setting:
        _check_block_setting(setting, where, in_condition)
        return
    if isinstance(setting, dict) and not in_condition:
        if "value" not in setting or set(setting) - {"filter", "value"}:
            raise RecipeError(f"{where}: a condition needs 'value' and optionally 'filter', got {setting!r}.")
        flt = setting.get("filter")
        if flt is not None and not isinstance(flt, str):
            raise RecipeError(f"{where}: a condition's 'filter' must be text (part of a tensor name), got {flt!r}.")
        _check_setting(setting["value"], where, in_condition=True)
        return
    if isinstance(setting, list):
        if not setting:
            raise RecipeError(f"{where}: an empty list is not a value.")
        scalars = [isinstance(e, (bool, int, float, str)) for e in setting]
        if all(scalars):
            return
        if any(scalars):
            raise RecipeError(f"{where}: mixes plain values and filter conditions in one list.")
        if not in_condition and all(isinstance(e, dict) for e in setting):
            for item in setting:
                _check_setting(item, where)
            return
    raise RecipeError(
        f"{where}: unsupported value {setting!r} (use a number, a list of numbers, or filter conditions "
        "whose values are numbers or lists of numbers)."
    )


def _number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _check_block_setting(setting: dict, where: str, in_condition: bool) -> None:
    """``{blocks: {NAME: number} | "n,n,...", default: number}``; names and counts are checked by the planner."""
    from core.merge.blocks import parse_block_string

    if in_condition:
        raise RecipeError(f"{where}: block weights ('blocks:') must be a parameter's whole value, not inside a filter.")
    extra = set(setting) - {"blocks", "default"}
    if extra:
        raise RecipeError(f"{where}: a block setting takes 'blocks' and 'default' only, not '{sorted(extra)[0]}'.")
    blocks = setting["blocks"]
    if isinstance(blocks, str):
        parse_block_string(blocks, where)
    elif isinstance(blocks, dict) and blocks:
        for name, value in blocks.items():
            if not _number(value):
                raise RecipeError(f"{where}.blocks.{name}: a block's value must be a number, got {value!r}.")
    else:
        raise RecipeError(
            f"{where}.blocks: give a mapping of block names to numbers or a comma-separated string, got {blocks!r}."
        )
    if "default" in setting and not _number(setting["default"]):
        raise RecipeError(f"{where}.default: must be a number, got {setting['default']!r}.")


# -- evaluation (mergekit semantics) ---------------------------------------
_MISSING = object()


def evaluate_setting(setting: Setting, tensor_name: str, t: float, convert, blocks: Any = None) -> Any:
    """Resolve filters and gradients for one tensor at layer position ``t``.

    A block setting takes the value of the tensor's block from ``blocks`` (a
    core.merge.blocks.BlockMap; None when the models are not SD checkpoints,
    which the planner refuses first); None when neither its block nor the
    setting's default is given.

    ``convert`` validates a scalar into the parameter's type. Numeric gradients
    interpolate linearly between neighbouring anchors (layer i of n at
    t = i/(n-1)); non-numeric lists pick the anchor at int(t*(len-1)). A list of
    conditions returns the first whose filter is absent, ``*`` or a substring
    of the tensor name; None when none matches.
    """
    if isinstance(setting, dict) and "blocks" in setting:
        if blocks is None:
            raise RecipeError(f"Tensor '{tensor_name}': block weights apply to Stable Diffusion checkpoints only.")
        raw = blocks.pick(setting, tensor_name)
        return None if raw is None else convert(raw)
    if isinstance(setting, dict):
        setting = [setting]
    if isinstance(setting, (bool, int, float, str)):
        return convert(setting)
    if not setting:
        return None
    if all(isinstance(e, (bool, int, float, str)) for e in setting):
        values = [convert(e) for e in setting]
        if not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in values):
            return values[int(t * (len(values) - 1))]
        scaled = t * (len(values) - 1)
        i0 = int(scaled)
        i1 = min(len(values) - 1, i0 + 1)
        frac = scaled - i0
        return convert((1 - frac) * values[i0] + frac * values[i1])
    for cond in setting:
        flt = cond.get("filter")
        if flt is None or flt == "*" or (tensor_name and str(flt) in tensor_name):
            return evaluate_setting(cond["value"], tensor_name, t, convert)
    return None
