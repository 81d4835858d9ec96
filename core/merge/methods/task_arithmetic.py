"""The task-arithmetic family: merges of task vectors (deltas from a base model).

Per tensor, with base ``b``, non-base inputs ``x_i`` and weights ``w_i``:

    d_i   = sparsify(x_i - b)                    (trim / drop; per method below)
    s_i   = w_i * d_i
    agree = sign(s_i) == sign(sum_j s_j)         (sign election; ``+`` on ties at 0)
    m     = sum_i s_i [* agree_i]                (masked only for the TIES variants)
    m    /= sum_i w_i [* agree_i]                (only with ``normalize: true``)
    out   = b + lambda * m

=================  ================  ===========  ===========================
method             sparsify          election     paper
=================  ================  ===========  ===========================
task_arithmetic    none              no           https://arxiv.org/abs/2212.04089
ties               top magnitudes    yes          https://arxiv.org/abs/2306.01708
dare_linear        random (DARE)     no           https://arxiv.org/abs/2311.03099
dare_ties          random (DARE)     yes          https://arxiv.org/abs/2311.03099
della              DELLA MagPrune    yes          https://arxiv.org/abs/2406.11617
della_linear       DELLA MagPrune    no           https://arxiv.org/abs/2406.11617
breadcrumbs        drop outliers     no           https://arxiv.org/abs/2312.06795
breadcrumbs_ties   drop outliers     yes          https://arxiv.org/abs/2312.06795
=================  ================  ===========  ===========================

Parameters, names and defaults are mergekit 0.1.5's, so its recipes give the
same numbers (see ``sparsify.py`` for the counting and tie rules). Where a
normalizing divisor is zero at an element (no model agrees with the elected
sign there, so the merged delta is zero anyway) it is taken as 1, as in mergekit.

Differences from mergekit 0.1.5, on purpose:

- ``normalize: true`` with non-base weights that sum to zero is refused when the
  recipe is checked (mergekit silently divides by 1 instead).
- DARE and DELLA draw their masks from a generator derived from (seed, tensor
  name, model), never from the global RNG, and offer ``rescale_mode``:
  ``l1`` (default, mergekit's L1-norm matching) or ``density`` (the papers'
  division by the keep probability, an unbiased estimate of the delta).
- DELLA is checked at plan time: ``density - epsilon`` and ``density + epsilon``
  must lie in [0, 1] (mergekit fails mid-merge and also refuses the ends).
  DELLA ranks magnitudes within rows over all trailing dims flattened
  (mergekit ranks along dim 1 only, and divides by zero for rows of length 1).
- Breadcrumbs never empties a tensor just because it is small, and refuses
  ``density + gamma > 1`` instead of quietly dropping fewer outliers.
- ``int8_mask`` is accepted and has no effect (masks are always bool here).
- Equal magnitudes are ranked by position, the same on every device.

Computed in float32 (float64 for float64 inputs), returned in the input dtype.
"""

from __future__ import annotations

from collections.abc import Callable
from functools import partial
from typing import TYPE_CHECKING

from core.errors import RecipeError
from core.merge.methods import register
from core.merge.methods.base import (
    BASE_REQUIRED,
    NON_BASE,
    REQUIRED,
    MergeMethod,
    Parameter,
    TensorInputs,
    compute_dtype,
)
from core.merge.methods.chunked import MIN_ELEMENTS, chunked_task_vector_merge
from core.merge.methods.sparsify import (
    RESCALE_MODES,
    magnitude_prune,
    magprune,
    outlier_prune,
    random_prune,
)

if TYPE_CHECKING:  # pragma: no cover - typing only
    import torch

# Sparsification kinds.
NONE = None
MAGNITUDE = "magnitude"
RANDOM = "random"
OUTLIERS = "outliers"
MAGPRUNE = "magprune"

_ZERO_SUM = 1e-8  # mergekit's threshold for "the weights sum to zero"


def sign_agreement(weighted: torch.Tensor) -> torch.Tensor:
    """TIES sign election over dim 0 of ``weighted`` (N, *shape) -> bool (N, *shape).

    The elected sign is that of the sum (positive when the sum is 0); a zero
    entry never agrees, so it adds nothing to the normalizing divisor.
    """
    import torch

    positive = weighted.sum(dim=0) >= 0
    elected = torch.where(positive, 1.0, -1.0).to(weighted.dtype)
    return weighted.sign() == elected


def combine(weighted: torch.Tensor, w: torch.Tensor, *, consensus: bool, normalize: bool) -> torch.Tensor:
    """Sum the weighted deltas ``weighted`` (N, *S) over the models -> (*S).

    With ``consensus`` only entries agreeing with the elected sign count, and
    ``normalize`` divides by the weights ``w`` (N, 1, ...) of those that agree;
    without it, by the sum of all weights. ``weighted`` is modified in place.
    Also used chunk by chunk by ``chunked.py``, so both paths share the maths.
    """
    if consensus:
        agree = sign_agreement(weighted)
        weighted.mul_(agree)
        merged = weighted.sum(dim=0)
        if normalize:
            divisor = (w * agree).sum(dim=0)
            # Zero where no model agrees (the merged delta is 0 there too) or where
            # agreeing weights of mixed sign cancel; mergekit divides by 1 in both.
            divisor[divisor == 0] = 1
            merged.div_(divisor)
        return merged
    merged = weighted.sum(dim=0)
    if normalize:
        total = w.sum()
        # The recipe check refuses a zero sum; this guards direct callers.
        if total.abs() >= _ZERO_SUM:
            merged.div_(total)
    return merged


def _sparsify(
    kind: str | None, delta: torch.Tensor, inputs: TensorInputs, index: int, mp: dict, params: dict
) -> torch.Tensor:
    """Apply the method's sparsification to one model's delta (same shape)."""
    density = float(mp.get("density", 1.0))
    if kind is NONE or density >= 1:
        return delta
    if not params.get("rescale", False):
        rescale = None
    else:
        rescale = params.get("rescale_mode", "l1") if kind in (RANDOM, MAGPRUNE) else "l1"
    if kind == MAGNITUDE:
        return magnitude_prune(delta, density, rescale)
    if kind == OUTLIERS:
        return outlier_prune(delta, density, float(mp.get("gamma", 0.01)), rescale)
    if kind == RANDOM:
        return random_prune(delta, density, inputs.generator(index, "dare"), rescale)
    if kind == MAGPRUNE:
        epsilon = float(mp.get("epsilon", 0.15))
        try:
            return magprune(delta, density, epsilon, inputs.generator(index, "della"), rescale)
        except ValueError as error:
            raise RecipeError(f"Tensor '{inputs.name}': {error}.") from None
    raise ValueError(f"unknown sparsification {kind!r}")


def task_vector_merge(inputs: TensorInputs, *, sparsify: str | None, consensus: bool) -> torch.Tensor:
    """Merge one tensor: inputs all of shape S -> result of shape S, input dtype."""
    import torch

    base = inputs.base
    if base is None:
        raise RecipeError(f"Tensor '{inputs.name}': this merge method needs a base model.")
    others = inputs.non_base_indices()
    if not others or base.numel() == 0:
        return base.clone()
    if sparsify in (NONE, MAGNITUDE) and base.numel() >= MIN_ELEMENTS:
        # Large tensors: the same arithmetic in cache-sized chunks (bit-identical).
        return chunked_task_vector_merge(inputs, trim=sparsify == MAGNITUDE, consensus=consensus)
    dtype = compute_dtype(base)
    b = base.to(dtype)
    params = inputs.params

    # weighted[r] = w_r * sparsify(x_r - b); a fresh buffer, so in-place is safe.
    weighted = torch.empty((len(others), *base.shape), dtype=dtype, device=base.device)
    weights = []
    for row, index in enumerate(others):
        mp = inputs.model_params[index]
        delta = _sparsify(sparsify, inputs.tensors[index].to(dtype) - b, inputs, index, mp, params)
        weight = float(mp["weight"])
        weights.append(weight)
        torch.mul(delta, weight, out=weighted[row])
        del delta
    w = torch.tensor(weights, dtype=dtype, device=base.device).reshape(-1, *([1] * base.dim()))

    merged = combine(weighted, w, consensus=consensus, normalize=bool(params.get("normalize", False)))
    del weighted

    lam = float(params.get("lambda", 1.0))
    if lam != 1:
        merged.mul_(lam)
    return (b + merged).to(base.dtype)


def _non_base(model_params: list, base_index: int | None) -> list[tuple[int, dict]]:
    return [(i, p) for i, p in enumerate(model_params) if i != base_index]


def _where(i: int) -> str:
    return f"model {i + 1} (recipe order)"


def check_weights(name: str, params: dict, model_params: list, base_index: int | None) -> None:
    """Refuse ``normalize: true`` when the non-base weights sum to zero."""
    others = _non_base(model_params, base_index)
    if not others or not params.get("normalize", False):
        return
    total = sum(float(p.get("weight", 0.0)) for _, p in others)
    if abs(total) < _ZERO_SUM:
        raise RecipeError(
            f"Tensor '{name}': the weights of the non-base models sum to zero, so 'normalize: true' "
            "would divide by zero; change the weights or set normalize: false."
        )


def check_della(name: str, params: dict, model_params: list, base_index: int | None) -> None:
    """Weights check, plus density +/- epsilon inside [0, 1] for every model."""
    check_weights(name, params, model_params, base_index)
    for i, p in _non_base(model_params, base_index):
        density = float(p.get("density", 1.0))
        epsilon = float(p.get("epsilon", 0.15))
        if density < 1 and (density - epsilon < 0 or density + epsilon > 1):
            raise RecipeError(
                f"Tensor '{name}': {_where(i)} has density {density:g} and epsilon {epsilon:g}, "
                f"so keep probabilities would range over [{density - epsilon:g}, {density + epsilon:g}]; "
                "density - epsilon and density + epsilon must lie in [0, 1]."
            )


def check_breadcrumbs(name: str, params: dict, model_params: list, base_index: int | None) -> None:
    """Weights check, plus density + gamma <= 1 (kept share plus outlier share)."""
    check_weights(name, params, model_params, base_index)
    for i, p in _non_base(model_params, base_index):
        density = float(p.get("density", 1.0))
        gamma = float(p.get("gamma", 0.01))
        if density < 1 and density + gamma > 1:
            raise RecipeError(
                f"Tensor '{name}': {_where(i)} has density {density:g} and gamma {gamma:g}; "
                "the kept share plus the outlier share cannot exceed 1, so lower gamma or density."
            )


def _parameters(normalize: bool, rescale: bool, sparsify: str | None) -> tuple[Parameter, ...]:
    """mergekit 0.1.5's parameter set for one method, with our help texts."""
    effect = "" if sparsify else " (no effect here; accepted for mergekit recipes)"
    params = [
        Parameter("int8_mask", bool, False, "Accepted for mergekit recipes; no effect (masks are always boolean)."),
        Parameter("normalize", bool, normalize, "Divide the merged delta by the sum of the weights that take part."),
        Parameter("rescale", bool, rescale, "Rescale the kept delta after sparsification" + effect + "."),
        Parameter(
            "lambda", float, 1.0, "Scale applied to the merged delta before adding it to the base.", slider=(0.0, 2.0)
        ),
        Parameter(
            "weight", float, REQUIRED, "Weight of this model's delta from the base.", scope=NON_BASE, slider=(-1.0, 1.0)
        ),
        Parameter(
            "density",
            float,
            1.0,
            "Share of this model's delta elements to keep" + effect + ".",
            scope=NON_BASE,
            minimum=0.0,
            maximum=1.0,
            exclusive_minimum=True,
        ),
    ]
    if sparsify == OUTLIERS:
        params.append(
            Parameter(
                "gamma",
                float,
                0.01,
                "Share of the largest-magnitude delta elements dropped as outliers.",
                scope=NON_BASE,
                minimum=0.0,
                maximum=1.0,
                slider=(0.0, 0.2),
            )
        )
    if sparsify == MAGPRUNE:
        params.append(
            Parameter(
                "epsilon",
                float,
                0.15,
                "Spread of keep probabilities around density, by magnitude rank.",
                scope=NON_BASE,
                minimum=0.0,
                maximum=0.5,
            )
        )
    if sparsify in (RANDOM, MAGPRUNE):
        params.append(
            Parameter(
                "rescale_mode",
                str,
                "l1",
                "How 'rescale' scales kept elements: l1 keeps the L1 norm, density divides by keep probability.",
                choices=RESCALE_MODES,
            )
        )
    return tuple(params)


def _register(
    name: str,
    display_name: str,
    paper: str,
    description: str,
    *,
    sparsify: str | None,
    consensus: bool,
    normalize: bool,
    rescale: bool,
    check: Callable[[str, dict, list, int | None], None] = check_weights,
) -> MergeMethod:
    return register(
        MergeMethod(
            name=name,
            display_name=display_name,
            paper=paper,
            description=description,
            kernel=partial(task_vector_merge, sparsify=sparsify, consensus=consensus),
            parameters=_parameters(normalize, rescale, sparsify),
            base=BASE_REQUIRED,
            min_models=1,
            random=sparsify in (RANDOM, MAGPRUNE),
            check=check,
            # Large tensors take the chunked path: base, delta and magnitude in float32.
            scratch=3.5 if sparsify in (NONE, MAGNITUDE) else None,
        )
    )


_register(
    "task_arithmetic",
    "Task Arithmetic",
    "https://arxiv.org/abs/2212.04089",
    "Adds the weighted task vectors (model minus base) to the base (Ilharco et al., 2022).",
    sparsify=NONE,
    consensus=False,
    normalize=False,
    rescale=False,
)
_register(
    "ties",
    "TIES",
    "https://arxiv.org/abs/2306.01708",
    "Trims each task vector to its largest magnitudes, elects a sign per element and "
    "averages the agreeing deltas (Yadav et al., 2023).",
    sparsify=MAGNITUDE,
    consensus=True,
    normalize=True,
    rescale=False,
)
_register(
    "dare_ties",
    "DARE TIES",
    "https://arxiv.org/abs/2311.03099",
    "Randomly drops task-vector elements and rescales the rest (Yu et al., 2023), then TIES sign election.",
    sparsify=RANDOM,
    consensus=True,
    normalize=False,
    rescale=True,
)
_register(
    "dare_linear",
    "Linear DARE",
    "https://arxiv.org/abs/2311.03099",
    "Randomly drops task-vector elements and rescales the rest (Yu et al., 2023), then adds them up.",
    sparsify=RANDOM,
    consensus=False,
    normalize=False,
    rescale=True,
)
_register(
    "breadcrumbs",
    "Model Breadcrumbs",
    "https://arxiv.org/abs/2312.06795",
    "Drops the largest outliers and the smallest elements of each task vector, then adds "
    "them up (Davari & Belilovsky, 2023).",
    sparsify=OUTLIERS,
    consensus=False,
    normalize=False,
    rescale=False,
    check=check_breadcrumbs,
)
_register(
    "breadcrumbs_ties",
    "Model Breadcrumbs with TIES",
    "https://arxiv.org/abs/2312.06795",
    "Breadcrumbs sparsification (Davari & Belilovsky, 2023) with TIES sign election.",
    sparsify=OUTLIERS,
    consensus=True,
    normalize=False,
    rescale=False,
    check=check_breadcrumbs,
)
_register(
    "della",
    "DELLA",
    "https://arxiv.org/abs/2406.11617",
    "Drops task-vector elements at random, larger magnitudes more likely kept (Deep et "
    "al., 2024), then TIES sign election.",
    sparsify=MAGPRUNE,
    consensus=True,
    normalize=True,
    rescale=True,
    check=check_della,
)
_register(
    "della_linear",
    "Linear DELLA",
    "https://arxiv.org/abs/2406.11617",
    "Drops task-vector elements at random, larger magnitudes more likely kept (Deep et al., 2024), then adds them up.",
    sparsify=MAGPRUNE,
    consensus=False,
    normalize=False,
    rescale=True,
    check=check_della,
)
