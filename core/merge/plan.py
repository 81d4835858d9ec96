"""Recipe -> per-tensor operations, checked from configs and headers only.

``plan_merge`` opens every model (headers only), checks the recipe against
them and returns a :class:`MergePlan`: one :class:`TensorOp` per output tensor
with its inputs, resolved parameters and dtypes, plus size and memory
estimates. Every problem found here is a RecipeError or ModelError naming the
model and tensor, raised before a single weight is read.

Input order follows mergekit: the models of a slice in recipe order, with the
base model appended last when it is not listed, so order-sensitive methods
give the same numbers.

Stable Diffusion checkpoints have blocks, not layers: their tensors are planned
one by one under their own names, and core/merge/sd_plan.py adds the checks
and options of that side (kinds, inpainting, block weights, vae/drop/ema).
"""

from __future__ import annotations

import copy
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

from core.errors import ModelError, RecipeError
from core.io.catalog import resolve_model
from core.io.formats import ModelSource, open_model
from core.io.sd import SDInfo, detect_source
from core.io.tensors import DTYPE_SIZES, RECIPE_DTYPES, TensorInfo, recipe_dtype_key, safetensors_dtype
from core.merge import methods as registry
from core.merge.layers import LayerLayout, config_layer_count, detect_layout, is_pre_tensor
from core.merge.methods.base import BASE_IGNORED, BASE_REQUIRED, GLOBAL, NON_BASE, MergeMethod, Parameter
from core.merge.recipe import ModelEntry, Recipe, SliceEntry, evaluate_setting
from core.merge.sd_plan import PlanHooks, finish as finish_hooks, prepare as prepare_hooks, vae_ops

FLOAT_DTYPES = ("F16", "BF16", "F32", "F64")
_TIED = {"lm_head.weight": ("model.embed_tokens.weight", "transformer.wte.weight", "embed_tokens.weight")}
_OVERHEAD_BYTES = 260 * 1000**2  # resident Python + torch runtime on CPU (measured: ~250 MB)
NO_LAYERS = LayerLayout(None, 0, "a Stable Diffusion checkpoint: blocks, not layers")


@dataclass
class InputModel:
    """A model taking part in the merge."""

    ref: str  # as written in the recipe
    source: ModelSource
    layout: LayerLayout
    _suffixes: Optional[dict[int, list[str]]] = field(default=None, repr=False)
    sd: Optional[SDInfo] = None  # what it is, when it is a Stable Diffusion checkpoint
    role: str = "input"  # "input", or "vae" for a VAE baked into the output

    @property
    def label(self) -> str:
        return f"'{self.ref}'"

    def layer_suffixes(self, layer: int) -> list[str]:
        """Tensor names of one layer without their prefix, in file order (indexed once)."""
        if self._suffixes is None:
            self._suffixes = {}
            for name in _file_order(self.source.tensors):
                split = self.layout.split(name)
                if split:
                    self._suffixes.setdefault(split[0], []).append(split[1])
        return self._suffixes.get(layer, [])


@dataclass
class TensorOp:
    """How one output tensor is made."""

    out_name: str
    inputs: list[tuple[int, str]]  # (index into MergePlan.models, tensor name)
    base_index: Optional[int]  # position in ``inputs``
    params: dict[str, Any]
    model_params: list[dict[str, Any]]
    shape: tuple[int, ...]
    compute_dtype: str
    out_dtype: str
    copy: bool = False  # copied from inputs[0] without a method (non-float, or passthrough)
    layer: Optional[int] = None

    @property
    def out_bytes(self) -> int:
        n = DTYPE_SIZES[self.out_dtype]
        for d in self.shape:
            n *= d
        return n


@dataclass
class MergePlan:
    recipe: Recipe
    method: MergeMethod
    models: list[InputModel]
    ops: list[TensorOp]
    config: Optional[dict[str, Any]]  # config.json of the output
    config_model: Optional[int]  # index of the model whose folder gives config/tokenizer files
    tokenizer_model: Optional[int]
    notes: list[str] = field(default_factory=list)
    output_bytes: int = 0
    input_bytes: int = 0
    peak_memory_bytes: int = 0
    hooks: Optional[PlanHooks] = None  # Stable Diffusion side, drop: patterns (None for mergekit recipes)

    @property
    def block_weights(self) -> Optional[dict[str, Any]]:
        """The per-block values applied (block-weighted SD merges), else None."""
        return self.hooks.block_weights if self.hooks is not None else None

    @property
    def inputs(self) -> list[InputModel]:
        """The merged models (without a VAE baked in)."""
        return [m for m in self.models if m.role == "input"]

    def method_summary(self) -> dict[str, int]:
        counts: dict[str, int] = {}
        for op in self.ops:
            key = "copy" if op.copy else self.method.name
            counts[key] = counts.get(key, 0) + 1
        return counts

    def close(self) -> None:
        for m in self.models:
            m.source.close()


def plan_merge(
    recipe: Recipe,
    *,
    allow_pickle: bool = False,
    output: Optional[Path] = None,
) -> MergePlan:
    """Check ``recipe`` against the models' headers and return the plan."""
    method = registry.get(recipe.merge_method)
    _check_parameter_names(recipe, method)
    _check_dtypes(recipe)
    if recipe.tokenizer_source == "union" or (recipe.tokenizer and recipe.tokenizer.get("source") == "union"):
        raise RecipeError("tokenizer_source: 'union' (merging vocabularies) is not supported yet; use 'base' or a model.")
    if recipe.tokenizer is not None:
        raise RecipeError("'tokenizer:' (token surgery) is not supported yet; use 'tokenizer_source: base' or a model.")

    template = recipe.chat_template
    if template is not None and template not in ("chatml", "auto") and "{%" not in template and "{{" not in template:
        raise RecipeError(f"chat_template: '{template}' is not a Jinja template, 'chatml' or 'auto'.")

    recipe_dir = recipe.source_path.parent if recipe.source_path else None
    models: list[InputModel] = []
    index_of: dict[str, int] = {}

    def model_index(ref: str) -> int:
        if ref not in index_of:
            path = resolve_model(ref, recipe_dir)
            source = open_model(path, allow_pickle=allow_pickle)
            info = detect_source(source)
            layout = NO_LAYERS if info is not None else detect_layout(source.tensors, source.config)
            index_of[ref] = len(models)
            models.append(InputModel(ref, source, layout, sd=info))
        return index_of[ref]

    try:
        for ref in recipe.model_refs():
            model_index(ref)
        hooks = prepare_hooks(
            recipe, method, models, lambda ref: open_model(resolve_model(ref, recipe_dir), allow_pickle=allow_pickle)
        )
    except BaseException:
        for m in models:
            m.source.close()
        raise
    if hooks is not None and hooks.vae_source is not None:
        hooks.vae_index = len(models)
        models.append(InputModel(hooks.vae_ref or "vae", hooks.vae_source, NO_LAYERS, role="vae"))

    slices = _normalized_slices(recipe, method, models, model_index)
    builder = _OpBuilder(recipe, method, models, model_index, hooks)
    ops = builder.build(slices)
    if hooks is not None:
        if hooks.vae_index is not None:
            ops += vae_ops(hooks, models, builder.out_override, builder.vae_op)
        builder.notes.extend(hooks.notes)
        finish_hooks(hooks, ops, [m.ref for m in models])

    config_idx = model_index(recipe.base_model) if recipe.base_model else slices[0][0][0]
    config = copy.deepcopy(models[config_idx].source.config) if models[config_idx].source.config else None
    if config is not None and recipe.slices is not None:
        found = config_layer_count(config)
        if found:
            config[found[0]] = builder.out_layers
    if config is not None:
        out_dtype = ops[0].out_dtype if ops else None
        torch_names = {v: k for k, v in RECIPE_DTYPES.items() if k in ("float32", "float16", "bfloat16", "float64")}
        if out_dtype in torch_names:
            key = "dtype" if "dtype" in config or "torch_dtype" not in config else "torch_dtype"
            config[key] = torch_names[out_dtype]
    tok_idx = _tokenizer_model(recipe, models, model_index, config_idx)
    _check_tokenizer_vocab(recipe, models, tok_idx, config)
    if template is not None:
        _check_template_sources(models, tok_idx, config_idx)

    plan = MergePlan(recipe, method, models, ops, config, config_idx, tok_idx, builder.notes, hooks=hooks)
    plan.output_bytes = sum(op.out_bytes for op in ops)
    plan.input_bytes = sum(
        models[mi].source.tensors[name].nbytes if name in models[mi].source.tensors else 0
        for op in ops
        for mi, name in op.inputs
    )
    plan.peak_memory_bytes = _peak_memory(plan)
    if output is not None:
        single_file_output(plan, Path(output))
        _check_output_holds_no_input(models, Path(output))
        _check_disk(plan, Path(output))
    return plan


_KIND_WORDS = {"transformers": "a model folder", "diffusers": "a diffusers pipeline", "pickle": "a pickle checkpoint"}


def is_single_file(source: ModelSource) -> bool:
    """One checkpoint file: a .safetensors file, or a pickle .ckpt/.pt file (opted in)."""
    return source.kind == "single_file" or (source.kind == "pickle" and source.path.is_file())


def single_file_output(plan: MergePlan, output: Path) -> bool:
    """True when ``output`` is one ``.safetensors`` file: every input must then be a single file too."""
    if output.suffix != ".safetensors":
        return False
    for m in plan.inputs:
        if not is_single_file(m.source):
            raise RecipeError(
                f"{output}: an output ending in .safetensors is one file, which needs single-file inputs, but "
                f"model '{m.ref}' is {_KIND_WORDS.get(m.source.kind, m.source.kind)}; give an output folder instead."
            )
    return True


def _check_output_holds_no_input(models: list[InputModel], output: Path) -> None:
    """Replacing the output folder must never delete a model the merge reads."""
    target = output.resolve()
    for m in models:
        source = m.source.path.resolve()
        if source == target and source.is_file():
            raise RecipeError(f"{output}: is the input model '{m.ref}'; write the merge to another file.")
        if source == target or target in source.parents:
            raise RecipeError(
                f"{output}: the output folder holds the input model '{m.ref}', which replacing it would delete; "
                "write the merge to another folder."
            )


def _check_parameter_names(recipe: Recipe, method: MergeMethod) -> None:
    known = [p.name for p in method.parameters]
    for where, params in recipe.parameter_places():
        for name in params:
            if name not in known:
                import difflib

                close = difflib.get_close_matches(name, known, n=1, cutoff=0.5)
                hint = f" Did you mean '{close[0]}'?" if close else ""
                listed = ", ".join(known) if known else "none"
                raise RecipeError(
                    f"{where}: '{name}' is not a parameter of {method.name} (it takes: {listed}).{hint}"
                )


def _check_dtypes(recipe: Recipe) -> None:
    for key in ("dtype", "out_dtype"):
        value = getattr(recipe, key)
        if value is not None and recipe_dtype_key(value) not in RECIPE_DTYPES:
            raise RecipeError(f"{key}: '{value}' is not a dtype (use float32, float16 or bfloat16).")


Slice = tuple[list[int], list[ModelEntry], Optional[int], SliceEntry]  # model indices, entries, base, raw


def _normalized_slices(recipe: Recipe, method: MergeMethod, models: list[InputModel], model_index) -> list[Slice]:
    """Turn ``models:`` into one whole-model slice; check bases, counts and ranges."""
    result: list[Slice] = []
    if recipe.models is not None:
        # Copies: the layer ranges set below must not leak into the recipe (its YAML is written out).
        entries = [ModelEntry(e.model, dict(e.parameters), e.layer_range) for e in recipe.models]
        refs = [e.model for e in entries]
        if recipe.base_model and recipe.base_model not in refs:
            # mergekit appends the base for every method, even those without a base role (linear, karcher).
            entries.append(ModelEntry(recipe.base_model, {}))
        counts = {e.model: models[model_index(e.model)].layout.count for e in entries}
        if len(set(counts.values())) > 1:
            listing = ", ".join(f"'{ref}' has {n}" for ref, n in counts.items())
            raise ModelError(f"The models have different layer counts ({listing}); use slices: to pick matching layers.")
        for e in entries:
            n = counts[e.model]
            e.layer_range = (0, n) if n else None
        raw = SliceEntry(entries, None, {})
        result.append(_finish_slice(recipe, method, models, model_index, entries, raw, "models"))
        return result
    for i, s in enumerate(recipe.slices or []):
        where = f"slices[{i}]"
        lengths = set()
        for j, src in enumerate(s.sources):
            m = models[model_index(src.model)]
            assert src.layer_range is not None
            start, end = src.layer_range
            if m.layout.count == 0:
                raise ModelError(f"{where}.sources[{j}]: model '{src.model}' has no numbered layers to slice.")
            if end > m.layout.count:
                raise ModelError(
                    f"{where}.sources[{j}]: layer_range [{start}, {end}) is outside model '{src.model}', "
                    f"which has {m.layout.count} layers ({m.layout.source})."
                )
            lengths.add(end - start)
        if len(lengths) > 1:
            raise RecipeError(f"{where}: all sources of a slice must span the same number of layers, got {sorted(lengths)}.")
        result.append(_finish_slice(recipe, method, models, model_index, list(s.sources), s, where))
    return result


def _finish_slice(recipe, method, models, model_index, entries, raw, where) -> Slice:
    indices = [model_index(e.model) for e in entries]
    if len(set(indices)) != len(indices):
        raise RecipeError(f"{where}: a model is listed twice.")
    base_ref = raw.base_model or recipe.base_model
    base_pos: Optional[int] = None
    if method.base != BASE_IGNORED and base_ref:
        refs = [e.model for e in entries]
        if base_ref not in refs:
            raise RecipeError(f"{where}: base_model '{base_ref}' is not among the slice's sources.")
        base_pos = refs.index(base_ref)
    if method.base == BASE_REQUIRED and base_pos is None:
        raise RecipeError(f"Method '{method.name}' needs a base_model; add 'base_model:' to the recipe.")
    n = len(entries)
    if n < method.min_models or (method.max_models is not None and n > method.max_models):
        if method.max_models == method.min_models:
            want = f"exactly {method.min_models}"
        elif method.max_models is None:
            want = f"at least {method.min_models}"
        else:
            want = f"{method.min_models} to {method.max_models}"
        base_note = " (the base model included)" if base_ref and base_ref in [e.model for e in entries] else ""
        raise RecipeError(f"{where}: method '{method.name}' takes {want} models{base_note}; the recipe gives {n}.")
    return indices, entries, base_pos, raw


class _OpBuilder:
    """Walks the slices and emits one TensorOp per output tensor."""

    def __init__(
        self,
        recipe: Recipe,
        method: MergeMethod,
        models: list[InputModel],
        model_index,
        hooks: Optional[PlanHooks] = None,
    ) -> None:
        self.recipe = recipe
        self.hooks = hooks
        self.blocks = hooks.blocks if hooks is not None else None
        self.method = method
        self.models = models
        self.model_index = model_index
        self.notes: list[str] = []
        self.out_layers = 0
        self.compute_override = safetensors_dtype(recipe.dtype)
        self.out_override = safetensors_dtype(recipe.out_dtype)

    def build(self, slices: list[Slice]) -> list[TensorOp]:
        first, last = slices[0], slices[-1]
        ref_model = self.models[first[0][first[2] if first[2] is not None else 0]]
        layout = ref_model.layout
        # Non-layer tensors: the union over the first/last slices' models, in file order.
        outside: list[str] = []
        for s in (first, last):
            for mi in s[0]:
                m = self.models[mi]
                for name in _file_order(m.source.tensors):
                    if m.layout.split(name) is None and name not in outside:
                        if self.hooks is not None and self.hooks.skip(name):
                            continue
                        outside.append(name)
        pre = [n for n in outside if is_pre_tensor(n)]
        post = [n for n in outside if not is_pre_tensor(n)]
        ops: list[TensorOp] = []
        source = self.hooks.source if self.hooks is not None else (lambda n: n)
        for name in pre:
            self._add(ops, name, [(mi, source(name)) for mi in first[0]], first, t=0.0, layer=None)
        for s in slices:
            indices, entries, _, _ = s
            n = (entries[0].layer_range[1] - entries[0].layer_range[0]) if entries[0].layer_range else 0
            for offset in range(n):
                t = offset / (n - 1) if n > 1 else 1.0
                # Suffixes of this layer, from the slice's reference model, in file order.
                ref_pos = s[2] if s[2] is not None else 0
                ref = self.models[indices[ref_pos]]
                ref_layer = entries[ref_pos].layer_range[0] + offset
                suffixes = list(ref.layer_suffixes(ref_layer))
                for pos, (mi, e) in enumerate(zip(indices, entries)):
                    m = self.models[mi]
                    layer = e.layer_range[0] + offset
                    extra = sorted(set(m.layer_suffixes(layer)) - set(suffixes))
                    if extra and self.method.missing_tensors != "passthrough":
                        raise ModelError(
                            f"Tensor '{m.layout.name(layer, extra[0])}' exists in model '{e.model}' "
                            f"but is missing from model '{entries[ref_pos].model}'."
                        )
                    for suffix in extra:
                        suffixes.append(suffix)
                out_layer = self.out_layers
                for suffix in suffixes:
                    out_name = layout.name(out_layer, suffix) if layout.prefix else suffix
                    if self.hooks is not None and self.hooks.skip(out_name):
                        continue
                    inputs = [
                        (mi, self.models[mi].layout.name(e.layer_range[0] + offset, suffix))
                        for mi, e in zip(indices, entries)
                    ]
                    self._add(ops, out_name, inputs, s, t=t, layer=out_layer)
                self.out_layers += 1
        for name in post:
            self._add(ops, name, [(mi, source(name)) for mi in last[0]], last, t=0.0, layer=None)
        if not ops:
            raise ModelError("The models have no tensors to merge.")
        return ops

    # -- one tensor -----------------------------------------------------------
    def _add(self, ops: list[TensorOp], out_name: str, inputs: list[tuple[int, str]], s: Slice, t: float, layer) -> None:
        indices, entries, base_pos, raw = s
        if self.hooks is not None and self.hooks.copy_first(out_name):
            self._copy_first(ops, out_name, inputs, entries, layer)
            return
        infos: list[Optional[TensorInfo]] = []
        resolved_inputs: list[tuple[int, str]] = []
        for (mi, name), e in zip(inputs, entries):
            info, actual = self._lookup(mi, name)
            infos.append(info)
            resolved_inputs.append((mi, actual))
        present = [i for i, info in enumerate(infos) if info is not None]
        if len(present) < len(infos):
            missing = next(i for i, info in enumerate(infos) if info is None)
            has = present[0]
            if self.method.missing_tensors == "passthrough" and len(present) == 1:
                info = infos[has]
                assert info is not None
                ops.append(self._copy_op(out_name, resolved_inputs[has], info, layer))
                return
            raise ModelError(
                f"Tensor '{inputs[missing][1]}' is missing from model '{entries[missing].model}' "
                f"but present in model '{entries[has].model}'."
            )
        shapes = [info.shape for info in infos if info is not None]
        if len(set(shapes)) > 1 and not (self.hooks is not None and self.hooks.shape_mismatch_ok(out_name)):
            listing = ", ".join(f"{list(sh)} in '{e.model}'" for sh, e in zip(shapes, entries))
            hint = ""
            if is_pre_tensor(out_name) or "lm_head" in out_name:
                hint = " The vocabularies differ; merging models with different vocabularies (tokenizer_source: union) is not supported yet."
            raise ModelError(f"Tensor '{out_name}' has different shapes: {listing}.{hint}")
        dtypes = {info.dtype for info in infos if info is not None}
        first = infos[0]
        assert first is not None
        if not dtypes <= set(FLOAT_DTYPES):
            if len(infos) > 1:
                for (_, name), info, e in zip(resolved_inputs, infos, entries):
                    if info is not None and info.dtype.startswith("F8"):
                        raise ModelError(
                            f"Tensor '{name}' of model '{e.model}' is {info.dtype} (float8), which cannot be merged; "
                            "dequantize the model to float16, bfloat16 or float32 first."
                        )
            # Integer/bool buffers are copied from the base (or first) model.
            src = base_pos if base_pos is not None else 0
            info = infos[src]
            assert info is not None
            ops.append(self._copy_op(out_name, resolved_inputs[src], info, layer))
            return
        compute = self.compute_override or (first.dtype if len(dtypes) == 1 else "F32")
        out = self.out_override or compute
        params, model_params = self._resolve(out_name, inputs, entries, base_pos, raw, t)
        if self.method.check is not None:
            self.method.check(out_name, params, model_params, base_pos)
        ops.append(
            TensorOp(out_name, resolved_inputs, base_pos, params, model_params, first.shape, compute, out, False, layer)
        )

    def _lookup(self, mi: int, name: str) -> tuple[Optional[TensorInfo], str]:
        tensors = self.models[mi].source.tensors
        if name in tensors:
            return tensors[name], name
        config = self.models[mi].source.config or {}
        for tied in _TIED.get(name, ()):
            if tied in tensors and config.get("tie_word_embeddings", True):
                note = f"Model '{self.models[mi].ref}' ties {name} to {tied}; its embedding is used."
                if note not in self.notes:
                    self.notes.append(note)
                return tensors[tied], tied
        return None, name

    def _copy_first(self, ops: list[TensorOp], out_name: str, inputs, entries, layer) -> None:
        """A non-weight (noise schedule, position ids): model A's, or the first model's that has it."""
        present = [(pos, mi, name) for pos, (mi, name) in enumerate(inputs) if name in self.models[mi].source.tensors]
        pos, mi, name = present[0]
        if len(present) < len(inputs):
            missing = next(e.model for i, e in enumerate(entries) if i not in {p for p, _, _ in present})
            note = (
                f"'{name}' (not a weight) is missing from model '{missing}'; "
                f"it is copied from model '{entries[pos].model}'."
            )
            if note not in self.notes:
                self.notes.append(note)
        ops.append(self._copy_op(out_name, (mi, name), self.models[mi].source.tensors[name], layer))

    def vae_op(self, out_name: str, src: tuple[int, str], info: TensorInfo, out_dtype: str) -> TensorOp:
        """A tensor of the VAE baked in, copied under the model's name."""
        return TensorOp(out_name, [src], None, {}, [{}], info.shape, info.dtype, out_dtype, True, None)

    def _copy_op(self, out_name: str, src: tuple[int, str], info: TensorInfo, layer) -> TensorOp:
        out = self.out_override if (self.out_override and info.dtype in FLOAT_DTYPES) else info.dtype
        return TensorOp(out_name, [src], None, {}, [{}], info.shape, info.dtype, out, True, layer)

    def _resolve(self, out_name, inputs, entries, base_pos, raw: SliceEntry, t: float):
        recipe_params = self.recipe.parameters
        params: dict[str, Any] = {}
        for p in self.method.global_parameters:
            params[p.name] = self._value(p, out_name, t, [raw.parameters, recipe_params], out_name, self.blocks)
        model_params: list[dict[str, Any]] = []
        for pos, ((_, in_name), e) in enumerate(zip(inputs, entries)):
            if self.blocks is not None:
                in_name = out_name  # SD inputs share the output's names (an EMA source is looked up by its weight)
            values: dict[str, Any] = {}
            for p in self.method.model_parameters:
                if p.scope == NON_BASE and pos == base_pos:
                    continue
                where = f"model '{e.model}'"
                values[p.name] = self._value(
                    p, in_name, t, [e.parameters, raw.parameters, recipe_params], where, self.blocks
                )
            model_params.append(values)
        return params, model_params

    @staticmethod
    def _value(p: Parameter, tensor_name: str, t: float, scopes: list[dict], where: str, blocks=None) -> Any:
        def convert(v):
            return p.validate(v, where)

        for scope in scopes:
            if scope and p.name in scope:
                value = evaluate_setting(scope[p.name], tensor_name, t, convert, blocks)
                if value is not None:
                    return value
        if p.required:
            raise RecipeError(f"{where}: parameter '{p.name}' is required but not set for tensor '{tensor_name}'.")
        return p.default


def _file_order(tensors: dict[str, TensorInfo]) -> list[str]:
    """Tensor names in the order their bytes lie on disk (sequential reads)."""
    return sorted(tensors, key=lambda n: (str(tensors[n].file), tensors[n].offset))


def _tokenizer_model(recipe: Recipe, models, model_index, config_idx: int) -> Optional[int]:
    source = recipe.tokenizer_source
    if source is None or source == "base":
        if source == "base" and not recipe.base_model:
            raise RecipeError("tokenizer_source: 'base' needs a base_model.")
        return config_idx
    return model_index(source)


def _check_tokenizer_vocab(recipe: Recipe, models, tok_idx: Optional[int], config: Optional[dict]) -> None:
    """A tokenizer from another model must index the same vocabulary as the output."""
    if tok_idx is None or config is None:
        return
    tok_config = models[tok_idx].source.config or {}
    ours, theirs = config.get("vocab_size"), tok_config.get("vocab_size")
    if isinstance(ours, int) and isinstance(theirs, int) and ours != theirs:
        raise RecipeError(
            f"tokenizer_source: '{models[tok_idx].ref}' has a vocabulary of {theirs} tokens but the merged "
            f"model's embeddings have {ours} rows; pick a tokenizer with the same vocabulary."
        )


def _check_template_sources(models: list[InputModel], tok_idx: Optional[int], config_idx: int) -> None:
    """Setting a chat template rewrites tokenizer_config.json: parse it now, not after the merge."""
    from core.io.formats import _read_json_object

    for idx in {i for i in (tok_idx, config_idx) if i is not None}:
        folder = models[idx].source.path
        if folder.is_dir() and (folder / "tokenizer_config.json").is_file():
            _read_json_object(folder / "tokenizer_config.json")


def _peak_memory(plan: MergePlan) -> int:
    """Estimated peak resident memory of the merge.

    Per op: the inputs as read, their converted copies when the compute dtype
    differs, the method's float32 scratch (``MergeMethod.scratch``) and two
    outputs (the one being written and the new one). The peak is the worst op
    plus the Python/torch runtime. Checked against measured peaks in the README.
    """
    worst = 0
    for op in plan.ops:
        elems = 1
        for d in op.shape:
            elems *= d
        read = 0
        for mi, name in op.inputs:
            info = plan.models[mi].source.tensors.get(name)
            read += info.nbytes if info is not None else 0
            if info is not None and info.dtype != op.compute_dtype:
                read += elems * DTYPE_SIZES[op.compute_dtype]
        if op.copy:
            scratch = 0.0
        else:
            copies = plan.method.scratch if plan.method.scratch is not None else len(op.inputs) + 3
            scratch = copies * elems * 4
        worst = max(worst, int(read + scratch + 2 * op.out_bytes))
    return _OVERHEAD_BYTES + worst


def _check_disk(plan: MergePlan, output: Path) -> None:
    parent = output.absolute().parent
    if not parent.exists():
        return  # the writer reports the missing folder
    free = shutil.disk_usage(parent).free
    needed = plan.output_bytes + 16 * 1024**2
    if free < needed:
        raise ModelError(
            f"{parent}: not enough free disk space for the output ({_gb(needed)} needed, {_gb(free)} free)."
        )


def _gb(n: int) -> str:
    return f"{n / 1e9:.2f} GB"
