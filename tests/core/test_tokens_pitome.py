"""PiToMe (core/tokens/pitome.py) against independent references.

References written out here, from the paper (Tran et al., NeurIPS 2024,
https://arxiv.org/abs/2405.16148): the energy score by a double loop in plain Python,
the whole ordered energy-based matching by loops, an equivalence with ToMe's
bipartite matching when the energy ranking is replaced by a uniform score, and
constructed inputs (a tight cluster plus orthogonal outliers) whose outcome is known.
"""

from __future__ import annotations

import math
import subprocess
import sys

import pytest
import torch

from core.tokens.bipartite import (
    Merge,
    TokenMergeError,
    bipartite_soft_matching,
    merge_source,
    merge_wavg,
)
from core.tokens.pitome import (
    energy_score,
    layer_margin,
    margin_schedule,
    max_r,
    pitome_soft_matching,
)


def _randn(*shape, seed=0, dtype=torch.float64):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=dtype)


# --------------------------------------------------------------------------- references


def _cos(u, v):
    dot = sum(a * b for a, b in zip(u, v))
    return dot / (math.sqrt(sum(a * a for a in u)) * math.sqrt(sum(b * b for b in v)))


def _f(x, margin, alpha):
    return x if x >= margin else alpha * (math.exp(x - margin) - 1.0)


def reference_energy(metric, margin, alpha, protected=()):
    """E_i = (1/N) sum_{j != i} f_m(cos(x_i, x_j)) over the N unprotected tokens; -inf if protected."""
    out = []
    for b, sample in enumerate(metric):
        prot = set(protected[b]) if protected and isinstance(protected[0], (list, set, tuple)) else set(protected)
        nodes = [i for i in range(len(sample)) if i not in prot]
        row = []
        for i in range(len(sample)):
            if i in prot:
                row.append(-math.inf)
                continue
            total = 0.0
            for j in nodes:
                if j != i:
                    total += _f(_cos(sample[i], sample[j]), margin, alpha)
            row.append(total / len(nodes))
        out.append(row)
    return out


def reference_pitome(metric, r, margin, alpha, protected=()):
    """The matching by loops: returns per sample {dst: [members]} and the removed positions."""
    energies = reference_energy(metric, margin, alpha, protected)
    results = []
    for b, sample in enumerate(metric):
        energy = energies[b]
        free = [i for i in range(len(sample)) if energy[i] != -math.inf]
        ranking = sorted(free, key=lambda i: (-energy[i], i))  # highest first, ties by position
        candidates = ranking[: 2 * r]
        a_set, b_set = candidates[0::2], candidates[1::2]
        groups = {t: [t] for t in range(len(sample))}
        removed = set()
        for i in a_set:
            best, best_j = -math.inf, None
            for j in b_set:  # first maximum in energy order
                s = _cos(sample[i], sample[j])
                if s > best:
                    best, best_j = s, j
            groups[best_j].append(i)
            removed.add(i)
        results.append((groups, removed))
    return results


def clustered(batch=2, tokens=16, outliers=(2, 8, 14), channels=8, seed=0, dtype=torch.float64):
    """A tight cluster around e0 plus outliers along e5, e6, e7 (orthogonal to it and each other)."""
    g = torch.Generator().manual_seed(seed)
    metric = torch.zeros(batch, tokens, channels, dtype=torch.float64)
    metric[..., 0] = 1.0
    metric[..., 1:5] = 0.05 * torch.randn(batch, tokens, 4, generator=g, dtype=torch.float64)
    for k, position in enumerate(outliers):
        metric[:, position] = 0.0
        metric[:, position, 5 + k] = 1.0
    return metric.to(dtype)


def _groups(merge: Merge, b: int) -> dict[int, list[int]]:
    """Output slot -> the input positions it stands for, from merge.assignment."""
    groups: dict[int, list[int]] = {}
    for position, slot in enumerate(merge.assignment[b].tolist()):
        groups.setdefault(slot, []).append(position)
    return groups


# --------------------------------------------------------------------------- basics


def test_import_is_cheap():
    code = "import sys, core.tokens.pitome; sys.exit('torch' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code]).returncode == 0


def test_r_zero_is_identity():
    x = _randn(2, 9, 4)
    m = pitome_soft_matching(x, 0, protected=1)
    assert isinstance(m, Merge) and m.is_identity and m.n_out == 9
    assert torch.equal(m.merge(x), x) and torch.equal(m.unmerge(x), x)
    merged, size = merge_wavg(m, x)
    assert torch.equal(merged, x) and torch.equal(size, torch.ones(2, 9, 1, dtype=x.dtype))


@pytest.mark.parametrize(
    "tokens,r,protected", [(9, 1, 0), (9, 4, 0), (10, 5, 0), (197, 16, 1), (197, 98, 1), (64, 31, 2)]
)
def test_output_length_and_unmerge(tokens, r, protected):
    x = _randn(3, tokens, 5, seed=tokens)
    m = pitome_soft_matching(x, r, protected=protected)
    y = m.merge(x)
    assert y.shape == (3, tokens - r, 5) and m.n_out == tokens - r
    assert m.counts.tolist() == [r] * 3 and m.similarity.shape == (3, r)
    assert m.unmerge(y).shape == x.shape
    # similarity is sorted most similar first, as bipartite.py reports it.
    assert torch.all(m.similarity[:, :-1] >= m.similarity[:, 1:])


def test_max_r():
    assert max_r(9) == 4  # bipartite allows 5 here: PiToMe needs 2r candidates
    assert max_r(10) == 5
    assert max_r(197, protected=1) == 98
    assert max_r(10, protected=1, protect_last=True) == 4
    assert max_r(1) == 0 and max_r(0) == 0
    with pytest.raises(ValueError, match="protected=4"):
        max_r(3, protected=4)


# --------------------------------------------------------------------------- energy


# (margin = 1 exactly would make the duplicate's cos = 1 +- rounding a coin toss.)
@pytest.mark.parametrize("margin,alpha", [(0.9, 1.0), (0.3, 2.5), (-1.0, 1.0), (0.99, 0.0), (0.0, 0.5)])
def test_energy_matches_double_loop(margin, alpha):
    metric = _randn(2, 7, 3, seed=3)
    metric[1, 4] = metric[1, 2] * 3.0  # an exact direction duplicate: cos = 1
    got = energy_score(metric, margin=margin, alpha=alpha)
    ref = torch.tensor(reference_energy(metric.tolist(), margin, alpha), dtype=torch.float32)
    assert got.dtype == torch.float32 and got.shape == (2, 7)
    torch.testing.assert_close(got, ref, atol=1e-6, rtol=1e-6)


def test_energy_leaves_protected_tokens_out_of_the_graph():
    metric = _randn(2, 8, 4, seed=4)
    mask = torch.zeros(2, 8, dtype=torch.bool)
    mask[0, [0, 5]] = True
    mask[1, [0, 7]] = True
    got = energy_score(metric, protected=mask, margin=0.2)
    ref = torch.tensor(reference_energy(metric.tolist(), 0.2, 1.0, [[0, 5], [0, 7]]), dtype=torch.float32)
    torch.testing.assert_close(got, ref, atol=1e-6, rtol=1e-6)
    assert torch.isinf(got[0, 5]) and got[0, 5] < 0


def test_isolated_tokens_have_low_energy():
    metric = clustered()
    energy = energy_score(metric)
    outliers = torch.tensor([2, 8, 14])
    cluster = torch.ones(16, dtype=torch.bool)
    cluster[outliers] = False
    assert energy[:, outliers].max() < energy[:, cluster].min()


# --------------------------------------------------------------------------- matching


@pytest.mark.parametrize("protected", [0, 1, 2])
@pytest.mark.parametrize("margin,alpha", [(0.9, 1.0), (0.1, 1.0), (0.45, 0.0)])
def test_matches_loop_reference(protected, margin, alpha):
    batch, tokens = 2, 11
    x = _randn(batch, tokens, 3, seed=5)
    metric = _randn(batch, tokens, 4, seed=6)
    ref_prot = list(range(protected))
    for r in range(max_r(tokens, protected=protected) + 1):
        m = pitome_soft_matching(metric, r, protected=protected, margin=margin, alpha=alpha)
        got = m.merge(x, mode="mean")
        for b, (groups, removed) in enumerate(reference_pitome(metric.tolist(), r, margin, alpha, ref_prot)):
            kept = [t for t in range(tokens) if t not in removed]  # survivors in input order
            assert len(kept) == got.shape[1]
            for slot, t in enumerate(kept):
                torch.testing.assert_close(got[b, slot], x[b, groups[t]].mean(0))
                assert sorted(_groups(m, b)[slot]) == sorted(groups[t])


def test_isolated_tokens_never_merge_while_cluster_members_do():
    metric = clustered()
    outliers = {2, 8, 14}
    for r in range(1, max_r(16 - len(outliers)) + 1):  # up to 6: all but one cluster token are candidates
        m = pitome_soft_matching(metric, r)
        for b in range(2):
            groups = _groups(m, b)
            merged = {p for members in groups.values() if len(members) > 1 for p in members}
            assert not merged & outliers
            # r cluster tokens merged away, into at least one cluster partner each.
            assert len(merged) >= r + 1 and len(groups) == 16 - r
    # The contrast with ToMe at the same r: its alternate split has the outliers
    # (even positions) in A, and r = 6 forces it to merge at least one of them.
    tome = bipartite_soft_matching(metric, 6)
    merged = {p for members in _groups(tome, 0).values() if len(members) > 1 for p in members}
    assert merged & outliers


@pytest.mark.parametrize("kind", ["leading", "mask"])
def test_protected_tokens_never_merge(kind):
    # Every token is a near-duplicate of the others, so protected ones would be prime
    # candidates by energy.
    metric = clustered(tokens=13, outliers=())
    x = _randn(2, 13, 3, seed=7)
    if kind == "leading":
        kwargs, prot = {"protected": 2, "protect_last": True}, [[0, 1, 12], [0, 1, 12]]
    else:
        mask = torch.zeros(2, 13, dtype=torch.bool)
        mask[0, [0, 4, 9]] = True
        mask[1, [0, 3]] = True
        kwargs, prot = {"protected": mask}, [[0, 4, 9], [0, 3]]
    r = 5  # (13 - 3) // 2 for the sample with the most protected tokens
    m = pitome_soft_matching(metric, r, **kwargs)
    y = m.merge(x)
    for b in range(2):
        groups = _groups(m, b)
        for p in prot[b]:
            slot = int(m.assignment[b, p])
            assert groups[slot] == [p]
            assert torch.equal(y[b, slot], x[b, p])
    assert int(m.assignment[0, 0]) == 0  # a protected CLS stays at index 0
    with pytest.raises(ValueError, match="r=6"):
        pitome_soft_matching(metric, 6, **kwargs)


def test_uniform_energy_is_bipartite_matching_on_all_tokens():
    """Uniform energy, N even, r = N/2: candidates = all, split by position = ToMe's alternate split."""
    metric = _randn(2, 12, 5, seed=8)
    x = _randn(2, 12, 3, seed=9)
    uniform = torch.zeros(2, 12)
    p = pitome_soft_matching(metric, 6, energy=uniform)
    t = bipartite_soft_matching(metric, 6)
    assert torch.equal(p.assignment, t.assignment)
    assert torch.equal(p.merge(x), t.merge(x))
    torch.testing.assert_close(p.similarity, t.similarity)


def test_uniform_energy_is_bipartite_matching_over_the_candidates():
    """Uniform energy, 2r < N: the first 2r unprotected tokens are the candidates, alternately A/B.

    Equals ToMe with B = the odd-ranked candidates and every non-candidate protected.
    """
    tokens, r = 11, 3
    metric = _randn(2, tokens, 5, seed=10)
    x = _randn(2, tokens, 3, seed=11)
    p = pitome_soft_matching(metric, r, protected=1, energy=torch.ones(tokens))
    candidates = list(range(1, 1 + 2 * r))  # position 0 is protected
    non_candidate = torch.ones(tokens, dtype=torch.bool)
    non_candidate[candidates] = False
    b_set = torch.tensor(candidates[1::2])
    t = bipartite_soft_matching(metric, r, protected=non_candidate, partition=b_set)
    assert torch.equal(p.assignment, t.assignment)
    assert torch.equal(p.merge(x), t.merge(x))


def test_energy_override_ranks_candidates():
    metric = _randn(1, 8, 4, seed=12)
    energy = torch.tensor([[0.0, 5.0, 0.0, 4.0, 0.0, 0.0, 0.0, 0.0]])
    m = pitome_soft_matching(metric, 1, energy=energy)
    # Only tokens 1 (A, highest) and 3 (B) are candidates: 1 merges into 3.
    assert _groups(m, 0)[int(m.assignment[0, 3])] == [1, 3]
    # A -inf (or NaN) score ranks last among unprotected tokens but never lets a
    # protected token (position 0 here) become a candidate.
    low = torch.full((1, 8), -math.inf)
    low[0, 6] = math.nan
    m = pitome_soft_matching(metric, 3, protected=1, energy=low)
    assert _groups(m, 0)[0] == [0] and m.n_out == 5
    with pytest.raises(ValueError, match="energy must be"):
        pitome_soft_matching(metric, 1, energy=torch.zeros(2, 8))


def test_batch_samples_are_independent():
    metric = _randn(3, 15, 6, seed=13)
    x = _randn(3, 15, 2, seed=14)
    together = pitome_soft_matching(metric, 5, protected=1).merge(x)
    for b in range(3):
        alone = pitome_soft_matching(metric[b : b + 1], 5, protected=1).merge(x[b : b + 1])
        assert torch.equal(together[b : b + 1], alone)


def test_size_weighted_mean_and_sources_over_layers():
    metric = _randn(2, 17, 6, seed=15)
    x = metric.clone()
    size = source = None
    total = x.sum(1)
    for layer, r in enumerate([4, 4, 3]):
        m = pitome_soft_matching(metric, r, protected=1, margin=layer_margin(layer, 3))
        source = merge_source(m, x, source)
        metric = m.merge(metric)
        x, size = merge_wavg(m, x, size)
        torch.testing.assert_close((x * size).sum(1), total)
        assert torch.equal(size.sum(1), torch.full((2, 1), 17.0, dtype=x.dtype))
    assert x.shape == (2, 6, 6)
    assert torch.equal(source.sum(1), torch.ones(2, 17, dtype=x.dtype))  # each input token covered once
    assert torch.equal(source.sum(2, keepdim=True), size)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_low_precision_dtypes(dtype):
    metric = clustered(dtype=dtype)
    m = pitome_soft_matching(metric, 6)
    assert m.similarity.dtype == dtype
    for b in range(2):
        merged = {p for g in _groups(m, b).values() if len(g) > 1 for p in g}
        assert not merged & {2, 8, 14}
    y, size = merge_wavg(m, metric)
    assert y.dtype == dtype and y.shape == (2, 10, 8) and torch.isfinite(y).all()
    assert energy_score(metric).dtype == torch.float32


def test_non_finite_token_is_kept_and_does_not_poison_the_rest():
    metric = clustered(outliers=())
    metric[:, 5] = math.nan
    energy = energy_score(metric)
    assert torch.isnan(energy[:, 5]).all() and torch.isfinite(energy[:, torch.arange(16) != 5]).all()
    m = pitome_soft_matching(metric, 7)
    for b in range(2):
        assert _groups(m, b)[int(m.assignment[b, 5])] == [5]
    assert torch.isfinite(m.similarity).all()


def test_gradients_are_not_tracked_through_the_matching():
    metric = _randn(1, 10, 4, seed=16).requires_grad_()
    m = pitome_soft_matching(metric, 3)
    y, _ = merge_wavg(m, metric)
    y.sum().backward()  # gradients flow through the merge, not the matching
    assert metric.grad is not None and not m.similarity.requires_grad


# --------------------------------------------------------------------------- options and errors


def test_margin_schedule():
    schedule = margin_schedule(12)
    assert schedule[0] == 0.9 and len(schedule) == 12
    assert all(a > b for a, b in zip(schedule, schedule[1:]))
    assert math.isclose(schedule[-1], 0.9 / 12)
    assert math.isclose(layer_margin(6, 12), 0.45)
    with pytest.raises(ValueError, match="layer=12"):
        layer_margin(12, 12)


@pytest.mark.parametrize("tokens,protected,r,limit", [(9, 0, 5, 4), (197, 1, 99, 98), (6, 0, 100, 3)])
def test_r_above_limit_is_an_error_naming_r_and_the_limit(tokens, protected, r, limit):
    metric = _randn(1, tokens, 4)
    with pytest.raises(ValueError, match=rf"r={r}\b.*\b{limit}\b"):
        pitome_soft_matching(metric, r, protected=protected)
    pitome_soft_matching(metric, limit, protected=protected)  # the limit itself is legal


@pytest.mark.parametrize("r", [-1, 1.5, True, "2"])
def test_r_must_be_a_count(r):
    with pytest.raises(TokenMergeError, match="r="):
        pitome_soft_matching(_randn(1, 8, 4), r)


@pytest.mark.parametrize("margin", [1.01, -1.5, math.nan, True, "0.5", None])
def test_margin_out_of_range_is_an_error(margin):
    with pytest.raises(ValueError, match="margin="):
        pitome_soft_matching(_randn(1, 8, 4), 2, margin=margin)
    with pytest.raises(ValueError, match="margin="):
        energy_score(_randn(1, 8, 4), margin=margin)


@pytest.mark.parametrize("alpha", [-0.1, math.inf, math.nan, False, "1"])
def test_alpha_out_of_range_is_an_error(alpha):
    with pytest.raises(ValueError, match="alpha="):
        pitome_soft_matching(_randn(1, 8, 4), 2, alpha=alpha)
    # r = 0 still validates: a bad option is an error whatever r is.
    with pytest.raises(ValueError, match="alpha="):
        pitome_soft_matching(_randn(1, 8, 4), 0, alpha=alpha)


def test_metric_shape_is_checked():
    with pytest.raises(ValueError, match="metric must be"):
        pitome_soft_matching(torch.zeros(8, 4), 1)
    with pytest.raises(ValueError, match="floating-point"):
        pitome_soft_matching(torch.zeros(1, 8, 4, dtype=torch.long), 1)
