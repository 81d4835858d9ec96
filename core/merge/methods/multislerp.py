"""Multi-SLERP: weighted spherical interpolation of any number of models.

Goddard, "Multi-SLERP", https://goddard.blog/posts/multislerp-wow-what-a-cool-idea
(barycentric interpolation on the hypersphere, as in mergekit's ``multislerp``).

Each (flattened) tensor ``x_i`` -- or task vector ``x_i - base`` when a base
model is given -- is projected onto the unit sphere, ``u_i = x_i / |x_i|``.
With weights ``w_i`` (normalised to sum to one by default):

1. ``m`` = the normalised weighted Euclidean mean of the ``u_i``;
2. the tangent vectors ``u_i - (u_i . m) m`` at ``m`` are averaged with the
   weights into ``v``;
3. the exponential map ``m cos|v| + v sin|v| / |v|`` goes back to the sphere,
   and the result is scaled by the weighted mean norm ``sum_i w_i |x_i|``.

A single model is returned unchanged. If the weighted mean of the unit
vectors vanishes (antipodal inputs whose weights cancel), two models fall back
to linear interpolation and more than two are refused.

As in mergekit 0.1.5, the arithmetic runs in the input dtype and the result
has the input dtype.
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


class NoMeanDirection(ValueError):
    """The weighted mean of the unit vectors is zero, so there is no mean direction."""


def multislerp(
    tensors: list[Tensor],
    weights: list[float],
    base: Tensor | None = None,
    normalize_weights: bool = True,
    eps: float = 1e-8,
) -> Tensor:
    """Barycentric SLERP of ``tensors`` (each of shape ``(...)``) -> ``(...)``.

    ``base`` (shape ``(...)`` or None) is subtracted first and added back at
    the end. Raises NoMeanDirection when the weighted mean direction is zero
    and there are more than two tensors.
    """
    import torch

    if len(tensors) == 1:
        return tensors[0]
    shape = tensors[0].shape
    # torch.stack copies, so subtracting in place leaves the inputs untouched.
    stacked = torch.stack(tensors)
    if base is not None:
        stacked.sub_(base)
    flat = stacked.reshape(len(tensors), -1)

    w = torch.tensor(weights, dtype=flat.dtype, device=flat.device)
    if normalize_weights:
        w = w / w.sum()

    norms = torch.norm(flat, dim=-1, keepdim=True)
    units = flat / (norms + eps)
    mean = (units * w.view(-1, 1)).sum(0)
    mean_norm = torch.norm(mean)
    if mean_norm < eps:
        if len(tensors) != 2:
            raise NoMeanDirection("the weighted mean direction of the models is zero")
        # Two opposite directions: the spherical path is undefined; interpolate linearly.
        result = (flat[0] * w[0] + flat[1] * w[1]).view(shape)
        return result if base is None else result + base
    mean = mean / mean_norm

    # Log map to the tangent space at the mean, weighted average, exp map back.
    tangents = units - (units * mean).sum(-1, keepdim=True) * mean
    tangent = (tangents * w.view(-1, 1)).sum(0)
    length = torch.norm(tangent) + eps
    direction = mean * torch.cos(length) + tangent * (torch.sin(length) / length)
    result = (direction * (norms.squeeze(-1) * w).sum()).view(shape)
    return result if base is None else result + base


def _multislerp(inputs: TensorInputs) -> Tensor:
    """Kernel: one or more non-base tensors (plus optional base) of shape ``(...)`` -> ``(...)``."""
    indices = inputs.non_base_indices()
    try:
        return multislerp(
            [inputs.tensors[i] for i in indices],
            [float(inputs.model_params[i]["weight"]) for i in indices],
            base=inputs.base,
            normalize_weights=bool(inputs.params["normalize_weights"]),
            eps=float(inputs.params["eps"]),
        )
    except NoMeanDirection:
        raise RecipeError(
            f"Tensor '{inputs.name}': the weighted directions of the models cancel out "
            "(opposite tensors with balancing weights), so multislerp has no direction; "
            "change the weights."
        ) from None


def _check(name: str, params: dict, model_params: list[dict], base_index: int | None) -> None:
    non_base = [p for i, p in enumerate(model_params) if i != base_index]
    if not non_base:
        raise RecipeError(f"Tensor '{name}': multislerp needs at least one model besides the base model.")
    # One model is returned as it is, so only a real mix divides by the sum.
    if params["normalize_weights"] and len(non_base) > 1 and sum(float(p["weight"]) for p in non_base) == 0:
        raise RecipeError(
            f"Tensor '{name}': the weights sum to zero, so 'normalize_weights: true' would divide by zero; "
            "change the weights or set normalize_weights: false."
        )


register(
    MergeMethod(
        name="multislerp",
        display_name="Multi-SLERP",
        paper="https://goddard.blog/posts/multislerp-wow-what-a-cool-idea",
        description="Weighted spherical interpolation of any number of models (task vectors with a base).",
        kernel=_multislerp,
        parameters=(
            Parameter(
                "weight",
                float,
                REQUIRED,
                "Weight of this model in the spherical mean.",
                scope=NON_BASE,
                slider=(0.0, 1.0),
            ),
            Parameter("normalize_weights", bool, True, "Divide the weights by their sum.", scope=GLOBAL),
            Parameter(
                "eps", float, 1e-8, "Small constant that keeps norms away from zero.", scope=GLOBAL, slider=(0.0, 1e-4)
            ),
        ),
        base=BASE_OPTIONAL,
        min_models=1,
        check=_check,
    )
)
