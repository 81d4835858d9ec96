"""Truncated SVD of weight updates: ``M ~ B @ A`` at a rank or an energy share.

By Eckart–Young the best rank-R approximation of ``M`` in the Frobenius norm
keeps its R largest singular values, and its error is
``sqrt(sum_{i>R} sigma_i^2)``. ``energy=e`` picks the smallest R whose kept
``sum sigma_i^2`` reaches ``e`` of the total.

Which SVD (``svd="auto"``):

* ``exact``: ``torch.linalg.svd`` (LAPACK / cuSOLVER), the optimum. Used when
  the smaller side of the matrix is at most ``EXACT_MAX_DIM`` (1024) or the
  rank asked for is a large share of it (then a randomized SVD saves nothing).
  Its cost grows as m·n·min(m, n): a 4096×11008 MLP weight takes tens of
  seconds on a CPU, a 70B model's thousands of them would take days.
* ``randomized``: a randomized range finder with power iterations (Halko,
  Martinsson & Tropp 2011, https://arxiv.org/abs/0909.4061), the algorithm of
  ``torch.svd_lowrank``, written out here so that its Gaussian test matrix is
  drawn from a generator seeded per tensor (``torch.svd_lowrank`` draws from
  the global RNG, which breaks the project's rule that a seed reproduces a
  result). Cost m·n·(R + 10) per pass, 2 + 2·4 passes. It is close to the
  optimum, not at it: the error reported is measured, ``||M − B A||``, not
  the Eckart–Young bound. With ``energy`` the sketch grows (×2) until its
  kept share reaches the threshold, falling back to the exact SVD past half
  the matrix; a sketch's singular values never exceed the true ones, so the
  rank it picks can be a little higher than the exact one, never lower in
  energy kept.

The scale is split evenly: ``B = U·sqrt(S)``, ``A = sqrt(S)·Vᵀ``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Optional

from core.errors import MergeStudioError

if TYPE_CHECKING:  # pragma: no cover
    import torch

EXACT_MAX_DIM = 1024
OVERSAMPLE = 10
POWER_ITERATIONS = 4
SVD_CHOICES = ("auto", "exact", "randomized")


@dataclass
class Factors:
    """``b @ a`` approximates the matrix; ``error`` = ||M − b a||_F, ``norm`` = ||M||_F."""

    a: "torch.Tensor"  # [rank, n]
    b: "torch.Tensor"  # [m, rank]
    rank: int
    error: float
    norm: float
    method: str  # "exact" or "randomized"

    @property
    def relative_error(self) -> float:
        return self.error / self.norm if self.norm > 0 else 0.0


def check_target(rank: Optional[int], energy: Optional[float]) -> None:
    """Refuse a rank below 1 and an energy outside (0, 1]; both at once too."""
    if rank is not None and energy is not None:
        raise MergeStudioError("Give --rank or --energy, not both.")
    if rank is not None and (isinstance(rank, bool) or not isinstance(rank, int) or rank < 1):
        raise MergeStudioError(f"--rank must be a whole number of at least 1, got {rank!r}.")
    if energy is not None and not (isinstance(energy, (int, float)) and 0 < energy <= 1):
        raise MergeStudioError(
            f"--energy must lie in (0, 1] (the share of the squared singular values kept), got {energy!r}."
        )


def seeded_generator(name: str, key: str, seed: int) -> "torch.Generator":
    """The randomized SVD's stream for one module: the engine's derivation from (seed, name, input key)."""
    from core.merge.methods.base import TensorInputs

    return TensorInputs(name, [], None, {}, [], [key], seed).generator(0, "svd")


def energy_rank(squares: "torch.Tensor", energy: float) -> int:
    """Smallest k with sum(squares[:k]) >= energy * sum(squares) (squares sorted descending), at least 1."""
    import torch

    cumulative = torch.cumsum(squares.to(torch.float64), 0)
    if cumulative.numel() == 0 or float(cumulative[-1]) <= 0:
        return 1
    threshold = energy * float(cumulative[-1])
    k = int(torch.searchsorted(cumulative, torch.tensor([threshold], dtype=torch.float64)).item()) + 1
    return max(1, min(k, squares.numel()))


def _split(u: "torch.Tensor", s: "torch.Tensor", vh: "torch.Tensor", k: int) -> tuple["torch.Tensor", "torch.Tensor"]:
    root = s[:k].sqrt()
    return root[:, None] * vh[:k], u[:, :k] * root[None, :]


def _pick(svd: str, rank: Optional[int], small: int) -> str:
    if svd != "auto":
        return svd
    if small <= EXACT_MAX_DIM:
        return "exact"
    if rank is not None and rank + OVERSAMPLE > small // 4:
        return "exact"
    return "randomized"


def factorize(
    matrix: "torch.Tensor",
    *,
    rank: Optional[int] = None,
    energy: Optional[float] = None,
    svd: str = "auto",
    generator: Optional["torch.Generator"] = None,
) -> Factors:
    """Truncated SVD of a 2-D ``matrix`` at ``rank`` or ``energy`` (exactly one)."""
    import torch

    if (rank is None) == (energy is None):
        raise ValueError("give exactly one of rank and energy")
    m, n = matrix.shape
    small = min(m, n)
    if rank is not None and not 1 <= rank <= small:
        raise ValueError(f"rank {rank} is outside [1, {small}]")
    norm = float(torch.linalg.matrix_norm(matrix.to(torch.float64)))
    method = _pick(svd, rank, small)
    if method == "randomized":
        found = _randomized(matrix, rank, energy, generator, norm)
        if found is not None:
            return found
        method = "exact"
    u, s, vh = torch.linalg.svd(matrix, full_matrices=False)
    squares = s.to(torch.float64) ** 2
    k = rank if rank is not None else energy_rank(squares, energy)  # type: ignore[arg-type]
    a, b = _split(u, s, vh, k)
    error = float(squares[k:].sum().sqrt())
    return Factors(a.contiguous(), b.contiguous(), k, error, norm, "exact")


def _randomized(
    matrix: "torch.Tensor",
    rank: Optional[int],
    energy: Optional[float],
    generator: Optional["torch.Generator"],
    norm: float,
) -> Optional[Factors]:
    """Randomized SVD (see the module docstring); None when ``energy`` needs more than half the matrix."""
    import torch

    m, n = matrix.shape
    small = min(m, n)
    q = min(small, (rank or 32) + OVERSAMPLE)
    total = norm**2
    while True:
        gaussian = torch.randn(n, q, generator=generator, dtype=matrix.dtype).to(matrix.device)
        basis = torch.linalg.qr(matrix @ gaussian).Q
        for _ in range(POWER_ITERATIONS):
            basis = torch.linalg.qr(matrix.T @ basis).Q
            basis = torch.linalg.qr(matrix @ basis).Q
        u_small, s, vh = torch.linalg.svd(basis.T @ matrix, full_matrices=False)
        u = basis @ u_small
        if rank is not None:
            k = rank
            break
        squares = s.to(torch.float64) ** 2
        cumulative = torch.cumsum(squares, 0)
        reached = torch.nonzero(cumulative >= energy * total).reshape(-1)  # type: ignore[operator]
        if reached.numel():
            k = int(reached[0]) + 1
            break
        if q >= small // 2:
            return None
        q = min(small // 2, 2 * q)
    a, b = _split(u, s, vh, k)
    error = float(torch.linalg.matrix_norm((matrix - b @ a).to(torch.float64)))
    return Factors(a.contiguous(), b.contiguous(), k, error, norm, "randomized")


def factorize_product(
    b: "torch.Tensor", a: "torch.Tensor", *, rank: Optional[int] = None, energy: Optional[float] = None
) -> Factors:
    """Truncated SVD of ``b @ a`` ([m, r] @ [r, n]) without forming it: QR of both, SVD of the r×r core.

    The singular values are those of the product exactly, so the truncation
    is the Eckart–Young optimum at a cost of (m + n)·r².
    """
    import torch

    if (rank is None) == (energy is None):
        raise ValueError("give exactly one of rank and energy")
    qb, rb = torch.linalg.qr(b)
    qa, ra = torch.linalg.qr(a.T)
    uc, s, vch = torch.linalg.svd(rb @ ra.T, full_matrices=False)
    u, vh = qb @ uc, vch @ qa.T
    squares = s.to(torch.float64) ** 2
    small = min(b.shape[0], a.shape[1])
    if rank is not None and not 1 <= rank <= small:
        raise ValueError(f"rank {rank} is outside [1, {small}]")
    k = rank if rank is not None else energy_rank(squares, energy)  # type: ignore[arg-type]
    if k > s.numel():  # the product has rank < k: pad with zero directions
        pad = k - s.numel()
        s = torch.cat([s, s.new_zeros(pad)])
        u = torch.cat([u, u.new_zeros(u.shape[0], pad)], 1)
        vh = torch.cat([vh, vh.new_zeros(pad, vh.shape[1])], 0)
    new_a, new_b = _split(u, s, vh, k)
    norm = float(squares.sum().sqrt())
    error = float(squares[k:].sum().sqrt())
    return Factors(new_a.contiguous(), new_b.contiguous(), k, error, norm, "exact")
