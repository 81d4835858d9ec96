"""Passthrough: copy a tensor from a single model, optionally scaled.

Used for layer stacking ("frankenmerges"): each slice of the output takes its
layers from one model unchanged. mergekit's ``passthrough`` method. With
``scale`` set, the tensor is multiplied by it (e.g. 0 to silence a projection).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from core.merge.methods import register
from core.merge.methods.base import BASE_IGNORED, MODEL, MergeMethod, Parameter, TensorInputs

if TYPE_CHECKING:  # pragma: no cover - typing only
    from torch import Tensor


def _passthrough(inputs: TensorInputs) -> Tensor:
    """Kernel: one tensor of shape ``(...)`` -> ``(...)``, same dtype.

    Without a scale the input tensor itself is returned (no copy), as mergekit does.
    """
    (tensor,) = inputs.tensors
    scale = inputs.model_params[0].get("scale") if inputs.model_params else None
    return tensor if scale is None else tensor * float(scale)


register(
    MergeMethod(
        name="passthrough",
        display_name="Passthrough",
        paper="",
        description="Copies tensors from one model unchanged (layer stacking), optionally scaled.",
        kernel=_passthrough,
        parameters=(
            Parameter(
                "scale",
                float,
                None,
                "Multiply the tensor by this; unset copies it unchanged.",
                scope=MODEL,
                slider=(0.0, 2.0),
            ),
        ),
        base=BASE_IGNORED,
        min_models=1,
        max_models=1,
    )
)
