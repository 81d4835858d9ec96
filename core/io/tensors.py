"""Lazy, per-tensor access to safetensors files.

The header is parsed and checked by hand (it is a length-prefixed JSON object),
so a corrupt or truncated file is reported with its name and the tensor at
fault before any weight is read. Tensor data is then read one tensor at a time
through safetensors' memory map: nothing holds a whole model in memory.
"""

from __future__ import annotations

import json
import math
import os
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Optional

from core.errors import ModelError

if TYPE_CHECKING:  # pragma: no cover
    import torch

# safetensors dtype names -> bytes per element.
DTYPE_SIZES = {
    "BOOL": 1,
    "U8": 1,
    "I8": 1,
    "F8_E4M3": 1,
    "F8_E5M2": 1,
    "I16": 2,
    "U16": 2,
    "F16": 2,
    "BF16": 2,
    "I32": 4,
    "U32": 4,
    "F32": 4,
    "I64": 8,
    "U64": 8,
    "F64": 8,
}

# Parsing a header larger than this is refused: real headers are a few MB at most.
MAX_HEADER_BYTES = 100 * 1024 * 1024


@dataclass(frozen=True)
class TensorInfo:
    """Where one tensor lives and what it looks like, from the file header only."""

    name: str
    shape: tuple[int, ...]
    dtype: str  # safetensors name: F32, BF16, ...
    file: Path
    offset: int  # absolute byte offset of the data in the file
    nbytes: int

    @property
    def numel(self) -> int:
        return math.prod(self.shape)


@dataclass
class SafetensorsHeader:
    path: Path
    tensors: dict[str, TensorInfo]
    metadata: dict[str, str]
    data_start: int


def read_header(path: Path) -> SafetensorsHeader:
    """Parse and check a safetensors header; raise ModelError naming the file.

    Checks: the length prefix fits the file, the JSON parses, every dtype is
    known, every tensor's byte span matches its shape and lies inside the file.
    """
    path = Path(path)
    try:
        size = path.stat().st_size
        with open(path, "rb") as handle:
            prefix = handle.read(8)
            if len(prefix) < 8:
                raise ModelError(f"{path}: not a safetensors file (only {size} bytes).")
            (header_len,) = struct.unpack("<Q", prefix)
            if header_len > MAX_HEADER_BYTES or 8 + header_len > size:
                raise ModelError(
                    f"{path}: corrupt safetensors header (header length {header_len} "
                    f"does not fit in a {size}-byte file)."
                )
            raw = handle.read(header_len)
    except OSError as exc:
        raise ModelError(f"{path}: cannot read ({exc.strerror or exc}).") from None
    try:
        header = json.loads(raw.decode("utf-8"))
        if not isinstance(header, dict):
            raise ValueError("not an object")
    except (UnicodeDecodeError, ValueError) as exc:
        raise ModelError(f"{path}: corrupt safetensors header ({exc}).") from None

    data_start = 8 + header_len
    metadata = header.pop("__metadata__", None) or {}
    if not isinstance(metadata, dict):
        raise ModelError(f"{path}: corrupt safetensors header (__metadata__ is not an object).")
    tensors: dict[str, TensorInfo] = {}
    for name, entry in header.items():
        tensors[name] = _parse_entry(path, name, entry, data_start, size)
    return SafetensorsHeader(path=path, tensors=tensors, metadata=metadata, data_start=data_start)


def _parse_entry(path: Path, name: str, entry: Any, data_start: int, size: int) -> TensorInfo:
    try:
        dtype = entry["dtype"]
        shape = tuple(int(d) for d in entry["shape"])
        begin, end = (int(x) for x in entry["data_offsets"])
    except (KeyError, TypeError, ValueError):
        raise ModelError(f"{path}: corrupt safetensors header entry for tensor '{name}'.") from None
    if not isinstance(dtype, str) or dtype not in DTYPE_SIZES:
        raise ModelError(f"{path}: tensor '{name}' has unsupported dtype {dtype}.")
    if any(d < 0 for d in shape):
        raise ModelError(f"{path}: corrupt safetensors header: tensor '{name}' has a negative dimension in shape {list(shape)}.")
    nbytes = math.prod(shape) * DTYPE_SIZES[dtype]
    if end - begin != nbytes or begin < 0:
        raise ModelError(
            f"{path}: corrupt safetensors header: tensor '{name}' of shape {list(shape)} {dtype} "
            f"needs {nbytes} bytes but its offsets span {end - begin}."
        )
    if data_start + end > size:
        raise ModelError(
            f"{path} is truncated: tensor '{name}' needs bytes up to {data_start + end} "
            f"but the file has {size}."
        )
    return TensorInfo(name, shape, dtype, path, data_start + begin, nbytes)


class SafetensorsReader:
    """Reads single tensors from one safetensors file, one ``pread`` per tensor.

    Each tensor is read into freshly allocated memory that is released when
    the caller drops it. A memory map would be as fast from the page cache but
    keeps every touched page of every input in the process (its resident size
    grows to the size of the inputs); explicit reads keep peak memory at the
    few tensors in flight, whatever the model size.
    """

    def __init__(self, header: SafetensorsHeader) -> None:
        self.header = header
        self._fd: Optional[int] = None

    def get(self, name: str, device: str = "cpu") -> "torch.Tensor":
        import torch

        info = self.header.tensors.get(name)
        if info is None:
            raise ModelError(f"{self.header.path}: has no tensor '{name}'.")
        if self._fd is None:
            try:
                self._fd = os.open(self.header.path, os.O_RDONLY)
            except OSError as exc:
                raise ModelError(f"{self.header.path}: cannot open ({exc.strerror or exc}).") from None
        buffer = torch.empty(info.nbytes, dtype=torch.uint8)
        view = memoryview(buffer.numpy()) if info.nbytes else memoryview(b"")
        done = 0
        while done < info.nbytes:
            try:
                count = os.preadv(self._fd, [view[done:]], info.offset + done)
            except OSError as exc:
                raise ModelError(f"{self.header.path}: cannot read tensor '{name}' ({exc.strerror or exc}).") from None
            if count == 0:
                raise ModelError(f"{self.header.path} is truncated: tensor '{name}' ends past the end of the file.")
            done += count
        tensor = buffer.view(torch_dtype(info.dtype)).reshape(info.shape)
        return tensor if device == "cpu" else tensor.to(device)

    def close(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None


def torch_dtype(name: str) -> "torch.dtype":
    """safetensors dtype name (F32, BF16, ...) -> torch dtype."""
    import torch

    table = {
        "BOOL": torch.bool,
        "U8": torch.uint8,
        "I8": torch.int8,
        "I16": torch.int16,
        "I32": torch.int32,
        "I64": torch.int64,
        "F16": torch.float16,
        "BF16": torch.bfloat16,
        "F32": torch.float32,
        "F64": torch.float64,
        "F8_E4M3": torch.float8_e4m3fn,
        "F8_E5M2": torch.float8_e5m2,
    }
    return table[name]


# Recipe dtype spellings (mergekit accepts these) -> safetensors names.
RECIPE_DTYPES = {
    "float32": "F32",
    "fp32": "F32",
    "float16": "F16",
    "fp16": "F16",
    "half": "F16",
    "bfloat16": "BF16",
    "bf16": "BF16",
    "float64": "F64",
    "fp64": "F64",
}


def recipe_dtype_key(recipe_name: Any) -> str:
    """'torch.BFloat16' -> 'bfloat16': the spelling looked up in RECIPE_DTYPES (mergekit accepts 'torch.')."""
    return str(recipe_name).lower().removeprefix("torch.")


def mergekit_dtype_name(recipe_name: str) -> str:
    """The spelling mergekit reads ('bf16' -> 'bfloat16'); unknown names are returned unchanged."""
    canonical = {"F32": "float32", "F16": "float16", "BF16": "bfloat16", "F64": "float64"}
    return canonical.get(RECIPE_DTYPES.get(recipe_dtype_key(recipe_name), ""), recipe_name)


def safetensors_dtype(recipe_name: Optional[str]) -> Optional[str]:
    """'bfloat16' -> 'BF16'; None stays None; unknown names raise KeyError."""
    if recipe_name is None:
        return None
    return RECIPE_DTYPES[recipe_dtype_key(recipe_name)]


def dtype_name(torch_dtype_value: "torch.dtype") -> str:
    """torch dtype -> safetensors name."""
    text = str(torch_dtype_value).replace("torch.", "")
    special = {"float8_e4m3fn": "F8_E4M3", "float8_e5m2": "F8_E5M2", "bool": "BOOL"}
    if text in special:
        return special[text]
    return RECIPE_DTYPES.get(text) or {"uint8": "U8", "int8": "I8", "int16": "I16", "int32": "I32", "int64": "I64"}[text]


def file_size(path: Path) -> int:
    return os.stat(path).st_size
