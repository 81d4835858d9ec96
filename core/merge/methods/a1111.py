"""The modes of A1111's Checkpoint Merger as ordinary recipe methods.

https://github.com/AUTOMATIC1111/stable-diffusion-webui/wiki/Features#checkpoint-merger

* ``weighted_sum``: exactly two models A, B in recipe order,
  ``A·(1 − alpha) + B·alpha``: alpha = 0.3 keeps 70 % of A and takes 30 % of B.
* ``add_difference``: exactly three models A, B, C in recipe order,
  ``A + multiplier·(B − C)``: adds what B learned on top of C to A.
* ``convert`` ("No interpolation"): one model, written again with the recipe's
  ``out_dtype``, ``vae:``, ``drop:`` and ``ema:`` options (which every method
  of a Stable Diffusion merge takes, as every mode of A1111's merger does).

alpha and multiplier accept any finite value; outside [0, 1] they extrapolate
(A1111's sliders stop at 0 and 1, so the app's slider does too, but a typed
value is kept). Both may be given per block (core/merge/blocks.py).

Inpainting and instruct-pix2pix models: as in A1111 (and its wiki's "make your
own inpainting model" recipe, add_difference with A = the inpainting model,
B = yours, C = the base B was tuned from), model A may have a 9- (or 8-)
channel first convolution when B and C have the normal 4: the first 4 input
channels are merged by the formula, the other 5 (or 4) are copied from A, and
the output is an inpainting (instruct-pix2pix) model. weighted_sum does the
same (A1111 applies it to both modes). The planner refuses every other mix of
channel counts before reading a weight (core/io/sd.py).

Computed in float32 (float64 inputs stay float64), in chunks of 256K elements
so the temporaries stay small, and returned in the input dtype.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Callable

from core.merge.methods import register
from core.merge.methods.base import BASE_IGNORED, GLOBAL, MergeMethod, Parameter, TensorInputs, compute_dtype

if TYPE_CHECKING:  # pragma: no cover
    import torch

WIKI = "https://github.com/AUTOMATIC1111/stable-diffusion-webui/wiki/Features#checkpoint-merger"
_CHUNK = 1 << 18


def _chunked(inputs: TensorInputs, combine: Callable[[list["torch.Tensor"], "torch.Tensor"], None]) -> "torch.Tensor":
    """Apply ``combine(chunks, out)`` over flat chunks of equally shaped inputs (in float32 / float64).

    When model A has more input channels than the others (an inpainting UNet's
    first convolution), the formula covers A's first channels and the rest are
    A's own.
    """
    import torch

    tensors = inputs.tensors
    first = tensors[0]
    narrow = tensors[1].shape
    if first.shape != narrow:
        out = first.clone()
        parts = [first[:, : narrow[1]].contiguous(), *tensors[1:]]
        sub = TensorInputs(inputs.name, parts, inputs.base_index, inputs.params, inputs.model_params)
        out[:, : narrow[1]] = _chunked(sub, combine)
        return out
    dtype = compute_dtype(first)
    out = torch.empty(first.shape, dtype=first.dtype, device=first.device)
    flats = [t.reshape(-1) for t in tensors]
    flat_out = out.reshape(-1)
    n = flat_out.numel()
    step = min(_CHUNK, max(n, 1))
    acc = torch.empty(min(n, step), dtype=dtype, device=first.device)
    for start in range(0, n, step):
        end = min(n, start + step)
        chunk = acc[: end - start]
        combine([f[start:end].to(dtype) for f in flats], chunk)
        flat_out[start:end] = chunk
    return out


def _weighted_sum(inputs: TensorInputs) -> "torch.Tensor":
    """A·(1 − alpha) + B·alpha, element by element."""
    alpha = float(inputs.params["alpha"])

    def combine(x: list, out) -> None:
        out.copy_(x[0]).mul_(1.0 - alpha).add_(x[1], alpha=alpha)

    return _chunked(inputs, combine)


def _add_difference(inputs: TensorInputs) -> "torch.Tensor":
    """A + multiplier·(B − C): the difference first, as A1111 computes it."""
    multiplier = float(inputs.params["multiplier"])

    def combine(x: list, out) -> None:
        out.copy_(x[1]).sub_(x[2]).mul_(multiplier).add_(x[0])

    return _chunked(inputs, combine)


def _convert(inputs: TensorInputs) -> "torch.Tensor":
    """The tensor itself; the executor converts it to the output dtype."""
    return inputs.tensors[0]


register(
    MergeMethod(
        name="weighted_sum",
        display_name="Weighted sum (A1111)",
        paper=WIKI,
        description="A1111's weighted sum of two models A and B: A·(1 − alpha) + B·alpha (0.3 = 30 % of model B).",
        kernel=_weighted_sum,
        parameters=(
            Parameter(
                "alpha",
                float,
                0.5,
                "Share of model B: 0.3 = 30 % of model B and 70 % of model A; result A·(1 − alpha) + B·alpha.",
                scope=GLOBAL,
                slider=(0.0, 1.0),
            ),
        ),
        base=BASE_IGNORED,
        min_models=2,
        max_models=2,
        scratch=0.0,
    )
)

register(
    MergeMethod(
        name="add_difference",
        display_name="Add difference (A1111)",
        paper=WIKI,
        description="A1111's add difference of three models A, B, C: A + multiplier·(B − C).",
        kernel=_add_difference,
        parameters=(
            Parameter(
                "multiplier",
                float,
                1.0,
                "Adds multiplier × (B − C) to A: 1.0 adds the whole difference, 0.5 half of it.",
                scope=GLOBAL,
                slider=(0.0, 1.0),
            ),
        ),
        base=BASE_IGNORED,
        min_models=3,
        max_models=3,
        scratch=0.0,
    )
)

register(
    MergeMethod(
        name="convert",
        display_name="No interpolation (convert)",
        paper=WIKI,
        description=(
            "A1111's 'No interpolation': one model written again, with the recipe's out_dtype, "
            "vae: (bake in a VAE), drop: (leave tensors out) and ema: options."
        ),
        kernel=_convert,
        parameters=(),
        base=BASE_IGNORED,
        min_models=1,
        max_models=1,
        scratch=0.0,
    )
)
