"""Metrics-Weighted Averaging (MWA): checkpoints of one run, weighted by a metric.

Yu and Choi, 2025, "Parameter-Efficient Checkpoint Merging via Metrics-Weighted
Averaging", https://arxiv.org/abs/2504.18580

Each checkpoint ``i`` carries a metric ``m_i``: its training ``loss`` (lower
is better) or its training ``step`` (later is better). One penalty factor
``p >= 0`` sets how strongly the better checkpoints dominate:

    loss:  w_i = m_i ** -p / sum_j m_j ** -p
    step:  w_i = m_i ** p  / sum_j m_j ** p
    merged = sum_i w_i * x_i

``p = 0`` is the plain average; as ``p`` grows the weight goes to the best
checkpoint (the lowest loss, the latest step; shared equally by ties). The
weights do not change when every metric is scaled by one factor, so one ``p``
works for any loss scale and any number of checkpoints.

They are computed as ``r_i = (m_best / m_i) ** p`` (loss) or
``(m_i / m_best) ** p`` (step), each in (0, 1] with 1 for the best, so a large
``p`` cannot overflow. ``normalize: true`` (the default, the paper's weighted
average) divides by ``sum_j r_j``; ``normalize: false`` uses ``r_i`` as they are,
like ``linear`` with ``normalize: false``.

Computed in float32 (float64 for float64 inputs), returned in the input dtype.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Optional, Sequence

from core.errors import RecipeError
from core.merge.methods import register
from core.merge.methods.base import GLOBAL, MODEL, MergeMethod, Parameter, TensorInputs
from core.merge.methods.linear import weighted_sum

if TYPE_CHECKING:  # pragma: no cover - typing only
    from torch import Tensor

METRICS = ("loss", "step")


def metric_weights(values: Sequence[float], metric: str, penalty: float, normalize: bool = True) -> list[float]:
    """The checkpoints' weights from their metric ``values`` (all > 0)."""
    if metric not in METRICS:
        raise ValueError(f"unknown metric {metric!r}; expected one of {METRICS}")
    logs = [math.log(float(v)) for v in values]
    if metric == "loss":
        best = min(logs)
        relative = [math.exp(penalty * (best - x)) for x in logs]
    else:
        best = max(logs)
        relative = [math.exp(penalty * (x - best)) for x in logs]
    if not normalize:
        return relative
    total = sum(relative)  # >= 1: the best checkpoint's r is 1
    return [r / total for r in relative]


def missing_metric(metric: str, model_params: Sequence[dict]) -> Optional[int]:
    """Index of the first checkpoint without a value for ``metric``, else None."""
    return next((i for i, p in enumerate(model_params) if p.get(metric) is None), None)


def _check(name: str, params: dict, model_params: list, base_index: Optional[int]) -> None:
    metric = params["metric"]
    index = missing_metric(metric, model_params)
    if index is not None:
        example = "1.25" if metric == "loss" else "1000"
        raise RecipeError(
            f"Tensor '{name}': model {index + 1} (recipe order) has no '{metric}', and metric: {metric} needs "
            f"one for every checkpoint (add parameters: {{{metric}: {example}}} to that model)."
        )


def _mwa(inputs: TensorInputs) -> Tensor:
    """Kernel: two or more checkpoints of one shape -> their weighted average."""
    params = inputs.params
    metric = params["metric"]
    values = [p[metric] for p in inputs.model_params]
    weights = metric_weights(values, metric, float(params["penalty"]), bool(params["normalize"]))
    return weighted_sum(inputs, weights, normalize=False)


register(
    MergeMethod(
        name="mwa",
        display_name="Metrics-Weighted Averaging",
        paper="https://arxiv.org/abs/2504.18580",
        description=(
            "Averages checkpoints of one training run, weighted by each one's training loss (lower is "
            "better) or step (later is better) with one penalty factor (Yu & Choi, 2025)."
        ),
        kernel=_mwa,
        parameters=(
            Parameter(
                "metric",
                str,
                "loss",
                "What ranks the checkpoints: loss (lower is better) or step (later is better).",
                scope=GLOBAL,
                choices=METRICS,
            ),
            Parameter(
                "penalty",
                float,
                1.0,
                "Penalty factor p: 0 is the plain average; larger values give the best checkpoint more weight.",
                scope=GLOBAL,
                minimum=0.0,
                slider=(0.0, 10.0),
            ),
            Parameter(
                "normalize",
                bool,
                True,
                "Divide the weights by their sum (a weighted average); off, the best checkpoint weighs 1.",
                scope=GLOBAL,
            ),
            Parameter(
                "loss",
                float,
                None,
                "This checkpoint's training loss (needed with metric: loss).",
                scope=MODEL,
                minimum=0.0,
                exclusive_minimum=True,
                slider=(0.0, 5.0),
            ),
            Parameter(
                "step",
                int,
                None,
                "This checkpoint's training step (needed with metric: step).",
                scope=MODEL,
                minimum=1,
                slider=(1, 10000),
            ),
        ),
        min_models=2,
        check=_check,
        scratch=0.0,  # weighted_sum works in cache-sized chunks
    )
)
