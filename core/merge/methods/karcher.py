"""Karcher mean: the Riemannian centre of mass of the models on the unit sphere.

Karcher, 1977, "Riemannian center of mass and mollifier smoothing", Comm. Pure
Appl. Math. 30(5); https://en.wikipedia.org/wiki/Fr%C3%A9chet_mean ; as a merge
method: https://arxiv.org/abs/2603.04972 (the reference mergekit gives).

Every (flattened) tensor ``x_i`` is split into its norm ``|x_i|`` and direction
``u_i``. Starting from the normalised Euclidean mean of the directions, a
fixed-point (Riemannian gradient) iteration moves the estimate ``m`` along

    v = sum_i a_i * theta_i / sin(theta_i) * (u_i - cos(theta_i) m),
    m <- cos|v| m + sin|v| v / |v|,      theta_i = angle(m, u_i),

until ``|v| < tol`` or ``max_iter`` steps. The result is ``m`` scaled by the
mean norm. All models weigh the same (``a_i = 1 / N``); tensors with norm at
most ``tol`` take no part in the direction but still count in the scale.

Norms are computed in float32 (float64 for float64 inputs); the vectors stay in
the input dtype, as in mergekit 0.1.5, and the result has the input dtype.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from core.merge.methods import register
from core.merge.methods.base import BASE_IGNORED, GLOBAL, MergeMethod, Parameter, TensorInputs

if TYPE_CHECKING:  # pragma: no cover - typing only
    from torch import Tensor


def karcher_mean(tensors: list[Tensor], weights: list[float], max_iter: int = 10, tol: float = 1e-5) -> Tensor:
    """Weighted Karcher mean of ``tensors`` (each of shape ``(...)``) -> ``(...)``."""
    import torch

    if len(tensors) == 1:
        return tensors[0]
    norm_dtype = torch.float64 if tensors[0].dtype == torch.float64 else torch.float32

    norms = [torch.linalg.vector_norm(x.to(norm_dtype)) for x in tensors]
    directions = [torch.zeros_like(x) if n.item() == 0.0 else (x / n).to(x.dtype) for x, n in zip(tensors, norms)]
    # Near-zero tensors have no meaningful direction; leave them out of the angle average.
    kept = [i for i, n in enumerate(norms) if n.item() > tol]
    if not kept:
        return torch.zeros_like(tensors[0])
    kept_sum = sum(weights[i] for i in kept)
    alphas = [weights[i] / kept_sum for i in kept]
    units = [directions[i] for i in kept]

    mean = torch.zeros_like(units[0])
    for a, u in zip(alphas, units):
        mean += a * u
    length = torch.linalg.vector_norm(mean.to(norm_dtype))
    # Directions that cancel out: start from the first one instead.
    mean = units[0].clone() if length.item() < tol else (mean / length).to(mean.dtype)

    for _ in range(max_iter):
        step = torch.zeros_like(mean)
        for a, u in zip(alphas, units):
            cos = torch.clamp(torch.dot(mean.reshape(-1), u.reshape(-1)), -1.0, 1.0)
            theta = torch.arccos(cos)
            if theta.item() < tol:  # u already at the mean: no pull (and 0/0 avoided)
                continue
            step += a * (theta / torch.sin(theta)) * (u - cos * mean)
        step_norm = torch.linalg.vector_norm(step.to(norm_dtype))
        if step_norm.item() < tol:
            break
        mean = (torch.cos(step_norm) * mean + torch.sin(step_norm) * (step / step_norm)).to(mean.dtype)
        # Re-project: rounding drifts the estimate off the sphere.
        length = torch.linalg.vector_norm(mean.to(norm_dtype))
        if length.item() > tol:
            mean = (mean / length).to(mean.dtype)

    scale = sum(w * n for w, n in zip(weights, norms))
    return scale * mean


def _karcher(inputs: TensorInputs) -> Tensor:
    """Kernel: one or more tensors of shape ``(...)`` -> ``(...)``, all weighted equally."""
    count = len(inputs.tensors)
    return karcher_mean(
        list(inputs.tensors),
        [1.0 / count] * count,
        max_iter=int(inputs.params["max_iter"]),
        tol=float(inputs.params["tol"]),
    )


register(
    MergeMethod(
        name="karcher",
        display_name="Karcher Mean",
        paper="https://arxiv.org/abs/2603.04972",
        description="Riemannian (spherical) mean of the models' directions, scaled by their mean norm.",
        kernel=_karcher,
        parameters=(
            Parameter(
                "max_iter", int, 10, "Most iterations of the fixed-point refinement.", scope=GLOBAL, slider=(1, 100)
            ),
            Parameter(
                "tol", float, 1e-5, "Stop when the update is shorter than this.", scope=GLOBAL, slider=(0.0, 1e-3)
            ),
        ),
        base=BASE_IGNORED,
        min_models=1,
    )
)
