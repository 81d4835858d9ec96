"""PiToMe: energy-score token merging that protects isolated, informative tokens.

Implemented from the paper (no code was copied from its CC-BY-NC repository):

* **PiToMe** -- Tran, Nguyen, Nguyen, Nguyen, Le, Xie, Sonntag, Zou, Nguyen, Niepert,
  "Accelerating Transformers with Spectrum-Preserving Token Merging", NeurIPS 2024,
  https://arxiv.org/abs/2405.16148 (Section 3, "token graph and energy score" and
  "ordered energy-based bipartite soft matching").

The idea. ToMe (:mod:`core.tokens.bipartite`) merges the most similar A->B pairs of
a fixed alternate split, so late in a network, when few tokens are left, it merges
informative tokens that happen to resemble something in the other set. PiToMe first
scores every token by how much of a *cluster* it belongs to, on the complete graph
whose edge weights are the cosine similarities of the metric:

    E_i = (1/N) * sum_{j != i} f_m(cos(x_i, x_j))

    f_m(x) = x                        if x >= m
           = alpha * (exp(x - m) - 1) otherwise

A token inside a large group of near-duplicates (background patches, padding-like
words) collects many terms ``~ 1`` and has a *high* energy; an isolated token sees
mostly similarities below the margin ``m``, each contributing a small negative
amount in ``(-alpha, 0)``, and has a *low* energy. Then:

1. sort the tokens by energy, highest first;
2. the ``2r`` highest are the merge candidates; every other token is kept as it is
   (the low-energy, informative ones, plus protected tokens such as CLS);
3. split the candidates alternately in energy order: A = 1st, 3rd, 5th, ... and
   B = 2nd, 4th, 6th, ... (|A| = |B| = r);
4. bipartite soft matching between them: each A token draws one edge to its most
   similar B token and the ``r`` best edges merge -- with |A| = r that is every A
   token, each into its partner (several may share a partner).

Defaults and the margin schedule. ``alpha = 1`` and a margin that decreases with
depth, ``m_l = 0.9 - 0.9 * l / L`` for layer ``l`` of ``L`` (:func:`layer_margin`,
:func:`margin_schedule`; we count ``l`` from 0, so the first layer uses 0.9, the
:func:`pitome_soft_matching` default). Deeper layers have more spread-out features,
so a lower margin still lets real clusters earn energy there. The sum runs over the
other nodes ``j != i`` of the graph (the paper's neighbourhood of ``i``); including
``j = i`` would add the constant ``1/N`` to every score and change no ranking.
Protected tokens are not nodes of the graph: they neither receive energy nor add it
to others (a CLS token or padding should not make its neighbours look redundant),
so ``N`` is the number of unprotected tokens of the sample.

The result is the same :class:`~core.tokens.bipartite.Merge` that
:func:`~core.tokens.bipartite.bipartite_soft_matching` returns, built by the same
code, so :func:`~core.tokens.bipartite.merge_wavg`, proportional attention,
:func:`~core.tokens.bipartite.merge_source` and ``unmerge`` work unchanged, and the
output order is bipartite.py's: surviving tokens keep their relative order, a merged
token sits where its B token was, a protected CLS stays at index 0.

Shapes: ``B`` batch, ``N`` tokens entering the merge, ``C`` channels, ``r`` tokens
removed, ``L = N - r`` tokens leaving. torch is imported inside the functions.
"""

from __future__ import annotations

import math
import numbers
from typing import TYPE_CHECKING

from core.tokens.bipartite import (
    TokenMergeError,
    _as_count,
    _build,
    _check_metric,
    _edge_order,
    _identity,
    _protected_mask,
    _protected_positions,
)

if TYPE_CHECKING:  # pragma: no cover - typing only
    from torch import Tensor

    from core.tokens.bipartite import Merge, Protected

MARGIN = 0.9
"""Default margin ``m`` (the paper's value at the first layer)."""

ALPHA = 1.0
"""Default ``alpha``, the scale of the below-margin branch of ``f_m``."""

MARGIN_RANGE = (-1.0, 1.0)
"""Legal margins: a cosine similarity lies in [-1, 1]."""


# --------------------------------------------------------------------------- options


def _check_margin(margin) -> float:
    if isinstance(margin, bool) or not isinstance(margin, numbers.Real) and not _is_scalar_tensor(margin):
        raise TokenMergeError(f"margin={margin!r} must be a number in [-1, 1].")
    value = float(margin)
    if not MARGIN_RANGE[0] <= value <= MARGIN_RANGE[1]:  # also refuses NaN
        raise TokenMergeError(f"margin={value!r} is outside [-1, 1] (it is compared with cosine similarities).")
    return value


def _check_alpha(alpha) -> float:
    if isinstance(alpha, bool) or not isinstance(alpha, numbers.Real) and not _is_scalar_tensor(alpha):
        raise TokenMergeError(f"alpha={alpha!r} must be a finite number >= 0.")
    value = float(alpha)
    # alpha < 0 would reward dissimilar neighbours (an isolated token would gain
    # energy), the opposite of the score's meaning; alpha = 0 is a hard cut-off.
    if not (math.isfinite(value) and value >= 0.0):
        raise TokenMergeError(f"alpha={value!r} must be a finite number >= 0.")
    return value


def _is_scalar_tensor(value) -> bool:
    return getattr(value, "ndim", None) == 0 and hasattr(value, "item")


def layer_margin(layer: int, num_layers: int, *, start: float = MARGIN) -> float:
    """The paper's margin for one layer: ``start - start * layer / num_layers``.

    ``layer`` counts from 0, so the first layer gets ``start`` (0.9) and the margin
    falls linearly towards 0 at the depth of the network.
    """
    layers = _as_count("num_layers", num_layers, 1)
    index = _as_count("layer", layer, 0)
    if index >= layers:
        raise TokenMergeError(f"layer={index} is not a layer of a {layers}-layer model (count from 0).")
    first = _check_margin(start)
    return first - first * index / layers


def margin_schedule(num_layers: int, *, start: float = MARGIN) -> list[float]:
    """:func:`layer_margin` for every layer: ``[0.9, 0.9 - 0.9/L, ..., 0.9/L]`` by default."""
    layers = _as_count("num_layers", num_layers, 1)
    return [layer_margin(layer, layers, start=start) for layer in range(layers)]


# --------------------------------------------------------------------------- legal range


def max_r(num_tokens: int, *, protected: int = 0, protect_last: bool = False) -> int:
    """The largest r one PiToMe merge of ``num_tokens`` tokens accepts: ``floor(free / 2)``.

    PiToMe needs ``2r`` unprotected candidates (r in A, r in B), so with ``free``
    unprotected tokens r is at most ``free // 2``. This can be one less than
    :func:`core.tokens.bipartite.max_r` (whose A set holds ``ceil(N / 2)`` tokens).
    ``protected`` is the number of leading protected tokens (1 for a CLS token).
    """
    n = _as_count("num_tokens", num_tokens, 0)
    k = _as_count("protected", protected, 0)
    if k > n:
        raise TokenMergeError(f"protected={k} is more than the {n} tokens in the sequence.")
    return (n - len(_protected_positions(n, k, protect_last))) // 2


# --------------------------------------------------------------------------- energy


def _unit(metric: Tensor) -> Tensor:
    """Rows scaled to unit norm; an all-zero row stays zero (similarity 0, not NaN)."""
    import torch

    return metric / metric.norm(dim=-1, keepdim=True).clamp_min(torch.finfo(metric.dtype).tiny)


def _energy(metric: Tensor, sim: Tensor, mask: Tensor | None, margin: float, alpha: float) -> Tensor:
    """Energy ``[B, N]`` float32 from the cosine similarities ``sim [B, N, N]``.

    Protected tokens (``mask [1 or B, N]``) get ``-inf`` and add nothing to the
    others. A token whose metric row is not finite gets NaN and adds nothing, so one
    broken token does not poison every score.
    """
    import torch

    batch, tokens = sim.shape[:2]
    # Rounding can put a cosine just outside [-1, 1]; the margin is compared with it.
    sim = sim.clamp(-1.0, 1.0)
    # f_m, elementwise. expm1 is exp(x - m) - 1 without cancellation near the margin.
    f = torch.where(sim >= margin, sim, alpha * torch.expm1(sim - margin))
    f.diagonal(dim1=-2, dim2=-1).zero_()  # j != i
    bad = ~torch.isfinite(metric).all(dim=-1)  # [B, N]
    drop = bad if mask is None else bad | mask
    f.masked_fill_(drop[:, None, :], 0)
    # Accumulate in float32: N terms of a half-precision sum lose the ranking.
    total = f.sum(dim=-1, dtype=torch.float32)
    if mask is None:
        energy = total / tokens
    else:
        nodes = tokens - mask.sum(-1, dtype=torch.float32)  # [1 or B]
        energy = total / nodes.clamp_min(1)[:, None]
    energy.masked_fill_(bad, math.nan)
    if mask is not None:
        energy.masked_fill_(mask.expand(batch, tokens), -math.inf)
    return energy


def energy_score(
    metric: Tensor,
    *,
    margin: float = MARGIN,
    alpha: float = ALPHA,
    protected: Protected = 0,
    protect_last: bool = False,
) -> Tensor:
    """PiToMe's energy of every token: ``metric [B, N, C] -> energy [B, N]`` (float32).

    ``E_i = (1/N) sum_{j != i} f_m(cos(x_i, x_j))`` over the unprotected tokens
    (``N`` of them), with ``f_m`` as in the module docstring. High energy: the token
    sits in a large cluster of similar tokens (merge it); low energy: isolated and
    informative (keep it). Protected tokens read ``-inf``; tokens whose metric holds
    NaN or inf read NaN.

    Raises:
        TokenMergeError: margin outside [-1, 1], alpha negative or not finite.
    """
    import torch

    _check_metric(metric)
    margin = _check_margin(margin)
    alpha = _check_alpha(alpha)
    batch, tokens, _ = metric.shape
    with torch.no_grad():
        mask, _ = _protected_mask(protected, protect_last, batch, tokens, metric.device)
        unit = _unit(metric)
        return _energy(metric, unit @ unit.transpose(-1, -2), mask, margin, alpha)


# --------------------------------------------------------------------------- matching


def pitome_soft_matching(
    metric: Tensor,
    r: int,
    *,
    protected: Protected = 0,
    margin: float = MARGIN,
    alpha: float = ALPHA,
    protect_last: bool = False,
    energy: Tensor | None = None,
) -> Merge:
    """PiToMe's ordered energy-based bipartite soft matching: remove ``r`` tokens.

    Args:
        metric: ``[B, N, C]`` floating point, the similarity features (the attention
            keys averaged over heads, as in ToMe). Compared by cosine similarity; no
            gradient flows through the matching.
        r: tokens removed, ``0 <= r <= max_r(N, ...) = floor(unprotected / 2)``.
            Larger is an error, never capped.
        protected: tokens that never merge and are left out of the energy graph: an
            int ``k`` protects the first ``k`` (1 for CLS); a bool tensor ``[N]`` or
            ``[B, N]`` marks any set (padding, ``~merge.valid`` after a threshold merge).
        margin: ``m`` in ``f_m``, in [-1, 1]. The paper lowers it with depth; get the
            per-layer value from :func:`layer_margin` / :func:`margin_schedule`.
        alpha: scale of the below-margin branch of ``f_m``, finite and ``>= 0``.
        protect_last: also protect the last token (an EOS/SEP token without padding).
        energy: optional ``[B, N]`` (or ``[N]``) scores to rank by instead of
            :func:`energy_score` (e.g. computed once and shared, or another
            criterion); higher merges first, ties by position. Protected tokens are
            excluded whatever their score. ``margin`` and ``alpha`` are still checked.

    Returns:
        A :class:`~core.tokens.bipartite.Merge` mapping ``[B, N, ...] -> [B, N - r, ...]``,
        ordered exactly as bipartite.py orders its outputs; ``merge.similarity [B, r]``
        holds the merged edges' cosine similarities, descending.

    Raises:
        TokenMergeError: r negative, not an int or above the limit; margin or alpha
            out of range; more protected tokens than tokens.
    """
    import torch

    _check_metric(metric)
    r = _as_count("r", r, 0)
    margin = _check_margin(margin)
    alpha = _check_alpha(alpha)
    batch, tokens, _ = metric.shape
    device = metric.device
    mask, leading = _protected_mask(protected, protect_last, batch, tokens, device)
    if leading is not None:  # the common case needs no device read
        limit = max_r(tokens, protected=leading, protect_last=protect_last)
    else:
        limit = (tokens - int(mask.sum(-1).max())) // 2
    if r > limit:
        raise TokenMergeError(
            f"r={r} is more than the {limit} tokens PiToMe can merge in a sequence of {tokens} "
            f"(it needs 2r unprotected candidates, so r <= floor(unprotected / 2)); use r <= {limit}."
        )
    if energy is not None:
        energy = _check_energy(energy, batch, tokens, device)
    if r == 0:
        return _identity(batch, tokens, device, metric.dtype)

    with torch.no_grad():
        unit = _unit(metric)
        sim = unit @ unit.transpose(-1, -2)  # [B, N, N], shared by the energy and the matching
        if energy is None:
            energy = _energy(metric, sim, mask, margin, alpha)
        elif mask is not None:
            energy = energy.masked_fill(mask.expand(batch, tokens), -math.inf)
        # Sort key: NaN (broken tokens) and -inf scores rank below every real score, so
        # they are kept unless r leaves no choice, yet strictly above protected tokens
        # (-inf, set just below), which therefore never become candidates.
        finfo = torch.finfo(energy.dtype)
        key = energy.nan_to_num(nan=finfo.min, posinf=finfo.max, neginf=finfo.min)
        if mask is not None:
            key = key.masked_fill(mask.expand(batch, tokens), -math.inf)
        ranked = key.argsort(dim=-1, descending=True, stable=True)[:, : 2 * r]  # [B, 2r] positions
        a_pos, b_pos = ranked[:, 0::2], ranked[:, 1::2]  # [B, r] each, alternate in energy order

        # A x B similarities, read from the full matrix instead of recomputed.
        rows = sim.gather(1, a_pos[:, :, None].expand(-1, -1, tokens))  # [B, r, N]
        scores = rows.gather(2, b_pos[:, None, :].expand(-1, r, -1))  # [B, r, r]
        node_max, node_idx = scores.max(dim=-1)
        # Rounding can push a duplicate's cosine just above 1, as in bipartite.py.
        node_max = node_max.clamp(max=1.0)
        # |A| = r, so every A token merges; sort the edges most similar first (ties
        # by rank) so merge.similarity reads like bipartite.py's.
        order = _edge_order(node_max, r)
        similarity = node_max.gather(1, order)
        src_pos = a_pos.gather(1, order)
        dst_pos = b_pos.gather(1, node_idx.gather(1, order))
        counts = torch.full((batch,), r, dtype=torch.long, device=device)
        return _build(tokens, src_pos, dst_pos, counts, r, similarity)


def _check_energy(energy, batch: int, tokens: int, device) -> Tensor:
    import torch

    if not isinstance(energy, torch.Tensor) or energy.shape not in ((tokens,), (batch, tokens)):
        shape = list(energy.shape) if isinstance(energy, torch.Tensor) else type(energy).__name__
        raise ValueError(f"energy must be a tensor of shape [{batch}, {tokens}] or [{tokens}], got {shape}.")
    if not energy.is_floating_point():
        energy = energy.to(torch.float32)
    return energy.to(device).expand(batch, tokens)
