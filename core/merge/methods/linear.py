"""Linear averaging ("model soups").

Wortsman et al., 2022, "Model soups: averaging weights of multiple fine-tuned
models improves accuracy without increasing inference time",
https://arxiv.org/abs/2203.05482

    merged = sum_i w_i * x_i / sum_i w_i        (normalize: true, the default)
    merged = sum_i w_i * x_i                    (normalize: false)

Computed in float32 (float64 when the inputs are float64), returned in the
input dtype, as mergekit does, so recipes give the same numbers.
"""

from __future__ import annotations

from core.errors import RecipeError
from core.merge.methods import register
from core.merge.methods.base import GLOBAL, MODEL, REQUIRED, MergeMethod, Parameter, TensorInputs, compute_dtype


_CHUNK = 1 << 18  # elements per chunk of a large tensor (1 MB of float32)


def weighted_sum(inputs: TensorInputs, weights: list[float], normalize: bool):
    """sum_i w_i * x_i (/ sum_i w_i): accumulated in order, in float32 (float64).

    Large tensors go through in chunks of 256K elements: the same operations
    per element (so the same bits), but each chunk's temporaries stay in the
    CPU cache instead of allocating tensor-sized float32 copies.
    """
    import torch

    first = inputs.tensors[0]
    dtype = compute_dtype(first)
    out = torch.empty(first.shape, dtype=first.dtype, device=first.device)
    flats = [t.reshape(-1) for t in inputs.tensors]
    flat_out = out.reshape(-1)
    total = sum(weights)
    n = flat_out.numel()
    step = _CHUNK if n > _CHUNK else max(n, 1)
    acc = torch.empty(min(n, step), dtype=dtype, device=first.device)
    for start in range(0, n, step):
        end = min(n, start + step)
        result = acc[: end - start]
        result.zero_()
        for flat, weight in zip(flats, weights):
            result.add_(flat[start:end].to(dtype), alpha=weight)
        if normalize:
            result.div_(total)
        flat_out[start:end] = result
    return out


def _linear(inputs: TensorInputs):
    weights = [float(p["weight"]) for p in inputs.model_params]
    return weighted_sum(inputs, weights, bool(inputs.params["normalize"]))


def _check(name, params, model_params, base_index):
    if params["normalize"] and sum(float(p["weight"]) for p in model_params) == 0:
        raise RecipeError(
            f"Tensor '{name}': the weights sum to zero, so 'normalize: true' would divide by zero; "
            "change the weights or set normalize: false."
        )


register(
    MergeMethod(
        name="linear",
        display_name="Linear",
        paper="https://arxiv.org/abs/2203.05482",
        description="Weighted average of the models (model soups).",
        kernel=_linear,
        parameters=(
            Parameter("weight", float, REQUIRED, "Share of this model in the average.", scope=MODEL),
            Parameter("normalize", bool, True, "Divide by the sum of the weights.", scope=GLOBAL),
        ),
        min_models=1,
        check=_check,
        scratch=0.0,  # chunked: only cache-sized temporaries
    )
)
