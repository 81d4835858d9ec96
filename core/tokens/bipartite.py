"""Bipartite soft matching: the core of token merging, with size and source tracking.

Implements, from the papers (no code was copied from their repositories):

* **ToMe** -- Bolya, Fu, Dai, Zhang, Feichtenhofer, Hoffman, "Token Merging: Your ViT
  But Faster", ICLR 2023, https://arxiv.org/abs/2210.09461. Section 3: split the tokens
  into two sets A and B, draw from each token in A one edge to its most similar token
  in B (cosine similarity of a metric, the attention keys averaged over heads), keep
  the r most similar edges and merge every connected component (an A token into its B
  partner; several A tokens may land on the same B token). Merged tokens are averaged
  weighted by their *size* (how many input tokens they stand for), and *proportional
  attention* adds ``log(size)`` to the attention logits so a merged token counts as
  many times as the tokens it replaced.
* **DyMU** -- Wang et al., "DyMU: Dynamic Merging and Virtual Unmerging for Efficient
  VLMs", 2025, https://arxiv.org/abs/2504.17040 (Dynamic Token Merging): instead of a
  fixed r, keep every edge whose similarity exceeds a threshold, so the number of
  merged tokens adapts to the input.

Shapes: ``B`` batch, ``N`` tokens entering the merge (``n_in``), ``C`` channels,
``L = N - r`` tokens leaving it (``n_out``), ``N_input`` the tokens of the original
input when several merges are chained. Every function takes tensors as ``[B, N, ...]``.

Design choices (each one is why the code looks the way it does):

* **Order is preserved.** Surviving tokens keep their relative order; a merged token
  sits where its B token was. A protected CLS token stays at index 0 (poolers read
  ``hidden[:, 0]``), positions stay monotonic for text, and pad slots (threshold mode)
  are always at the end.
* **Deterministic.** The default partition is the paper's alternating one (A = even
  positions, B = odd). Ties are broken by position (stable sorts, first maximum). The
  ``"random"`` partition needs an explicit ``torch.Generator`` and never touches
  torch's global RNG, so a diffusion sampler's noise does not change.
* **No silent caps.** An r larger than the number of tokens that may merge, a threshold
  outside [-1, 1], a schedule of the wrong length: each is a :class:`TokenMergeError`
  (a ``ValueError``) that names the value -- never a quietly smaller r.
* **Cheap to import.** torch is imported inside the functions that need it.
* **Bitwise repeatability** holds on CPU. On CUDA the reductions of ``merge`` are
  scatters, whose float sums may differ in the last bits between runs (as in every
  scatter-based ToMe); the matching itself does not change.
* **Flat indices.** A :class:`Merge` stores flat row indices into ``x.reshape(B*N, -1)``
  computed once per matching, so every ``merge``/``unmerge`` call is one
  ``index_select`` plus at most one ``scatter_reduce_``, whatever the number and shape
  of the tensors merged with it (hidden states, sizes, sources, masks).

Threshold mode and batches: the number of merges differs per sample. We keep each
sample's own merges (its output never depends on the other samples in the batch) and
pad: a batch leaves with ``L = N - min(counts)`` tokens; a sample that merged more has
``counts[b] - min(counts)`` pad slots at the end, zero-filled, marked False in
:attr:`Merge.valid`, with size 0 under :func:`merge_wavg`, so the proportional-attention
bias ``log(0) = -inf`` masks them as keys. Later matchings must protect them
(``protected=~merge.valid``). The rejected alternatives: the batch minimum would make a
sample's result depend on its batch-mates; requiring B = 1 would forbid batched
benchmarks and classifier-free guidance.
"""

from __future__ import annotations

import math
import numbers
import operator
from typing import TYPE_CHECKING, Sequence, Union

from core.errors import MergeStudioError

if TYPE_CHECKING:  # pragma: no cover - typing only
    import torch
    from torch import Tensor

    Protected = Union[int, Tensor]
    Partition = Union[str, Tensor]

MODES = ("mean", "sum", "amax", "amin", "prod")
"""Reductions accepted by :meth:`Merge.merge` (those of ``Tensor.scatter_reduce_``)."""

PARTITIONS = ("alternate", "random")
"""Named partitions; a tensor marking the B set is accepted too."""

# Score of an A token whose best similarity is NaN (a NaN or inf in the metric): below
# every real cosine (>= -1) but above -inf, so such a token merges after every healthy
# one and never outranks a protected token (whose score is -inf).
_NAN_SCORE = -2.0


class TokenMergeError(MergeStudioError, ValueError):
    """A token-merging option is out of range (r, threshold, schedule, partition, mode).

    A ``ValueError`` for Python callers and a :class:`~core.errors.MergeStudioError`,
    so the CLI and GUI show its one sentence instead of a traceback.
    """


# --------------------------------------------------------------------------- validation


def _as_count(name: str, value, minimum: int = 0) -> int:
    """``value`` as an int >= minimum; bools and non-integral numbers are refused."""
    if isinstance(value, bool):
        raise TokenMergeError(f"{name}={value!r} must be a whole number, not a bool.")
    try:
        number = operator.index(value)
    except TypeError:
        raise TokenMergeError(f"{name}={value!r} must be a whole number.") from None
    if number < minimum:
        raise TokenMergeError(f"{name}={number} must be at least {minimum}.")
    return number


def _check_mode(mode: str) -> None:
    if mode not in MODES:
        raise TokenMergeError(f"mode={mode!r} is not a merge mode; use one of {', '.join(MODES)}.")


def _check_tokens(x, batch: int, tokens: int, what: str) -> None:
    """``x`` must be ``[batch, tokens, ...]`` (a programming error otherwise)."""
    if x.dim() < 2 or x.shape[0] != batch or x.shape[1] != tokens:
        raise ValueError(
            f"{what}: expected a tensor of shape [{batch}, {tokens}, ...], got {list(x.shape)}."
        )


def _check_metric(metric) -> None:
    if metric.dim() != 3:
        raise ValueError(f"metric must be [B, N, C], got shape {list(metric.shape)}.")
    if not metric.is_floating_point():
        raise ValueError(f"metric must be a floating-point tensor, got {metric.dtype}.")


# --------------------------------------------------------------------------- legal ranges


def _protected_positions(num_tokens: int, protected: int, protect_last: bool) -> set[int]:
    positions = set(range(protected))
    if protect_last and num_tokens > 0:
        positions.add(num_tokens - 1)
    return positions


def max_r(
    num_tokens: int, *, protected: int = 0, protect_last: bool = False, partition: str = "alternate"
) -> int:
    """The largest r one bipartite merge of ``num_tokens`` tokens accepts.

    Every unprotected A token may merge, provided at least one unprotected B token is
    left to receive it. A has ``ceil(N / 2)`` tokens, B ``floor(N / 2)``. With
    ``partition="random"`` the protected tokens may land in either set, so this is the
    worst case over their placement (the r that is legal whatever the draw).
    ``protected`` is the number of leading protected tokens (1 for a CLS token).
    """
    n = _as_count("num_tokens", num_tokens, 0)
    k = _as_count("protected", protected, 0)
    if k > n:
        raise TokenMergeError(f"protected={k} is more than the {n} tokens in the sequence.")
    positions = _protected_positions(n, k, protect_last)
    n_a, n_b = (n + 1) // 2, n // 2
    if partition == "alternate":
        prot_a = sum(1 for p in positions if p % 2 == 0)
        prot_b = len(positions) - prot_a
        return n_a - prot_a if n_b - prot_b > 0 else 0
    if partition == "random":
        total = len(positions)
        best = None
        for in_a in range(max(0, total - n_b), min(total, n_a) + 1):
            value = n_a - in_a if n_b - (total - in_a) > 0 else 0
            best = value if best is None else min(best, value)
        return best or 0
    raise TokenMergeError(f"partition={partition!r} is not one of {', '.join(PARTITIONS)}.")


# --------------------------------------------------------------------------- the merge


class Merge:
    """The result of one matching: which tokens merge into which, for any tensor.

    Built by :func:`bipartite_soft_matching` or :func:`threshold_soft_matching`; apply
    it to as many tensors as share the token axis (hidden states, sizes, sources,
    masks): ``merge(x)`` maps ``[B, N, ...] -> [B, L, ...]`` and ``unmerge(y)`` maps
    ``[B, L, ...] -> [B, N, ...]`` by copying each merged token to all its sources.

    Attributes:
        batch_size, n_in, n_out: ``B``, ``N`` and ``L``.
        counts: ``[B]`` int64, tokens merged away in each sample (all equal to r in
            fixed-r mode).
        valid: ``[B, L]`` bool, False on pad slots; ``None`` when no sample is padded
            (always in fixed-r mode). Valid slots are a prefix of each row.
        similarity: ``[B, max(counts)]``, the cosine similarity of each merged edge in
            descending order, NaN past a sample's count or where the metric was not
            finite (for DyMU-style threshold calibration and for display).
        assignment: ``[B, N]`` int64, the output slot representing each input token.

    Across chained threshold merges, ``size[..., 0] > 0`` (from :func:`merge_wavg`) is
    the validity mask of the current sequence: pad slots have size 0 and, protected
    in later matchings, keep it.
    """

    __slots__ = (
        "batch_size",
        "n_in",
        "n_out",
        "counts",
        "valid",
        "similarity",
        "assignment",
        "_keep",
        "_pad",
        "_src",
        "_dst",
        "_assign_flat",
    )

    def __init__(self, batch_size, n_in, n_out, counts, valid, similarity, assignment, keep, pad, src, dst):
        self.batch_size = batch_size
        self.n_in = n_in
        self.n_out = n_out
        self.counts = counts
        self.valid = valid
        self.similarity = similarity
        self.assignment = assignment
        self._keep = keep  # [B*L] flat input row of each output row (None: identity)
        self._pad = pad  # [B*L, 1] bool, True on pad rows; None when there are none
        self._src = src  # [M] flat input rows merged away
        self._dst = dst  # [M] flat output rows they merge into
        self._assign_flat = None if keep is None else (assignment + _row_offsets(assignment, n_out)).reshape(-1)

    @property
    def is_identity(self) -> bool:
        """True when nothing merges: ``merge`` and ``unmerge`` return their input."""
        return self._keep is None

    def merge(self, x: Tensor, mode: str = "mean") -> Tensor:
        """``x [B, N, ...] -> [B, L, ...]``: each B token reduced with the A tokens merged into it.

        ``mode`` is a ``scatter_reduce`` reduction over the token and its sources:
        ``"mean"`` (plain average; use :func:`merge_wavg` for ToMe's size-weighted
        one), ``"sum"``, ``"amax"``, ``"amin"`` or ``"prod"``. Pad slots are zero.
        When nothing merges, ``x`` itself is returned (not a copy).
        """
        _check_mode(mode)
        _check_tokens(x, self.batch_size, self.n_in, "Merge.merge")
        if self._keep is None:
            return x
        rest = x.shape[2:]
        rows = x.reshape(self.batch_size * self.n_in, -1)
        out = rows.index_select(0, self._keep)
        if self._pad is not None:
            out.masked_fill_(self._pad, 0)
        if self._src.numel():
            sources = rows.index_select(0, self._src)
            index = self._dst[:, None].expand(-1, rows.shape[1])
            out.scatter_reduce_(0, index, sources, reduce=mode, include_self=True)
        return out.reshape(self.batch_size, self.n_out, *rest)

    __call__ = merge

    def unmerge(self, x: Tensor) -> Tensor:
        """``x [B, L, ...] -> [B, N, ...]``: every input token gets its output token's value."""
        _check_tokens(x, self.batch_size, self.n_out, "Merge.unmerge")
        if self._keep is None:
            return x
        rest = x.shape[2:]
        rows = x.reshape(self.batch_size * self.n_out, -1)
        return rows.index_select(0, self._assign_flat).reshape(self.batch_size, self.n_in, *rest)

    def __repr__(self) -> str:
        counts = self.counts.tolist()
        shown = counts[0] if len(set(counts)) == 1 else counts
        return f"Merge(B={self.batch_size}, {self.n_in} -> {self.n_out} tokens, merged={shown})"


def _row_offsets(index: Tensor, stride: int) -> Tensor:
    """``[B, 1]`` offsets ``b * stride`` that turn per-sample indices into flat rows."""
    import torch

    return torch.arange(index.shape[0], device=index.device)[:, None] * stride


def _identity(batch: int, tokens: int, device, dtype) -> Merge:
    import torch

    return Merge(
        batch,
        tokens,
        tokens,
        torch.zeros(batch, dtype=torch.long, device=device),
        None,
        torch.empty(batch, 0, dtype=dtype, device=device),
        torch.arange(tokens, device=device).expand(batch, tokens),
        None,
        None,
        None,
        None,
    )


def _build(tokens: int, src_pos: Tensor, dst_pos: Tensor, counts: Tensor, r_min: int, similarity: Tensor) -> Merge:
    """A :class:`Merge` from per-sample edges ``src_pos -> dst_pos`` (both ``[B, R]``).

    Entry ``j`` of row ``b`` is a real edge when ``j < counts[b]``; the others are
    ignored (threshold mode pads rows to the largest count).
    """
    import torch

    batch, width = src_pos.shape
    device = src_pos.device
    n_out = tokens - r_min
    ragged = width != r_min
    edge = torch.arange(width, device=device)[None, :] < counts[:, None] if ragged else None

    # Which input tokens disappear. The unused entries of a ragged row are A tokens
    # that did not merge; writing False there cannot clear a real True because every
    # A position appears at most once per row.
    is_src = torch.zeros(batch, tokens, dtype=torch.bool, device=device)
    if ragged:
        is_src.scatter_(1, src_pos, edge)
    else:
        is_src.scatter_(1, src_pos, True)
    kept = ~is_src

    # A kept token's output slot is the number of kept tokens before it: order preserved.
    out_pos = kept.cumsum(1) - 1
    dst_out = out_pos.gather(1, dst_pos)
    # A merged-away token is represented by its B partner's slot.
    src_value = torch.where(edge, dst_out, out_pos.gather(1, src_pos)) if ragged else dst_out
    assignment = out_pos.scatter(1, src_pos, src_value)

    # Output slot -> input row. Merged-away tokens all write into a spare column n_out
    # that is cut off; slots past a sample's real tokens (pads) keep row 0.
    target = torch.where(kept, out_pos, n_out)
    keep = torch.zeros(batch, n_out + 1, dtype=torch.long, device=device)
    keep.scatter_(1, target, torch.arange(tokens, device=device).expand(batch, tokens))
    keep = keep[:, :n_out]

    keep_flat = (keep + _row_offsets(keep, tokens)).reshape(-1)
    src_flat = src_pos + _row_offsets(src_pos, tokens)
    dst_flat = dst_out + _row_offsets(dst_out, n_out)
    if ragged:
        valid = torch.arange(n_out, device=device)[None, :] < (tokens - counts)[:, None]
        pad = ~valid.reshape(-1, 1)
        src_flat, dst_flat = src_flat[edge], dst_flat[edge]
        similarity = similarity.masked_fill(~edge, float("nan"))
    else:
        valid, pad = None, None
        src_flat, dst_flat = src_flat.reshape(-1), dst_flat.reshape(-1)
    return Merge(batch, tokens, n_out, counts, valid, similarity, assignment, keep_flat, pad, src_flat, dst_flat)


# --------------------------------------------------------------------------- matching


def _protected_mask(protected, protect_last: bool, batch: int, tokens: int, device):
    """``[1 or B, N]`` bool mask of protected tokens, or None; plus its leading count.

    The count is the int form of ``protected`` (None when a tensor was given), which
    lets the alternate partition validate r without reading the device.
    """
    import torch

    leading = None
    mask = None
    if isinstance(protected, torch.Tensor):
        if protected.dtype != torch.bool or protected.shape not in ((tokens,), (batch, tokens)):
            raise ValueError(
                f"protected must be an int or a bool tensor of shape [{tokens}] or [{batch}, {tokens}], "
                f"got {protected.dtype} {list(protected.shape)}."
            )
        mask = protected.to(device).reshape(-1, tokens).clone()
    else:
        leading = _as_count("protected", protected, 0)
        if leading > tokens:
            raise TokenMergeError(f"protected={leading} is more than the {tokens} tokens in the sequence.")
        if leading:
            mask = torch.zeros(1, tokens, dtype=torch.bool, device=device)
            mask[:, :leading] = True
    if protect_last and tokens:
        if mask is None:
            mask = torch.zeros(1, tokens, dtype=torch.bool, device=device)
        mask[:, -1] = True
    return mask, leading


def _partition(partition, generator, batch: int, tokens: int, device):
    """Positions of the A and B sets: ``[Na]``/``[Nb]`` shared by the batch, or ``[B, Na]``/``[B, Nb]``.

    Positions are ascending in every row, so ties resolve towards earlier tokens.
    """
    import torch

    if isinstance(partition, str):
        if partition == "alternate":
            return (
                torch.arange(0, tokens, 2, device=device),
                torch.arange(1, tokens, 2, device=device),
            )
        if partition == "random":
            if not isinstance(generator, torch.Generator):
                raise TokenMergeError(
                    "partition='random' needs an explicit torch.Generator (generator=...), "
                    "so the global random state (a sampler's noise) is never touched."
                )
            # One draw for the whole batch, on the generator's own device, with the
            # alternate partition's set sizes (|A| = ceil(N/2), |B| = floor(N/2)).
            perm = torch.randperm(tokens, generator=generator, device=generator.device).to(device)
            n_b = tokens // 2
            return perm[n_b:].sort().values, perm[:n_b].sort().values
        raise TokenMergeError(
            f"partition={partition!r} is not one of {', '.join(PARTITIONS)} (or a tensor marking the B tokens)."
        )
    if not isinstance(partition, torch.Tensor):
        raise TokenMergeError(f"partition={partition!r} must be 'alternate', 'random' or a tensor.")
    if partition.dtype == torch.bool:
        if partition.shape not in ((tokens,), (batch, tokens)):
            raise ValueError(
                f"a bool partition must have shape [{tokens}] or [{batch}, {tokens}], got {list(partition.shape)}."
            )
        is_b = partition.to(device)
    else:
        if partition.is_floating_point() or partition.dim() not in (1, 2):
            raise ValueError(f"a partition index tensor must be int64 [Nb] or [B, Nb], got {partition.dtype}.")
        index = partition.to(device=device, dtype=torch.long)
        if index.numel() and (int(index.min()) < 0 or int(index.max()) >= tokens):
            raise ValueError(f"partition indices must lie in [0, {tokens}).")
        is_b = torch.zeros(*index.shape[:-1], tokens, dtype=torch.bool, device=device)
        is_b.scatter_(-1, index, True)
        if int(is_b.sum(-1).min()) != index.shape[-1]:
            raise ValueError("partition indices repeat a token; each B token must be listed once.")
    sizes = is_b.sum(-1)
    if is_b.dim() == 2 and int(sizes.min()) != int(sizes.max()):
        raise ValueError("every sample's partition must put the same number of tokens in B.")
    if is_b.dim() == 2 and batch == 1:
        is_b = is_b[0]
    a_idx = (~is_b).nonzero()[:, -1].reshape(*is_b.shape[:-1], -1)
    b_idx = is_b.nonzero()[:, -1].reshape(*is_b.shape[:-1], -1)
    return a_idx, b_idx


def _take(index: Tensor, positions: Tensor) -> Tensor:
    """``index`` (``[n]`` shared or ``[B, n]``) looked up at ``positions [B, k]``."""
    return index[positions] if index.dim() == 1 else index.gather(1, positions)


def _select(metric: Tensor, index: Tensor) -> Tensor:
    if index.dim() == 1:
        return metric.index_select(1, index)
    return metric.gather(1, index[..., None].expand(-1, -1, metric.shape[-1]))


def _best_edges(metric, protected, protect_last, partition, generator):
    """Each A token's most similar B token.

    Returns ``(node_max [B, Na], node_idx [B, Na], a_idx, b_idx, mergeable)`` where
    ``node_max`` is the cosine similarity (-inf for A tokens that may not merge, NaN
    where the metric held NaN or inf),
    ``node_idx`` the partner's position within B, and ``mergeable`` the smallest number
    of A tokens allowed to merge in any sample (a Python int).
    """
    import torch

    batch, tokens, _ = metric.shape
    device = metric.device
    mask, leading = _protected_mask(protected, protect_last, batch, tokens, device)
    a_idx, b_idx = _partition(partition, generator, batch, tokens, device)
    n_a, n_b = a_idx.shape[-1], b_idx.shape[-1]

    prot_a = prot_b = None
    if mask is not None:
        if a_idx.dim() == 2 and mask.shape[0] == 1:
            mask = mask.expand(batch, tokens)
        prot_a = mask[:, a_idx] if a_idx.dim() == 1 else mask.gather(1, a_idx)
        prot_b = mask[:, b_idx] if b_idx.dim() == 1 else mask.gather(1, b_idx)

    # How many A tokens may merge: computed without reading the device in the common
    # case (alternate partition, protected given as a count).
    if isinstance(partition, str) and partition == "alternate" and leading is not None:
        mergeable = max_r(tokens, protected=leading, protect_last=protect_last)
    elif n_a == 0 or n_b == 0:
        mergeable = 0
    elif prot_a is None:
        mergeable = n_a
    else:
        free_a = (~prot_a).sum(-1)
        mergeable = int(torch.where((~prot_b).any(-1), free_a, torch.zeros_like(free_a)).min())

    if mergeable == 0:
        return None, None, a_idx, b_idx, 0

    # Cosine similarity between A and B. Norms are clamped at the dtype's smallest
    # normal number so an all-zero metric row has similarity 0 instead of NaN.
    unit = metric / metric.norm(dim=-1, keepdim=True).clamp_min(torch.finfo(metric.dtype).tiny)
    scores = _select(unit, a_idx) @ _select(unit, b_idx).transpose(-1, -2)  # [B, Na, Nb]
    if prot_a is not None:
        # Protected tokens are neither merged away (A rows) nor merged into (B columns).
        scores.masked_fill_(prot_a[..., :, None], -math.inf)
        scores.masked_fill_(prot_b[..., None, :], -math.inf)
    node_max, node_idx = scores.max(dim=-1)
    # Rounding can push a duplicate's cosine just above 1; clamp so threshold=1 is exact.
    node_max = node_max.clamp(max=1.0)
    return node_max, node_idx, a_idx, b_idx, mergeable


def _edge_order(node_max: Tensor, count: int) -> Tensor:
    """Positions in A of the ``count`` best edges, most similar first, ties by position."""
    import torch

    key = torch.where(node_max.isnan(), torch.full_like(node_max, _NAN_SCORE), node_max)
    return key.argsort(dim=-1, descending=True, stable=True)[:, :count]


def bipartite_soft_matching(
    metric: Tensor,
    r: int,
    *,
    protected: Protected = 0,
    protect_last: bool = False,
    partition: Partition = "alternate",
    generator: torch.Generator | None = None,
) -> Merge:
    """ToMe's bipartite soft matching: merge the ``r`` most similar A->B edges.

    Args:
        metric: ``[B, N, C]`` floating point, the similarity features (ToMe: the
            attention keys averaged over heads). Compared by cosine similarity; no
            gradient flows through the matching.
        r: tokens removed, ``0 <= r <= max_r(N, ...)``. Larger is an error, never capped.
        protected: tokens that never merge (neither merged away nor merged into):
            an int ``k`` protects the first ``k`` (1 for CLS, 2 for DeiT's CLS and
            distillation tokens); a bool tensor ``[N]`` or ``[B, N]`` marks any set
            (pads, pad slots from a threshold merge: ``~merge.valid``).
        protect_last: also protect the last token (an EOS/SEP token without padding).
        partition: ``"alternate"`` (A = even positions, B = odd; the paper's choice,
            deterministic), ``"random"`` (one random split shared by the batch, with
            |A| = ceil(N/2); needs ``generator``), or a tensor marking the B tokens
            (bool ``[N]``/``[B, N]``, or their positions ``[Nb]``/``[B, Nb]``), e.g.
            tomesd's one-destination-per-grid-cell split.
        generator: the ``torch.Generator`` a random partition draws from; ignored
            otherwise. torch's global RNG is never used.

    Returns:
        A :class:`Merge` that maps ``[B, N, ...] -> [B, N - r, ...]``.

    Raises:
        TokenMergeError: r negative, not an int, or above the number of A tokens that
            may merge in some sample.
    """
    import torch

    _check_metric(metric)
    r = _as_count("r", r, 0)
    batch, tokens, _ = metric.shape
    if r == 0:
        return _identity(batch, tokens, metric.device, metric.dtype)
    with torch.no_grad():
        node_max, node_idx, a_idx, b_idx, mergeable = _best_edges(
            metric, protected, protect_last, partition, generator
        )
        if r > mergeable:
            raise TokenMergeError(
                f"r={r} is more than the {mergeable} tokens that can merge in a sequence of {tokens} "
                f"(at most one per unprotected token of set A, which holds {a_idx.shape[-1]}); "
                f"use r <= {mergeable}."
            )
        order = _edge_order(node_max, r)
        similarity = node_max.gather(1, order)
        src_pos = _take(a_idx, order)
        dst_pos = _take(b_idx, node_idx.gather(1, order))
        counts = torch.full((batch,), r, dtype=torch.long, device=metric.device)
        return _build(tokens, src_pos, dst_pos, counts, r, similarity)


def threshold_soft_matching(
    metric: Tensor,
    threshold: float,
    *,
    protected: Protected = 0,
    protect_last: bool = False,
    partition: Partition = "alternate",
    generator: torch.Generator | None = None,
) -> Merge:
    """DyMU-style matching: merge every A->B edge whose cosine similarity exceeds ``threshold``.

    Same matching as :func:`bipartite_soft_matching` (each A token's single best B
    partner, protected tokens excluded), but instead of the r best edges every edge
    with similarity ``> threshold`` (strictly, as in DyMU) merges, so each sample
    merges as many tokens as its content allows. ``threshold=1`` never merges;
    ``threshold=-1`` merges every A token that may merge (unless its best partner is
    exactly opposite). Similarities are clamped to at most 1 before comparing.

    Batches are padded, not equalised: the result has ``L = N - min(counts)`` tokens,
    a sample that merged more has ``counts[b] - min(counts)`` zero pad slots at its end
    (``merge.valid`` False, size 0 under :func:`merge_wavg`, hence a ``-inf`` key bias
    from :func:`attention_bias_from_size`). Each sample's result is therefore the same
    as if it had been run alone. Reading the counts costs one device synchronisation.

    Args:
        metric: ``[B, N, C]`` floating point.
        threshold: a real number in [-1, 1].
        protected, protect_last, partition, generator: as in :func:`bipartite_soft_matching`.

    Returns:
        A :class:`Merge`; ``merge.counts [B]`` holds each sample's number of merges.

    Raises:
        TokenMergeError: threshold outside [-1, 1], NaN or not a number.
    """
    import torch

    _check_metric(metric)
    if isinstance(threshold, bool) or not isinstance(threshold, (numbers.Real, torch.Tensor)):
        raise TokenMergeError(f"threshold={threshold!r} must be a number in [-1, 1].")
    value = float(threshold)
    if not -1.0 <= value <= 1.0:  # also refuses NaN
        raise TokenMergeError(f"threshold={value!r} is outside [-1, 1] (it is a cosine similarity).")
    batch, tokens, _ = metric.shape
    with torch.no_grad():
        node_max, node_idx, a_idx, b_idx, mergeable = _best_edges(
            metric, protected, protect_last, partition, generator
        )
        if mergeable == 0 and node_max is None:
            return _identity(batch, tokens, metric.device, metric.dtype)
        counts = (node_max > value).sum(-1)
        r_min, r_max = (int(v) for v in torch.stack([counts.min(), counts.max()]).tolist())
        if r_max == 0:
            return _identity(batch, tokens, metric.device, metric.dtype)
        # The edges above the threshold are exactly each row's top counts[b] entries.
        order = _edge_order(node_max, r_max)
        similarity = node_max.gather(1, order)
        src_pos = _take(a_idx, order)
        dst_pos = _take(b_idx, node_idx.gather(1, order))
        return _build(tokens, src_pos, dst_pos, counts, r_min, similarity)


# --------------------------------------------------------------------------- size tracking


def merge_wavg(merge: Merge, x: Tensor, size: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """Size-weighted merge (ToMe Sec. 3): ``x [B, N, C] -> [B, L, C]``, ``size [B, N, 1] -> [B, L, 1]``.

    ``size`` counts the input tokens each token stands for (ones when None, in
    ``x``'s dtype). A merged token is ``sum(size_i * x_i) / sum(size_i)`` over the
    tokens it absorbs, and its size is ``sum(size_i)``; so ``sum(size * x)`` and
    ``sum(size)`` are unchanged by the merge. Pad slots get x = 0 and size = 0, and
    keep them through later merges that protect them.
    """
    batch, tokens = merge.batch_size, merge.n_in
    _check_tokens(x, batch, tokens, "merge_wavg x")
    if size is None:
        size = x.new_ones(batch, tokens, 1)
    elif size.shape != (batch, tokens, 1):
        raise ValueError(f"merge_wavg: size must be [{batch}, {tokens}, 1], got {list(size.shape)}.")
    if merge.is_identity:
        return x, size
    total = merge.merge(x * size, mode="sum")
    size = merge.merge(size, mode="sum")
    # Pad slots (from this merge or an earlier threshold merge) hold 0 / 0: divide by 1
    # there so they stay 0 with finite gradients. A NaN pad would poison attention even
    # under a -inf bias, because softmax weight 0 times NaN is NaN.
    return total / size.masked_fill(size == 0, 1), size


def attention_bias_from_size(size: Tensor) -> Tensor:
    """Proportional attention (ToMe Sec. 3): ``log(size)`` to add to attention logits.

    ``size [B, N, 1]`` (or ``[B, N]``) -> ``[B, 1, 1, N]``, which broadcasts over
    ``[B, heads, Nq, Nk]`` logits along the keys, and works as an additive
    ``attn_mask`` for ``scaled_dot_product_attention``. ``softmax(qk^T + log s) v`` over
    merged keys equals plain attention over the sequence in which each merged token is
    repeated ``s`` times. Pad slots (size 0) get ``-inf``, i.e. are masked out.
    """
    if size.dim() == 3 and size.shape[-1] == 1:
        size = size[..., 0]
    elif size.dim() != 2:
        raise ValueError(f"size must be [B, N, 1] or [B, N], got {list(size.shape)}.")
    return size.log()[:, None, None, :]


# --------------------------------------------------------------------------- source tracking


def merge_source(merge: Merge, x: Tensor, source: Tensor | None = None) -> Tensor:
    """Track which input tokens each token covers: ``source [B, N, N_input] -> [B, L, N_input]``.

    ``source`` is a 0/1 matrix, one row per current token; None starts from the
    identity (``N_input = N``), in ``x``'s dtype and device (``x [B, N, ...]`` is only
    read for those). Row sums equal the sizes; each column holds a single 1. Dense:
    ``B * N * N_input`` elements -- for long sequences prefer :func:`merge_assignment`.
    """
    import torch

    batch, tokens = merge.batch_size, merge.n_in
    _check_tokens(x, batch, tokens, "merge_source x")
    if source is None:
        source = torch.eye(tokens, dtype=x.dtype, device=x.device).expand(batch, tokens, tokens)
    else:
        _check_tokens(source, batch, tokens, "merge_source source")
    return merge.merge(source, mode="amax")


def merge_assignment(merge: Merge, assignment: Tensor | None = None) -> Tensor:
    """Compact source tracking: ``assignment [B, N_input] -> [B, N_input]`` (int64).

    ``assignment[b, i]`` is the current token that input token ``i`` belongs to; None
    starts from the identity. Same information as :func:`merge_source`, in
    ``B * N_input`` integers, composed with one gather per merge.
    """
    if assignment is None:
        return merge.assignment
    if assignment.dim() != 2 or assignment.shape[0] != merge.batch_size:
        raise ValueError(
            f"assignment must be [{merge.batch_size}, N_input], got {list(assignment.shape)}."
        )
    return merge.assignment.gather(1, assignment)


def source_from_assignment(assignment: Tensor, n_current: int, dtype=None) -> Tensor:
    """The dense 0/1 ``source [B, n_current, N_input]`` of an ``assignment [B, N_input]``."""
    import torch

    batch, n_input = assignment.shape
    source = torch.zeros(batch, n_current, n_input, dtype=dtype or torch.float32, device=assignment.device)
    return source.scatter_(1, assignment[:, None, :], 1)


def unmerge_to_input(x: Tensor, source: Tensor) -> Tensor:
    """Map a per-token quantity back to the input: ``x [B, N_current, ...] -> [B, N_input, ...]``.

    ``source`` is either the dense ``[B, N_current, N_input]`` matrix of
    :func:`merge_source` or the int64 ``[B, N_input]`` assignment of
    :func:`merge_assignment`. Each input token receives a copy of the current token
    that covers it (exactly, no arithmetic), e.g. to unmerge a hidden state or to paint
    per-token values over an image.
    """
    if source.dim() == 3:
        if source.shape[0] != x.shape[0] or source.shape[1] != x.shape[1]:
            raise ValueError(
                f"unmerge_to_input: source {list(source.shape)} does not match x {list(x.shape)}."
            )
        assignment = source.argmax(dim=1)
    elif source.dim() == 2 and not source.is_floating_point():
        if source.shape[0] != x.shape[0]:
            raise ValueError(
                f"unmerge_to_input: assignment {list(source.shape)} does not match x {list(x.shape)}."
            )
        assignment = source
    else:
        raise ValueError(
            "unmerge_to_input: source must be a [B, N_current, N_input] matrix or a [B, N_input] int64 assignment."
        )
    if x.dim() < 2:
        raise ValueError(f"unmerge_to_input: x must be [B, N_current, ...], got {list(x.shape)}.")
    batch, n_current = x.shape[:2]
    rest = x.shape[2:]
    rows = x.reshape(batch, n_current, -1)
    index = assignment[:, :, None].expand(-1, -1, rows.shape[-1])
    return rows.gather(1, index).reshape(batch, assignment.shape[1], *rest)


# --------------------------------------------------------------------------- schedules

RSpec = Union[int, Sequence[int], "tuple[int, float]"]


def _schedule(r, num_layers: int) -> list[int]:
    if isinstance(r, tuple):
        if len(r) != 2:
            raise TokenMergeError(f"r={r!r}: a schedule is a pair (r, inflection).")
        base, inflection = r
        base = _as_count("r", base, 0)
        if isinstance(inflection, bool) or not isinstance(inflection, numbers.Real):
            raise TokenMergeError(f"inflection={inflection!r} must be a number in [-1, 1].")
        inflection = float(inflection)
        if not -1.0 <= inflection <= 1.0:
            raise TokenMergeError(f"inflection={inflection!r} is outside [-1, 1].")
        if num_layers == 1:
            return [base]
        first = base * (1.0 - inflection)
        last = base * (1.0 + inflection)
        step = (last - first) / (num_layers - 1)
        # The small epsilon keeps exact integers (e.g. the last layer's 0) from rounding down to -1.
        return [max(0, int(math.floor(first + step * layer + 1e-9))) for layer in range(num_layers)]
    if isinstance(r, (str, bytes, dict, set)) or isinstance(r, bool):
        raise TokenMergeError(f"r={r!r} must be an int, a list with one int per layer, or a pair (r, inflection).")
    ndim = getattr(r, "ndim", None)  # numpy scalars and 0-d tensors/arrays are single values
    if ndim == 0 or (ndim is None and not hasattr(r, "__iter__")):
        return [_as_count("r", r, 0)] * num_layers
    if hasattr(r, "__iter__"):
        values = list(r.tolist() if hasattr(r, "tolist") else r)
        if len(values) != num_layers:
            raise TokenMergeError(
                f"r is a list of {len(values)} values but the model has {num_layers} layers; give one per layer."
            )
        return [_as_count(f"r[{layer}]", value, 0) for layer, value in enumerate(values)]
    raise TokenMergeError(f"r={r!r} must be an int, a list with one int per layer, or a pair (r, inflection).")


def parse_r(
    r: RSpec,
    num_layers: int,
    num_tokens: int,
    *,
    protected: int = 0,
    protect_last: bool = False,
    partition: str = "alternate",
) -> list[int]:
    """Tokens to merge at each layer, validated against the tokens that will be left.

    ``r`` may be:

    * an int: the same r at every layer (ToMe's constant schedule);
    * a list (or other sequence) with exactly one int per layer;
    * a pair ``(r, inflection)`` with ``inflection`` in [-1, 1]: a linear schedule
      from ``r * (1 - inflection)`` at the first layer to ``r * (1 + inflection)`` at
      the last, each rounded down, so its mean is at most r. ``inflection = 0`` is
      constant, ``-1`` decreasing (2r -> 0, the ToMe paper's "decreasing schedule",
      merging most where tokens are still plentiful), ``+1`` increasing (0 -> 2r).

    Each layer's r must be at most :func:`max_r` of the tokens entering that layer
    (so the count never drops below the protected tokens plus one); otherwise a
    :class:`TokenMergeError` names the layer (counted from 0) and the numbers.
    """
    layers = _as_count("num_layers", num_layers, 1)
    tokens = _as_count("num_tokens", num_tokens, 1)
    schedule = _schedule(r, layers)
    remaining = tokens
    for layer, value in enumerate(schedule):
        limit = max_r(remaining, protected=protected, protect_last=protect_last, partition=partition)
        if value > limit:
            n_protected = len(_protected_positions(remaining, protected, protect_last))
            raise TokenMergeError(
                f"r={value} at layer {layer} (counting from 0) is more than the {limit} tokens that can merge "
                f"there: {remaining} tokens enter layer {layer}, of which {n_protected} are protected, and only "
                f"tokens of set A (half) merge; lower r or use a decreasing schedule."
            )
        remaining -= value
    return schedule
