"""LoRA in the engine: merge LoRAs into a model, combine several, extract one from a difference.

Python API (torch loads only when one of these runs)::

    from core import lora
    lora.merge_lora("base/", ["style.safetensors", ("detail/", 0.5)], "out/")   # W + s·(α/r)·B·A
    lora.combine_loras(["a.safetensors", "b.safetensors"], "ab.safetensors",
                       method="ties", weights=[1, 0.7], density=0.5, rank=16)
    lora.extract_lora("base/", "tuned/", "adapter/", rank=16)                 # PEFT adapter
    lora.extract_lora("sd15.safetensors", "tuned.safetensors", "x.safetensors", energy=0.9)  # kohya
    info = lora.open_lora("adapter/")                                        # headers only

Each has an ``iter_*`` twin that yields :class:`core.jobs.Progress` per tensor
(close it to cancel: nothing is left at the output). Formats: PEFT adapter
folders and kohya / A1111 ``.safetensors`` files (``core.lora.formats``); how
their module names meet a model's tensors: ``core.lora.names``.
"""

from __future__ import annotations

from typing import Any

_EXPORTS = {
    "open_lora": "core.lora.formats",
    "LoraFile": "core.lora.formats",
    "LoraModule": "core.lora.formats",
    "merge_lora": "core.lora.merge",
    "iter_merge_lora": "core.lora.merge",
    "LoraSpec": "core.lora.merge",
    "parse_spec": "core.lora.merge",
    "LoraMergeResult": "core.lora.merge",
    "combine_loras": "core.lora.combine",
    "iter_combine": "core.lora.combine",
    "CombineResult": "core.lora.combine",
    "extract_lora": "core.lora.extract",
    "iter_extract": "core.lora.extract",
    "ExtractResult": "core.lora.extract",
}


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'core.lora' has no attribute {name!r}")
    import importlib

    return getattr(importlib.import_module(module), name)


__all__ = sorted(_EXPORTS)
