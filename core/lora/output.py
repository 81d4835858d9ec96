"""Atomic outputs of the LoRA operations.

* :class:`AtomicFile`: a single ``.safetensors`` output, written inside a hidden
  folder beside the target and renamed into place at the end (the folder
  counterpart is :class:`core.io.writer.AtomicOutput`).
* :class:`TensorSpool`: writes a safetensors file whose tensor shapes are known
  only as they are computed (an extracted LoRA's rank comes out of its SVD).
  Tensors are appended to a scratch file as they come, so memory holds one
  module at a time; the header is laid out at the end and the data copied
  behind it.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, Optional

from core.errors import MergeStudioError, ModelError
from core.io.tensors import dtype_name
from core.io.writer import OutputTensor, _as_bytes, _disk_error, plan_shards

if TYPE_CHECKING:  # pragma: no cover
    import torch

WEIGHT_SUFFIXES = (".safetensors", ".bin", ".ckpt", ".pt", ".pth")
# Files of the input model that describe how *it* was made, not the output.
NOT_COPIED = ("README.md", "mergekit_config.yml")


class AtomicFile:
    """``with AtomicFile(target) as tmp_file:`` write ``tmp_file``; renamed to ``target`` on success."""

    def __init__(self, target: Path, overwrite: bool = False) -> None:
        self.target = Path(target).absolute()
        self.overwrite = overwrite
        self.temp: Optional[Path] = None

    def check(self) -> None:
        """Raise if the target cannot be written; call before any weight is read."""
        target = self.target
        if target.suffix != ".safetensors":
            raise MergeStudioError(f"{target}: a single-file output must end in .safetensors.")
        if target.is_dir():
            raise MergeStudioError(f"{target}: is a folder; give a .safetensors file name.")
        if target.exists() and not self.overwrite:
            raise MergeStudioError(f"{target}: exists; pass --overwrite to replace it.")
        parent = target.parent
        if not parent.is_dir():
            raise MergeStudioError(f"{parent}: the output's folder does not exist.")
        if not os.access(parent, os.W_OK):
            raise MergeStudioError(f"{parent}: no permission to write here.")

    def __enter__(self) -> Path:
        self.check()
        try:
            self.temp = Path(tempfile.mkdtemp(prefix=f".{self.target.name}.partial-", dir=self.target.parent))
        except OSError as exc:
            raise _disk_error(self.target, exc) from None
        return self.temp / self.target.name

    def __exit__(self, exc_type, exc, tb) -> bool:
        assert self.temp is not None
        try:
            if exc_type is None:
                try:
                    os.replace(self.temp / self.target.name, self.target)
                except OSError as error:
                    raise ModelError(f"{self.target}: cannot move the finished output into place ({error}).") from None
        finally:
            shutil.rmtree(self.temp, ignore_errors=True)
        return False


class TensorSpool:
    """Collects tensors on disk in arrival order, then writes them as one safetensors file."""

    def __init__(self, folder: Path) -> None:
        self.path = folder / ".spool"
        self.tensors: list[OutputTensor] = []
        self.bytes = 0
        try:
            self._handle = open(self.path, "wb")
        except OSError as exc:
            raise _disk_error(self.path, exc) from None

    def add(self, name: str, tensor: "torch.Tensor") -> None:
        data = _as_bytes(tensor)
        try:
            self._handle.write(data)
        except OSError as exc:
            raise _disk_error(self.path, exc) from None
        self.tensors.append(OutputTensor(name, tuple(tensor.shape), dtype_name(tensor.dtype)))
        self.bytes += len(data)

    def finish(self, file: Path, metadata: dict[str, str]) -> None:
        """Write ``file``: the header of every tensor added, then their data."""
        shard = plan_shards(self.tensors, 1 << 62, metadata, "spool")[0]
        try:
            self._handle.close()
            with open(file, "wb") as out, open(self.path, "rb") as data:
                out.write(shard.header)
                shutil.copyfileobj(data, out, 16 << 20)
                out.flush()
                os.fsync(out.fileno())
            os.remove(self.path)
        except OSError as exc:
            raise _disk_error(file, exc) from None

    def close(self) -> None:
        if not self._handle.closed:
            self._handle.close()


def copy_extras(src: Path, dst: Path) -> None:
    """Copy a model folder's non-weight files (configs, tokenizers, scheduler), recursively."""
    for item in sorted(src.rglob("*")):
        if item.is_dir() or item.name.startswith("."):
            continue
        rel = item.relative_to(src)
        if item.suffix in WEIGHT_SUFFIXES or item.name.endswith(".index.json") or str(rel) in NOT_COPIED:
            continue
        target = dst / rel
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(item, target)


def check_free_space(target: Path, needed: int) -> None:
    """Refuse an output that cannot fit on its disk (checked before any weight is read)."""
    parent = Path(target).absolute().parent
    free = shutil.disk_usage(parent).free
    if needed > free:
        raise MergeStudioError(
            f"{target}: the output needs {needed / 1e9:.2f} GB but only {free / 1e9:.2f} GB is free there."
        )
