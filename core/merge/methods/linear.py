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
from core.merge.methods.base import MODEL, GLOBAL, MergeMethod, Parameter, TensorInputs, REQUIRED


def compute_dtype(tensor):
    """float64 stays float64; everything else is computed in float32."""
    import torch

    return torch.float64 if tensor.dtype == torch.float64 else torch.float32


def weighted_sum(inputs: TensorInputs, weights: list[float], normalize: bool):
    import torch

    first = inputs.tensors[0]
    dtype = compute_dtype(first)
    result = torch.zeros(first.shape, dtype=dtype, device=first.device)
    for tensor, weight in zip(inputs.tensors, weights):
        result.add_(tensor.to(dtype), alpha=weight)
    if normalize:
        result.div_(sum(weights))
    return result.to(first.dtype)


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
    )
)
