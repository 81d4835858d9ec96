"""Recognise a model on disk and give lazy access to its tensors.

Supported layouts:

* Hugging Face transformers folder: ``config.json`` plus ``model.safetensors``
  or a sharded ``model.safetensors.index.json`` (diffusers components use
  ``diffusion_pytorch_model`` for the same two layouts);
* a single ``.safetensors`` checkpoint file (A1111 / ComfyUI style);
* a diffusers pipeline folder: ``model_index.json`` with one component per
  subfolder; tensors are named ``component/tensor`` (``unet/conv_in.weight``);
* pickle checkpoints (``.bin``, ``.ckpt``, ``.pt``, ``.pth``): refused unless
  the caller opts in, then loaded with ``torch.load(weights_only=True)``.

Only headers and configs are read when a model is opened; tensors are read on
request, one at a time.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Optional

from core.errors import ModelError
from core.io.tensors import DTYPE_SIZES, SafetensorsReader, TensorInfo, dtype_name, read_header

if TYPE_CHECKING:  # pragma: no cover
    import torch

PICKLE_SUFFIXES = (".bin", ".ckpt", ".pt", ".pth")
WEIGHT_STEMS = ("model", "diffusion_pytorch_model")


@dataclass
class ModelSource:
    """One model on disk: its config and an index of its tensors (headers only)."""

    path: Path
    kind: str  # "transformers", "single_file", "diffusers", "pickle"
    config: Optional[dict[str, Any]]
    tensors: dict[str, TensorInfo]
    metadata: dict[str, str] = field(default_factory=dict)
    weight_files: list[Path] = field(default_factory=list)
    components: dict[str, "ModelSource"] = field(default_factory=dict)
    _readers: dict[Path, SafetensorsReader] = field(default_factory=dict, repr=False)
    _pickle_state: Optional[dict[str, Any]] = field(default=None, repr=False)

    @property
    def name(self) -> str:
        return self.path.name

    def get(self, name: str) -> "torch.Tensor":
        """Read one tensor (a view of the memory map where possible)."""
        if self.kind == "diffusers":
            component, _, inner = name.partition("/")
            return self.components[component].get(inner)
        if name not in self.tensors:
            raise ModelError(f"{self.path}: has no tensor '{name}'.")
        if self.kind == "pickle":
            assert self._pickle_state is not None
            return self._pickle_state[name]
        info = self.tensors[name]
        reader = self._readers.get(info.file)
        if reader is None:
            reader = self._readers[info.file] = SafetensorsReader(read_header(info.file))
        return reader.get(name)

    def size_on_disk(self) -> int:
        return sum(f.stat().st_size for f in self.all_weight_files())

    def all_weight_files(self) -> list[Path]:
        files = list(self.weight_files)
        for component in self.components.values():
            files.extend(component.weight_files)
        return files

    def num_parameters(self) -> int:
        return sum(info.numel for info in self.tensors.values())

    def close(self) -> None:
        for reader in self._readers.values():
            reader.close()
        self._readers.clear()
        self._pickle_state = None
        for component in self.components.values():
            component.close()


def open_model(path: str | Path, *, allow_pickle: bool = False) -> ModelSource:
    """Open the model at ``path``, reading configs and headers only.

    Raises ModelError with one sentence naming the path when it does not exist,
    is not a model, has a corrupt or truncated file, or is pickle-only without
    ``allow_pickle``.
    """
    path = Path(path).expanduser()
    if not path.exists():
        raise ModelError(f"{path}: no such file or folder.")
    if path.is_file():
        if path.suffix == ".safetensors":
            return _single_file(path)
        if path.suffix in PICKLE_SUFFIXES:
            return _pickle_file(path, path, None, allow_pickle)
        raise ModelError(f"{path}: not a model file (expected .safetensors).")
    if (path / "model_index.json").is_file():
        return _diffusers_pipeline(path, allow_pickle)
    return _folder(path, allow_pickle)


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError) as exc:
        raise ModelError(f"{path}: cannot parse JSON ({exc}).") from None


def _read_json_object(path: Path) -> dict[str, Any]:
    value = _read_json(path)
    if not isinstance(value, dict):
        raise ModelError(f"{path}: expected a JSON object, got {type(value).__name__}.")
    return value


def _single_file(path: Path) -> ModelSource:
    header = read_header(path)
    return ModelSource(
        path=path,
        kind="single_file",
        config=None,
        tensors=header.tensors,
        metadata=header.metadata,
        weight_files=[path],
    )


def _folder(path: Path, allow_pickle: bool) -> ModelSource:
    config_path = path / "config.json"
    config = _read_json_object(config_path) if config_path.is_file() else None
    for stem in WEIGHT_STEMS:
        single = path / f"{stem}.safetensors"
        index = path / f"{stem}.safetensors.index.json"
        if index.is_file():
            return _sharded(path, index, config)
        if single.is_file():
            header = read_header(single)
            return ModelSource(path, "transformers", config, header.tensors, header.metadata, [single])
    loose = sorted(path.glob("*.safetensors"))
    if len(loose) == 1 and config is None:
        return _single_file(loose[0])
    pickles = sorted(p for p in path.iterdir() if p.suffix in PICKLE_SUFFIXES and p.is_file())
    if pickles:
        index = path / "pytorch_model.bin.index.json"
        if index.is_file():
            raise ModelError(f"{path}: sharded pickle checkpoints are not supported; convert to safetensors.")
        # Training checkpoints hold optimizer.pt, scheduler.pt, training_args.bin beside the weights.
        weights = [p for p in pickles if p.stem in ("pytorch_model", "model", "diffusion_pytorch_model")]
        return _pickle_file((weights or pickles)[0], path, config, allow_pickle)
    raise ModelError(
        f"{path}: not a model folder (no model.safetensors, model.safetensors.index.json "
        "or model_index.json found)."
    )


def _sharded(path: Path, index_path: Path, config: Optional[dict]) -> ModelSource:
    index = _read_json(index_path)
    weight_map = index.get("weight_map") if isinstance(index, dict) else None
    if not isinstance(weight_map, dict) or not weight_map:
        raise ModelError(f"{index_path}: has no 'weight_map'.")
    tensors: dict[str, TensorInfo] = {}
    metadata: dict[str, str] = {}
    files: list[Path] = []
    by_file: dict[str, list[str]] = {}
    for name, file_name in weight_map.items():
        if not isinstance(file_name, str) or not file_name:
            raise ModelError(f"{index_path}: weight_map entry for tensor '{name}' is not a file name ({file_name!r}).")
        by_file.setdefault(file_name, []).append(name)
    for file_name, names in by_file.items():
        shard = path / file_name
        if not shard.is_file():
            raise ModelError(f"{index_path}: lists shard '{file_name}', which does not exist.")
        header = read_header(shard)
        files.append(shard)
        metadata.update(header.metadata)
        for name in names:
            if name not in header.tensors:
                raise ModelError(f"{shard}: the index lists tensor '{name}' but the shard does not hold it.")
            tensors[name] = header.tensors[name]
    return ModelSource(path, "transformers", config, tensors, metadata, files)


def _pickle_file(file: Path, path: Path, config: Optional[dict], allow_pickle: bool) -> ModelSource:
    if not allow_pickle:
        raise ModelError(
            f"{file}: is a pickle checkpoint, which can run arbitrary code when loaded; "
            "convert it to safetensors or pass --allow-pickle to load it with weights_only=True."
        )
    import torch

    try:
        try:
            state = torch.load(file, map_location="cpu", weights_only=True, mmap=True)
        except RuntimeError as exc:
            if "mmap" not in str(exc):
                raise
            # The legacy (pre-zip) format cannot be memory-mapped: read it whole.
            state = torch.load(file, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises many types for bad pickles
        raise ModelError(f"{file}: cannot load with weights_only=True ({_pickle_reason(exc)}).") from None
    if isinstance(state, dict) and "state_dict" in state and isinstance(state["state_dict"], dict):
        state = state["state_dict"]
    if not isinstance(state, dict):
        raise ModelError(f"{file}: does not hold a dictionary of tensors.")
    state = {k: v for k, v in state.items() if isinstance(v, torch.Tensor)}
    if not state:
        raise ModelError(f"{file}: holds no tensors (is it a model's weights?).")
    tensors = {
        name: TensorInfo(
            name,
            tuple(t.shape),
            dtype_name(t.dtype),
            file,
            0,
            t.numel() * DTYPE_SIZES[dtype_name(t.dtype)],
        )
        for name, t in state.items()
    }
    return ModelSource(path, "pickle", config, tensors, {}, [file], _pickle_state=state)


def _pickle_reason(exc: Exception) -> str:
    """torch's weights_only errors span many lines; keep the one that says why."""
    import re

    text = str(exc)
    match = re.search(r"Unsupported global: GLOBAL (\S+)", text)
    if match:
        return f"it contains '{match.group(1)}', which is not a tensor type and could run code"
    text = re.sub(r"\x1b\[[0-9;]*m", "", text)
    first = next((line.strip() for line in text.splitlines() if line.strip()), type(exc).__name__)
    return first.rstrip(".")


def _diffusers_pipeline(path: Path, allow_pickle: bool) -> ModelSource:
    model_index = _read_json_object(path / "model_index.json")
    components: dict[str, ModelSource] = {}
    for name, value in sorted(model_index.items()):
        if name.startswith("_") or not (path / name).is_dir():
            continue
        folder = path / name
        has_weights = any(folder.glob("*.safetensors")) or any(
            p.suffix in PICKLE_SUFFIXES for p in folder.iterdir()
        )
        if not has_weights:
            continue  # tokenizer, scheduler: no tensors
        components[name] = _folder(folder, allow_pickle)
    if not components:
        raise ModelError(f"{path}: model_index.json names no component folder with weights.")
    tensors: dict[str, TensorInfo] = {}
    for comp_name, comp in components.items():
        for tensor_name, info in comp.tensors.items():
            tensors[f"{comp_name}/{tensor_name}"] = info
    return ModelSource(
        path, "diffusers", model_index, tensors, {}, [], components=components
    )
