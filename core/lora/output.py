"""Atomic outputs of the LoRA operations.

* :class:`AtomicFile`: a single ``.safetensors`` output, written inside a hidden
  folder beside the target and renamed into place at the end
  (:class:`core.io.writer.AtomicOutput` as a single file).
* :class:`TensorSpool`: writes a safetensors file whose tensor shapes are known
  only as they are computed (an extracted LoRA's rank comes out of its SVD).
  Tensors are appended to a scratch file as they come, so memory holds one
  module at a time; the header is laid out at the end and the data copied
  behind it.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import TYPE_CHECKING, Optional, Union

from core.errors import MergeStudioError
from core.io.tensors import dtype_name
from core.io.writer import AtomicOutput, OutputTensor, _as_bytes, _disk_error, plan_shards

if TYPE_CHECKING:  # pragma: no cover
    import torch

WEIGHT_SUFFIXES = (".safetensors", ".bin", ".ckpt", ".pt", ".pth")
OUTPUT_DTYPES = {"float32": "float32", "fp32": "float32", "float16": "float16", "fp16": "float16",
                 "bfloat16": "bfloat16", "bf16": "bfloat16"}
# Files of the input model that describe how *it* was made, not the output.
NOT_COPIED = ("README.md", "mergekit_config.yml")


class AtomicFile(AtomicOutput):
    """``with AtomicFile(target) as tmp_file:`` write ``tmp_file``; renamed to ``target`` on success.

    :class:`core.io.writer.AtomicOutput` in its single-file form, which must be a
    ``.safetensors`` file; entering gives the file to write rather than its folder.
    """

    def __init__(self, target: Path, overwrite: bool = False) -> None:
        super().__init__(target, overwrite, single_file=True)

    def check(self) -> None:
        """Raise if the target cannot be written; call before any weight is read."""
        if self.target.suffix != ".safetensors":
            raise MergeStudioError(f"{self.target}: a single-file output must end in .safetensors.")
        super().check()

    def __enter__(self) -> Path:
        super().__enter__()
        return self.file


def output_dtype(name: Optional[str], fallback: "torch.dtype") -> "torch.dtype":
    """--dtype NAME as a torch dtype (float32, float16, bfloat16); ``fallback`` when not given."""
    import torch

    if name is None:
        return fallback
    key = OUTPUT_DTYPES.get(str(name).lower().removeprefix("torch."))
    if key is None:
        raise MergeStudioError(f"--dtype {name}: use float32, float16 or bfloat16.")
    return getattr(torch, key)


def atomic_output(target: Path, *, single: bool, overwrite: bool) -> Union[AtomicFile, AtomicOutput]:
    """An atomic single ``.safetensors`` file, or an atomic folder."""
    return AtomicFile(target, overwrite) if single else AtomicOutput(target, overwrite)


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


class LoraWriter:
    """Writes LoRA modules, one at a time, as a PEFT adapter or a kohya file.

    Each module is stored with scale 1 (alpha = its rank): the factors carry
    the whole update. kohya's ``.alpha`` is a float32 scalar (bfloat16 cannot
    hold every rank exactly).
    """

    def __init__(self, fmt: str, folder: Path, dtype: "torch.dtype") -> None:
        from core.lora.formats import KOHYA, PEFT

        if fmt not in (KOHYA, PEFT):
            raise ValueError(f"unknown LoRA format {fmt!r}")
        self.format = fmt
        self.dtype = dtype
        self.spool = TensorSpool(folder)
        self.ranks: dict[str, int] = {}

    def add(self, name: str, a: "torch.Tensor", b: "torch.Tensor", *, embedding: bool = False) -> None:
        """Module ``name`` (kohya: the key stem with its prefix; PEFT: the module path)."""
        import torch

        from core.lora.formats import KOHYA, PEFT_PREFIX

        a = a.detach().to("cpu", self.dtype).contiguous()
        b = b.detach().to("cpu", self.dtype).contiguous()
        if self.format == KOHYA:
            self.spool.add(f"{name}.lora_down.weight", a)
            self.spool.add(f"{name}.lora_up.weight", b)
            self.spool.add(f"{name}.alpha", torch.tensor(float(a.shape[0]), dtype=torch.float32))
        elif embedding:
            self.spool.add(f"{PEFT_PREFIX}{name}.lora_embedding_A", a)
            self.spool.add(f"{PEFT_PREFIX}{name}.lora_embedding_B", b)
        else:
            self.spool.add(f"{PEFT_PREFIX}{name}.lora_A.weight", a)
            self.spool.add(f"{PEFT_PREFIX}{name}.lora_B.weight", b)
        self.ranks[name] = int(a.shape[0])

    def finish(self, file: Path, metadata: dict[str, str]) -> None:
        self.spool.finish(file, metadata)

    def close(self) -> None:
        self.spool.close()


def peft_config(template: Optional[dict], ranks: dict[str, int], **fields: object) -> dict:
    """adapter_config.json for modules of the given ranks, each with scale 1 (lora_alpha = r).

    The most common rank is ``r``; other modules get ``rank_pattern`` and
    ``alpha_pattern`` entries (their escaped full paths, which PEFT matches
    against the end of each module name).
    """
    import re
    from collections import Counter

    common = Counter(ranks.values()).most_common(1)[0][0] if ranks else 8
    others = {re.escape(name): r for name, r in ranks.items() if r != common}
    config = dict(template or {})
    for key in ("layers_to_transform", "layers_pattern", "exclude_modules", "target_parameters"):
        config.pop(key, None)  # the target list below is complete; these would narrow it
    config.update(
        {
            "peft_type": "LORA",
            "r": common,
            "lora_alpha": common,
            "rank_pattern": others,
            "alpha_pattern": dict(others),
            "target_modules": sorted(ranks),
            "use_rslora": False,
            "use_dora": False,
            "lora_dropout": config.get("lora_dropout", 0.0),
            "bias": "none",
            "inference_mode": True,
        }
    )
    config["modules_to_save"] = None  # the file holds LoRA factors only
    config.setdefault("init_lora_weights", True)
    config.update(fields)
    return config
