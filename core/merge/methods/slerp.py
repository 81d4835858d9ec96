"""Spherical linear interpolation (SLERP) between a base model and one other model.

Shoemake, 1985, "Animating rotation with quaternion curves" (SIGGRAPH '85);
https://en.wikipedia.org/wiki/Slerp

Each tensor is treated as one vector (the whole tensor, flattened; not row by
row). With ``a`` the base tensor, ``b`` the other one and ``theta`` the angle
between them,

    merged = sin((1 - t) * theta) / sin(theta) * a + sin(t * theta) / sin(theta) * b

and, when the two are (anti)collinear (``|cos theta| > 0.9995``), the plain
linear interpolation ``(1 - t) * a + t * b``. ``t`` is the share of the
non-base model: ``t = 0`` gives the base, ``t = 1`` the other model. Values
outside [0, 1] extrapolate and are accepted, as in mergekit.

Computed in float32 (float64 for float64 inputs), returned in the input dtype,
with the same thresholds as mergekit 0.1.5 so recipes give the same numbers.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from core.merge.methods import register
from core.merge.methods.base import (
    BASE_REQUIRED,
    GLOBAL,
    REQUIRED,
    MergeMethod,
    Parameter,
    TensorInputs,
)

if TYPE_CHECKING:  # pragma: no cover - typing only
    from torch import Tensor

# Above this |cos theta| the two tensors count as collinear and we fall back to
# linear interpolation (sin theta ~ 0 makes the spherical weights unstable).
DOT_THRESHOLD = 0.9995
# A tensor whose norm is at most this is not normalised (avoids 0 / 0).
NORM_EPS = 1e-8
# Elements converted to the compute dtype at a time: bounds the float32
# scratch for a large bf16 tensor to a few MiB instead of a full copy.
CHUNK_ELEMENTS = 1024 * 1024


def slerp(t: float, v0: Tensor, v1: Tensor) -> Tensor:
    """Interpolate from ``v0`` (t = 0) to ``v1`` (t = 1) on the sphere.

    ``v0``, ``v1``: tensors of the same shape ``(...)`` and dtype. Returns a new
    tensor of that shape and dtype; the inputs are not modified.
    """
    import torch

    dtype = torch.float64 if v0.dtype == torch.float64 else torch.float32
    a = v0.reshape(-1)
    b = v1.reshape(-1)
    tt = torch.tensor(t, dtype=dtype, device=v0.device)
    if a.numel() == 0:
        return v0.clone()

    spans = [(start, min(start + CHUNK_ELEMENTS, a.numel())) for start in range(0, a.numel(), CHUNK_ELEMENTS)]

    def piece(x: Tensor, span: tuple[int, int]) -> Tensor:
        return x[span[0] : span[1]].to(dtype)

    # Norm of per-chunk norms: exact (up to rounding) and never overflows.
    norm_a = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(piece(a, s)) for s in spans]))
    norm_b = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(piece(b, s)) for s in spans]))
    norm_a = torch.where(norm_a > NORM_EPS, norm_a, torch.ones_like(norm_a))
    norm_b = torch.where(norm_b > NORM_EPS, norm_b, torch.ones_like(norm_b))
    # Dot of the unit vectors; dividing first keeps large weights from overflowing.
    cos = torch.stack([(piece(a, s) / norm_a * (piece(b, s) / norm_b)).sum() for s in spans]).sum()
    cos = cos.clamp(-1, 1)

    if cos.abs().item() > DOT_THRESHOLD:
        coef_a, coef_b = 1 - tt, tt
    else:
        theta = torch.acos(cos)
        sin_theta = torch.sin(theta)
        coef_a = torch.sin((1 - tt) * theta) / sin_theta
        coef_b = torch.sin(tt * theta) / sin_theta

    result = torch.empty_like(a)
    for s in spans:
        result[s[0] : s[1]] = coef_a * piece(a, s) + coef_b * piece(b, s)
    return result.reshape(v0.shape)


def _slerp(inputs: TensorInputs) -> Tensor:
    """Kernel: base and one other tensor of shape ``(...)`` -> merged ``(...)``."""
    base = inputs.base_index
    (other,) = inputs.non_base_indices()
    return slerp(float(inputs.params["t"]), inputs.tensors[base], inputs.tensors[other])


register(
    MergeMethod(
        name="slerp",
        display_name="SLERP",
        paper="https://en.wikipedia.org/wiki/Slerp",
        description="Spherical interpolation between the base model and one other model.",
        kernel=_slerp,
        parameters=(
            Parameter(
                "t",
                float,
                REQUIRED,
                "Share of the non-base model: 0 keeps the base, 1 takes the other model.",
                scope=GLOBAL,
                slider=(0.0, 1.0),
            ),
        ),
        base=BASE_REQUIRED,
        min_models=2,
        max_models=2,
        missing_tensors="passthrough",
    )
)
