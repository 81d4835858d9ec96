"""Merge LoRAs into a model: ``W' = W + strength * scale * B @ A``, tensor by tensor.

Everything is checked from headers first (every LoRA key matches one tensor
whose shape fits; the output can be written and fits on the disk). Then the
model's tensors stream through in file order: a tensor no LoRA touches is
written exactly as read (byte-identical), a touched one is updated in float32
(float64 for float64 weights) and written back in its own dtype. The output
has the input's layout: a single ``.safetensors`` file for a single file, a
folder (its configs and tokenizer copied) for a folder, one folder per
component for a diffusers pipeline.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Generator, Optional, Sequence, Union

from core.errors import MergeStudioError, ModelError
from core.io.catalog import resolve_model
from core.io.formats import ModelSource, open_model
from core.io.writer import DEFAULT_SHARD_BYTES, AtomicOutput, OutputTensor, ShardedWriter, plan_shards, write_index
from core.jobs import Progress
from core.lora.formats import LoraFile, open_lora
from core.lora.names import ModelIndex
from core.lora.output import AtomicFile, atomic_output, check_free_space, copy_extras
from core.lora.resolve import Application, overlapping, resolve

if TYPE_CHECKING:  # pragma: no cover
    import torch

METADATA_KEY = "mergestudio_lora"


@dataclass(frozen=True)
class LoraSpec:
    """A LoRA to merge and its strength."""

    path: Path
    strength: float = 1.0


LoraArg = Union[str, Path, LoraSpec, tuple]


def parse_spec(text: str) -> LoraSpec:
    """'style.safetensors:0.7' -> LoraSpec(path, 0.7); without ':NUMBER' the strength is 1."""
    head, sep, tail = str(text).rpartition(":")
    if sep and head:
        try:
            return LoraSpec(Path(head), float(tail))
        except ValueError:
            pass
    return LoraSpec(Path(text), 1.0)


def as_spec(value: LoraArg) -> LoraSpec:
    if isinstance(value, LoraSpec):
        spec = value
    elif isinstance(value, tuple):
        spec = LoraSpec(Path(value[0]), float(value[1]))
    else:
        spec = LoraSpec(Path(value), 1.0)
    if not math.isfinite(spec.strength):
        raise MergeStudioError(f"LoRA {spec.path}: the strength must be a finite number, got {spec.strength}.")
    return spec


@dataclass
class LoraMergeResult:
    output: Path
    tensors: int  # tensors written
    changed: int  # tensors a LoRA updated
    modules: int  # LoRA modules applied
    bytes_written: int
    seconds: float
    files: list[str] = field(default_factory=list)


@dataclass
class _Part:
    """One output weight set: the model, or one component of a pipeline."""

    folder: Path
    stem: str
    names: list[str]  # model tensor names, in write order
    writer: Optional[ShardedWriter] = None


def iter_merge_lora(
    model: Union[str, Path],
    loras: Sequence[LoraArg],
    output: Union[str, Path],
    *,
    overwrite: bool = False,
    allow_pickle: bool = False,
    shard_size: int = DEFAULT_SHARD_BYTES,
) -> Generator[Progress, None, LoraMergeResult]:
    """Merge ``loras`` into ``model``, writing ``output``; yields Progress per tensor.

    Close the generator to cancel: nothing is left at ``output``.
    """
    if shard_size <= 0:
        raise MergeStudioError(f"--shard-size must be positive, got {shard_size}.")
    specs = [as_spec(x) for x in loras]
    if not specs:
        raise MergeStudioError("Give at least one LoRA to merge.")
    source = open_model(resolve_model(str(model)), allow_pickle=allow_pickle)
    files: list[LoraFile] = []
    try:
        files = [open_lora(s.path) for s in specs]
        plan = _plan(source, files)
        output = Path(output)
        single = source.path.is_file()
        atomic = atomic_output(output, single=single, overwrite=overwrite)
        if not single and output.suffix == ".safetensors":
            raise MergeStudioError(
                f"{output}: {source.path} is a folder, so the output is a folder too; give a folder name."
            )
        atomic.check()
        total = sum(source.tensors[n].nbytes for n in source.tensors)
        check_free_space(output, total)
        result = yield from _write(source, files, specs, plan, atomic, single, shard_size, total)
        return result
    finally:
        for f in files:
            f.close()
        source.close()


def merge_lora(
    model: Union[str, Path],
    loras: Sequence[LoraArg],
    output: Union[str, Path],
    *,
    overwrite: bool = False,
    allow_pickle: bool = False,
    shard_size: Optional[int] = None,
    on_progress=None,
    cancel=None,
) -> LoraMergeResult:
    """Merge LoRAs (paths, ``(path, strength)`` pairs or LoraSpec) into ``model``; see :func:`iter_merge_lora`."""
    from core.jobs import drive

    work = iter_merge_lora(
        model, loras, output, overwrite=overwrite, allow_pickle=allow_pickle,
        shard_size=DEFAULT_SHARD_BYTES if shard_size is None else shard_size,
    )
    return drive(work, on_progress, cancel)


def _plan(source: ModelSource, files: list[LoraFile]) -> dict[str, list[Application]]:
    """Model tensor name -> the LoRA modules that update it (headers only)."""
    index = ModelIndex(source.tensors)
    applications: list[Application] = []
    for i, lora in enumerate(files):
        applications.extend(resolve(lora, i, source, index))
    clash = overlapping(applications)
    if clash is not None:
        first, second = clash
        raise ModelError(
            f"LoRA {files[first.lora].path}: modules '{first.module.name}' and '{second.module.name}' both update "
            f"'{first.target.tensor}'; the file names one module twice."
        )
    by_tensor: dict[str, list[Application]] = {}
    for app in applications:
        by_tensor.setdefault(app.target.tensor, []).append(app)
    return by_tensor


def file_order(source: ModelSource) -> list[str]:
    """Tensor names in the order they lie on disk (file, then offset): reads run forward."""
    order = {name: i for i, name in enumerate(source.tensors)}
    return sorted(source.tensors, key=lambda n: (str(source.tensors[n].file), source.tensors[n].offset, order[n]))


def _stem(files: list[Path]) -> str:
    stem = files[0].name.split(".")[0].split("-0")[0] if files else "model"
    return stem if stem in ("model", "diffusion_pytorch_model") else "model"


def _parts(source: ModelSource, tmp: Path, single: bool) -> dict[str, _Part]:
    names = file_order(source)
    if single:
        return {"": _Part(tmp.parent, tmp.name.removesuffix(".safetensors"), names)}
    if source.kind != "diffusers":
        return {"": _Part(tmp, _stem(source.weight_files), names)}
    parts: dict[str, _Part] = {}
    for name in names:
        component = name.partition("/")[0]
        if component not in parts:
            parts[component] = _Part(tmp / component, _stem(source.components[component].weight_files), [])
        parts[component].names.append(name)
    return parts


def _metadata(source: ModelSource, files: list[LoraFile], specs: list[LoraSpec], single: bool) -> dict[str, str]:
    record = {
        "model": str(source.path),
        "loras": [
            {"name": f.name, "path": str(f.path), "format": f.format, "strength": s.strength, "modules": len(f.modules)}
            for f, s in zip(files, specs)
        ],
        "formula": "W + strength * alpha / r * B @ A",
    }
    base = {k: v for k, v in source.metadata.items() if k != METADATA_KEY} if single else {}
    return {"format": "pt", **base, METADATA_KEY: json.dumps(record)}


def _write(
    source: ModelSource,
    files: list[LoraFile],
    specs: list[LoraSpec],
    plan: dict[str, list[Application]],
    atomic: Union[AtomicFile, AtomicOutput],
    single: bool,
    shard_size: int,
    total: int,
) -> Generator[Progress, None, LoraMergeResult]:
    started = time.monotonic()
    metadata = _metadata(source, files, specs, single)
    done = bytes_done = 0
    count = len(source.tensors)
    with atomic as tmp:
        parts = _parts(source, tmp, single)
        try:
            for part in parts.values():
                part.folder.mkdir(parents=True, exist_ok=True)
                layout = [OutputTensor(_inner(n), source.tensors[n].shape, source.tensors[n].dtype) for n in part.names]
                limit = 1 << 62 if single else shard_size
                part.writer = ShardedWriter(part.folder, plan_shards(layout, limit, metadata, part.stem))
                for name in part.names:
                    tensor = source.get(name)
                    apps = plan.get(name)
                    if apps:
                        tensor = _apply(tensor, apps, files, specs, name)
                    part.writer.write(_inner(name), tensor)
                    del tensor
                    done += 1
                    bytes_done += source.tensors[name].nbytes
                    yield Progress(done, count, bytes_done, total, time.monotonic() - started, name)
                part.writer.finish()
                if not single:
                    write_index(part.folder, part.writer.shards, part.stem)
            if not single:
                copy_extras(source.path, tmp)
        finally:
            for part in parts.values():
                if part.writer is not None:
                    part.writer.abort()
    if single:
        written = [str(atomic.target)]
    else:
        shards = [(p.folder, s.file_name) for p in parts.values() for s in p.writer.shards]  # type: ignore[union-attr]
        written = [str((folder / name).relative_to(tmp)) for folder, name in shards]
    return LoraMergeResult(
        output=atomic.target,
        tensors=count,
        changed=len(plan),
        modules=sum(len(a) for a in plan.values()),
        bytes_written=bytes_done,
        seconds=time.monotonic() - started,
        files=written,
    )


def _inner(name: str) -> str:
    """A pipeline tensor 'unet/x' is 'x' inside its component's file."""
    return name.partition("/")[2] or name


def _apply(
    weight: "torch.Tensor", apps: list[Application], files: list[LoraFile], specs: list[LoraSpec], name: str
) -> "torch.Tensor":
    """weight + sum of strength * scale * B @ A over the modules that target it."""
    import torch

    compute = torch.float64 if weight.dtype == torch.float64 else torch.float32
    result = weight.to(compute, copy=True)
    for app in apps:
        lora = files[app.lora]
        copy = lora.base_copies.get(app.module.name)
        if copy is not None and not torch.equal(lora.get(copy).to(weight.dtype), weight):  # PEFT casts it on load
            raise ModelError(
                f"LoRA {lora.path}: '{copy}' (PEFT's copy of the base layer, which PEFT would load in place of the "
                f"model's) differs from '{name}' of the model; merge it into the model it was trained on."
            )
        delta = lora.delta(app.module, compute) * specs[app.lora].strength
        region = result if app.target.rows is None else result[app.target.rows[0]: app.target.rows[1]]
        delta = delta.reshape(region.shape)
        if not bool(torch.isfinite(delta).all()):
            raise ModelError(
                f"LoRA {lora.path}: module '{app.module.name}' holds NaN or Inf values; merging it would spread them."
            )
        region.add_(delta)
        del delta
    return result.to(weight.dtype)
