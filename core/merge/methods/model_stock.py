"""Model Stock: average fine-tuned models, then pull toward the base by their agreement.

Jang, Yun and Han, 2024, "Model Stock: All we need is just a few fine-tuned
models", https://arxiv.org/abs/2403.19522

With base ``w0``, ``N`` fine-tuned models ``w_i``, their average ``w_avg`` and
``cos`` the mean pairwise cosine of the task vectors ``w_i - w0``, the paper's
interpolation ratio (its eq. 6) is

    t = N * cos / (1 + (N - 1) * cos),      merged = t * w_avg + (1 - t) * w0.

``cos`` is taken over the whole flattened tensor, or with ``filter_wise`` one
per row (per slice along the last axis; a 1-D tensor is one row). Norm products
are clamped at 1e-6 (so a zero task vector has cosine 0), and where
``1 + (N - 1) cos`` is within 1e-6 of zero there is no finite ratio and the
base is kept (t = 0), as in mergekit 0.1.5.

The arithmetic runs in the input dtype, as in mergekit, and the result has the
input dtype.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from core.merge.methods import register
from core.merge.methods.base import BASE_REQUIRED, GLOBAL, MergeMethod, Parameter, TensorInputs

if TYPE_CHECKING:  # pragma: no cover - typing only
    from torch import Tensor

# Norm products below this count as this (a zero task vector gives cos = 0).
NORM_PRODUCT_EPS = 1e-6
# |1 + (N - 1) cos| below this: no finite ratio, keep the base.
SINGULAR_EPS = 1e-6


def model_stock(base: Tensor, tensors: list[Tensor], filter_wise: bool = False) -> Tensor:
    """Merge ``tensors`` (each ``(...)``, N >= 2) with ``base`` (``(...)``) -> ``(...)``."""
    import torch

    shape = base.shape
    if not filter_wise:
        w0, ws = base.reshape(-1), [w.reshape(-1) for w in tensors]
    elif base.dim() == 1:
        # A vector is a single filter.
        w0, ws = base.unsqueeze(0), [w.unsqueeze(0) for w in tensors]
    else:
        w0, ws = base, list(tensors)

    deltas = [w - w0 for w in ws]
    cosines = []
    for i in range(len(deltas)):
        for j in range(i + 1, len(deltas)):
            a, b = deltas[i], deltas[j]
            norms = torch.norm(a, dim=-1) * torch.norm(b, dim=-1)
            cosines.append(((a * b).sum(dim=-1) / norms.clamp(min=NORM_PRODUCT_EPS)).clamp(-1, 1))
    cos = torch.stack(cosines).mean(dim=0).unsqueeze(-1)

    n = len(ws)
    denominator = 1 + (n - 1) * cos
    singular = denominator.abs() < SINGULAR_EPS
    ratio = torch.where(
        singular,
        torch.zeros_like(cos),
        n * cos / torch.where(singular, torch.ones_like(denominator), denominator),
    )
    average = sum(ws) / n
    return (ratio * average + (1 - ratio) * w0).reshape(shape)


def _model_stock(inputs: TensorInputs) -> Tensor:
    """Kernel: base plus two or more tensors of shape ``(...)`` -> ``(...)``."""
    return model_stock(
        inputs.base,
        [inputs.tensors[i] for i in inputs.non_base_indices()],
        filter_wise=bool(inputs.params["filter_wise"]),
    )


register(
    MergeMethod(
        name="model_stock",
        display_name="Model Stock",
        paper="https://arxiv.org/abs/2403.19522",
        description="Average of the fine-tuned models, interpolated toward the base by how much they agree.",
        kernel=_model_stock,
        parameters=(
            Parameter(
                "filter_wise",
                bool,
                False,
                "One ratio per row (last axis) instead of one per tensor.",
                scope=GLOBAL,
            ),
        ),
        base=BASE_REQUIRED,
        min_models=3,
        # mergekit's BASE_OR_SKIP: a tensor that fewer than min_models inputs have
        # is copied from the base if only the base has it and left out otherwise;
        # with enough inputs, the ones that have it are merged.
        missing_tensors="base_or_skip",
    )
)
