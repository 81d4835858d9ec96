"""Read LoRA files: PEFT adapters and kohya / A1111 single files (headers first).

Two layouts are recognised:

* **PEFT**: a folder with ``adapter_config.json`` and ``adapter_model.safetensors``
  (keys ``base_model.model.<module>.lora_A.weight [r, in]`` and ``.lora_B.weight
  [out, r]``; embeddings ``.lora_embedding_A [r, vocab]`` / ``.lora_embedding_B
  [dim, r]``). A bare ``.safetensors`` file of PEFT keys is read with the
  ``adapter_config.json`` beside it, or the config that diffusers stores in the
  file's metadata (``lora_adapter_metadata``); without either its scale is
  unknown and the file is refused.
* **kohya / A1111**: one ``.safetensors`` with ``lora_unet_<path>`` /
  ``lora_te_``, ``lora_te1_``, ``lora_te2_`` modules, each ``.lora_down.weight
  [r, in(, kh, kw)]``, ``.lora_up.weight [out, r(, 1, 1)]`` and an optional
  scalar ``.alpha``.

A module's update is ``scale * B @ A`` (conv factors flattened), transposed for
PEFT embeddings and ``fan_in_fan_out`` layers (GPT-2's Conv1D). Scale is
``alpha / r``: PEFT's ``lora_alpha`` (``alpha_pattern`` per module; ``/ sqrt(r)``
with ``use_rslora``), kohya's ``.alpha`` tensor, or 1 when a kohya module has no
alpha. Anything that is not a plain LoRA factor (DoRA magnitudes, LyCORIS LoHa /
LoKr, trained biases, ``modules_to_save`` weights) is refused naming the key:
merging it as if it were a LoRA would be wrong.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Optional

from core.errors import ModelError
from core.io.tensors import SafetensorsHeader, SafetensorsReader, TensorInfo, read_header

if TYPE_CHECKING:  # pragma: no cover
    import torch

PEFT = "peft"
KOHYA = "kohya"
FORMATS = (PEFT, KOHYA)

PEFT_PREFIX = "base_model.model."
KOHYA_PREFIXES = {"lora_unet_": "unet", "lora_te1_": "te1", "lora_te2_": "te2", "lora_te_": "te1"}
_KOHYA_PARTS = {".lora_down.weight": "down", ".lora_up.weight": "up", ".alpha": "alpha"}
_PEFT_PARTS = {
    ".lora_A.weight": "down",
    ".lora_B.weight": "up",
    ".lora_embedding_A": "edown",
    ".lora_embedding_B": "eup",
}
# Keys of adapters that are not plain LoRA factors, and what they are.
_UNSUPPORTED = (
    (".lora_magnitude_vector", "a DoRA magnitude vector"),
    (".dora_scale", "a DoRA magnitude vector"),
    (".hada_", "a LyCORIS LoHa factor"),
    (".lokr_", "a LyCORIS LoKr factor"),
    (".lora_mid.weight", "a LyCORIS Tucker (CP) factor"),
    (".oft_", "an OFT factor"),
    (".diff", "a full-weight difference"),
)


@dataclass(frozen=True)
class LoraModule:
    """One LoRA module: where its factors are and what they look like (headers only)."""

    name: str  # kohya: the key stem ('lora_unet_down_blocks_0_...'); PEFT: the module path
    down: str  # tensor key of A (lora_A / lora_down), shape [r, in(, kh, kw)]
    up: str  # tensor key of B (lora_B / lora_up), shape [out, r(, 1, 1)]
    alpha_key: Optional[str]  # kohya's scalar '.alpha' tensor, if any
    rank: int
    in_shape: tuple[int, ...]  # A.shape[1:]
    out_features: int
    transpose: bool = False  # the update is (B @ A).T (PEFT embeddings, fan_in_fan_out)
    embedding: bool = False
    alpha: Optional[float] = None  # PEFT: from the config; kohya: None (read alpha_key)
    rslora: bool = False

    @property
    def component(self) -> Optional[str]:
        """kohya: 'unet', 'te1' or 'te2' (from the key prefix); PEFT: None."""
        for prefix, component in KOHYA_PREFIXES.items():
            if self.name.startswith(prefix):
                return component
        return None

    @property
    def stem(self) -> str:
        """The module path of a kohya key without its prefix ('down_blocks_0_...')."""
        for prefix in KOHYA_PREFIXES:
            if self.name.startswith(prefix):
                return self.name[len(prefix):]
        return self.name

    @property
    def delta_shape(self) -> tuple[int, ...]:
        """Shape of the update as it adds to the weight."""
        if self.transpose:
            return (self.in_shape[0], self.out_features)
        return (self.out_features, *self.in_shape)


@dataclass
class LoraFile:
    """A LoRA on disk: its modules (from the header) and lazy access to the factors."""

    path: Path
    format: str  # PEFT or KOHYA
    weights: Path  # the safetensors file holding the factors
    modules: dict[str, LoraModule]
    config: Optional[dict[str, Any]] = None  # PEFT's adapter_config.json
    metadata: dict[str, str] = field(default_factory=dict)
    header: Optional[SafetensorsHeader] = field(default=None, repr=False)
    # PEFT's copies of targeted embedding layers (save_embedding_layers): module -> key.
    base_copies: dict[str, str] = field(default_factory=dict)
    _reader: Optional[SafetensorsReader] = field(default=None, repr=False)

    @property
    def name(self) -> str:
        return self.path.name

    @property
    def tensors(self) -> dict[str, TensorInfo]:
        assert self.header is not None
        return self.header.tensors

    def get(self, key: str) -> "torch.Tensor":
        """Read one tensor of the file."""
        if self._reader is None:
            assert self.header is not None
            self._reader = SafetensorsReader(self.header)
        return self._reader.get(key)

    def scale(self, module: LoraModule) -> float:
        """alpha / r for ``module`` (reads kohya's scalar alpha tensor)."""
        alpha = module.alpha
        if alpha is None and module.alpha_key is not None:
            alpha = float(self.get(module.alpha_key).float().reshape(-1)[0])
            if not math.isfinite(alpha):
                raise ModelError(f"{self.path}: '{module.alpha_key}' is {alpha}, not a finite number.")
        if alpha is None:
            return 1.0
        return alpha / (math.sqrt(module.rank) if module.rslora else module.rank)

    def factors(
        self, module: LoraModule, dtype: Optional["torch.dtype"] = None
    ) -> tuple["torch.Tensor", "torch.Tensor"]:
        """(A, B) as stored, converted to ``dtype`` when given."""
        a, b = self.get(module.down), self.get(module.up)
        if dtype is not None:
            a, b = a.to(dtype), b.to(dtype)
        return a, b

    def delta(self, module: LoraModule, dtype: Optional["torch.dtype"] = None) -> "torch.Tensor":
        """``scale * B @ A`` shaped like ``module.delta_shape`` (float32 unless ``dtype``)."""
        import torch

        a, b = self.factors(module, dtype or torch.float32)
        return product(a, b, module.transpose) * self.scale(module)

    def close(self) -> None:
        if self._reader is not None:
            self._reader.close()
            self._reader = None

    def __enter__(self) -> "LoraFile":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


def product(a: "torch.Tensor", b: "torch.Tensor", transpose: bool = False) -> "torch.Tensor":
    """B @ A for factors of any kernel size: [out, r(,1,1)] @ [r, in(, kh, kw)] -> [out, in(, kh, kw)]."""
    out = b.reshape(b.shape[0], -1) @ a.reshape(a.shape[0], -1)
    out = out.reshape(b.shape[0], *a.shape[1:])
    return out.T if transpose else out


def open_lora(path: str | Path) -> LoraFile:
    """Open a PEFT adapter folder or a LoRA ``.safetensors`` file, headers only.

    Raises ModelError naming the file and key when it is not a LoRA, holds
    keys that are not plain LoRA factors, or has factors that do not fit.
    """
    path = Path(path).expanduser()
    if not path.exists():
        raise ModelError(f"{path}: no such file or folder.")
    if path.is_dir():
        config_path = path / "adapter_config.json"
        weights = path / "adapter_model.safetensors"
        if not config_path.is_file():
            raise ModelError(f"{path}: not a PEFT adapter folder (no adapter_config.json).")
        if not weights.is_file():
            if (path / "adapter_model.bin").is_file():
                raise ModelError(
                    f"{path}: holds only adapter_model.bin, a pickle file; save the adapter as safetensors."
                )
            raise ModelError(f"{path}: has no adapter_model.safetensors.")
        return _peft(path, weights, _read_config(config_path), read_header(weights))
    if path.suffix != ".safetensors":
        raise ModelError(f"{path}: not a LoRA file (expected a .safetensors file or a PEFT adapter folder).")
    header = read_header(path)
    if not header.tensors:
        raise ModelError(f"{path}: holds no tensors.")
    keys = list(header.tensors)
    if any(k.startswith(tuple(KOHYA_PREFIXES)) for k in keys):
        return _kohya(path, header)
    if any(k.endswith(tuple(_PEFT_PARTS)) for k in keys):
        config_path = path.parent / "adapter_config.json"
        if config_path.is_file():
            config = _read_config(config_path)
        elif "lora_adapter_metadata" in header.metadata:
            where = f"{path} (metadata 'lora_adapter_metadata')"
            config = _parse_config(header.metadata["lora_adapter_metadata"], where)
        else:
            raise ModelError(
                f"{path}: holds PEFT LoRA keys but no adapter_config.json is beside it, so its lora_alpha "
                "(the scale) is unknown; pass the adapter folder instead."
            )
        return _peft(path, path, config, header)
    _refuse_unsupported(path, keys)
    raise ModelError(
        f"{path}: not a LoRA (no lora_A/lora_B or lora_down/lora_up keys; first key '{keys[0]}')."
    )


def _read_config(path: Path) -> dict[str, Any]:
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise ModelError(f"{path}: cannot read ({exc}).") from None
    return _parse_config(text, str(path))


def _parse_config(text: str, where: str) -> dict[str, Any]:
    try:
        config = json.loads(text)
    except ValueError as exc:
        raise ModelError(f"{where}: cannot parse JSON ({exc}).") from None
    if not isinstance(config, dict):
        raise ModelError(f"{where}: expected a JSON object.")
    return config


def _refuse_unsupported(path: Path, keys: list[str]) -> None:
    for key in keys:
        for marker, what in _UNSUPPORTED:
            if marker in key:
                raise ModelError(
                    f"{path}: key '{key}' is {what}, not a plain LoRA factor; only LoRA (and LoCon) files can be used."
                )


def _split(key: str, parts: dict[str, str]) -> Optional[tuple[str, str]]:
    for suffix, part in parts.items():
        if key.endswith(suffix):
            return key[: -len(suffix)], part
    return None


def _kohya(path: Path, header: SafetensorsHeader) -> LoraFile:
    _refuse_unsupported(path, list(header.tensors))
    groups: dict[str, dict[str, str]] = {}
    for key in header.tensors:
        split = _split(key, _KOHYA_PARTS)
        if split is None or not split[0].startswith(tuple(KOHYA_PREFIXES)):
            raise ModelError(
                f"{path}: key '{key}' is not a kohya LoRA factor (expected lora_unet_/lora_te*_ modules with "
                ".lora_down.weight, .lora_up.weight and .alpha)."
            )
        groups.setdefault(split[0], {})[split[1]] = key
    modules = {}
    for name, parts in groups.items():
        modules[name] = _module(path, header, name, parts, transpose=False, embedding=False)
    return LoraFile(path, KOHYA, path, modules, None, header.metadata, header)


def _peft(path: Path, weights: Path, config: dict[str, Any], header: SafetensorsHeader) -> LoraFile:
    where = path / "adapter_config.json" if path.is_dir() else path
    peft_type = str(config.get("peft_type", "LORA")).upper()
    if peft_type != "LORA":
        raise ModelError(f"{where}: peft_type is {peft_type}; only LORA adapters can be used.")
    if config.get("use_dora"):
        raise ModelError(f"{where}: use_dora is true; DoRA adapters are not plain LoRAs and cannot be used.")
    r, alpha = config.get("r", 8), config.get("lora_alpha", 8)
    for field_name, value in (("r", r), ("lora_alpha", alpha)):
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            raise ModelError(f"{where}: field '{field_name}' must be a number, got {value!r}.")
    alpha_pattern = config.get("alpha_pattern") or {}
    if not isinstance(alpha_pattern, dict):
        raise ModelError(f"{where}: field 'alpha_pattern' must be an object.")
    fan_in_fan_out = bool(config.get("fan_in_fan_out", False))
    rslora = bool(config.get("use_rslora", False))
    _refuse_unsupported(weights, list(header.tensors))
    groups: dict[str, dict[str, str]] = {}
    base_copies: dict[str, str] = {}
    for key in header.tensors:
        if key.endswith(".base_layer.weight"):
            base_copies[key[: -len(".base_layer.weight")].removeprefix(PEFT_PREFIX)] = key
            continue
        split = _split(key, _PEFT_PARTS)
        if split is None:
            what = "a trained bias" if key.endswith(".bias") else "a full weight (modules_to_save?)"
            raise ModelError(
                f"{weights}: key '{key}' is {what}, not a LoRA factor; merging it is not supported."
            )
        module = split[0].removeprefix(PEFT_PREFIX)
        groups.setdefault(module, {})[split[1]] = key
    modules = {}
    for name, parts in groups.items():
        embedding = "edown" in parts or "eup" in parts
        parts = {"down": parts.get("edown", parts.get("down")), "up": parts.get("eup", parts.get("up"))}
        parts = {k: v for k, v in parts.items() if v is not None}
        module_alpha = _pattern_value(alpha_pattern, name, alpha)
        if isinstance(module_alpha, bool) or not isinstance(module_alpha, (int, float)):
            raise ModelError(f"{where}: alpha_pattern value for '{name}' must be a number, got {module_alpha!r}.")
        modules[name] = _module(
            weights, header, name, parts, transpose=embedding or fan_in_fan_out, embedding=embedding,
            alpha=float(module_alpha), rslora=rslora,
        )
    for name, key in base_copies.items():
        if name not in modules:
            raise ModelError(f"{weights}: key '{key}' is a full weight of a module the adapter does not adapt.")
    return LoraFile(path, PEFT, weights, modules, config, header.metadata, header, base_copies)


def _pattern_value(patterns: dict[str, Any], module: str, default: Any) -> Any:
    """PEFT's per-module override: the first pattern that matches the end of the module path."""
    for pattern, value in patterns.items():
        try:
            if re.match(rf"(.*\.)?({pattern})$", module):
                return value
        except re.error:
            if module == pattern or module.endswith("." + pattern):
                return value
    return default


def _module(
    file: Path,
    header: SafetensorsHeader,
    name: str,
    parts: dict[str, str],
    *,
    transpose: bool,
    embedding: bool,
    alpha: Optional[float] = None,
    rslora: bool = False,
) -> LoraModule:
    """Check one module's factor shapes from the header."""
    for part, label in (("down", "down (A)"), ("up", "up (B)")):
        if part not in parts:
            other = parts.get("up") or parts.get("down") or parts.get("alpha")
            raise ModelError(f"{file}: module '{name}' has no {label} factor (found '{other}' alone).")
    down, up = header.tensors[parts["down"]], header.tensors[parts["up"]]
    for info in (down, up):
        if not info.dtype.startswith(("F", "BF")) or info.dtype.startswith("F8"):
            raise ModelError(
                f"{file}: '{info.name}' has dtype {info.dtype}; LoRA factors must be float16, bfloat16 or float32."
            )
    a, b = down.shape, up.shape
    rank = a[0] if a else 0
    ok = len(a) in (2, 4) and len(b) == len(a) and rank > 0 and b[1] == rank
    if ok and len(b) == 4:
        ok = b[2:] == (1, 1)
    if ok and transpose and len(a) != 2:
        ok = False
    if not ok:
        raise ModelError(
            f"{file}: module '{name}' has factors of shapes {list(a)} (down) and {list(b)} (up), which do not "
            "form a LoRA (expected [r, in(, kh, kw)] and [out, r(, 1, 1)])."
        )
    alpha_key = parts.get("alpha")
    if alpha_key is not None and header.tensors[alpha_key].numel != 1:
        shape = list(header.tensors[alpha_key].shape)
        raise ModelError(f"{file}: '{alpha_key}' should be one number, has shape {shape}.")
    return LoraModule(
        name=name,
        down=down.name,
        up=up.name,
        alpha_key=alpha_key,
        rank=rank,
        in_shape=tuple(a[1:]),
        out_features=b[0],
        transpose=transpose,
        embedding=embedding,
        alpha=alpha,
        rslora=rslora,
    )
