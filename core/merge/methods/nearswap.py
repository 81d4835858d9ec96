"""NearSwap: take the other model's value only where it is already near the base.

alchemonaut, "QuartetAnemoi-70B" (model card describing NearSwap),
https://huggingface.co/alchemonaut/QuartetAnemoi-70B-t0.0001

Element by element, with base ``a`` and other model ``b``,

    w = clamp(t / max(|a - b|, 1e-6), 0, 1),      merged = w * b + (1 - w) * a,

so values closer than ``t`` are swapped for ``b`` entirely and farther ones
move toward ``b`` by ``t / |a - b|``. A negative ``t`` keeps the base.

The arithmetic runs in the input dtype, as in mergekit 0.1.5, and the result
has the input dtype.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from core.merge.methods import register
from core.merge.methods.base import BASE_REQUIRED, GLOBAL, REQUIRED, MergeMethod, Parameter, TensorInputs

if TYPE_CHECKING:  # pragma: no cover - typing only
    from torch import Tensor

# Differences below this count as this, so identical values give w = t / 1e-6.
MIN_DIFFERENCE = 1e-6


def nearswap(t: float, base: Tensor, other: Tensor) -> Tensor:
    """Elementwise NearSwap of ``base`` and ``other`` (both ``(...)``) -> ``(...)``."""
    weight = (t / (base - other).abs().clamp(min=MIN_DIFFERENCE)).clamp(min=0, max=1)
    return weight * other + (1 - weight) * base


def _nearswap(inputs: TensorInputs) -> Tensor:
    """Kernel: base and one other tensor of shape ``(...)`` -> ``(...)``."""
    (other,) = inputs.non_base_indices()
    return nearswap(float(inputs.params["t"]), inputs.base, inputs.tensors[other])


register(
    MergeMethod(
        name="nearswap",
        display_name="NearSwap",
        paper="https://huggingface.co/alchemonaut/QuartetAnemoi-70B-t0.0001",
        description="Moves each base weight toward the other model, fully where the two are within t.",
        kernel=_nearswap,
        parameters=(
            Parameter(
                "t",
                float,
                REQUIRED,
                "Distance below which a weight is swapped for the other model's (typically ~1e-4).",
                scope=GLOBAL,
                slider=(0.0, 0.01),
            ),
        ),
        base=BASE_REQUIRED,
        min_models=2,
        max_models=2,
        # mergekit's PASSTHROUGH_BASE_SINGLETON: a tensor only the base has is copied.
        missing_tensors="passthrough_base",
    )
)
