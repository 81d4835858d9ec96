"""The chunked figures of core/inspect/chunked.py equal the same figures computed on whole tensors in the test."""

from __future__ import annotations

import math

import pytest
import torch

from core.inspect import chunked


def top_share(abs_delta: torch.Tensor, fraction: float = 0.1) -> float:
    """Share of the sum held by the ceil(fraction * n) largest entries, by a full sort (0 when all are zero)."""
    a = abs_delta.reshape(-1).sort(descending=True).values
    total = float(a.sum())
    k = math.ceil(fraction * a.numel())
    return 0.0 if a.numel() == 0 or total == 0.0 else float(a[:k].sum()) / total


def tensor_figures(ref: torch.Tensor, deltas: list[torch.Tensor]) -> dict:
    """Every figure on whole float64 tensors, with the conventions of core/inspect/weights.py's docstring."""
    ref_norm = float(ref.norm())
    flat = [d.reshape(-1) for d in deltas]
    norms = [float(d.norm()) for d in flat]
    rel = [0.0 if n == 0.0 else (n / ref_norm if ref_norm > 0.0 else math.nan) for n in norms]
    out = {"rel_l2": rel, "abs_l2": norms, "top10_share": [top_share(d.abs()) for d in flat],
           "cosine": None, "sign_conflict": None}
    m = len(flat)
    if m >= 2:
        out["cosine"] = [[0.0 if norms[i] == 0.0 or norms[j] == 0.0 else
                          (1.0 if i == j else float(flat[i] @ flat[j]) / (norms[i] * norms[j]))
                          for j in range(m)] for i in range(m)]
        signs = torch.stack([d.sign() for d in flat])  # [M, N]
        eligible = (signs != 0).sum(0) >= 2
        disagree = (signs > 0).any(0) & (signs < 0).any(0)
        n = int(eligible.sum())
        out["sign_conflict"] = int((eligible & disagree).sum()) / n if n else 0.0
    return out


@pytest.fixture
def small_chunks(monkeypatch):
    """Chunks, bins and the gathering limit far below the tensor sizes, so every path runs."""
    monkeypatch.setattr(chunked, "CHUNK", 997)
    monkeypatch.setattr(chunked, "BINS", 16)
    monkeypatch.setattr(chunked, "COLLECT", 50)


def _close(a, b):
    if a is None or b is None:
        assert a is b
    elif isinstance(a, list):
        assert len(a) == len(b)
        for x, y in zip(a, b):
            _close(x, y)
    elif isinstance(a, float) and math.isnan(a):
        assert math.isnan(b)
    else:
        assert a == pytest.approx(b, rel=1e-10, abs=1e-12)


@pytest.mark.parametrize("kind", ["gaussian", "heavy", "ties", "sparse", "zeros"])
def test_chunked_equals_whole_tensor(small_chunks, kind):
    g = torch.Generator().manual_seed(1)
    ref = torch.randn(37, 211, generator=g, dtype=torch.float64)
    if kind == "gaussian":
        deltas = [torch.randn(ref.shape, generator=g, dtype=torch.float64) * 0.01 for _ in range(3)]
    elif kind == "heavy":  # a few huge outliers: the k-th largest sits in a crowded bottom bin
        deltas = [torch.randn(ref.shape, generator=g, dtype=torch.float64) ** 5 for _ in range(2)]
    elif kind == "ties":  # many equal magnitudes straddle the k-th largest
        deltas = [torch.randint(-3, 4, ref.shape, generator=g).to(torch.float64) * 0.5 for _ in range(2)]
    elif kind == "sparse":
        deltas = [torch.randn(ref.shape, generator=g, dtype=torch.float64)
                  * (torch.rand(ref.shape, generator=g) < 0.03) for _ in range(2)]
    else:
        deltas = [torch.zeros_like(ref), torch.randn(ref.shape, generator=g, dtype=torch.float64)]
    models = [(ref + d).to(torch.float64) for d in deltas]
    expected = tensor_figures(ref, [m - ref for m in models])
    got = chunked.figures(ref, models, torch.float64)
    for key in expected:
        _close(got[key], expected[key])


def test_bf16_inputs_are_converted_per_chunk(small_chunks):
    g = torch.Generator().manual_seed(2)
    ref = torch.randn(64, 100, generator=g).to(torch.bfloat16)
    model = (ref.float() + 0.05 * torch.randn(64, 100, generator=g)).to(torch.bfloat16)
    expected = tensor_figures(ref.double(), [model.double() - ref.double()])
    got = chunked.figures(ref, [model], torch.float64)
    _close(got["rel_l2"], expected["rel_l2"])
    _close(got["top10_share"], expected["top10_share"])
    assert ref.dtype == torch.bfloat16  # the input is not converted in place


def test_top_share_of_exactly_k_with_ties(small_chunks):
    values = torch.tensor([5.0] * 30 + [1.0] * 970, dtype=torch.float64)  # k = 100: 30 fives, 70 ones
    share = chunked.top_share_chunked(lambda s, e: values[s:e], values.numel(), float(values.sum()),
                                      float(values.max()))
    assert share == pytest.approx((30 * 5 + 70 * 1) / (150 + 970))
