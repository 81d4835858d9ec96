"""WIDEN: merge by weight disentanglement (magnitude and direction, fused adaptively).

Yu, Yu, Yu, Huang and Li, 2024, "Extend Model Merging from Fine-Tuned to
Pre-Trained Large Language Models via Weight Disentanglement",
https://arxiv.org/abs/2408.03092

Meant for models of one base whose changes differ in size, e.g. an instruction
fine-tune (small changes) and a continually pre-trained model (large ones): no
manual weights, each model's share is computed per column from how much that
column changed, ranked within the tensor so that the two scales compare.

Per 2-D tensor as stored, with base ``B`` and models ``W_1..W_N`` (N >= 2),
column ``j`` (a torch Linear stores ``[out, in]``, so one column per input
feature; GPT-2's Conv1D stores ``[in, out]``, so there one per output):

1. disentangle: magnitude ``m[j] = ||W[:, j]||`` (the norm over the rows) and
   direction ``D[:, j] = W[:, j] / m[j]`` (0 where ``m[j] = 0``);
2. divergences from the base: ``dM_n[j] = |m_n[j] - m_B[j]|`` and
   ``dD_n[j] = 1 - cos(W_n[:, j], B[:, j])``, computed as the equal
   ``||D_n[:, j] - D_B[:, j]||^2 / 2``: exactly 0 for an unchanged column and
   free of the cancellation of ``1 - cos`` for the tiny angles of a fine-tune
   (0 for two zero columns, 1/2 for one);
3. rank each divergence among the tensor's ``k`` columns, for each model on its
   own (so a model with large changes and one with small changes compare):
   ``r[j] = (number of columns with a smaller divergence) / (k - 1)`` in
   [0, 1] (equal divergences share the lower rank; 0 when k = 1);
4. importance per column, over the models: ``S_n = softmax_n(r_n / tau)``;
   score calibration: where ``S_n > t * (1 / N)`` (above ``t`` times the
   average score) ``S_n`` becomes ``s``;
5. fuse, magnitude and direction with their own scores:
   ``m = m_B + sum_n S^M_n (m_n - m_B)``, ``D = D_B + sum_n S^D_n (D_n - D_B)``,
   ``merged[:, j] = m[j] * D[:, j]`` (the fused direction is not renormalised),
   computed as ``B + (m * D - m_B * D_B)``: the base plus the fused change.

``t`` is ``above_average_value_ratio`` and ``s`` is ``score_calibration_value``
(both 1.0 by default, as in the authors' release); ``tau`` (``temperature``,
default 1: the plain softmax) is our addition for sharper or flatter shares.

Other tensors:

- Embedding tables (``embed_tokens``, ``wte``, ``word_embeddings``, ... see
  :data:`EMBEDDING`) are looked up by row, so they are transposed first: one
  magnitude and direction per token.
- Tensors of more than two dimensions are read as ``(shape[0], rest)`` matrices.
- 1-D and 0-D tensors (norm weights, biases) have no columns to disentangle:
  each element's change ``|x_n - b|`` is ranked and scored as above, and
  ``merged = b + sum_n S_n (x_n - b)``.

Two models that are equal get equal ranks, hence scores ``1/N`` that are not
above the average, so the merge is ``B + (W - B)``: their common change. A model
equal to the base ranks 0 everywhere; the other model's columns with a rank
above 0 then score above the average and take its full change (with s = 1).

Computed in float32 (float64 for float64 inputs), returned in the input dtype.
"""

from __future__ import annotations

import re
from typing import TYPE_CHECKING

from core.merge.methods import register
from core.merge.methods.base import (
    BASE_REQUIRED,
    GLOBAL,
    MergeMethod,
    Parameter,
    TensorInputs,
    compute_dtype,
)

if TYPE_CHECKING:  # pragma: no cover - typing only
    from torch import Tensor

# Tensor names of lookup tables (one row per token or position).
EMBEDDING = re.compile(
    r"(^|\.)(embed_tokens|embed_positions|embed_in|tok_embeddings|wte|wpe|shared|word_embeddings"
    r"|position_embeddings?|token_type_embeddings|token_embedding|embeddings)\.weight$"
)


def is_embedding(name: str) -> bool:
    """Whether ``name`` is an embedding table (rows are tokens), by its name."""
    return EMBEDDING.search(name) is not None


def normalized_ranks(values: Tensor) -> Tensor:
    """Rank of each entry of ``values`` (N, k) within its row, scaled to [0, 1].

    The rank is the number of strictly smaller entries (equal values share the
    lower rank), divided by ``k - 1``; all zeros when ``k == 1``.
    """
    import torch

    k = values.shape[-1]
    if k <= 1:
        return torch.zeros_like(values)
    ordered = torch.sort(values, dim=-1).values
    smaller = torch.searchsorted(ordered.contiguous(), values.contiguous(), side="left")
    return smaller.to(values.dtype) / (k - 1)


def importance(ranks: Tensor, temperature: float, threshold: float, calibration: float) -> Tensor:
    """Scores ``(N, k)`` from ranks ``(N, k)``: softmax over models, then calibration.

    ``S_n = exp(r_n / tau) / sum_m exp(r_m / tau)``; where ``S_n > threshold / N``
    it becomes ``calibration``. The comparison is made as
    ``N * exp(.) > threshold * sum exp(.)``, so equal ranks (scores exactly 1/N)
    are never above a threshold of 1, whatever the rounding of 1/N.
    """
    import torch

    n = ranks.shape[0]
    z = ranks / temperature
    e = torch.exp(z - z.max(dim=0, keepdim=True).values)
    total = e.sum(dim=0, keepdim=True)
    above = n * e > threshold * total
    return torch.where(above, torch.full_like(e, calibration), e / total)


def _scores(divergences: Tensor, params: dict) -> Tensor:
    return importance(
        normalized_ranks(divergences),
        float(params["temperature"]),
        float(params["above_average_value_ratio"]),
        float(params["score_calibration_value"]),
    )


def _magnitude_direction(w: Tensor) -> tuple[Tensor, Tensor]:
    """Column norms ``(k,)`` and unit columns ``(d, k)`` of ``w`` (zero columns stay zero)."""
    import torch

    m = torch.linalg.vector_norm(w, dim=0)
    safe = torch.where(m > 0, m, torch.ones_like(m))
    return m, w / safe


def widen_matrix(base: Tensor, others: list[Tensor], params: dict) -> Tensor:
    """WIDEN of ``(d, k)`` matrices (compute dtype) -> ``(d, k)``."""
    import torch

    m_b, d_b = _magnitude_direction(base)
    mags, dirs, d_mag, d_dir = [], [], [], []
    for w in others:
        m, d = _magnitude_direction(w)
        mags.append(m)
        dirs.append(d)
        d_mag.append((m - m_b).abs())
        d_dir.append((d - d_b).square().sum(dim=0) / 2)  # = 1 - cos for unit columns
    s_mag = _scores(torch.stack(d_mag), params)
    s_dir = _scores(torch.stack(d_dir), params)
    magnitude = m_b.clone()
    direction = d_b.clone()
    for i, (m, d) in enumerate(zip(mags, dirs)):
        magnitude += s_mag[i] * (m - m_b)
        direction += s_dir[i] * (d - d_b)
    # m * D, written as the base plus the change so that unchanged models give the base bit for bit.
    return base + (direction * magnitude - d_b * m_b)


def widen_elements(base: Tensor, others: list[Tensor], params: dict) -> Tensor:
    """WIDEN of vectors (any shape, each element scored on its own) -> same shape."""
    import torch

    deltas = [(w - base).reshape(-1) for w in others]
    scores = _scores(torch.stack([d.abs() for d in deltas]), params)
    merged = base.reshape(-1).clone()
    for score, delta in zip(scores, deltas):
        merged += score * delta
    return merged.reshape(base.shape)


def widen(name: str, base: Tensor, others: list[Tensor], params: dict) -> Tensor:
    """Merge ``others`` (each shaped like ``base``) into ``base`` -> input dtype."""
    dtype = compute_dtype(base)
    b = base.to(dtype)
    ws = [w.to(dtype) for w in others]
    if base.numel() == 0 or not ws:
        return base.clone()
    if base.dim() < 2:
        return widen_elements(b, ws, params).to(base.dtype)
    if base.dim() == 2 and is_embedding(name):
        return widen_matrix(b.T, [w.T for w in ws], params).T.to(base.dtype)
    shape = base.shape
    flat = [t.reshape(shape[0], -1) for t in [b, *ws]]
    return widen_matrix(flat[0], flat[1:], params).reshape(shape).to(base.dtype)


def _widen(inputs: TensorInputs) -> Tensor:
    """Kernel: a base and two or more models, all of one shape -> that shape."""
    others = [inputs.tensors[i] for i in inputs.non_base_indices()]
    return widen(inputs.name, inputs.base, others, inputs.params)


PARAMETERS = (
    Parameter(
        "above_average_value_ratio",
        float,
        1.0,
        "Score calibration threshold t: a model's score above t times the average (1/N) is set to "
        "score_calibration_value.",
        scope=GLOBAL,
        minimum=0.0,
        slider=(0.0, 2.0),
    ),
    Parameter(
        "score_calibration_value",
        float,
        1.0,
        "Score s given to above-threshold models: 1 takes that model's whole change in the column.",
        scope=GLOBAL,
        minimum=0.0,
        slider=(0.0, 2.0),
    ),
    Parameter(
        "temperature",
        float,
        1.0,
        "Softmax temperature over the models' ranked changes (1: the paper's plain softmax; "
        "lower is sharper).",
        scope=GLOBAL,
        minimum=0.0,
        exclusive_minimum=True,
        slider=(0.05, 2.0),
    ),
)

register(
    MergeMethod(
        name="widen",
        display_name="WIDEN",
        paper="https://arxiv.org/abs/2408.03092",
        description=(
            "Splits each weight into magnitude and direction per column, ranks each model's change "
            "from the base and fuses them with adaptive scores (Yu et al., 2024); for merging a "
            "fine-tune with a continually pre-trained model of one base."
        ),
        kernel=_widen,
        parameters=PARAMETERS,
        base=BASE_REQUIRED,
        min_models=3,
    )
)
