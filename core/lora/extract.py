"""Extract a LoRA from the difference of two models by truncated SVD.

For every selected weight that differs, ``ΔW = tuned − base`` (conv kernels
flattened to [out, in·kh·kw]) is factored by :func:`core.lora.factor.factorize`
at ``rank`` or at the smallest rank keeping ``energy`` of ``Σσ²``. A rank
larger than a module allows is refused naming the module, before any weight is
read (no silent cap: leave such modules out with ``modules``).

Formats:

* ``peft`` (transformers models): ``adapter_config.json`` + ``adapter_model.safetensors``
  that ``peft.PeftModel.from_pretrained`` loads onto the base model. Layer types
  come from the model class built on the meta device (no weights): Linear,
  Embedding (``lora_embedding_A/B``), GPT-2's Conv1D (``fan_in_fan_out``) and
  Conv2d layers can hold a LoRA.
* ``kohya`` (Stable Diffusion single files and diffusers pipelines): one
  ``.safetensors`` with ``lora_unet_`` / ``lora_te_`` (SDXL: ``lora_te1_``,
  ``lora_te2_``) modules, named as kohya's sd-scripts name them (what A1111,
  ComfyUI and kohya read). UNet modules: SD 1.x/2.x get diffusers names
  (``lora_unet_down_blocks_0_attentions_0_proj_in``: sd-scripts trains those on
  diffusers' UNet); SDXL gets the original (ldm) names
  (``lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q``: sd-scripts
  trains SDXL on its own original-layout UNet), a pipeline's diffusers names
  mapped back through the published layout (core/lora/names.py). Text encoders:
  the Hugging Face CLIP names under ``text_model.``
  (``lora_te1_text_model_encoder_layers_0_self_attn_q_proj``, also from
  transformers 5 files that leave that level out), OpenCLIP's fused
  ``in_proj_weight`` split into q, k, v.

Tensors that differ but no LoRA can express (norms, biases, embedding tables in
kohya files, VAE weights) are listed in the result, with their largest change,
never dropped silently. ``modules`` is a regular expression searched in each
tensor name; only matching tensors are read.
"""

from __future__ import annotations

import json
import math
import re
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Generator, Optional, Union

from core.errors import MergeStudioError, ModelError
from core.io.catalog import resolve_model
from core.io.formats import ModelSource, open_model
from core.jobs import Progress
from core.lora.factor import SVD_CHOICES, check_target, factorize, seeded_generator
from core.lora.formats import FORMATS, KOHYA, PEFT
from core.lora.names import (
    diffusers_to_ldm,
    kohya_clip_path,
    ldm_to_diffusers,
    openclip_modules,
    split_component,
    underscore,
    unet_layers,
    weight_module,
)
from core.lora.merge import file_order
from core.lora.output import LoraWriter, atomic_output, output_dtype, peft_config

if TYPE_CHECKING:  # pragma: no cover
    import torch

METADATA_KEY = "mergestudio_lora_extract"
FLOAT_DTYPES = ("F16", "BF16", "F32", "F64")
_TASKS = {
    "ForCausalLM": "CAUSAL_LM",
    "ForSeq2SeqLM": "SEQ_2_SEQ_LM",
    "ForConditionalGeneration": "SEQ_2_SEQ_LM",
    "ForSequenceClassification": "SEQ_CLS",
    "ForTokenClassification": "TOKEN_CLS",
    "ForQuestionAnswering": "QUESTION_ANS",
}
_EMBEDDINGS = ("token_embedding", "position_embedding", "embed_tokens", "embed_positions")
_KOHYA_PREFIX = {"unet": "lora_unet_", "te1": "lora_te_", "te2": "lora_te2_"}


@dataclass(frozen=True)
class _Piece:
    """One LoRA module cut from one tensor (the whole tensor, or a row slice)."""

    name: str  # the LoRA module name
    rows: Optional[tuple[int, int]]
    transpose: bool  # factor ΔWᵀ (PEFT embeddings, Conv1D)
    embedding: bool


@dataclass
class ModuleReport:
    """One extracted module: its rank and how well it reconstructs its ΔW."""

    module: str
    tensor: str
    rank: int
    error: float  # ||ΔW − B A||_F
    norm: float  # ||ΔW||_F
    svd: str  # "exact" or "randomized"

    @property
    def relative_error(self) -> float:
        return self.error / self.norm if self.norm > 0 else 0.0


@dataclass
class ExtractResult:
    output: Path
    format: str
    modules: list[ModuleReport]
    unchanged: int  # selected LoRA-able tensors equal in both models
    skipped: dict[str, str] = field(default_factory=dict)  # tensor -> why it is not in the LoRA (it differs)
    seconds: float = 0.0


def iter_extract(
    base: Union[str, Path],
    tuned: Union[str, Path],
    output: Union[str, Path],
    *,
    rank: Optional[int] = None,
    energy: Optional[float] = None,
    format: str = "auto",
    modules: Optional[str] = None,
    dtype: Optional[str] = None,
    svd: str = "auto",
    device: str = "auto",
    seed: int = 0,
    overwrite: bool = False,
    allow_pickle: bool = False,
) -> Generator[Progress, None, ExtractResult]:
    """Extract ``tuned − base`` as a LoRA at ``output``; yields Progress per tensor."""
    if rank is None and energy is None:
        raise MergeStudioError("Give --rank R or --energy E (for example --energy 0.9).")
    check_target(rank, energy)
    if format not in (*FORMATS, "auto"):
        raise MergeStudioError(f"--format {format}: use peft, kohya or auto.")
    if svd not in SVD_CHOICES:
        raise MergeStudioError(f"--svd {svd}: use one of {', '.join(SVD_CHOICES)}.")
    pattern = _pattern(modules)
    base_src = open_model(resolve_model(str(base)), allow_pickle=allow_pickle)
    tuned_src: Optional[ModelSource] = None
    try:
        tuned_src = open_model(resolve_model(str(tuned)), allow_pickle=allow_pickle)
        fmt = _format(format, base_src)
        names = _selected(base_src, tuned_src, pattern, modules)
        pieces, skipped_kinds = (_peft_pieces if fmt == PEFT else _kohya_pieces)(base_src, names)
        if rank is not None:
            _check_rank(base_src, pieces, rank)
        output = Path(output)
        if fmt == PEFT and output.suffix == ".safetensors":
            raise MergeStudioError(f"{output}: PEFT adapters are folders; give a folder name (or --format kohya).")
        atomic = atomic_output(output, single=fmt == KOHYA, overwrite=overwrite)
        atomic.check()
        from core.merge.executor import resolve_device

        dev = resolve_device(device)
        out_dtype = output_dtype(dtype, _model_dtype(tuned_src, names))
        result = yield from _run(base_src, tuned_src, names, pieces, skipped_kinds, fmt, atomic, rank, energy,
                                 svd, dev, seed, out_dtype)
        return result
    finally:
        base_src.close()
        if tuned_src is not None:
            tuned_src.close()


def extract_lora(base: Union[str, Path], tuned: Union[str, Path], output: Union[str, Path], *,
                 on_progress=None, cancel=None, **options: Any) -> ExtractResult:
    """Extract a LoRA; see :func:`iter_extract` for the options."""
    from core.jobs import drive

    return drive(iter_extract(base, tuned, output, **options), on_progress, cancel)


def _pattern(text: Optional[str]) -> Optional[re.Pattern]:
    if text is None:
        return None
    try:
        return re.compile(text)
    except re.error as exc:
        raise MergeStudioError(f"--modules '{text}' is not a regular expression ({exc}).") from None


def _format(requested: str, base: ModelSource) -> str:
    config = base.config if base.kind == "transformers" else None
    transformers_model = isinstance(config, dict) and bool(config.get("architectures"))
    if requested == "auto":
        return PEFT if transformers_model else KOHYA
    if requested == PEFT and not transformers_model:
        raise MergeStudioError(
            f"{base.path}: --format peft needs a transformers model (a folder whose config.json names its "
            "'architectures'); use --format kohya for Stable Diffusion checkpoints."
        )
    return requested


def _selected(base: ModelSource, tuned: ModelSource, pattern: Optional[re.Pattern], text: Optional[str]) -> list[str]:
    """Tensor names to compare, in the tuned model's file order; both models must agree on them."""
    names = [n for n in file_order(tuned) if pattern is None or pattern.search(n)]
    if pattern is not None and not names:
        raise MergeStudioError(f"--modules '{text}' matches no tensor of {tuned.path}.")
    for name in names:
        info = tuned.tensors[name]
        other = base.tensors.get(name)
        if other is None:
            raise ModelError(
                f"{base.path}: has no tensor '{name}', which {tuned.path} has; are they the same architecture?"
            )
        if other.shape != info.shape:
            raise ModelError(
                f"Tensor '{name}' has shape {list(other.shape)} in {base.path} but {list(info.shape)} in {tuned.path}; "
                "a LoRA cannot change a shape."
            )
    missing = [n for n in base.tensors if n not in tuned.tensors and (pattern is None or pattern.search(n))]
    if missing:
        raise ModelError(
            f"{tuned.path}: has no tensor '{missing[0]}', which {base.path} has; are they the same architecture?"
        )
    return names


def _model_dtype(source: ModelSource, names: list[str]) -> "torch.dtype":
    import torch

    from core.io.tensors import torch_dtype

    dtypes = {source.tensors[n].dtype for n in names if source.tensors[n].dtype in ("F16", "BF16", "F32")}
    return torch_dtype(dtypes.pop()) if len(dtypes) == 1 else torch.float32


def _layer_types(source: ModelSource) -> tuple[dict[str, str], str]:
    """Module name -> 'linear' / 'embedding' / 'conv1d' / 'conv2d' of the model class, built on the meta device."""
    import torch

    config = source.config or {}
    arch = config["architectures"][0]
    try:
        import transformers
        from transformers.pytorch_utils import Conv1D

        cls = getattr(transformers, arch)
        hf_config = transformers.AutoConfig.from_pretrained(str(source.path))
        with torch.device("meta"):
            model = cls(hf_config)
    except Exception as exc:  # transformers raises many types for unknown or broken configs
        raise ModelError(
            f"{source.path}: cannot build the model class '{arch}' from its config.json to learn its layer types "
            f"({type(exc).__name__}: {' '.join(str(exc).split())[:200]})."
        ) from None
    types = {}
    for name, module in model.named_modules():
        if isinstance(module, torch.nn.Embedding):
            types[name] = "embedding"
        elif isinstance(module, torch.nn.Linear):
            types[name] = "linear"
        elif isinstance(module, Conv1D):
            types[name] = "conv1d"
        elif isinstance(module, torch.nn.Conv2d):
            types[name] = "conv2d"
    return types, arch


def _peft_pieces(source: ModelSource, names: list[str]) -> tuple[dict[str, list[_Piece]], dict[str, str]]:
    types, arch = _layer_types(source)
    pieces: dict[str, list[_Piece]] = {}
    cannot: dict[str, str] = {}
    for name in names:
        info = source.tensors[name]
        module = name[: -len(".weight")] if name.endswith(".weight") else None
        kind = types.get(module) if module is not None else None
        if info.dtype not in FLOAT_DTYPES:
            continue
        if kind is None or (kind == "conv2d") != (len(info.shape) == 4) or len(info.shape) not in (2, 4):
            cannot[name] = f"not the weight of a Linear, Embedding or Conv layer of {arch}"
            continue
        transpose = kind in ("embedding", "conv1d")
        pieces[name] = [_Piece(module, None, transpose, kind == "embedding")]  # type: ignore[arg-type]
    if not pieces and cannot:
        example = next(iter(cannot))
        raise MergeStudioError(
            f"{source.path}: none of the selected tensors is the weight of a layer a PEFT LoRA can adapt in {arch} "
            f"(Linear, Embedding, Conv1D, Conv2d), e.g. '{example}'."
        )
    return pieces, cannot


def _kohya_pieces(source: ModelSource, names: list[str]) -> tuple[dict[str, list[_Piece]], dict[str, str]]:
    from core.lora.names import is_sd_layout

    sd_layout = is_sd_layout(source.tensors)
    layers, attention_up = unet_layers(source.tensors)
    sdxl_unet = _is_sdxl_unet(source)
    # SD 1.x/2.x have one text encoder (lora_te_), SDXL two (lora_te1_, lora_te2_).
    te_prefix = {"te1": "lora_te1_" if _has_te2(source) else "lora_te_", "te2": "lora_te2_"}
    bare = None if sd_layout else _bare_component(source)
    pieces: dict[str, list[_Piece]] = {}
    cannot: dict[str, str] = {}
    for name in names:
        info = source.tensors[name]
        module = weight_module(name)
        if info.dtype not in FLOAT_DTYPES:
            continue
        component, flavour, prefix, rest = split_component(module or name, sd_layout)
        if component is None:
            component = bare
        if component not in ("unet", "te1", "te2"):
            cannot[name] = "not part of the UNet or a text encoder, which is all a kohya LoRA holds"
            continue
        if module is None or len(info.shape) not in (2, 4) or rest.rsplit(".", 1)[-1] in _EMBEDDINGS:
            cannot[name] = "not the weight of a linear or conv layer"
            continue
        head = _KOHYA_PREFIX["unet"] if component == "unet" else te_prefix[component]
        if flavour == "openclip":
            mapped = openclip_modules(rest, info.shape[-1])
            if not mapped:
                cannot[name] = "an OpenCLIP weight with no Hugging Face CLIP counterpart"
                continue
            pieces[name] = [_Piece(head + underscore(path), t.rows, False, False) for path, t in mapped]
            continue
        if component in ("te1", "te2"):
            rest = kohya_clip_path(rest)
        if component == "unet":
            rest = _kohya_unet_path(rest, name.startswith("model.diffusion_model."), sdxl_unet, layers, attention_up)
        pieces[name] = [_Piece(head + underscore(rest), None, False, False)]
    return pieces, cannot


def _kohya_unet_path(rest: str, ldm: bool, sdxl: bool, layers: int, attention_up: set[int]) -> str:
    """The UNet module path sd-scripts uses: original (ldm) names for SDXL, diffusers names otherwise."""
    if sdxl:
        return rest if ldm else (diffusers_to_ldm(rest, layers, attention_up) or rest)
    return (ldm_to_diffusers(rest, layers) or rest) if ldm else rest


def _is_sdxl_unet(source: ModelSource) -> bool:
    """An SDXL-type UNet (its pooled-text / size embedding: ``label_emb``, diffusers ``add_embedding``)."""
    embeddings = ("model.diffusion_model.label_emb.", "unet/add_embedding.", "add_embedding.")
    if any(n.startswith(embeddings) for n in source.tensors):
        return True
    return (source.config or {}).get("addition_embed_type") == "text_time"


def _has_te2(source: ModelSource) -> bool:
    return any(n.startswith(("conditioner.embedders.1.", "text_encoder_2/")) for n in source.tensors)


def _bare_component(source: ModelSource) -> Optional[str]:
    """A lone diffusers UNet or CLIP text-encoder folder: which LoRA prefix its modules take."""
    config = source.config or {}
    if config.get("_class_name", "").startswith("UNet"):
        return "unet"
    if str(config.get("model_type", "")).startswith("clip"):
        return "te1"
    raise MergeStudioError(
        f"{source.path}: --format kohya is for Stable Diffusion models (a checkpoint, a pipeline, its UNet or "
        "text encoder); use --format peft for this model."
    )


def _piece_shape(shape: tuple[int, ...], piece: _Piece) -> tuple[int, int]:
    rows = shape[0] if piece.rows is None else piece.rows[1] - piece.rows[0]
    m, n = rows, math.prod(shape[1:])
    return (n, m) if piece.transpose else (m, n)


def _check_rank(source: ModelSource, pieces: dict[str, list[_Piece]], rank: int) -> None:
    for name, parts in pieces.items():
        for piece in parts:
            m, n = _piece_shape(source.tensors[name].shape, piece)
            if rank > min(m, n):
                raise MergeStudioError(
                    f"--rank {rank} is larger than module '{piece.name}' allows: its weight '{name}' is "
                    f"{list(source.tensors[name].shape)}, so at most rank {min(m, n)} (leave it out with --modules)."
                )


def _run(base, tuned, names, pieces, cannot, fmt, atomic, rank, energy, svd, device, seed, out_dtype):
    import torch

    started = time.monotonic()
    reports: list[ModuleReport] = []
    skipped: dict[str, str] = {}
    unchanged = 0
    with atomic as tmp:
        folder = tmp.parent if fmt == KOHYA else tmp
        writer = LoraWriter(fmt, folder, out_dtype)
        try:
            for done, name in enumerate(names, 1):
                if name in pieces or name in cannot:
                    old, new = base.get(name), tuned.get(name)
                    if torch.equal(old, new):
                        unchanged += name in pieces
                    else:
                        compute = torch.float64 if torch.float64 in (old.dtype, new.dtype) else torch.float32
                        delta = new.to(device, compute) - old.to(device, compute)
                        del old, new
                        if not bool(torch.isfinite(delta).all()):
                            raise ModelError(
                                f"Tensor '{name}': the difference holds NaN or Inf values; check both models."
                            )
                        if name in cannot:
                            skipped[name] = f"{cannot[name]} (largest change {float(delta.abs().max()):.3g})"
                        else:
                            for piece in pieces[name]:
                                gen = seeded_generator(piece.name, str(tuned.path), seed)
                                reports.append(_factor(writer, name, piece, delta, rank, energy, svd, gen))
                        del delta
                yield Progress(done, len(names), 0, 0, time.monotonic() - started, name)
            if not reports:
                raise MergeStudioError(
                    f"{tuned.path} and {base.path} do not differ in any weight a LoRA can hold; nothing to extract."
                )
            record = {
                "base": str(base.path),
                "tuned": str(tuned.path),
                "rank": rank,
                "energy": energy,
                "svd": sorted({r.svd for r in reports}),
                "formula": "B @ A ~ tuned - base (truncated SVD)",
            }
            metadata = {"format": "pt", METADATA_KEY: json.dumps(record)}
            if fmt == KOHYA:
                dim = str(rank) if rank is not None else "dynamic"
                metadata.update({"ss_network_module": "networks.lora", "ss_network_dim": dim, "ss_network_alpha": dim})
                writer.finish(tmp, metadata)
            else:
                writer.finish(tmp / "adapter_model.safetensors", metadata)
                _write_peft_config(tmp, base, writer.ranks, pieces)
        finally:
            writer.close()
    return ExtractResult(atomic.target, fmt, reports, unchanged, skipped, time.monotonic() - started)


def _factor(
    writer: LoraWriter, name: str, piece: _Piece, delta: "torch.Tensor", rank, energy, svd, gen
) -> ModuleReport:
    part = delta if piece.rows is None else delta[piece.rows[0]: piece.rows[1]]
    matrix = part.reshape(part.shape[0], -1)
    if piece.transpose:
        matrix = matrix.T
    found = factorize(matrix, rank=rank, energy=energy, svd=svd, generator=gen)
    a, b = found.a, found.b
    if part.dim() == 4:
        a = a.reshape(a.shape[0], *part.shape[1:])
        b = b.reshape(b.shape[0], b.shape[1], 1, 1)
    writer.add(piece.name, a, b, embedding=piece.embedding)
    return ModuleReport(piece.name, name, found.rank, found.error, found.norm, found.method)


def _write_peft_config(folder: Path, base: ModelSource, ranks: dict[str, int], pieces: dict[str, list[_Piece]]) -> None:
    config = base.config or {}
    arch = str((config.get("architectures") or [""])[0])
    task = next((t for suffix, t in _TASKS.items() if arch.endswith(suffix)), None)
    fan_in_fan_out = any(p.transpose and not p.embedding for parts in pieces.values() for p in parts if p.name in ranks)
    settings = peft_config(
        None,
        ranks,
        base_model_name_or_path=str(base.path.absolute()),
        task_type=task,
        fan_in_fan_out=fan_in_fan_out,
    )
    (folder / "adapter_config.json").write_text(json.dumps(settings, indent=2) + "\n")
