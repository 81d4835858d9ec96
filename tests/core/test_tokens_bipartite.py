"""Bipartite soft matching (core/tokens/bipartite.py) against independent references.

References are written out here: a pure-Python loop implementation of ToMe's matching
(Bolya et al. 2023, Sec. 3) on small inputs, the size-weighted mean, attention over
the explicitly duplicated sequence, and the schedule formula.
"""

from __future__ import annotations

import math
import subprocess
import sys

import pytest
import torch

from core.tokens.bipartite import (
    MODES,
    Merge,
    TokenMergeError,
    attention_bias_from_size,
    bipartite_soft_matching,
    max_r,
    merge_assignment,
    merge_source,
    merge_wavg,
    parse_r,
    source_from_assignment,
    threshold_soft_matching,
    unmerge_to_input,
)


def _randn(*shape, seed=0, dtype=torch.float64):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=dtype)


# --------------------------------------------------------------------------- reference


def _cos(u, v):
    dot = sum(a * b for a, b in zip(u, v))
    nu = math.sqrt(sum(a * a for a in u))
    nv = math.sqrt(sum(b * b for b in v))
    return dot / (nu * nv)


def reference_merge(x, metric, *, r=None, threshold=None, protected=(), b_sets=None, weights=None):
    """ToMe by loops, one sample at a time.

    Returns per sample: (merged rows as lists, sizes, removed positions, {dst: [members]}).
    A = positions not in B (B = odd positions unless ``b_sets`` gives each sample's
    set); each unprotected A token points at its most similar unprotected B token (first
    maximum); edges sorted by similarity, descending, ties by position; the best r (or
    those above ``threshold``) merge. Merged value = size-weighted mean of the members.
    Survivors keep their original order.
    """
    batch, tokens = len(x), len(x[0])
    results = []
    for b in range(batch):
        prot = set(protected[b] if protected and isinstance(protected[0], (set, list, tuple)) else protected)
        b_set = set(b_sets[b]) if b_sets is not None else {i for i in range(tokens) if i % 2 == 1}
        a_list = [i for i in range(tokens) if i not in b_set]
        b_list = sorted(b_set)
        edges = []
        for i in a_list:
            if i in prot:
                continue
            best, best_j = -math.inf, None
            for j in b_list:
                if j in prot:
                    continue
                s = _cos(metric[b][i], metric[b][j])
                if s > best:
                    best, best_j = s, j
            if best_j is not None:
                edges.append((best, i, best_j))
        edges.sort(key=lambda e: -e[0])  # Python's sort is stable: ties keep position order
        chosen = edges[:r] if r is not None else [e for e in edges if e[0] > threshold]
        groups = {t: [t] for t in range(tokens)}
        removed = set()
        for _, i, j in chosen:
            groups[j].append(i)
            removed.add(i)
        w = weights[b] if weights is not None else [1.0] * tokens
        rows, sizes = [], []
        for t in range(tokens):
            if t in removed:
                continue
            members = groups[t]
            total = sum(w[m] for m in members)
            rows.append([sum(w[m] * x[b][m][c] for m in members) / total for c in range(len(x[b][t]))])
            sizes.append(total)
        results.append((rows, sizes, removed, {t: g for t, g in groups.items() if len(g) > 1}))
    return results


# --------------------------------------------------------------------------- basics


def test_import_is_cheap():
    code = "import sys, core.tokens, core.tokens.bipartite; sys.exit('torch' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code]).returncode == 0


def test_r_zero_is_identity():
    x = _randn(2, 9, 4)
    m = bipartite_soft_matching(x, 0, protected=1)
    assert m.is_identity and m.n_out == 9
    assert torch.equal(m.merge(x), x)
    assert torch.equal(m.unmerge(m.merge(x)), x)
    merged, size = merge_wavg(m, x)
    assert torch.equal(merged, x) and torch.equal(size, torch.ones(2, 9, 1, dtype=x.dtype))
    assert torch.equal(m.assignment, torch.arange(9).expand(2, 9))
    assert m.counts.tolist() == [0, 0]


@pytest.mark.parametrize("tokens,r,protected", [(9, 1, 0), (9, 4, 1), (10, 5, 0), (197, 16, 1), (64, 31, 2)])
def test_merged_count_and_unmerge_length(tokens, r, protected):
    x = _randn(3, tokens, 5, seed=tokens)
    m = bipartite_soft_matching(x, r, protected=protected)
    y = m.merge(x)
    assert y.shape == (3, tokens - r, 5) and m.n_out == tokens - r
    assert m.counts.tolist() == [r] * 3
    assert m.unmerge(y).shape == x.shape
    # Extra trailing dimensions and 2-D per-token tensors go through the same merge.
    assert m.merge(x.reshape(3, tokens, 5, 1)).shape == (3, tokens - r, 5, 1)
    assert m.merge(x[..., 0]).shape == (3, tokens - r)


@pytest.mark.parametrize("protected,protect_last", [(0, False), (1, False), (1, True), (2, True)])
@pytest.mark.parametrize("mode", ["mean", "sum", "amax"])
def test_matches_brute_force_reference(protected, protect_last, mode):
    batch, tokens, channels = 2, 9, 4
    x = _randn(batch, tokens, channels, seed=1)
    metric = _randn(batch, tokens, channels, seed=2)
    prot = list(range(protected)) + ([tokens - 1] if protect_last else [])
    for r in range(max_r(tokens, protected=protected, protect_last=protect_last) + 1):
        m = bipartite_soft_matching(metric, r, protected=protected, protect_last=protect_last)
        ref = reference_merge(x.tolist(), metric.tolist(), r=r, protected=prot)
        got = m.merge(x, mode=mode)
        for b, (rows, _, removed, groups) in enumerate(ref):
            kept = [t for t in range(tokens) if t not in removed]
            for slot, t in enumerate(kept):
                members = x[b, groups.get(t, [t])]
                expected = {
                    "mean": members.mean(0),
                    "sum": members.sum(0),
                    "amax": members.amax(0),
                }[mode]
                torch.testing.assert_close(got[b, slot], expected, rtol=1e-12, atol=1e-12)
            if mode == "mean":
                torch.testing.assert_close(got[b], torch.tensor(rows, dtype=x.dtype), rtol=1e-12, atol=1e-12)
            # Each input token maps to the slot of its group's surviving token.
            for t in range(tokens):
                owner = t if t not in removed else next(d for d, g in groups.items() if t in g)
                assert m.assignment[b, t].item() == kept.index(owner)


def test_explicit_per_sample_partition_matches_reference():
    batch, tokens = 2, 9
    x = _randn(batch, tokens, 4, seed=3)
    b_sets = [[0, 3, 4, 8], [1, 2, 5, 7]]
    m = bipartite_soft_matching(x, 3, partition=torch.tensor(b_sets))
    ref = reference_merge(x.tolist(), x.tolist(), r=3, b_sets=b_sets)
    got = m.merge(x)
    for b, (rows, _, _, _) in enumerate(ref):
        torch.testing.assert_close(got[b], torch.tensor(rows, dtype=x.dtype), rtol=1e-12, atol=1e-12)
    # The same split given as a bool mask is the same matching.
    mask = torch.zeros(batch, tokens, dtype=torch.bool)
    mask[0, b_sets[0]] = True
    mask[1, b_sets[1]] = True
    assert torch.equal(bipartite_soft_matching(x, 3, partition=mask).merge(x), got)


def test_exact_duplicates_merge_first():
    x = _randn(2, 12, 6, seed=4)
    # A tokens 2, 6 and 10 copy B tokens 3, 5 and 9 (sample 0), 1, 7, 11 (sample 1).
    pairs = {0: [(2, 3), (6, 5), (10, 9)], 1: [(2, 1), (6, 7), (10, 11)]}
    for b, edges in pairs.items():
        for a, bb in edges:
            x[b, a] = x[b, bb]
    m = bipartite_soft_matching(x, 3, protected=1)
    for b, edges in pairs.items():
        removed = {a for a, _ in edges}
        for a, bb in edges:
            assert m.assignment[b, a] == m.assignment[b, bb]
        kept_positions = [t for t in range(12) if t not in removed]
        # Survivors are exactly the non-duplicates, in their original order.
        torch.testing.assert_close(m.merge(x)[b], x[b, kept_positions], rtol=0, atol=1e-15)
    torch.testing.assert_close(m.similarity, torch.ones(2, 3, dtype=x.dtype), rtol=0, atol=1e-12)


def test_order_preserved_and_protected_tokens_never_merge():
    x = _randn(2, 15, 4, seed=5)
    x[:, 0] = x[:, 1]  # CLS duplicates its neighbour: the best edge, were it not protected
    x[:, 14] = x[:, 13]  # likewise the last token
    x[1, 4] = x[1, 5]  # a per-sample protected token
    mask = torch.zeros(2, 15, dtype=torch.bool)
    mask[1, 4] = True
    for kwargs in ({"protected": 1, "protect_last": True}, {"protected": mask | (torch.arange(15) % 14 == 0)}):
        m = bipartite_soft_matching(x, max_r(15, protected=1, protect_last=True) - 1, **kwargs)
        merged, size = merge_wavg(m, x)
        assert torch.equal(merged[:, 0], x[:, 0]) and torch.equal(merged[:, -1], x[:, -1])
        assert size[:, 0, 0].tolist() == [1, 1] and size[:, -1, 0].tolist() == [1, 1]
        for t in (0, 14):  # neither merged away nor merged into
            assert (m.assignment[:, t].unsqueeze(1) == m.assignment).sum(1).tolist() == [1, 1]
        # Slots follow input order: each slot's surviving token (its B member, or its only
        # member) appears in increasing position.
        for b in range(2):
            survivors = []
            for slot in range(m.n_out):
                members = (m.assignment[b] == slot).nonzero()[:, 0].tolist()
                survivors += [t for t in members if t % 2 == 1] if len(members) > 1 else members
            assert survivors == sorted(survivors) and len(survivors) == m.n_out
    m = bipartite_soft_matching(x, 5, protected=mask)
    assert (m.assignment[1, 4] == m.assignment[1]).sum() == 1
    # A NaN in the metric ranks its edges last but never above a protected token.
    broken = x.clone()
    broken[:, 2] = float("nan")
    m = bipartite_soft_matching(broken, max_r(15, protected=1), protected=1)
    assert (m.assignment[:, 0].unsqueeze(1) == m.assignment).sum(1).tolist() == [1, 1]


# --------------------------------------------------------------------------- size and source


def test_size_weighted_mean_sizes_and_sources_over_layers():
    batch, tokens, channels = 2, 33, 8
    x0 = _randn(batch, tokens, channels, seed=6)
    x, size, source, assignment = x0, None, None, None
    for layer, r in enumerate([8, 6, 4]):
        metric = _randn(batch, x.shape[1], channels, seed=10 + layer)
        m = bipartite_soft_matching(metric, r, protected=1)
        source = merge_source(m, x, source)
        assignment = merge_assignment(m, assignment)
        x, size = merge_wavg(m, x, size)
    assert x.shape[1] == tokens - 18
    # Sizes count input tokens; source rows sum to the size; each input token has one owner.
    assert size.sum(1).flatten().tolist() == [tokens] * batch
    torch.testing.assert_close(source.sum(-1, keepdim=True), size, rtol=0, atol=0)
    assert torch.equal(source.sum(1), torch.ones(batch, tokens, dtype=source.dtype))
    assert torch.equal(source_from_assignment(assignment, x.shape[1], dtype=source.dtype), source)
    # The size-weighted mean of the sequence is the plain mean of the input.
    torch.testing.assert_close((size * x).sum(1) / size.sum(1), x0.mean(1), rtol=1e-12, atol=1e-12)
    # Back to input length: identical through the dense and the compact tracking, and
    # equal to the input wherever a token was never merged (size 1 at the end).
    back = unmerge_to_input(x, source)
    assert back.shape == x0.shape
    assert torch.equal(back, unmerge_to_input(x, assignment))
    untouched = (unmerge_to_input(size, assignment)[..., 0] == 1)
    assert untouched.sum() > 0
    assert torch.equal(back[untouched], x0[untouched])
    # Each merged token is the mean of the input tokens it covers (weights are sizes).
    expected = torch.einsum("bki,bic->bkc", source, x0) / size
    torch.testing.assert_close(x, expected, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_low_precision_dtypes(dtype):
    x = _randn(2, 20, 8, seed=14).to(dtype)
    x[:, 0] = 0  # an all-zero metric row has similarity 0, not NaN
    m = bipartite_soft_matching(x, 6)
    merged, size = merge_wavg(m, x)
    assert merged.dtype == dtype and size.dtype == dtype and merged.shape == (2, 14, 8)
    assert torch.isfinite(merged).all() and torch.isfinite(m.similarity).all()
    assert size.sum(1).flatten().tolist() == [20, 20]
    t = threshold_soft_matching(x, 0.0)
    assert torch.isfinite(merge_wavg(t, x)[0]).all()


def test_unmerge_copies_to_sources():
    x = _randn(2, 11, 3, seed=7)
    m = bipartite_soft_matching(x, 4)
    y = m.merge(x)
    back = m.unmerge(y)
    for b in range(2):
        for t in range(11):
            assert torch.equal(back[b, t], y[b, m.assignment[b, t]])
    # Tokens that took part in no merge come back unchanged.
    involved = torch.zeros(2, 11, dtype=torch.bool)
    for b in range(2):
        owners, counts = m.assignment[b].unique(return_counts=True)
        involved[b] = torch.isin(m.assignment[b], owners[counts > 1])
    assert torch.equal(back[~involved], x[~involved])


def test_proportional_attention_equals_attention_over_duplicates():
    torch.manual_seed(0)
    heads, dim, queries = 2, 8, 5
    unique = torch.randn(2, 10, 2 * heads * dim)  # features = keys and values, concatenated
    # Sample 0: A token 2 copies B token 3; A tokens 6 and 8 both copy B token 5 (size 3).
    # Sample 1: A tokens 2, 6 and 10 copy B tokens 3, 11 and 9.
    order = [[0, 1, 3, 3, 4, 5, 5, 7, 5, 9, 2, 6], [0, 1, 3, 3, 4, 5, 6, 7, 8, 9, 9, 6]]
    full = torch.stack([unique[b, order[b]] for b in range(2)])  # [2, 12, 2 * heads * dim]
    m = bipartite_soft_matching(full, 3, protected=1)
    merged, size = merge_wavg(m, full)
    assert sorted(size[0, :, 0].tolist())[-3:] == [1.0, 2.0, 3.0]
    assert sorted(size[1, :, 0].tolist())[-4:] == [1.0, 2.0, 2.0, 2.0]
    q = torch.randn(2, heads, queries, dim)

    def split(t):  # [B, N, 2 * heads * dim] -> keys, values, each [B, heads, N, dim]
        k, v = t.chunk(2, dim=-1)
        return tuple(u.reshape(t.shape[0], -1, heads, dim).transpose(1, 2) for u in (k, v))

    k_full, v_full = split(full)
    k_m, v_m = split(merged)
    bias = attention_bias_from_size(size)
    assert bias.shape == (2, 1, 1, merged.shape[1])
    reference = torch.softmax(q @ k_full.transpose(-1, -2) / math.sqrt(dim), -1) @ v_full
    proportional = torch.softmax(q @ k_m.transpose(-1, -2) / math.sqrt(dim) + bias, -1) @ v_m
    torch.testing.assert_close(proportional, reference, rtol=0, atol=1e-6)
    sdpa = torch.nn.functional.scaled_dot_product_attention(q, k_m, v_m, attn_mask=bias)
    torch.testing.assert_close(sdpa, reference, rtol=0, atol=1e-6)
    # Without the bias the merged attention is not the full one: the test has teeth.
    plain = torch.softmax(q @ k_m.transpose(-1, -2) / math.sqrt(dim), -1) @ v_m
    assert (plain - reference).abs().max() > 1e-3


# --------------------------------------------------------------------------- threshold mode


def test_threshold_extremes():
    x = _randn(2, 17, 6, seed=8)
    none = threshold_soft_matching(x, 1.0, protected=1)
    assert none.is_identity and none.counts.tolist() == [0, 0] and none.merge(x) is x
    everything = threshold_soft_matching(x, -1.0, protected=1)
    assert everything.counts.tolist() == [8, 8] and everything.n_out == 9  # 9 A tokens, CLS kept
    torch.testing.assert_close(
        everything.merge(x), bipartite_soft_matching(x, 8, protected=1).merge(x), rtol=0, atol=0
    )


def test_threshold_matches_reference_and_pads_per_sample():
    batch, tokens = 3, 21
    x = _randn(batch, tokens, 3, seed=9)
    x[1, 4] = x[1, 5]  # sample 1 gets one more confident edge
    threshold = 0.6
    m = threshold_soft_matching(x, threshold, protected=1)
    ref = reference_merge(x.tolist(), x.tolist(), threshold=threshold, protected=[0])
    counts = [len(removed) for _, _, removed, _ in ref]
    assert m.counts.tolist() == counts and len(set(counts)) > 1, counts
    assert m.n_out == tokens - min(counts)
    merged, size = merge_wavg(m, x)
    for b, (rows, sizes, _, _) in enumerate(ref):
        n_real = tokens - counts[b]
        assert m.valid[b].tolist() == [True] * n_real + [False] * (m.n_out - n_real)
        torch.testing.assert_close(merged[b, :n_real], torch.tensor(rows, dtype=x.dtype), rtol=1e-12, atol=1e-12)
        assert size[b, :n_real, 0].tolist() == sizes
        assert torch.all(merged[b, n_real:] == 0) and torch.all(size[b, n_real:] == 0)
        # A sample's result does not depend on its batch-mates.
        alone, alone_size = merge_wavg(threshold_soft_matching(x[b : b + 1], threshold, protected=1), x[b : b + 1])
        torch.testing.assert_close(alone[0], merged[b, :n_real], rtol=0, atol=0)
        assert torch.equal(alone_size[0], size[b, :n_real])
        # Edge similarities are sorted, above the threshold, NaN past the count.
        sims = m.similarity[b]
        assert torch.all(sims[: counts[b]] > threshold) and torch.isnan(sims[counts[b] :]).all()
    bias = attention_bias_from_size(size)
    keys = m.valid[:, None, None, :]
    assert torch.isneginf(bias[~keys]).all() and torch.isfinite(bias[keys]).all()
    # Chained: pads are protected; size > 0 stays the validity mask; means are kept.
    m2 = bipartite_soft_matching(merged, 2, protected=(size[..., 0] == 0) | (torch.arange(m.n_out) == 0))
    merged2, size2 = merge_wavg(m2, merged, size)
    assert size2.sum(1).flatten().tolist() == [tokens] * batch
    assert ((size2[..., 0] > 0).sum(1) == torch.tensor(counts).neg() + tokens - 2).all()
    assert torch.isfinite(merged2).all() and torch.all(merged2[size2[..., 0] == 0] == 0)
    torch.testing.assert_close((size2 * merged2).sum(1) / size2.sum(1), x.mean(1), rtol=1e-12, atol=1e-12)
    source = merge_source(m2, merged, merge_source(m, x))
    torch.testing.assert_close(source.sum(-1, keepdim=True), size2, rtol=0, atol=0)


def test_threshold_gradients_stay_finite_with_pads():
    x = _randn(2, 13, 4, seed=11).requires_grad_()
    x.data[0, 2] = x.data[0, 3]
    m = threshold_soft_matching(x, 0.7)
    assert m.valid is not None
    merged, size = merge_wavg(m, x)
    merged.sum().backward()
    assert torch.isfinite(x.grad).all()


# --------------------------------------------------------------------------- errors


@pytest.mark.parametrize("r", [5, 9, 100])
def test_r_above_mergeable_is_an_error(r):
    x = _randn(2, 9, 4)
    with pytest.raises(ValueError, match=f"r={r} is more than the 4 tokens"):
        bipartite_soft_matching(x, r, protected=1)


@pytest.mark.parametrize("r", [-1, True, 2.5, "3"])
def test_r_must_be_a_count(r):
    with pytest.raises(TokenMergeError, match="r="):
        bipartite_soft_matching(_randn(1, 9, 4), r)


@pytest.mark.parametrize("threshold", [1.5, -1.01, float("nan"), "0.5", True])
def test_threshold_out_of_range_is_an_error(threshold):
    with pytest.raises(ValueError, match="threshold="):
        threshold_soft_matching(_randn(1, 9, 4), threshold)


def test_other_bad_options():
    x = _randn(1, 9, 4)
    with pytest.raises(TokenMergeError, match="mode='median'"):
        bipartite_soft_matching(x, 2).merge(x, mode="median")
    with pytest.raises(TokenMergeError, match="explicit torch.Generator"):
        bipartite_soft_matching(x, 2, partition="random")
    with pytest.raises(TokenMergeError, match="partition='checker'"):
        bipartite_soft_matching(x, 2, partition="checker")
    with pytest.raises(TokenMergeError, match="protected=10"):
        bipartite_soft_matching(x, 2, protected=10)
    with pytest.raises(ValueError, match=r"\[1, 9, \.\.\.\]"):
        bipartite_soft_matching(x, 2).merge(x[:, :8])
    assert set(MODES) == {"mean", "sum", "amax", "amin", "prod"}
    assert isinstance(bipartite_soft_matching(x, 1), Merge)


# --------------------------------------------------------------------------- legal ranges, schedules


def test_max_r_is_the_exact_bound():
    for tokens in range(1, 14):
        for protected in range(0, 3):
            for last in (False, True):
                if protected > tokens:
                    continue
                prot = set(range(protected)) | ({tokens - 1} if last else set())
                free_a = sum(1 for i in range(0, tokens, 2) if i not in prot)
                free_b = sum(1 for i in range(1, tokens, 2) if i not in prot)
                expected = free_a if free_b else 0
                assert max_r(tokens, protected=protected, protect_last=last) == expected
                x = _randn(1, tokens, 3, seed=tokens)
                if expected:
                    m = bipartite_soft_matching(x, expected, protected=protected, protect_last=last)
                    assert m.n_out == tokens - expected
                with pytest.raises(TokenMergeError):
                    bipartite_soft_matching(x, expected + 1, protected=protected, protect_last=last)
    # The random partition's bound holds whatever the draw.
    for seed in range(20):
        gen = torch.Generator().manual_seed(seed)
        bipartite_soft_matching(_randn(1, 11, 3), max_r(11, protected=2, partition="random"), protected=2,
                                partition="random", generator=gen)


def test_parse_r_forms():
    assert parse_r(8, 12, 197, protected=1) == [8] * 12
    assert parse_r([0, 1, 2], 3, 10) == [0, 1, 2]
    layers, r = 12, 8
    for inflection in (-1.0, -0.5, 0.0, 0.5, 1.0):
        first, last = r * (1 - inflection), r * (1 + inflection)
        expected = [math.floor(first + (last - first) * i / (layers - 1) + 1e-9) for i in range(layers)]
        got = parse_r((r, inflection), layers, 197, protected=1)
        assert got == expected and sum(got) <= r * layers
    assert parse_r((8, -1), 12, 197)[0] == 16 and parse_r((8, -1), 12, 197)[-1] == 0  # decreasing
    assert parse_r((8, 1), 12, 197)[0] == 0 and parse_r((8, 1), 12, 197)[-1] == 16  # increasing
    assert parse_r((5, 0.3), 1, 20) == [5]
    assert parse_r(torch.tensor([1, 2]), 2, 10) == [1, 2] and parse_r(torch.tensor(3), 2, 10) == [3, 3]
    assert parse_r(range(3), 3, 10) == [0, 1, 2]


def test_parse_r_errors_name_the_value():
    with pytest.raises(TokenMergeError, match="list of 3 values but the model has 12 layers"):
        parse_r([1, 2, 3], 12, 197)
    with pytest.raises(TokenMergeError, match="inflection=1.5"):
        parse_r((8, 1.5), 12, 197)
    with pytest.raises(TokenMergeError, match=r"r\[1\]=-2"):
        parse_r([1, -2], 2, 197)
    # 197 tokens, CLS protected, r=30: 197, 167, 137, 107, 77, then 47 tokens of which 23 may merge.
    expected = "r=30 at layer 5 .* 23 tokens that can merge there: 47 tokens enter layer 5"
    with pytest.raises(TokenMergeError, match=expected):
        parse_r(30, 12, 197, protected=1)
    with pytest.raises(TokenMergeError, match="layer 0"):
        parse_r([99, 0], 2, 197, protected=1)
    assert parse_r([98, 49, 24], 3, 197, protected=1) == [98, 49, 24]  # each layer at its limit
    with pytest.raises(TokenMergeError):
        parse_r(True, 12, 197)


def test_schedule_runs_through_the_matching():
    """Token counts per layer follow parse_r; the last layer keeps CLS plus one token."""
    tokens = 40
    schedule = parse_r([19, 10, 5, 2, 1], 5, tokens, protected=1)
    x = _randn(1, tokens, 4, seed=12)
    counts = []
    for r in schedule:
        counts.append(x.shape[1])
        x, _ = merge_wavg(bipartite_soft_matching(x, r, protected=1), x)
    assert counts == [40, 21, 11, 6, 4] and x.shape[1] == 3  # CLS + 2


# --------------------------------------------------------------------------- randomness


def test_random_partition_uses_only_its_generator():
    x = _randn(2, 30, 4, seed=13)
    torch.manual_seed(1234)
    state = torch.get_rng_state()
    first = bipartite_soft_matching(x, 7, protected=1, partition="random", generator=torch.Generator().manual_seed(5))
    assert torch.equal(torch.get_rng_state(), state)
    again = bipartite_soft_matching(x, 7, protected=1, partition="random", generator=torch.Generator().manual_seed(5))
    assert torch.equal(first.assignment, again.assignment)
    others = [
        bipartite_soft_matching(x, 7, protected=1, partition="random", generator=torch.Generator().manual_seed(s))
        for s in range(6, 10)
    ]
    assert any(not torch.equal(first.assignment, o.assignment) for o in others)
    assert torch.equal(torch.get_rng_state(), state)
    # Valid merges whatever the split: CLS kept, sizes add up.
    merged, size = merge_wavg(first, x)
    assert torch.equal(merged[:, 0], x[:, 0]) and size.sum(1).flatten().tolist() == [30, 30]
    # Deterministic default: the same input always gives the same matching.
    assert torch.equal(bipartite_soft_matching(x, 7).assignment, bipartite_soft_matching(x, 7).assignment)
