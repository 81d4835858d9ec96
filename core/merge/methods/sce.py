"""SCE: Select, Calculate, Erase.

Wan et al., 2024, "FuseChat: Knowledge Fusion of Chat Models",
https://arxiv.org/abs/2408.07990

Per tensor, with base ``b`` and task vectors ``d_i = x_i - b`` (i over the
non-base models, N of them):

    Select:    with select_topk < 1, keep the elements whose variance across
               the d_i is among the top ``select_topk`` share of the elements
               with non-zero variance; zero the rest in every d_i.
    Calculate: w_i = mean(d_i ** 2) / sum_j mean(d_j ** 2)
               (uniform 1/N when that sum is below 1e-6, as in mergekit).
    Erase:     elect a sign per element from sum_i d_i (TIES, positive at 0);
               drop the d_i that disagree.
    merged = b + sum_i w_i d_i [agree] / max(sum_i w_i [agree], 1e-6)

Parameters, names and defaults are mergekit 0.1.5's (no weights: SCE derives
them). Note that the 1e-6 fallback is absolute: task vectors whose mean square
is below about 1e-6 (small fine-tuning deltas) get uniform weights there too;
this is kept so recipes give mergekit's numbers.

One difference from mergekit 0.1.5, on purpose: mergekit selects
``floor(select_topk * n)`` elements, so a small tensor (fewer than
``1 / select_topk`` elements with non-zero variance) loses all of them and
falls back to the base; here at least one element is selected. Ties in
variance are ranked by position, the same on every device.

Computed in float32 (float64 for float64 inputs), returned in the input dtype.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from core.errors import RecipeError
from core.merge.methods import register
from core.merge.methods.base import BASE_REQUIRED, GLOBAL, MergeMethod, Parameter, TensorInputs, compute_dtype
from core.merge.methods.sparsify import top_mask
from core.merge.methods.task_arithmetic import sign_agreement

if TYPE_CHECKING:  # pragma: no cover - typing only
    import torch

_UNIFORM_BELOW = 1e-6  # mergekit's threshold on the sum of mean squares
_MIN_DIVISOR = 1e-6  # mergekit's floor for the per-element weight sum


def sce_weights(task_vectors: torch.Tensor) -> torch.Tensor:
    """Calculate step: (N, *shape) -> (N,) weights from mean squared deltas."""
    import torch

    energy = task_vectors.square().reshape(task_vectors.shape[0], -1).mean(dim=1)
    total = float(energy.sum())
    if abs(total) < _UNIFORM_BELOW:
        return torch.full_like(energy, 1.0 / energy.shape[0])
    return energy / total


def sce_select(task_vectors: torch.Tensor, select_topk: float) -> torch.Tensor:
    """Select step: (N, *shape) -> bool (*shape), the highest-variance elements."""
    import torch

    variance = torch.var(task_vectors, dim=0, unbiased=False)
    nonzero = torch.count_nonzero(variance)
    # floor(nonzero * select_topk) with the product in float32, as mergekit
    # computes it (it can round up where the float64 product falls just short).
    k = int(nonzero.to(torch.float32) * select_topk)
    if int(nonzero) > 0:
        k = max(1, k)  # never select nothing just because the tensor is small
    return top_mask(variance.abs(), k)


def _sce(inputs: TensorInputs) -> torch.Tensor:
    """Merge one tensor: inputs all of shape S -> result of shape S, input dtype."""
    import torch

    base = inputs.base
    if base is None:
        raise RecipeError(f"Tensor '{inputs.name}': SCE needs a base model.")
    others = inputs.non_base_indices()
    if not others or base.numel() == 0:
        return base.clone()
    dtype = compute_dtype(base)
    b = base.to(dtype)
    task_vectors = torch.stack([inputs.tensors[i].to(dtype) - b for i in others])

    select_topk = float(inputs.params.get("select_topk", 1.0))
    if select_topk < 1:
        task_vectors.mul_(sce_select(task_vectors, select_topk))

    agree = sign_agreement(task_vectors)
    weights = sce_weights(task_vectors).reshape(-1, *([1] * base.dim()))
    erased = weights * agree  # (N, *shape): each model's weight where it agrees
    merged = (task_vectors * erased).sum(dim=0)
    merged.div_(erased.sum(dim=0).clamp(min=_MIN_DIVISOR))
    return (b + merged).to(base.dtype)


register(
    MergeMethod(
        name="sce",
        display_name="SCE",
        paper="https://arxiv.org/abs/2408.07990",
        description="Selects high-variance elements, weights task vectors by their energy and "
        "erases sign conflicts (Wan et al., 2024).",
        kernel=_sce,
        parameters=(
            Parameter("int8_mask", bool, False, "Accepted for mergekit recipes; no effect (masks are always boolean)."),
            Parameter(
                "select_topk",
                float,
                1.0,
                "Share of elements, by variance across models, that take part.",
                scope=GLOBAL,
                minimum=0.0,
                maximum=1.0,
                exclusive_minimum=True,
            ),
        ),
        base=BASE_REQUIRED,
        min_models=1,
    )
)
