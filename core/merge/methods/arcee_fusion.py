"""Arcee Fusion: keep only the changes that matter most, chosen by a dynamic threshold.

Arcee AI, "Arcee Fusion" (https://arcee.ai; mergekit's ``arcee_fusion`` method).

With base ``a`` and fine-tuned ``b`` (tensors of shape ``(..., d)``):

1. importance ``s = |b - a| * KL(softmax(b) || softmax(a))``, the KL divergence
   taken along the last axis (one value per row, with 1e-8 added to both
   distributions) and broadcast over the row;
2. threshold ``tau = median(s) + 1.5 * (Q3(s) - Q1(s))`` -- the upper Tukey
   fence; each quantile is the sorted value at index ``floor(q * (n - 1))``;
3. ``merged = a + (b - a) * [s >= tau]``.

Tensors with more than 1,000,000 elements estimate the quantiles from
1,000,000 elements drawn with replacement, as mergekit 0.1.5 does; we draw them
from the merge's seeded per-tensor generator (mergekit uses torch's global
RNG), so a seed reproduces the merge. Smaller tensors are deterministic.

The arithmetic runs in the input dtype, as in mergekit; the result has the
input dtype (mergekit returns float32 for half-precision inputs, which its
writer then casts back).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from core.merge.methods import register
from core.merge.methods.base import BASE_REQUIRED, MergeMethod, TensorInputs

if TYPE_CHECKING:  # pragma: no cover - typing only
    import torch
    from torch import Tensor

# Above this many elements the quantiles come from a sample of this size.
QUANTILE_SAMPLE_SIZE = 1_000_000
# Added to both softmax distributions so the logarithm stays finite.
KL_EPS = 1e-8


def importance(base: Tensor, other: Tensor) -> Tensor:
    """Importance scores ``|other - base| * KL(p_other || p_base)``, shape ``(..., d)``."""
    import torch

    p = torch.softmax(other, dim=-1) + KL_EPS
    q = torch.softmax(base, dim=-1) + KL_EPS
    kl = (p * torch.log(p / q)).sum(dim=-1, keepdim=True)
    return (other - base).abs() * kl


def fence(scores: Tensor, generator: torch.Generator | None = None) -> Tensor:
    """``median + 1.5 * IQR`` of ``scores`` (any shape), sampled above 1M elements."""
    import torch

    flat = scores.reshape(-1)
    if flat.numel() > QUANTILE_SAMPLE_SIZE:
        picks = torch.randint(flat.numel(), (QUANTILE_SAMPLE_SIZE,), generator=generator)
        flat = flat[picks.to(flat.device)]
    ordered = torch.sort(flat).values
    last = ordered.numel() - 1
    # floor(q * (n - 1)), exactly as the float32 products (exact below 2**24).
    q1, median, q3 = ordered[last // 4], ordered[last // 2], ordered[(3 * last) // 4]
    return median + 1.5 * (q3 - q1)


def arcee_fusion(base: Tensor, other: Tensor, generator: torch.Generator | None = None) -> Tensor:
    """Fuse ``other`` into ``base`` (both ``(..., d)``) -> ``(..., d)`` in the input dtype."""
    import torch

    scores = importance(base, other)
    mask = scores >= fence(scores, generator)
    # Same rounding as mergekit: the difference in the input dtype, the sum in
    # at least float32 (its mask is float32), then back to the input dtype.
    wide = torch.promote_types(base.dtype, torch.float32)
    return (base + (other - base) * mask.to(wide)).to(base.dtype)


def _arcee_fusion(inputs: TensorInputs) -> Tensor:
    """Kernel: base and one other tensor of shape ``(..., d)`` -> ``(..., d)``."""
    (other,) = inputs.non_base_indices()
    return arcee_fusion(inputs.base, inputs.tensors[other], inputs.generator(other, "arcee_fusion_quantiles"))


register(
    MergeMethod(
        name="arcee_fusion",
        display_name="Arcee Fusion",
        paper="https://arcee.ai",
        description="Takes the other model's changes only where their importance passes a dynamic threshold.",
        kernel=_arcee_fusion,
        parameters=(),
        base=BASE_REQUIRED,
        min_models=2,
        max_models=2,
        # Only tensors above 1M elements sample their quantiles from the seed.
        random=True,
        missing_tensors="passthrough",
    )
)
