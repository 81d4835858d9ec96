"""Find models referenced by name, and describe local models from headers only.

``resolve_model`` looks for a recipe's reference among local paths first, then
in the Hugging Face cache; nothing is downloaded: a name that is not on disk is
an error that says where it was looked for. ``describe_model`` turns a model on
disk into a :class:`ModelInfo` (architecture, parameters, dtype, size,
provenance) from its configs and safetensors headers, for the model library.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

from core.errors import ModelError


def hf_cache_dir() -> Path:
    """The Hugging Face hub cache folder (HF_HUB_CACHE, HF_HOME or the default)."""
    if os.environ.get("HF_HUB_CACHE"):
        return Path(os.environ["HF_HUB_CACHE"]).expanduser()
    home = Path(os.environ.get("HF_HOME", Path.home() / ".cache" / "huggingface")).expanduser()
    return home / "hub"


def find_in_hf_cache(repo_id: str, revision: str = "main") -> Optional[Path]:
    """The snapshot folder of ``repo_id`` in the local cache, or None."""
    folder = hf_cache_dir() / ("models--" + repo_id.replace("/", "--"))
    if not folder.is_dir():
        return None
    ref = folder / "refs" / revision
    snapshots = folder / "snapshots"
    if ref.is_file():
        snap = snapshots / ref.read_text().strip()
        if snap.is_dir():
            return snap
    if (snapshots / revision).is_dir():
        return snapshots / revision
    candidates = sorted(snapshots.glob("*"), key=lambda p: p.stat().st_mtime) if snapshots.is_dir() else []
    return candidates[-1] if candidates else None


def resolve_model(ref: str, recipe_dir: Optional[Path] = None) -> Path:
    """Turn a recipe's model reference into a path on disk.

    Order: the path as given (relative to the current folder, as mergekit
    does), then relative to the recipe's folder, then ``org/name[@revision]``
    in the Hugging Face cache.
    """
    path = Path(ref).expanduser()
    if path.exists():
        return path
    if recipe_dir is not None and not path.is_absolute() and (recipe_dir / path).exists():
        return recipe_dir / path
    name, _, revision = ref.partition("@")
    if not path.is_absolute() and name.count("/") == 1:
        cached = find_in_hf_cache(name, revision or "main")
        if cached is not None:
            return cached
    raise ModelError(
        f"Model '{ref}' was not found: no such file or folder, and not in the Hugging Face cache ({hf_cache_dir()})."
    )


# ----------------------------------------------------------------------------- describing models
#
# Everything below reads configs and safetensors headers only: describing a
# model of any size costs a few small reads, never its tensor data.

MERGESTUDIO_RECIPE_KEY = "mergestudio_recipe"
A1111_RECIPE_KEY = "sd_merge_recipe"
A1111_MODELS_KEY = "sd_merge_models"
PROVENANCE_TOOLS = ("Merge Studio", "mergekit", "A1111")


@dataclass(frozen=True)
class Provenance:
    """How a model was made, when it says so: which tool, method and input models."""

    tool: str  # one of PROVENANCE_TOOLS
    method: Optional[str]
    models: tuple[str, ...]
    recipe: Optional[str]  # the recipe text as stored: YAML (ours, mergekit) or JSON (A1111)
    detail: str  # one readable line, e.g. "ties of 3 models"

    def to_dict(self) -> dict[str, Any]:
        return {
            "tool": self.tool,
            "method": self.method,
            "models": list(self.models),
            "recipe": self.recipe,
            "detail": self.detail,
        }


@dataclass(frozen=True)
class ModelInfo:
    """What a library shows about one model, from its configs and headers."""

    path: Path
    name: str
    kind: str  # "transformers", "single_file" or "diffusers"
    architecture: str
    model_type: Optional[str]
    num_parameters: int
    dtype: str  # the dtype holding most elements, e.g. "BF16"
    size_bytes: int  # weight files on disk
    layer_count: Optional[int]
    source: str  # the library folder it was found under, or "Hugging Face cache"
    provenance: Optional[Provenance]
    header_hash: str
    modified: float  # mtime of the newest weight file

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready (the CLI's ``--json``)."""
        return {
            "path": str(self.path),
            "name": self.name,
            "kind": self.kind,
            "architecture": self.architecture,
            "model_type": self.model_type,
            "num_parameters": self.num_parameters,
            "dtype": self.dtype,
            "size_bytes": self.size_bytes,
            "layer_count": self.layer_count,
            "source": self.source,
            "provenance": None if self.provenance is None else self.provenance.to_dict(),
            "header_hash": self.header_hash,
            "modified": self.modified,
        }


def describe_model(path: str | Path, *, source: str = "") -> ModelInfo:
    """Describe the model at ``path`` from its configs and safetensors headers.

    Raises ModelError (one sentence naming the file) for anything that is not a
    readable safetensors model: missing, corrupt, truncated, pickle-only, empty.
    """
    from core.io.formats import open_model

    path = Path(path).expanduser()
    model = open_model(path)
    try:
        if not model.tensors:
            raise ModelError(f"{model.path}: holds no tensors.")
        architecture, model_type = _architecture(model)
        layer_count = None
        if model.kind == "transformers" or (model.kind == "single_file" and model_type is None):
            from core.merge.layers import detect_layout

            layer_count = detect_layout(model.tensors, model.config).count or None
        weight_files = model.all_weight_files()
        return ModelInfo(
            path=path,
            name=path.stem if path.is_file() else path.name,
            kind=model.kind,
            architecture=architecture,
            model_type=model_type,
            num_parameters=model.num_parameters(),
            dtype=_dominant_dtype(model),
            size_bytes=model.size_on_disk(),
            layer_count=layer_count,
            source=source,
            provenance=read_provenance(model),
            header_hash=_header_hash(model),
            modified=max(f.stat().st_mtime for f in weight_files),
        )
    except OSError as exc:
        raise ModelError(f"{path}: cannot read ({exc.strerror or exc}).") from None
    finally:
        model.close()


def header_hash(path: str | Path) -> str:
    """A fingerprint of a model from its config and weight headers (no tensor data read).

    blake2b over config.json (model_index.json and component configs for a
    diffusers pipeline) and each weight file's raw header (8-byte length plus
    JSON), files in sorted order, each preceded by its name inside the model.
    """
    from core.io.formats import open_model

    model = open_model(Path(path).expanduser())
    try:
        return _header_hash(model)
    finally:
        model.close()


def _header_hash(model: Any) -> str:
    import hashlib
    import struct

    root = model.path if model.path.is_dir() else model.path.parent
    configs: list[Path] = []
    if model.path.is_dir():
        configs += [model.path / name for name in ("config.json", "model_index.json")]
        configs += [component.path / "config.json" for component in model.components.values()]
    digest = hashlib.blake2b(digest_size=20)
    for file in sorted(f for f in configs if f.is_file()):
        digest.update(_relative_name(file, root))
        digest.update(file.read_bytes())
    for file in sorted(model.all_weight_files()):
        digest.update(_relative_name(file, root))
        with open(file, "rb") as handle:
            prefix = handle.read(8)
            (length,) = struct.unpack("<Q", prefix)
            digest.update(prefix + handle.read(length))  # read_header has checked the length
    return digest.hexdigest()


def _relative_name(file: Path, root: Path) -> bytes:
    try:
        name = file.relative_to(root).as_posix()
    except ValueError:
        name = file.name
    return name.encode("utf-8") + b"\0"


def _dominant_dtype(model: Any) -> str:
    """The dtype holding the most elements (ties: the first name alphabetically)."""
    counts: dict[str, int] = {}
    for info in model.tensors.values():
        counts[info.dtype] = counts.get(info.dtype, 0) + info.numel
    return min(counts, key=lambda dtype: (-counts[dtype], dtype))


# Single-file checkpoints are recognised from their key names.
_SD_UNET = "model.diffusion_model."


def _architecture(model: Any) -> tuple[str, Optional[str]]:
    """(architecture, model_type) from the config, model_index.json or key names."""
    config = model.config if isinstance(model.config, dict) else {}
    if model.kind == "diffusers":
        name = config.get("_class_name")
        return (name if isinstance(name, str) and name else "diffusers pipeline"), None
    model_type = config.get("model_type") if isinstance(config.get("model_type"), str) else None
    architectures = config.get("architectures")
    if isinstance(architectures, list) and architectures and isinstance(architectures[0], str):
        return architectures[0], model_type
    if model_type:
        return model_type, model_type
    class_name = config.get("_class_name")  # a diffusers component folder (unet/, vae/)
    if isinstance(class_name, str) and class_name:
        return class_name, None
    return checkpoint_architecture(model.tensors)


def checkpoint_architecture(names: Any) -> tuple[str, Optional[str]]:
    """Recognise a single-file checkpoint from its tensor names: (architecture, model_type).

    SD 1.x has a CLIP text encoder under ``cond_stage_model.transformer``, SD 2.x an
    OpenCLIP one under ``cond_stage_model.model``, SDXL its encoders under
    ``conditioner.embedders`` (the refiner only OpenCLIP-G); anything else is a
    plain "safetensors checkpoint". Given ``{name: TensorInfo}``, an inpainting or
    instruct-pix2pix UNet (9 or 8 input channels) is named as such too.
    """
    from core.io.sd import KIND_TITLES, detect

    keys = list(names)
    has_unet = any(k.startswith(_SD_UNET) for k in keys)
    known = any(k.startswith("conditioner.embedders.") for k in keys) or (
        has_unet and any(k.startswith(("cond_stage_model.model.", "cond_stage_model.transformer.")) for k in keys)
    )
    if known:
        info = detect(names if isinstance(names, dict) else {k: () for k in keys})
        assert info is not None
        variant = f" ({info.variant})" if info.variant else ""
        return KIND_TITLES[info.kind] + variant, info.kind
    if has_unet:
        return "Stable Diffusion UNet", None
    if any(marker in k for k in keys for marker in ("lora_down.", "lora_up.", "lora_A.", "lora_B.")):
        return "LoRA adapter", None
    return "safetensors checkpoint", None


# ----------------------------------------------------------------------------- provenance


def read_provenance(source: Any) -> Optional[Provenance]:
    """How ``source`` (a ModelSource) was made, from its metadata and files, or None.

    Checked in order: our ``mergestudio_recipe`` safetensors metadata, a
    ``mergekit_config.yml`` beside the weights or a README.md whose front matter
    is tagged mergekit, then A1111's ``sd_merge_recipe`` / ``sd_merge_models``
    metadata. Unreadable provenance is not an error: ``detail`` says so.
    """
    metadata = _all_metadata(source)
    if MERGESTUDIO_RECIPE_KEY in metadata:
        found = _yaml_provenance("Merge Studio", metadata[MERGESTUDIO_RECIPE_KEY])
        if "mergestudio_block_weights" in metadata and found.method is not None:
            found = Provenance(found.tool, found.method, found.models, found.recipe, found.detail + ", block-weighted")
        return found
    folder = source.path if source.path.is_dir() else None
    if folder is not None:
        config_file = folder / "mergekit_config.yml"
        if config_file.is_file():
            return _yaml_provenance("mergekit", _read_text(config_file))
        readme = folder / "README.md"
        if readme.is_file():
            found = _readme_provenance(_read_text(readme))
            if found is not None:
                return found
    if A1111_RECIPE_KEY in metadata:
        return _a1111_provenance(metadata[A1111_RECIPE_KEY], metadata.get(A1111_MODELS_KEY))
    return None


def _all_metadata(source: Any) -> dict[str, str]:
    merged: dict[str, str] = {}
    for component in source.components.values():
        merged.update(component.metadata)
    merged.update(source.metadata)
    return merged


def _read_text(path: Path) -> Optional[str]:
    try:
        return path.read_text(encoding="utf-8", errors="replace")
    except OSError:
        return None


def _yaml_provenance(tool: str, text: Optional[str]) -> Provenance:
    import yaml

    if text is None:
        return _unreadable(tool, None, "the file cannot be read")
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError:
        return _unreadable(tool, text, "not valid YAML")
    if not isinstance(data, dict) or not isinstance(data.get("merge_method"), str):
        return _unreadable(tool, text, "no merge_method")
    method = data["merge_method"]
    models = _recipe_models(data)
    return Provenance(tool, method, models, text, _detail(method, models))


def _recipe_models(data: dict[str, Any]) -> tuple[str, ...]:
    """The model references of a mergekit-style recipe dict, base model included, in order."""
    refs: list[str] = []

    def add(entry: Any) -> None:
        ref = entry.get("model") if isinstance(entry, dict) else entry
        if isinstance(ref, (str, int, float)) and str(ref) and str(ref) not in refs:
            refs.append(str(ref))

    for entry in data.get("models") or []:
        add(entry)
    for piece in data.get("slices") or []:
        if isinstance(piece, dict):
            for entry in piece.get("sources") or []:
                add(entry)
    if data.get("base_model"):
        add(data["base_model"])
    return tuple(refs)


def _readme_provenance(text: Optional[str]) -> Optional[Provenance]:
    """mergekit's model card: YAML front matter tagged ``mergekit``, recipe in a yaml block."""
    import re

    import yaml

    if not text or not text.startswith("---"):
        return None
    match = re.match(r"---\s*\n(.*?)\n---\s*(?:\n|$)", text, re.DOTALL)
    if not match:
        return None
    try:
        front = yaml.safe_load(match.group(1))
    except yaml.YAMLError:
        return None
    tags = front.get("tags") if isinstance(front, dict) else None
    if not isinstance(tags, list) or "mergekit" not in {str(t).lower() for t in tags}:
        return None
    body = text[match.end():]
    block = re.search(r"```ya?ml\s*\n(.*?)```", body, re.DOTALL)
    if block:
        found = _yaml_provenance("mergekit", block.group(1))
        if found.method is not None:
            return found
    base = front.get("base_model")
    models = tuple(str(m) for m in (base if isinstance(base, list) else [base] if base else []))
    return Provenance("mergekit", None, models, None, _detail(None, models))


def _a1111_provenance(recipe_text: str, models_text: Optional[str]) -> Provenance:
    try:
        recipe = json.loads(recipe_text)
    except (TypeError, ValueError):
        return _unreadable("A1111", recipe_text, "not valid JSON")
    if not isinstance(recipe, dict):
        return _unreadable("A1111", recipe_text, "not a JSON object")
    method = recipe.get("interp_method") or recipe.get("type")
    method = str(method) if method else None
    names = _a1111_model_names(recipe, models_text)
    detail = _detail(method, names)
    multiplier = recipe.get("multiplier")
    if isinstance(multiplier, (int, float)) and not isinstance(multiplier, bool):
        detail += f", multiplier {multiplier:g}"
    return Provenance("A1111", method, names, recipe_text, detail)


def _a1111_model_names(recipe: dict[str, Any], models_text: Optional[str]) -> tuple[str, ...]:
    """The inputs' names: primary, secondary, tertiary when their hashes are listed, else all."""
    try:
        listing = json.loads(models_text) if models_text else {}
    except (TypeError, ValueError):
        listing = {}
    if not isinstance(listing, dict):
        listing = {}
    names = {key: value.get("name") for key, value in listing.items() if isinstance(value, dict)}
    ordered = [
        names.get(recipe.get(f"{role}_model_hash"))
        for role in ("primary", "secondary", "tertiary")
        if recipe.get(f"{role}_model_hash")
    ]
    if ordered and all(isinstance(n, str) and n for n in ordered):
        return tuple(ordered)
    return tuple(n for n in names.values() if isinstance(n, str) and n)


def _detail(method: Optional[str], models: tuple[str, ...]) -> str:
    count = len(models)
    noun = "model" if count == 1 else "models"
    return f"{method or 'merge'} of {count} {noun}" if count else (method or "merge")


def _unreadable(tool: str, text: Optional[str], reason: str) -> Provenance:
    return Provenance(tool, None, (), text, f"the {tool} recipe could not be read ({reason})")
