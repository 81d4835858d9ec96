"""The chunked figures of core/inspect/chunked.py equal the whole-tensor ones (core.inspect.weights.tensor_figures)."""

from __future__ import annotations

import math

import pytest
import torch

from core.inspect import chunked
from core.inspect import weights as wd


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
    expected = wd.tensor_figures(ref, [m - ref for m in models])
    got = chunked.figures(ref, models, torch.float64)
    for key in expected:
        _close(got[key], expected[key])


def test_bf16_inputs_are_converted_per_chunk(small_chunks):
    g = torch.Generator().manual_seed(2)
    ref = torch.randn(64, 100, generator=g).to(torch.bfloat16)
    model = (ref.float() + 0.05 * torch.randn(64, 100, generator=g)).to(torch.bfloat16)
    expected = wd.tensor_figures(ref.double(), [model.double() - ref.double()])
    got = chunked.figures(ref, [model], torch.float64)
    _close(got["rel_l2"], expected["rel_l2"])
    _close(got["top10_share"], expected["top10_share"])
    assert ref.dtype == torch.bfloat16  # the input is not converted in place


def test_top_share_of_exactly_k_with_ties(small_chunks):
    values = torch.tensor([5.0] * 30 + [1.0] * 970, dtype=torch.float64)  # k = 100: 30 fives, 70 ones
    share = chunked.top_share_chunked(lambda s, e: values[s:e], values.numel(), float(values.sum()),
                                      float(values.max()))
    assert share == pytest.approx((30 * 5 + 70 * 1) / (150 + 970))
