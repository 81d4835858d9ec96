"""Sharded safetensors output, streamed tensor by tensor, and atomic folders.

Because a merge plan knows every output tensor's name, shape and dtype before
any weight is read, the shard layout and each shard's header are computed up
front. Each tensor is then written straight to its place in its shard as soon
as it is computed: the writer never holds a shard in memory, so peak memory
does not grow with the shard size (mergekit buffers a whole shard).

:class:`AtomicOutput` builds the output in a hidden folder beside the target
and renames it into place only when everything succeeded, so a failed or
cancelled merge never leaves a half-written model where a good one is expected.
A single-file output (``-o merged.safetensors``) is written inside the same
hidden folder and renamed onto the target file at the end.
"""

from __future__ import annotations

import errno
import json
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, BinaryIO, Optional

from core.errors import MergeStudioError, ModelError
from core.io.tensors import DTYPE_SIZES

if TYPE_CHECKING:  # pragma: no cover
    import torch

DEFAULT_SHARD_BYTES = 5 * 1000**3  # 5 GB, as transformers and mergekit
_ALIGN = 8


@dataclass(frozen=True)
class OutputTensor:
    name: str
    shape: tuple[int, ...]
    dtype: str  # safetensors name

    @property
    def nbytes(self) -> int:
        n = DTYPE_SIZES[self.dtype]
        for d in self.shape:
            n *= d
        return n


@dataclass
class Shard:
    file_name: str
    tensors: list[OutputTensor]
    header: bytes  # length prefix + JSON, padded

    @property
    def data_bytes(self) -> int:
        return sum(t.nbytes for t in self.tensors)


def plan_shards(
    tensors: list[OutputTensor],
    max_shard_bytes: int,
    metadata: dict[str, str],
    stem: str = "model",
) -> list[Shard]:
    """Assign tensors, in order, to shards of at most ``max_shard_bytes`` of data.

    A tensor larger than the limit gets a shard of its own. File names follow
    transformers: ``model.safetensors`` for one shard, else
    ``model-00001-of-0000N.safetensors``.
    """
    groups: list[list[OutputTensor]] = [[]]
    size = 0
    for tensor in tensors:
        if groups[-1] and size + tensor.nbytes > max_shard_bytes:
            groups.append([])
            size = 0
        groups[-1].append(tensor)
        size += tensor.nbytes
    count = len(groups)
    shards = []
    for i, group in enumerate(groups):
        name = f"{stem}.safetensors" if count == 1 else f"{stem}-{i + 1:05d}-of-{count:05d}.safetensors"
        shards.append(Shard(name, group, _header(group, metadata)))
    return shards


def _header(tensors: list[OutputTensor], metadata: dict[str, str]) -> bytes:
    entries: dict[str, object] = {"__metadata__": dict(metadata)}
    offset = 0
    for t in tensors:
        entries[t.name] = {"dtype": t.dtype, "shape": list(t.shape), "data_offsets": [offset, offset + t.nbytes]}
        offset += t.nbytes
    raw = json.dumps(entries, separators=(",", ":")).encode("utf-8")
    raw += b" " * ((-(8 + len(raw))) % _ALIGN)  # data starts 8-byte aligned
    return len(raw).to_bytes(8, "little") + raw


def write_index(folder: Path, shards: list[Shard], stem: str = "model", metadata: Optional[dict] = None) -> None:
    """Write ``<stem>.safetensors.index.json`` when there is more than one shard."""
    if len(shards) < 2:
        return
    weight_map = {t.name: s.file_name for s in shards for t in s.tensors}
    total = sum(s.data_bytes for s in shards)
    index = {"metadata": {"total_size": total, **(metadata or {})}, "weight_map": weight_map}
    (folder / f"{stem}.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")


def _disk_error(path: Path, exc: OSError) -> MergeStudioError:
    """One sentence naming the output folder (not the hidden temporary one) and the file that failed."""
    path = Path(path)
    target, inside = path, ""
    for folder in [path, *path.parents]:
        name = folder.name
        if name.startswith(".") and ".partial-" in name:
            target = folder.parent / name[1:].split(".partial-")[0]
            inside = str(path.relative_to(folder)) if path != folder else ""
            break
    what = f" {inside}" if inside else ""
    if exc.errno == errno.ENOSPC:
        return MergeStudioError(f"{target}: the disk is full while writing{what or ' the output'}; nothing was written to the output folder.")
    if inside:
        return MergeStudioError(f"{target}: cannot write{what} ({exc.strerror or exc}); nothing was written to the output folder.")
    return MergeStudioError(f"{target}: cannot write ({exc.strerror or exc}).")


class ShardedWriter:
    """Writes tensors, in plan order, straight into pre-laid-out shards."""

    def __init__(self, folder: Path, shards: list[Shard]) -> None:
        self.folder = folder
        self.shards = shards
        self._order = [(si, t) for si, s in enumerate(shards) for t in s.tensors]
        self._next = 0
        self._handle: Optional[BinaryIO] = None
        self._shard_index = -1
        self.bytes_written = 0

    def write(self, name: str, tensor: "torch.Tensor") -> None:
        """Write the next tensor; it must be the one the layout expects next."""
        shard_index, expected = self._order[self._next]
        if name != expected.name:
            raise RuntimeError(f"writer expected tensor '{expected.name}', got '{name}'")
        if tuple(tensor.shape) != expected.shape:
            raise RuntimeError(f"tensor '{name}' has shape {tuple(tensor.shape)}, planned {expected.shape}")
        if shard_index != self._shard_index:
            self._open(shard_index)
        data = _as_bytes(tensor)
        if len(data) != expected.nbytes:
            raise RuntimeError(f"tensor '{name}' has {len(data)} bytes, planned {expected.nbytes}")
        path = self.folder / self.shards[shard_index].file_name
        try:
            assert self._handle is not None
            self._handle.write(data)
        except OSError as exc:
            raise _disk_error(path, exc) from None
        self.bytes_written += len(data)
        self._next += 1

    def _open(self, shard_index: int) -> None:
        self._close()
        shard = self.shards[shard_index]
        path = self.folder / shard.file_name
        try:
            self._handle = open(path, "wb")
            self._handle.write(shard.header)
        except OSError as exc:
            raise _disk_error(path, exc) from None
        self._shard_index = shard_index

    def _close(self) -> None:
        if self._handle is not None:
            path = self.folder / self.shards[self._shard_index].file_name
            try:
                self._handle.flush()
                os.fsync(self._handle.fileno())
                self._handle.close()
            except OSError as exc:
                self._handle = None
                raise _disk_error(path, exc) from None
            self._handle = None

    def finish(self) -> None:
        if self._next != len(self._order):
            missing = self._order[self._next][1].name
            raise RuntimeError(f"writer finished early; tensor '{missing}' was never written")
        self._close()

    def abort(self) -> None:
        if self._handle is not None:
            try:
                self._handle.close()
            except OSError:
                pass
            self._handle = None


def _as_bytes(tensor: "torch.Tensor") -> memoryview:
    """Raw little-endian bytes of a CPU tensor, without a copy when contiguous."""
    import torch

    t = tensor.detach()
    if t.device.type != "cpu":
        t = t.cpu()
    t = t.contiguous()
    if t.numel() == 0:
        return memoryview(b"")
    return memoryview(t.reshape(-1).view(torch.uint8).numpy())


class AtomicOutput:
    """A hidden temporary folder beside ``target``, renamed into place on success.

    ``target`` must not exist or be empty unless ``overwrite``; an existing
    target is replaced only after the new one is complete. With ``single_file``
    (by default: a target named ``*.safetensors``) the target is one file: it is
    written as ``<temp folder>/<target name>`` (see :attr:`file`) and moved onto
    the target, replacing an existing file.
    """

    def __init__(self, target: Path, overwrite: bool = False, single_file: Optional[bool] = None) -> None:
        self.target = Path(target).absolute()
        self.overwrite = overwrite
        self.single_file = self.target.suffix == ".safetensors" if single_file is None else single_file
        self.temp: Optional[Path] = None

    @property
    def file(self) -> Path:
        """Where a single-file output is written before it is moved into place."""
        assert self.temp is not None
        return self.temp / self.target.name

    def check(self) -> None:
        """Raise if the target cannot be written; call before any weight is read."""
        target = self.target
        if self.single_file and target.exists():
            if target.is_dir():
                raise MergeStudioError(f"{target}: exists and is a folder, not a file.")
            if not self.overwrite:
                raise MergeStudioError(f"{target}: exists; pass --overwrite to replace it.")
        elif target.exists():
            if not target.is_dir():
                raise MergeStudioError(f"{target}: exists and is not a folder.")
            if any(target.iterdir()) and not self.overwrite:
                raise MergeStudioError(f"{target}: exists and is not empty; pass --overwrite to replace it.")
        parent = target.parent
        if not parent.exists():
            raise MergeStudioError(f"{parent}: the output's parent folder does not exist.")
        if not os.access(parent, os.W_OK):
            raise MergeStudioError(f"{parent}: no permission to write here.")

    def __enter__(self) -> Path:
        self.check()
        try:
            self.temp = Path(tempfile.mkdtemp(prefix=f".{self.target.name}.partial-", dir=self.target.parent))
        except OSError as exc:
            raise _disk_error(self.target, exc) from None
        return self.temp

    def __exit__(self, exc_type, exc, tb) -> bool:
        assert self.temp is not None
        if exc_type is not None:
            shutil.rmtree(self.temp, ignore_errors=True)
            return False
        try:
            if self.single_file:
                os.replace(self.file, self.target)
                shutil.rmtree(self.temp, ignore_errors=True)
            elif self.target.exists():
                old = Path(tempfile.mkdtemp(prefix=f".{self.target.name}.old-", dir=self.target.parent))
                os.rmdir(old)
                os.rename(self.target, old)
                os.rename(self.temp, self.target)
                shutil.rmtree(old, ignore_errors=True)
            else:
                os.rename(self.temp, self.target)
        except OSError as exc:
            shutil.rmtree(self.temp, ignore_errors=True)
            raise ModelError(f"{self.target}: cannot move the finished output into place ({exc}).") from None
        return False
