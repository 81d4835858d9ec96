"""NuSLERP: SLERP between two models with per-model weights, optionally on task vectors.

Spherical interpolation (Shoemake, 1985; https://en.wikipedia.org/wiki/Slerp)
as reworked in mergekit's ``nuslerp`` method: the two non-base models get
weights ``w0``, ``w1`` and are interpolated with ``t = w1 / (w0 + w1)`` (0.5
when the weights sum to about zero). With a base model the interpolation runs
on the task vectors ``x_i - base`` and the base is added back.

The angle is measured over the whole flattened tensor (``nuslerp_flatten``,
the default), or else along the last axis (one angle per row) or, with
``nuslerp_row_wise``, along the first axis (one angle per column). Where the
two vectors are collinear the plain linear interpolation is used.

As in mergekit 0.1.5, the arithmetic runs in the input dtype (the recipe's
``dtype`` decides it) and the result has the input dtype.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from core.errors import RecipeError
from core.merge.methods import register
from core.merge.methods.base import (
    BASE_OPTIONAL,
    GLOBAL,
    NON_BASE,
    REQUIRED,
    MergeMethod,
    Parameter,
    TensorInputs,
)

if TYPE_CHECKING:  # pragma: no cover - typing only
    from torch import Tensor

# Weights whose sum is below this in magnitude give t = 0.5 instead of a
# division by (almost) zero.
WEIGHT_SUM_EPS = 1e-6
# Vectors shorter than this are not scaled up when normalised.
NORMALIZE_EPS = 1e-7
# Collinear when 1 - cos^2 <= COLLINEAR_EPS^2 (sin theta is then ~0).
COLLINEAR_EPS = 1e-8


def nuslerp(t: float, v0: Tensor, v1: Tensor, dim: int = -1, flatten: bool = False) -> Tensor:
    """SLERP of the raw vectors ``v0`` (t = 0) and ``v1`` (t = 1).

    ``v0``, ``v1``: tensors of shape ``(...)``. The angle is taken over the whole
    tensor when ``flatten``, else along axis ``dim`` (one angle per slice).
    Returns a tensor of shape ``(...)`` in the input dtype.
    """
    import torch

    shape = v0.shape
    if flatten:
        a, b = v0.reshape(-1), v1.reshape(-1)
    elif dim != -1:
        a, b = v0.transpose(dim, -1), v1.transpose(dim, -1)
    else:
        a, b = v0, v1

    unit_a = a / torch.norm(a, dim=-1, keepdim=True).clamp(min=NORMALIZE_EPS)
    unit_b = b / torch.norm(b, dim=-1, keepdim=True).clamp(min=NORMALIZE_EPS)
    cos = (unit_a * unit_b).sum(dim=-1, keepdim=True).clamp(-1, 1)
    collinear = (1 - cos.square()) <= COLLINEAR_EPS**2
    # acos(0) on the collinear slices keeps the discarded branch finite.
    theta = torch.acos(torch.where(collinear, torch.zeros_like(cos), cos))
    spherical = (torch.sin((1 - t) * theta) * a + torch.sin(t * theta) * b) / torch.sin(theta)
    result = torch.where(collinear, (1 - t) * a + t * b, spherical)
    if dim != -1 and not flatten:
        result = result.transpose(dim, -1)
    return result.reshape(shape)


def _nuslerp(inputs: TensorInputs) -> Tensor:
    """Kernel: two non-base tensors (plus optional base) of shape ``(...)`` -> ``(...)``."""
    first, second = inputs.non_base_indices()
    w0 = float(inputs.model_params[first]["weight"])
    w1 = float(inputs.model_params[second]["weight"])
    total = w0 + w1
    t = 0.5 if abs(total) < WEIGHT_SUM_EPS else w1 / total
    dim = 0 if inputs.params["nuslerp_row_wise"] else -1
    flatten = bool(inputs.params["nuslerp_flatten"])
    x0, x1 = inputs.tensors[first], inputs.tensors[second]
    base = inputs.base
    if base is None:
        return nuslerp(t, x0, x1, dim=dim, flatten=flatten)
    return base + nuslerp(t, x0 - base, x1 - base, dim=dim, flatten=flatten)


def _check(name: str, params: dict, model_params: list[dict], base_index: int | None) -> None:
    non_base = len(model_params) - (base_index is not None)
    if non_base != 2:
        raise RecipeError(f"Tensor '{name}': nuslerp needs exactly two models besides the base model, got {non_base}.")


register(
    MergeMethod(
        name="nuslerp",
        display_name="NuSLERP",
        paper="https://en.wikipedia.org/wiki/Slerp",
        description="SLERP of two weighted models, on task vectors when a base model is given.",
        kernel=_nuslerp,
        parameters=(
            Parameter(
                "weight",
                float,
                REQUIRED,
                "Relative weight of this model; t = weight of the second / sum of both.",
                scope=NON_BASE,
                slider=(0.0, 1.0),
            ),
            Parameter(
                "nuslerp_row_wise",
                bool,
                False,
                "Without flattening, measure angles along the first axis instead of the last.",
                scope=GLOBAL,
            ),
            Parameter(
                "nuslerp_flatten",
                bool,
                True,
                "Take one angle over the whole flattened tensor.",
                scope=GLOBAL,
            ),
        ),
        base=BASE_OPTIONAL,
        min_models=2,
        max_models=3,
        missing_tensors="passthrough",
        check=_check,
    )
)
