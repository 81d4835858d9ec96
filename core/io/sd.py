"""Stable Diffusion checkpoints: what a model is, from its tensor names and a few shapes.

Recognised from headers only (no weight is read):

* single-file checkpoints in the original (ldm / sgm) key layout: SD 1.x (CLIP
  text encoder under ``cond_stage_model.transformer.``), SD 2.x (OpenCLIP under
  ``cond_stage_model.model.``), SDXL base (``conditioner.embedders.0`` CLIP-L and
  ``conditioner.embedders.1`` OpenCLIP-G) and the SDXL refiner (OpenCLIP-G alone);
* diffusers pipeline folders (``unet/``, ``text_encoder/``, ``text_encoder_2/``,
  ``vae/`` components).

The UNet's input channels tell a normal model (4) from an inpainting (9) or an
instruct-pix2pix (8) one. Whether an SD 2.x model predicts v or epsilon is not
visible in its weights, so nothing here guesses it.

Also here: the hashes A1111 shows (the full-file sha256 and its legacy 8-digit
hash) and the ``sd_merge_recipe`` / ``sd_merge_models`` metadata it writes.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Mapping, Optional, Sequence

from core.errors import ModelError

SD1, SD2, SDXL, SDXL_REFINER = "sd1", "sd2", "sdxl", "sdxl_refiner"
KIND_NAMES = {SD1: "SD 1.x", SD2: "SD 2.x", SDXL: "SDXL", SDXL_REFINER: "SDXL refiner"}
KIND_TITLES = {
    SD1: "Stable Diffusion 1.x",
    SD2: "Stable Diffusion 2.x",
    SDXL: "Stable Diffusion XL",
    SDXL_REFINER: "Stable Diffusion XL refiner",
}
LDM, DIFFUSERS = "ldm", "diffusers"
LAYOUT_NAMES = {LDM: "a single-file (original layout) checkpoint", DIFFUSERS: "a diffusers pipeline"}

UNET_PREFIX = "model.diffusion_model."
VAE_PREFIX = "first_stage_model."
EMA_PREFIX = "model_ema."
EMA_COUNTERS = ("model_ema.decay", "model_ema.num_updates")
LDM_CONV_IN = UNET_PREFIX + "input_blocks.0.0.weight"
DIFFUSERS_CONV_IN = "unet/conv_in.weight"

PARTS = ("unet", "text_encoder", "text_encoder_2", "vae", "ema")
PART_NAMES = {
    "unet": "a UNet",
    "text_encoder": "a text encoder",
    "text_encoder_2": "a second text encoder",
    "vae": "a VAE",
    "ema": "EMA weights (model_ema.*)",
}
VARIANTS = {9: "inpainting", 8: "instruct-pix2pix"}

# Not weights: the DDPM noise schedule of ldm checkpoints and token position ids.
# A1111 keeps model A's (they are the same in every model of one kind).
SCHEDULE_BUFFERS = frozenset(
    {
        "betas",
        "alphas_cumprod",
        "alphas_cumprod_prev",
        "sqrt_alphas_cumprod",
        "sqrt_one_minus_alphas_cumprod",
        "log_one_minus_alphas_cumprod",
        "sqrt_recip_alphas_cumprod",
        "sqrt_recipm1_alphas_cumprod",
        "posterior_variance",
        "posterior_log_variance_clipped",
        "posterior_mean_coef1",
        "posterior_mean_coef2",
        "logvar",
    }
)


@dataclass(frozen=True)
class SDInfo:
    """What a Stable Diffusion model is: kind, key layout, UNet input channels, parts present."""

    kind: str  # sd1, sd2, sdxl, sdxl_refiner
    layout: str  # ldm (single file) or diffusers
    in_channels: Optional[int]  # 4 normal, 9 inpainting, 8 instruct-pix2pix; None without a UNet
    parts: frozenset[str]

    @property
    def kind_name(self) -> str:
        return KIND_NAMES[self.kind]

    @property
    def variant(self) -> str:
        """'inpainting', 'instruct-pix2pix' or '' (a normal model)."""
        return VARIANTS.get(self.in_channels or 4, "")

    def describe(self) -> str:
        """E.g. 'SD 1.x inpainting (9-channel UNet), single file: UNet, text encoder, VAE, EMA weights'."""
        variant = f" {self.variant}" if self.variant else ""
        channels = f" ({self.in_channels}-channel UNet)" if self.in_channels else ""
        where = "single file" if self.layout == LDM else "diffusers"
        parts = ", ".join(PART_NAMES[p].removeprefix("a ").removeprefix("an ") for p in PARTS if p in self.parts)
        return f"{self.kind_name}{variant}{channels}, {where}: {parts}"

    def to_dict(self) -> dict[str, Any]:
        return {
            "kind": self.kind,
            "kind_name": self.kind_name,
            "layout": self.layout,
            "in_channels": self.in_channels,
            "variant": self.variant or None,
            "parts": [p for p in PARTS if p in self.parts],
        }


def _shape(value: Any) -> tuple[int, ...]:
    shape = getattr(value, "shape", value)
    return tuple(shape) if isinstance(shape, (tuple, list)) else ()


def detect(tensors: Mapping[str, Any]) -> Optional[SDInfo]:
    """Recognise an original-layout checkpoint from ``{name: shape or TensorInfo}``; None if it is none."""
    names = list(tensors)

    def has(prefix: str) -> bool:
        return any(n.startswith(prefix) for n in names)

    unet = has(UNET_PREFIX)
    if has("conditioner.embedders."):
        kind = SDXL if has("conditioner.embedders.1.") else SDXL_REFINER
    elif has("cond_stage_model.model."):
        kind = SD2
    elif has("cond_stage_model.transformer."):
        kind = SD1
    elif unet:
        kind = _unet_only_kind(tensors)
    else:
        return None
    parts = set()
    if unet:
        parts.add("unet")
    if has("cond_stage_model.") or has("conditioner.embedders.0."):
        parts.add("text_encoder")
    if kind == SDXL and has("conditioner.embedders.1."):
        parts.add("text_encoder_2")
    if has(VAE_PREFIX):
        parts.add("vae")
    if any(n.startswith(EMA_PREFIX) and n not in EMA_COUNTERS for n in names):
        parts.add("ema")
    conv = _shape(tensors.get(LDM_CONV_IN))
    return SDInfo(kind, LDM, conv[1] if len(conv) == 4 else None, frozenset(parts))


def _unet_only_kind(tensors: Mapping[str, Any]) -> str:
    """A checkpoint with a UNet and no text encoder: SDXL has label_emb; SD 2.x a 1024-wide context."""
    if any(n.startswith(UNET_PREFIX + "label_emb.") for n in tensors):
        return SDXL
    for name, value in tensors.items():
        if name.startswith(UNET_PREFIX) and name.endswith("attn2.to_k.weight"):
            width = _shape(value)[-1:]
            if width == (1024,):
                return SD2
            if width == (768,):
                return SD1
        if name.startswith(UNET_PREFIX) and name.endswith("proj_in.weight"):
            return SD2 if len(_shape(value)) == 2 else SD1
    return SD1


def detect_source(source: Any) -> Optional[SDInfo]:
    """Recognise a ModelSource (single file or diffusers pipeline); None for any other model."""
    if source.kind == "diffusers":
        return _detect_pipeline(source)
    if source.kind in ("single_file", "pickle") and not source.config:
        return detect(source.tensors)
    return None


def _detect_pipeline(source: Any) -> Optional[SDInfo]:
    comps = source.components
    unet = comps.get("unet")
    conv = _shape(unet.tensors.get("conv_in.weight")) if unet is not None else ()
    if len(conv) != 4:
        return None
    cfg = unet.config or {}
    xl = (
        "text_encoder_2" in comps
        or cfg.get("addition_embed_type") == "text_time"
        or any(n.startswith("add_embedding.") for n in unet.tensors)
    )
    if xl:
        kind = SDXL_REFINER if "text_encoder_2" in comps and "text_encoder" not in comps else SDXL
    else:
        kind = _pipeline_sd12(cfg, unet.tensors)
    parts = {"unet"} | {p for p in ("text_encoder", "text_encoder_2", "vae") if p in comps}
    if kind == SDXL_REFINER:
        parts = (parts - {"text_encoder_2"}) | {"text_encoder"}
    return SDInfo(kind, DIFFUSERS, conv[1], frozenset(parts))


def _pipeline_sd12(cfg: dict, tensors: Mapping[str, Any]) -> str:
    """SD 1.x or 2.x from the UNet config (context width, linear projections), else from proj_in's shape."""
    cross = cfg.get("cross_attention_dim")
    if cross == 1024:
        return SD2
    if cross == 768:
        return SD1
    if "use_linear_projection" in cfg:
        return SD2 if cfg["use_linear_projection"] else SD1
    for name, value in tensors.items():
        if name.endswith("proj_in.weight"):
            return SD2 if len(_shape(value)) == 2 else SD1
    return SD1


# ----------------------------------------------------------------------------- compatibility


def check_kinds(models: Sequence[tuple[str, Optional[SDInfo]]]) -> None:
    """Refuse models of different kinds or layouts (ModelError naming both); no weights are read."""
    sd = [(ref, info) for ref, info in models if info is not None]
    if not sd:
        return
    first_ref, first = sd[0]
    if len(sd) < len(models):
        other = next(ref for ref, info in models if info is None)
        raise ModelError(
            f"'{other}' is not a Stable Diffusion checkpoint and '{first_ref}' is {first.kind_name}: "
            "they cannot be merged."
        )
    for ref, info in sd[1:]:
        if info.kind != first.kind:
            raise ModelError(f"'{ref}' is {info.kind_name}, '{first_ref}' is {first.kind_name}: they cannot be merged.")
    for ref, info in sd[1:]:
        if info.layout != first.layout:
            raise ModelError(
                f"'{ref}' is {LAYOUT_NAMES[info.layout]} and '{first_ref}' {LAYOUT_NAMES[first.layout]}: their "
                "tensor names differ, so they cannot be merged; convert one of them to the other's layout first."
            )


def check_channels(models: Sequence[tuple[str, SDInfo]], method: str) -> bool:
    """Check the UNets' input channels; True when A1111's inpainting merge applies.

    All equal: fine (False). Otherwise only A1111's direction is accepted:
    ``weighted_sum`` or ``add_difference`` with model A (the first) the
    inpainting (9) or instruct-pix2pix (8) model and every other one a normal
    4-channel model; then the first 4 input channels of the first convolution
    are merged and the others copied from A. Anything else is a ModelError.
    """
    channels = {info.in_channels for _, info in models}
    if len(channels) <= 1:
        return False
    a_ref, a = models[0]
    for ref, info in models:
        if info.in_channels is None:
            other = a_ref if ref != a_ref else models[1][0]
            raise ModelError(
                f"'{ref}' has no UNet (model.diffusion_model.*) but '{other}' has one: they cannot be merged."
            )
    others = models[1:]
    if a.in_channels in VARIANTS:
        odd = next(((ref, info) for ref, info in others if info.in_channels != 4), None)
        if odd is None:
            if method in ("weighted_sum", "add_difference"):
                return True
            raise ModelError(
                f"'{a_ref}' has {_an(a.in_channels)}-channel ({a.variant}) UNet and '{others[0][0]}' a 4-channel one: "
                f"only weighted_sum and add_difference merge them (A1111's way, the {a.variant} model as A), "
                f"not {method}."
            )
        ref, info = odd
        raise ModelError(
            f"'{ref}' has {_an(info.in_channels)}-channel UNet: with the {a.variant} model '{a_ref}' as A, "
            "every other model must be a normal 4-channel one."
        )
    ref, info = next((ref, info) for ref, info in others if info.in_channels != a.in_channels)
    label = f" ({info.variant})" if info.variant else ""
    hint = ": they cannot be merged"
    if info.in_channels in VARIANTS and a.in_channels == 4:
        hint = (
            f"; A1111's merge supports this only with the {info.variant} model first (as A), "
            "in weighted_sum or add_difference"
        )
    raise ModelError(
        f"'{ref}' has {_an(info.in_channels)}-channel{label} UNet and '{a_ref}' {_an(a.in_channels)}-channel one{hint}."
    )


def _an(n: Optional[int]) -> str:
    """'a 4', 'an 8', 'an 11'."""
    return f"{'an' if str(n).startswith('8') or n in (11, 18) else 'a'} {n}"


def present_parts(names: Iterable[str], layout: str, kind: str) -> frozenset[str]:
    """The parts a set of tensor names holds (after some were dropped by the recipe)."""
    parts = set()
    for n in names:
        if layout == DIFFUSERS:
            comp = n.partition("/")[0]
            if comp in ("unet", "text_encoder", "text_encoder_2", "vae"):
                parts.add(comp)
            continue
        if n.startswith(UNET_PREFIX):
            parts.add("unet")
        elif n.startswith("cond_stage_model.") or n.startswith("conditioner.embedders.0."):
            parts.add("text_encoder")
        elif n.startswith("conditioner.embedders.1."):
            parts.add("text_encoder_2")
        elif n.startswith(VAE_PREFIX):
            parts.add("vae")
        elif n.startswith(EMA_PREFIX) and n not in EMA_COUNTERS:
            parts.add("ema")
    if kind == SDXL_REFINER and "text_encoder_2" in parts:
        parts = (parts - {"text_encoder_2"}) | {"text_encoder"}
    return frozenset(parts)


def is_buffer(name: str) -> bool:
    """A non-weight tensor of a checkpoint (noise schedule, EMA counters, position ids)."""
    return name in SCHEDULE_BUFFERS or name in EMA_COUNTERS or name.endswith("position_ids")


def ema_name(unet_key: str) -> str:
    """The EMA copy of a UNet weight in an ldm checkpoint: dots removed after ``model.``.

    ``model.diffusion_model.out.2.weight`` -> ``model_ema.diffusion_modelout2weight``.
    """
    return EMA_PREFIX + unet_key.removeprefix("model.").replace(".", "")


def conv_in_names(layout: str) -> tuple[str, ...]:
    """The tensors whose input channels differ in inpainting / instruct-pix2pix UNets."""
    if layout == DIFFUSERS:
        return (DIFFUSERS_CONV_IN,)
    return (LDM_CONV_IN, ema_name(LDM_CONV_IN))


# ----------------------------------------------------------------------------- A1111 hashes and metadata


def sha256_file(path: Path, block: int = 1 << 20) -> str:
    """The sha256 of a whole file (A1111's "model hash"; its short form is the first 10 digits).

    This reads the entire file once, in 1 MiB blocks (memory stays flat), so it
    costs as long as reading the model from disk; the merge computes it for the
    metadata of its output, never ``check``.
    """
    digest = hashlib.sha256()
    try:
        with open(path, "rb") as handle:
            while chunk := handle.read(block):
                digest.update(chunk)
    except OSError as exc:
        raise ModelError(f"{path}: cannot read ({exc.strerror or exc}).") from None
    return digest.hexdigest()


def cached_sha256(path: Path) -> str:
    """:func:`sha256_file`, remembered in ``MERGESTUDIO_HOME/cache/sha256.json`` by path, size and mtime.

    Merging the same inputs again (new block weights, say) then costs no full
    read of each input; a changed file (size or mtime) is hashed again.
    """
    import os
    import tempfile

    from core.paths import cache_dir

    path = Path(path).absolute()
    stat = path.stat()
    key, stamp = str(path), [stat.st_size, stat.st_mtime_ns]
    store = cache_dir() / "sha256.json"
    try:
        known = json.loads(store.read_text(encoding="utf-8"))
        if not isinstance(known, dict):
            known = {}
    except (OSError, ValueError):
        known = {}
    entry = known.get(key)
    if isinstance(entry, dict) and entry.get("stamp") == stamp and isinstance(entry.get("sha256"), str):
        return entry["sha256"]
    digest = sha256_file(path)
    known[key] = {"stamp": stamp, "sha256": digest}
    tmp = None
    try:  # a cache: a failure to write it costs a re-hash next time, nothing else
        fd, tmp = tempfile.mkstemp(prefix=".sha256-", dir=store.parent)
        with os.fdopen(fd, "w", encoding="utf-8") as handle:
            json.dump(known, handle)
        os.replace(tmp, store)
    except OSError:
        if tmp is not None:
            Path(tmp).unlink(missing_ok=True)
    return digest


def legacy_hash(path: Path) -> str:
    """A1111's old short hash: 8 hex digits of the sha256 of the 64 KiB at offset 1 MiB.

    A file shorter than 1 MiB hashes the empty string, as A1111 does.
    """
    try:
        with open(path, "rb") as handle:
            handle.seek(0x100000)
            data = handle.read(0x10000)
    except OSError as exc:
        raise ModelError(f"{path}: cannot read ({exc.strerror or exc}).") from None
    return hashlib.sha256(data).hexdigest()[:8]


INTERP_METHODS = {"weighted_sum": "Weighted sum", "add_difference": "Add difference", "convert": "No interpolation"}


@dataclass(frozen=True)
class InputRecord:
    """One input of a merge as A1111 lists it in ``sd_merge_models``."""

    name: str  # file name, as A1111 shows checkpoints
    sha256: str
    legacy_hash: str
    metadata: Mapping[str, str]  # the input's own safetensors metadata (its sd_merge_* keys travel on)


def a1111_metadata(inputs: Sequence[InputRecord], recipe: Mapping[str, Any]) -> dict[str, str]:
    """``sd_merge_recipe`` and ``sd_merge_models`` as A1111 writes them (JSON text values).

    ``recipe`` holds the fields of ``sd_merge_recipe`` beyond the model hashes
    (interp_method, multiplier, save_as_half, ...). The primary, secondary and
    tertiary hashes are the first three inputs. ``sd_merge_models`` maps each
    input's sha256 to its name, legacy hash and own ``sd_merge_recipe``, and takes
    over the ``sd_merge_models`` of inputs that were merges themselves.
    """
    roles = ("primary", "secondary", "tertiary")
    merged: dict[str, Any] = {"type": "mergestudio"}
    for i, role in enumerate(roles):
        merged[f"{role}_model_hash"] = inputs[i].sha256 if i < len(inputs) else None
    merged.update(recipe)
    models: dict[str, Any] = {}
    for record in inputs:
        models[record.sha256] = {
            "name": record.name,
            "legacy_hash": record.legacy_hash,
            "sd_merge_recipe": _json_or_none(record.metadata.get("sd_merge_recipe")),
        }
        earlier = _json_or_none(record.metadata.get("sd_merge_models"))
        if isinstance(earlier, dict):
            models.update(earlier)
    return {"sd_merge_recipe": json.dumps(merged), "sd_merge_models": json.dumps(models)}


def _json_or_none(text: Optional[str]) -> Any:
    if not text:
        return None
    try:
        return json.loads(text)
    except (TypeError, ValueError):
        return None
