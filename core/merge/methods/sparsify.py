"""Sparsification of task vectors (deltas) for the task-arithmetic family.

Each function takes one delta tensor (any shape, float32 or float64, never
modified) and returns a new tensor of the same shape with some elements set to
zero and, optionally, the survivors rescaled.

- :func:`magnitude_prune` keeps the largest magnitudes (TIES, Yadav et al.
  2023, https://arxiv.org/abs/2306.01708).
- :func:`outlier_prune` drops the largest ``gamma`` share and the smallest ones
  (Model Breadcrumbs, Davari & Belilovsky 2023, https://arxiv.org/abs/2312.06795).
- :func:`random_prune` keeps each element with probability ``density`` (DARE,
  Yu et al. 2023, https://arxiv.org/abs/2311.03099).
- :func:`magprune` keeps each element with a probability that grows with its
  magnitude rank in its row (DELLA, Deep et al. 2024, https://arxiv.org/abs/2406.11617).

Counts follow mergekit 0.1.5: ``k = floor(density * n)``, at least one element
of a non-empty tensor survives a positive density. Equal magnitudes are broken
by position (the lower flat index ranks higher), so results are the same on
every device and thread count; mergekit breaks such ties by an unstable sort,
which agrees with this rule on tensors of up to 16 elements on the CPU.

Breadcrumbs differs from mergekit 0.1.5 on purpose. mergekit keeps
``floor(density * n)`` elements, so a tensor with fewer than ``1 / density``
elements (a short bias or norm vector at a low density) loses every element
and silently falls back to the base model's values. Here the kept count is at
least one, as in mergekit's own TIES trimming, and the outlier count shrinks
only so far as that one element needs; everywhere mergekit keeps something the
two give the same mask.

Rescaling (``rescale``): ``None`` keeps survivors as they are; ``"l1"`` scales
them so the L1 norm of the delta is unchanged (mergekit's rule; skipped when
either norm is below 1e-7); ``"density"`` divides each survivor by its keep
probability, the papers' rule, which makes the expectation equal the delta.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:  # pragma: no cover - typing only
    import torch

RESCALE_MODES = ("l1", "density")
_L1_EPS = 1e-7  # below this L1 norm a rescale factor is meaningless (mergekit's guard)
_CHUNK = 8192  # below torch's parallel grain size, so one thread sums each row


def keep_count(density: float, numel: int) -> int:
    """Elements kept at ``density``: floor(density * n), at least 1 when n > 0."""
    if numel == 0 or density <= 0:
        return 0
    if density >= 1:
        return numel
    # The same float product and truncation as mergekit, so counts agree exactly.
    return min(numel, max(1, int(density * numel)))


def outlier_count(gamma: float, numel: int) -> int:
    """Largest elements dropped as outliers: floor(gamma * n)."""
    if numel == 0 or gamma <= 0:
        return 0
    return min(numel, int(gamma * numel))


def _first_equal(equal: torch.Tensor, count: int) -> torch.Tensor:
    """The first ``count`` True entries of the flat bool ``equal`` (by index)."""
    import torch

    if count <= 0:
        return torch.zeros_like(equal)
    # nonzero() lists indices in ascending order; ties are usually few, so this
    # beats a cumsum over the whole tensor.
    where = torch.nonzero(equal).reshape(-1)
    if where.numel() <= count:
        return equal
    mask = torch.zeros_like(equal)
    mask[where[:count]] = True
    return mask


_SAMPLE = 1 << 16  # sample size for bracketing the k-th value of a large tensor


def kth_select(flat: torch.Tensor, j: int) -> tuple[torch.Tensor, int, int]:
    """The exact ``j``-th smallest value (1-based) of the 1-D ``flat``, with counts.

    Returns ``(value, n_less, n_equal)``: the value (a 0-d tensor, the same as
    ``torch.kthvalue(flat, j)``), how many entries are smaller and how many
    equal it. On large tensors a strided sample of 65,536 values brackets the
    answer, two passes count the entries below and inside the bracket, and
    kthvalue runs only on the few inside. When the bracket misses (the counts
    prove it), it falls back to kthvalue on everything: exact either way.
    """
    import math

    import torch

    n = flat.numel()
    if n > 4 * _SAMPLE:
        step = n // _SAMPLE
        sample = flat[::step][:_SAMPLE].sort().values
        m = sample.numel()
        q = j / n
        margin = 4.0 * math.sqrt(m * q * (1 - q)) + 32
        lo = sample[max(0, int(q * m - margin))]
        hi = sample[min(m - 1, int(q * m + margin) + 1)]
        in_range = flat >= lo
        below = n - int(torch.count_nonzero(in_range))
        in_range &= flat <= hi
        inside = flat[in_range]
        del in_range
        if below < j <= below + inside.numel():
            value = torch.kthvalue(inside, j - below).values
            n_less = below + int(torch.count_nonzero(inside < value))
            return value, n_less, int(torch.count_nonzero(inside == value))
    value = torch.kthvalue(flat, j).values
    return value, int(torch.count_nonzero(flat < value)), int(torch.count_nonzero(flat == value))


def top_mask(magnitude: torch.Tensor, k: int) -> torch.Tensor:
    """Bool mask (shape of ``magnitude``) of its ``k`` largest entries.

    Ties at the k-th value go to the lowest flat indices, i.e. the first ``k``
    entries of a stable descending sort. O(n): no sort; when every entry equal
    to the threshold is kept (the usual case) one comparison makes the mask.
    """
    import torch

    flat = magnitude.reshape(-1)
    n = flat.numel()
    if k >= n:
        return torch.ones_like(magnitude, dtype=torch.bool)
    if k <= 0:
        return torch.zeros_like(magnitude, dtype=torch.bool)
    threshold, n_less, n_equal = kth_select(flat, n - k + 1)
    need = k - (n - n_less - n_equal)  # entries equal to the threshold still to keep
    if need == n_equal:
        return (flat >= threshold).reshape(magnitude.shape)
    mask = (flat > threshold) | _first_equal(flat == threshold, need)
    return mask.reshape(magnitude.shape)


def bottom_mask(magnitude: torch.Tensor, m: int) -> torch.Tensor:
    """Bool mask of the ``m`` smallest entries; ties go to the lowest indices.

    These are the first ``m`` entries of a stable ascending sort.
    """
    import torch

    flat = magnitude.reshape(-1)
    n = flat.numel()
    if m >= n:
        return torch.ones_like(magnitude, dtype=torch.bool)
    if m <= 0:
        return torch.zeros_like(magnitude, dtype=torch.bool)
    threshold, n_less, n_equal = kth_select(flat, m)
    need = m - n_less
    if need == n_equal:
        return (flat <= threshold).reshape(magnitude.shape)
    mask = (flat < threshold) | _first_equal(flat == threshold, need)
    return mask.reshape(magnitude.shape)


def l1_norm(tensor: torch.Tensor) -> float:
    """sum |tensor|, accumulated in float64 in an order fixed by the size alone.

    A plain ``tensor.abs().sum()`` splits the work by thread count, so its
    last bits (and a rescale factor made from it) would change with
    ``torch.set_num_threads``. Rows of ``_CHUNK`` elements are each summed by
    one thread, then the row sums the same way, until one short vector is left.
    """
    import torch

    flat = tensor.reshape(-1)
    if flat.numel() == 0:
        return 0.0
    first = True
    while first or flat.numel() > _CHUNK:
        n = flat.numel()
        main = n - n % _CHUNK
        parts = []
        if main:
            rows = flat[:main].reshape(-1, _CHUNK)
            parts.append((rows.abs() if first else rows).sum(dim=1, dtype=torch.float64))
        if main < n:
            tail = flat[main:]
            parts.append((tail.abs() if first else tail).sum(dtype=torch.float64).reshape(1))
        flat = torch.cat(parts) if len(parts) > 1 else parts[0]
        first = False
    return float(flat.sum())


def l1_rescale(delta: torch.Tensor, kept: torch.Tensor) -> torch.Tensor:
    """``kept`` scaled so its L1 norm equals that of ``delta`` (same shape)."""
    before = l1_norm(delta)
    after = l1_norm(kept)
    if before < _L1_EPS or after < _L1_EPS:
        return kept
    return kept * (before / after)


def _apply(delta: torch.Tensor, keep: torch.Tensor, rescale: str | None) -> torch.Tensor:
    """Zero the elements outside ``keep``; rescale as asked (l1 or none)."""
    kept = delta * keep.to(delta.dtype)  # same dtypes: mixed-dtype ops take a slow path
    if rescale == "l1":
        return l1_rescale(delta, kept)
    if rescale not in (None, "density"):
        raise ValueError(f"unknown rescale mode {rescale!r}")
    return kept


def magnitude_prune(delta: torch.Tensor, density: float, rescale: str | None = None) -> torch.Tensor:
    """TIES trim: keep the ``keep_count(density, n)`` largest |delta| (any shape).

    ``rescale="density"`` divides the survivors by ``density``.
    """
    if density >= 1:
        return delta.clone()
    keep = top_mask(delta.abs(), keep_count(density, delta.numel()))
    kept = _apply(delta, keep, rescale)
    return kept / density if rescale == "density" else kept


def outlier_prune(delta: torch.Tensor, density: float, gamma: float, rescale: str | None = None) -> torch.Tensor:
    """Breadcrumbs: drop the ``gamma`` share of largest |delta| and the smallest,
    keeping ``keep_count(density, n)`` elements (any shape).

    When ``density + gamma > 1`` fewer outliers are dropped so that the kept
    count holds (mergekit's rule; the recipe check refuses such values).
    """
    if density >= 1:
        return delta.clone()
    n = delta.numel()
    n_keep = keep_count(density, n)
    n_top = min(outlier_count(gamma, n), n - n_keep)
    n_bottom = n - n_keep - n_top
    magnitude = delta.abs()
    # Ascending order: positions [n_bottom, n_bottom + n_keep) survive.
    keep = bottom_mask(magnitude, n_bottom + n_keep) & ~bottom_mask(magnitude, n_bottom)
    kept = _apply(delta, keep, rescale)
    return kept / density if rescale == "density" else kept


def random_prune(
    delta: torch.Tensor, density: float, generator: torch.Generator, rescale: str | None = "l1"
) -> torch.Tensor:
    """DARE: keep each element independently with probability ``density``.

    Uniforms are drawn on the CPU from ``generator`` (one per element, in flat
    order) and moved to ``delta``'s device, so a seed gives the same mask
    everywhere. ``rescale="density"`` divides survivors by ``density``.
    """
    import torch

    if density >= 1:
        return delta.clone()
    uniform = torch.rand(delta.shape, generator=generator, dtype=torch.float32, device="cpu")
    keep = (uniform < density).to(delta.device)
    del uniform
    kept = _apply(delta, keep, rescale)
    return kept / density if rescale == "density" else kept


def magprune_probabilities(magnitude: torch.Tensor, density: float, epsilon: float) -> torch.Tensor:
    """DELLA keep probabilities, shape of ``magnitude``.

    Within each row (dim 0 of a tensor of 2 or more dims, everything else
    flattened; a 1-D tensor is one row) the element of rank r (0 = smallest,
    ties by position) gets ``density - epsilon + 2 * epsilon * r / (m - 1)``,
    for row length m; a row of one element gets ``density``.
    """
    import torch

    rows = magnitude.reshape(magnitude.shape[0], -1) if magnitude.dim() >= 2 else magnitude.reshape(1, -1)
    m = rows.shape[1]
    if m <= 1:
        return torch.full_like(magnitude, density)
    order = torch.argsort(rows, dim=1, stable=True)
    ranks = torch.empty_like(order)
    positions = torch.arange(m, device=rows.device).expand_as(order)
    ranks.scatter_(1, order, positions)
    del order, positions
    rank_norm = ranks.to(magnitude.dtype) / (m - 1)
    probs = (density - epsilon) + rank_norm * (2 * epsilon)
    return probs.clamp_(0, 1).reshape(magnitude.shape)


def magprune(
    delta: torch.Tensor,
    density: float,
    epsilon: float,
    generator: torch.Generator,
    rescale: str | None = "l1",
) -> torch.Tensor:
    """DELLA MagPrune: keep each element with its rank-based probability.

    ``rescale="density"`` divides each survivor by its own keep probability
    (DELLA's rule), so the expectation equals ``delta``.
    """
    import torch

    if density >= 1:
        return delta.clone()
    if density - epsilon < 0 or density + epsilon > 1:
        raise ValueError(f"density {density} +/- epsilon {epsilon} must lie in [0, 1]")
    probs = magprune_probabilities(delta.abs(), density, epsilon)
    uniform = torch.rand(delta.shape, generator=generator, dtype=torch.float32, device="cpu")
    keep = uniform.to(device=delta.device, dtype=probs.dtype) < probs
    del uniform
    if rescale == "density":
        # Survivors have probability > 0, so the division is safe where it counts.
        return torch.where(keep, delta / probs, torch.zeros((), dtype=delta.dtype, device=delta.device))
    return _apply(delta, keep, rescale)
