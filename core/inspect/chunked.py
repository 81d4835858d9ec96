"""The figures of :mod:`core.inspect.weights` for one tensor, in chunks of bounded size.

Whole-tensor float64 arithmetic on a 1 B-entry embedding would need several 8 GB
copies; here the reference and the models' tensors stay in their own dtype and
every figure is accumulated over flat chunks of ``CHUNK`` entries converted to
float64 one at a time, so the working memory beyond the tensors just read is a
few chunks, whatever the tensor size.

* sums of squares, dot products, sums of ``|delta|`` and the sign counts add up
  chunk by chunk (exact up to float64 rounding);
* the top-10 % share needs the ``k``-th largest ``|delta|`` of the whole tensor:
  it is found exactly by histogram refinement — one pass counts and sums the
  entries per bin over ``[0, max]``, the bin holding the ``k``-th largest becomes
  the next range, and once that bin holds at most ``COLLECT`` entries they are
  gathered and sorted. Entries above the bin are added from the bin sums, so the
  result is the sum of exactly ``k`` largest entries (ties included as needed).

Shapes: ``ref [*S]`` and ``models`` a list of ``M`` tensors ``[*S]``.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any, Callable, Iterator, Sequence

if TYPE_CHECKING:  # pragma: no cover
    import torch

CHUNK = 1 << 20  # entries per chunk: 8 MB of float64 per array in flight
BINS = 4096
COLLECT = 1 << 20  # gather the candidates once the k-th largest lies among this few


def _chunks(n: int) -> Iterator[tuple[int, int]]:
    for start in range(0, n, CHUNK):
        yield start, min(n, start + CHUNK)


def figures(ref: "torch.Tensor", models: Sequence["torch.Tensor"], dtype: "torch.dtype",
            fraction: float = 0.1) -> dict[str, Any]:
    """rel_l2, abs_l2, top10_share, cosine [M, M] and sign_conflict of ``delta_i = models[i] - ref``."""
    import torch

    flat_ref = ref.reshape(-1)
    flat = [m.reshape(-1) for m in models]
    n, m = flat_ref.numel(), len(flat)
    ref_sq = 0.0
    dots = [[0.0] * m for _ in range(m)]
    abs_sum = [0.0] * m
    abs_max = [0.0] * m
    eligible = conflicts = 0
    for start, end in _chunks(n):
        r = flat_ref[start:end].to(dtype)
        deltas = [x[start:end].to(dtype) - r for x in flat]
        ref_sq += float(torch.dot(r, r))
        for i in range(m):
            for j in range(i, m):
                dots[i][j] += float(torch.dot(deltas[i], deltas[j]))
            a = deltas[i].abs()
            abs_sum[i] += float(a.sum())
            if a.numel():
                abs_max[i] = max(abs_max[i], float(a.max()))
        if m >= 2:
            positive = torch.zeros(end - start, dtype=torch.bool, device=r.device)
            negative = torch.zeros_like(positive)
            nonzero = torch.zeros(end - start, dtype=torch.int32, device=r.device)
            for d in deltas:
                positive |= d > 0
                negative |= d < 0
                nonzero += d != 0
            two = nonzero >= 2
            eligible += int(two.sum())
            conflicts += int((two & positive & negative).sum())
    ref_norm = math.sqrt(ref_sq)
    norms = [math.sqrt(max(dots[i][i], 0.0)) for i in range(m)]
    rel = [0.0 if v == 0.0 else (v / ref_norm if ref_norm > 0.0 else math.nan) for v in norms]
    cosine = sign_conflict = None
    if m >= 2:
        cosine = [[0.0] * m for _ in range(m)]
        for i in range(m):
            for j in range(i, m):
                if norms[i] > 0.0 and norms[j] > 0.0:
                    c = 1.0 if i == j else dots[i][j] / (norms[i] * norms[j])
                    cosine[i][j] = cosine[j][i] = c
        sign_conflict = conflicts / eligible if eligible else 0.0
    top = []
    for i in range(m):
        def abs_delta(start: int, end: int, i: int = i) -> "torch.Tensor":
            return (flat[i][start:end].to(dtype) - flat_ref[start:end].to(dtype)).abs()

        top.append(top_share_chunked(abs_delta, n, abs_sum[i], abs_max[i], fraction))
    return {"rel_l2": rel, "abs_l2": norms, "top10_share": top, "cosine": cosine, "sign_conflict": sign_conflict}


def top_share_chunked(values: Callable[[int, int], "torch.Tensor"], n: int, total: float, vmax: float,
                      fraction: float = 0.1) -> float:
    """Share of ``total`` held by the ``ceil(fraction * n)`` largest of the non-negative
    entries ``values(start, end)`` (a flat chunk), by histogram refinement (module docstring)."""
    import torch

    k = math.ceil(fraction * n)
    if n == 0 or total == 0.0 or k == 0:
        return 0.0
    levels: list[tuple[float, float, int]] = []  # (lo, hi, chosen bin): the nested ranges so far
    lo, hi = 0.0, vmax
    above, acc = 0, 0.0  # entries above the current range (all among the k largest) and their sum

    def candidates(chunk: "torch.Tensor") -> "torch.Tensor":
        for level_lo, level_hi, chosen in levels:
            chunk = chunk[_bin(chunk, level_lo, level_hi) == chosen]
        return chunk

    while True:
        if hi <= lo:  # every candidate has the same value
            return (acc + (k - above) * lo) / total
        counts = torch.zeros(BINS, dtype=torch.int64)
        sums = torch.zeros(BINS, dtype=torch.float64)
        for start, end in _chunks(n):
            c = candidates(values(start, end))
            if c.numel():
                c = c.to("cpu", torch.float64)  # the bin tallies are tiny; keep them on the CPU
                b = _bin(c, lo, hi)
                counts += torch.bincount(b, minlength=BINS)
                sums += torch.bincount(b, weights=c, minlength=BINS)
        # From the top bin down: the bin where the running count reaches k.
        running = above
        chosen = BINS - 1
        for b in range(BINS - 1, -1, -1):
            if running + int(counts[b]) >= k:
                chosen = b
                break
            running += int(counts[b])
            acc += float(sums[b])
        above = running
        width = (hi - lo) / BINS
        levels.append((lo, hi, chosen))
        if int(counts[chosen]) <= COLLECT:
            gathered = [candidates(values(start, end)).to("cpu", torch.float64) for start, end in _chunks(n)]
            pool = torch.cat(gathered).sort(descending=True).values
            return (acc + float(pool[: k - above].sum())) / total
        lo, hi = lo + chosen * width, lo + (chosen + 1) * width
        if width == 0.0:
            return (acc + (k - above) * lo) / total


def _bin(values: "torch.Tensor", lo: float, hi: float) -> "torch.Tensor":
    """The bin of each value over ``[lo, hi]`` in BINS equal bins, clamped to the first and last bin.

    Monotone in the value, and the same formula at every pass, so the bins split the
    candidates consistently even where rounding puts a value a hair outside an edge.
    """
    import torch

    v = values.to(torch.float64)
    if hi <= lo:
        return torch.zeros(v.shape, dtype=torch.int64)
    return ((v - lo) * (BINS / (hi - lo))).floor().to(torch.int64).clamp_(0, BINS - 1)
